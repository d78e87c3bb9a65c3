//! What the serving controllers report on the Service: a certificate issued (metric,
//! log, Event), success (`serving-cert-signed-by`) and failure (error annotations with
//! the consecutive count, a Warning Event, the retry).

use k8s_openapi::api::core::v1::Service;
use kube::api::Patch;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::decision::IssueReason;
use super::request::failures;
use super::written::Marked;
use super::{Error, MAX_FAILURES, PATCH_SERVICE, READ_SERVICE, secret_ref};
use crate::controllers::{
    Context, EventType, LOOK_AGAIN, is_conflict, is_not_found, patch_params, retry_delay, shown_obj,
};
use crate::metrics::ReasonLabels;
use crate::names::{self as ann, Family};
use crate::pki::{CertificateAuthority, IssuedLeaf, format_expiry};
use crate::signer::Signer;

/// Records a certificate just written: the metric, a log line and a Normal Event on
/// the Service (`ServingCertificateIssued` for a new Secret, else
/// `ServingCertificateRefreshed`), which waits while urgent key work waits.
pub async fn announce_issued(
    ctx: &Context,
    svc: &Service,
    name: &str,
    reason: &IssueReason,
    leaf: &IssuedLeaf,
    signer: &CertificateAuthority,
) {
    ctx.metrics.certificates_issued.get_or_create(&ReasonLabels { reason: reason.category() }).inc();
    let (verb, event_reason) = match reason {
        IssueReason::Absent => ("created", "ServingCertificateIssued"),
        _ => ("re-issued", "ServingCertificateRefreshed"),
    };
    let namespace = svc.namespace().unwrap_or_default();
    tracing::info!(object = %secret_ref(&namespace, name), %reason, "serving certificate {verb}");
    let note = format!(
        "Secret {name} {verb} because {reason}: certificate valid until {}, signed by {}",
        format_expiry(leaf.not_after),
        signer.subject_cn()
    );
    ctx.event_after_urgent_work(svc.object_ref(&()), event_reason, note).await;
}

/// Success: `serving-cert-signed-by` = the CA's CN and no error annotations. Written
/// only when something differs — in the cached Service and, because the cache can lag
/// a moment behind our own previous write, in a fresh (consistent) read. Neither when
/// `marked` says the cached Service is the very version we marked a moment ago; nor
/// read again when this pass has `issued` a certificate: the Service then differs
/// unless a pass just before marked it already, and marking it again changes nothing.
pub(super) async fn mark_signed(
    ctx: &Context,
    svc: &Service,
    signer: &Signer,
    issued: bool,
    marked: &Marked,
) -> Result<(), Error> {
    let ca_cn = signer.ca.subject_cn();
    let families = [ann::BETA, ann::ALPHA];
    let up_to_date = |svc: &Service| {
        let annotations = svc.annotations();
        families.iter().all(|f: &Family| {
            annotations.get(f.signed_by).map(String::as_str) == Some(ca_cn)
                && !annotations.contains_key(f.generation_error)
                && !annotations.contains_key(f.generation_error_num)
        })
    };
    let (uid, version) = (svc.uid().unwrap_or_default(), svc.resource_version().unwrap_or_default());
    if up_to_date(svc) || marked.lagging(&uid, &version, ca_cn) {
        return Ok(());
    }
    if !issued && !needs_mark(ctx, svc, up_to_date).await? {
        return Ok(());
    }
    let mut patch = serde_json::Map::new();
    for f in families {
        patch.insert(f.signed_by.into(), json!(ca_cn));
        patch.insert(f.generation_error.into(), json!(null));
        patch.insert(f.generation_error_num.into(), json!(null));
    }
    if patch_annotations(ctx, svc, patch, None).await? {
        marked.remember(&uid, &version, ca_cn);
    }
    Ok(())
}

/// Whether the Service as the API server has it now (not as cached) is not yet marked.
async fn needs_mark(ctx: &Context, svc: &Service, up_to_date: impl Fn(&Service) -> bool) -> Result<bool, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let fresh = api.get_opt(&svc.name_any()).await.map_err(|source| Error::Kube {
        action: READ_SERVICE,
        object: shown_obj(svc),
        source,
    })?;
    Ok(fresh.is_some_and(|fresh| !up_to_date(&fresh)))
}

/// Failure: error annotations (beta and alpha) with the consecutive count, a Warning
/// Event, and a retry with backoff — until the count reaches [`MAX_FAILURES`]. A
/// Service that is gone meanwhile ends the matter. The count is written only over the
/// Service it was counted from: if the Service changed since (a person reset the count,
/// or our previous report is not in the cache yet), the pass is run again on what it is
/// now, instead of overwriting it with a stale count.
pub(super) async fn report_problem(
    ctx: &Context,
    controller: &'static str,
    svc: &Service,
    message: &str,
) -> Result<Action, Error> {
    let count = failures(svc).saturating_add(1);
    let mut patch = serde_json::Map::new();
    for f in [ann::BETA, ann::ALPHA] {
        patch.insert(f.generation_error.into(), json!(message));
        patch.insert(f.generation_error_num.into(), json!(count.to_string()));
    }
    match patch_annotations(ctx, svc, patch, svc.resource_version()).await {
        Ok(true) => {}
        Ok(false) => return Ok(Action::await_change()),
        Err(Error::Kube { source, .. }) if is_conflict(&source) => return Ok(Action::requeue(LOOK_AGAIN)),
        Err(error) => return Err(error),
    }
    tracing::warn!(object = %shown_obj(svc), failures = count, "serving certificate not issued: {message}");
    let note = if count >= MAX_FAILURES {
        format!(
            "{message}. Stopped retrying after {count} consecutive failures: remove the annotation {} to retry",
            ann::BETA.generation_error_num
        )
    } else {
        message.to_string()
    };
    ctx.event(&svc.object_ref(&()), EventType::Warning, "ServingCertificateError", note).await;
    ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::ErrorLabels { controller, category: "rejected" }).inc();
    Ok(if count >= MAX_FAILURES { Action::await_change() } else { Action::requeue(retry_delay(count)) })
}

/// Merges `annotations` into the Service's; `false` when the Service is gone. With
/// `expected`, only into that resourceVersion of it (409 otherwise).
async fn patch_annotations(
    ctx: &Context,
    svc: &Service,
    annotations: serde_json::Map<String, serde_json::Value>,
    expected: Option<String>,
) -> Result<bool, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let mut patch = json!({ "metadata": { "annotations": annotations } });
    if let Some(version) = expected {
        patch["metadata"]["resourceVersion"] = json!(version);
    }
    ctx.metrics.write("services", "patch");
    match api.patch(&svc.name_any(), &patch_params(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(source) => Err(Error::Kube { action: PATCH_SERVICE, object: shown_obj(svc), source }),
    }
}
