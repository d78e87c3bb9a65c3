//! Serving-cert controller: an annotated Service gets its serving Secret.
//!
//! Keyed by Service. It creates the Secret when none exists, reports conflicts and bad
//! input on the Service (error annotations with a consecutive-failure count, capped at
//! 10, and a Warning Event), and records the signing CA in `serving-cert-signed-by`.
//! Existing Secrets that carry the managed label belong to the cert-refresh
//! controller; this one only repairs Secrets of ours without the label (which that
//! controller cannot see), so the two never write the same Secret.
//!
//! Watch: the shared Service cache, plus the Secret a Service names (see
//! `ServingWatches`). Plan: [`decide`] on the Secret read whole from the API server.
//! Write: create, or replace guarded by resourceVersion. Report: the Service's
//! annotations, an Event and the metrics.

use std::sync::Arc;

use futures::Stream;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::Patch;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use time::OffsetDateTime;

use super::decision::{Decision, decide};
use super::{
    Content, Error, MAX_FAILURES, Wanted, announce_issued, desired, failures, leaf_request, secret_facts, secret_ref,
    wanted,
};
use crate::controllers::{Context, LOOK_AGAIN, api_message, drive, is_conflict, is_refused, patch_params, retry_delay};
use crate::names::{self as ann, Family};
use crate::shutdown::Shutdown;
use crate::signer::Signer;

pub const NAME: &str = "serving-cert";

/// Runs the controller until `shutdown` (in-flight work finishes first).
pub async fn run(
    ctx: Arc<Context>,
    services: Store<Service>,
    service_events: impl Stream<Item = Result<Service, watcher::Error>> + Send + 'static,
    secret_changes: impl Stream<Item = ObjectRef<Service>> + Send + 'static,
    shutdown: Shutdown,
) {
    let controller = Controller::for_stream(service_events, services).reconcile_on(secret_changes);
    drive(controller, NAME, ctx.clone(), shutdown, ctx, reconcile).await;
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    // At the cap, nothing happens until a person edits the Service.
    if failures(&svc) >= MAX_FAILURES {
        return Ok(Action::await_change());
    }
    let (name, family) = match requested_secret(&svc) {
        Ok(Some(requested)) => requested,
        Ok(None) => return Ok(Action::await_change()),
        Err(problem) => return report_problem(&ctx, &svc, &problem).await,
    };
    let Some(signer) = ctx.signer.current() else {
        // The CA is not loaded yet; loading it re-triggers every Service.
        return Ok(Action::await_change());
    };
    let namespace = svc.namespace().unwrap_or_default();
    let existing = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadSecret { secret: secret_ref(&namespace, name), source })?;
    let labeled = existing.as_ref().is_some_and(|s| secret_facts(s).labeled);
    let policy = ctx.config.leaf_policy();
    let request = leaf_request(&svc, &policy.cluster_domain);
    let facts = existing.as_ref().map(secret_facts);
    let decision = decide(facts.as_ref(), &request, &signer.ca, &policy, OffsetDateTime::now_utc());

    match decision {
        Decision::Foreign(why) => {
            let message = format!(
                "Secret {} already exists and {why}; the operator never modifies it. Delete it, or set {} to another name",
                secret_ref(&namespace, name),
                family.serving_cert_secret_name
            );
            return report_problem(&ctx, &svc, &message).await;
        }
        // Labeled Secrets are the cert-refresh controller's to fix; its write brings
        // us back here.
        Decision::Issue(_) if labeled => return Ok(Action::await_change()),
        Decision::Issue(reason) => {
            let leaf = ctx.keys.issue(signer.clone(), request, policy.lifetime).await.map_err(|source| {
                Error::IssueLeaf { service: ObjectRef::from_obj(svc.as_ref()).to_string(), source }
            })?;
            let secret = desired(existing.as_ref(), &svc, family, name, Content::Issued(&leaf));
            if let Some(next) = write(&ctx, &svc, &secret, existing.is_some()).await? {
                return Ok(next);
            }
            announce_issued(&ctx, &svc, name, &reason, &leaf, &signer.ca).await;
        }
        Decision::Tidy { expiry, .. } if !labeled => {
            let secret = desired(existing.as_ref(), &svc, family, name, Content::Kept { expiry });
            if let Some(next) = write(&ctx, &svc, &secret, true).await? {
                return Ok(next);
            }
        }
        Decision::Tidy { .. } | Decision::Keep { .. } => {}
    }
    mark_signed(&ctx, &svc, &signer).await?;
    Ok(Action::await_change())
}

/// The Secret name the Service asks for (`None`: none), or why it cannot have one.
fn requested_secret(svc: &Service) -> Result<Option<(&str, Family)>, String> {
    match wanted(svc) {
        Wanted::NotRequested => Ok(None),
        Wanted::Empty(family) => Err(format!(
            "the annotation {} is empty: set it to the name of the Secret to create",
            family.serving_cert_secret_name
        )),
        Wanted::Named { name, family } => match ann::check_subdomain(name) {
            Ok(()) => Ok(Some((name, family))),
            Err(why) => Err(format!("{:?} is not a valid Secret name: {why}", crate::bounded(name))),
        },
    }
}

/// Creates or replaces the Secret. `Some(action)` when the write did not happen and the
/// reconcile ends there: lost a race (look again soon) or refused by the API server
/// (reported on the Service).
async fn write(ctx: &Context, svc: &Service, secret: &Secret, exists: bool) -> Result<Option<Action>, Error> {
    let written = if exists { super::replace(ctx, secret).await } else { super::create(ctx, secret).await };
    match written {
        Ok(_) => Ok(None),
        // Someone created or changed it meanwhile: look again.
        Err(e) if is_conflict(&e) => Ok(Some(Action::requeue(LOOK_AGAIN))),
        Err(e) if is_refused(&e) => {
            let message = format!(
                "the API server refused Secret {}: {}",
                secret_ref(&secret.namespace().unwrap_or_default(), &secret.name_any()),
                crate::bounded(&api_message(&e))
            );
            report_problem(ctx, svc, &message).await.map(Some)
        }
        Err(source) => Err(Error::WriteSecret {
            secret: secret_ref(&secret.namespace().unwrap_or_default(), &secret.name_any()),
            source,
        }),
    }
}

/// Success: `serving-cert-signed-by` = the CA's CN and no error annotations. Written
/// only when something differs — in the cached Service and, because the cache can lag
/// a moment behind our own previous write, in a fresh (consistent) read.
async fn mark_signed(ctx: &Context, svc: &Service, signer: &Signer) -> Result<(), Error> {
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
    if up_to_date(svc) {
        return Ok(());
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let fresh = api
        .get_opt(&svc.name_any())
        .await
        .map_err(|source| Error::ReadService { service: ObjectRef::from_obj(svc).to_string(), source })?;
    match fresh {
        Some(fresh) if !up_to_date(&fresh) => {}
        _ => return Ok(()),
    }
    let mut patch = serde_json::Map::new();
    for f in families {
        patch.insert(f.signed_by.into(), json!(ca_cn));
        patch.insert(f.generation_error.into(), json!(null));
        patch.insert(f.generation_error_num.into(), json!(null));
    }
    patch_annotations(ctx, svc, patch).await
}

/// Failure: error annotations (beta and alpha) with the consecutive count, a Warning
/// Event, and a retry with backoff — until the count reaches [`MAX_FAILURES`].
async fn report_problem(ctx: &Context, svc: &Service, message: &str) -> Result<Action, Error> {
    let count = failures(svc) + 1;
    let mut patch = serde_json::Map::new();
    for f in [ann::BETA, ann::ALPHA] {
        patch.insert(f.generation_error.into(), json!(message));
        patch.insert(f.generation_error_num.into(), json!(count.to_string()));
    }
    patch_annotations(ctx, svc, patch).await?;
    let service = ObjectRef::from_obj(svc).to_string();
    tracing::warn!(%service, failures = count, "serving certificate not issued: {message}");
    let note = if count >= MAX_FAILURES {
        format!(
            "{message}. Stopped retrying after {count} consecutive failures: remove the annotation {} to retry",
            ann::BETA.generation_error_num
        )
    } else {
        message.to_string()
    };
    ctx.event(&svc.object_ref(&()), EventType::Warning, "ServingCertificateError", note).await;
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels { controller: NAME, category: "rejected" })
        .inc();
    Ok(if count >= MAX_FAILURES { Action::await_change() } else { Action::requeue(retry_delay(count)) })
}

async fn patch_annotations(
    ctx: &Context,
    svc: &Service,
    annotations: serde_json::Map<String, serde_json::Value>,
) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let patch = json!({ "metadata": { "annotations": annotations } });
    ctx.metrics.write("services", "patch");
    api.patch(&svc.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::PatchService { service: ObjectRef::from_obj(svc).to_string(), source })?;
    Ok(())
}
