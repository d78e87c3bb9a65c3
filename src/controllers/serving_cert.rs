//! Serving-cert controller: an annotated Service gets its serving Secret.
//!
//! Keyed by Service. It creates the Secret when none exists, reports conflicts and bad
//! input on the Service (error annotations with a consecutive-failure count, capped at
//! 10, and a Warning Event), and records the signing CA in `serving-cert-signed-by`.
//! Existing Secrets that carry the managed label belong to the cert-refresh
//! controller; this one only repairs Secrets of ours without the label (which that
//! controller cannot see), so the two never write the same Secret.
//!
//! The Service comes from the shared cache; the Secret is read whole from the API
//! server (absent, someone else's, or ours).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use time::OffsetDateTime;

use super::serving_secret::{self, Content, Wanted, secret_facts, service_facts, wanted};
use super::{Context, Error, backoff};
use crate::annotations::{self as ann, Family};
use crate::pki::Decision;
use crate::signer::OwnedLeafRequest;

pub const NAME: &str = "serving-cert";

/// After this many consecutive failures the Service is left alone until a person
/// edits (or removes) its error annotations.
pub const MAX_FAILURES: u32 = 10;

/// Runs the controller until `shutdown` resolves (in-flight work finishes first).
pub async fn run(
    ctx: Arc<Context>,
    services: Store<Service>,
    service_events: impl Stream<Item = Result<Service, watcher::Error>> + Send + 'static,
    secret_changes: impl Stream<Item = ObjectRef<Service>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    Controller::for_stream(service_events, services)
        .reconcile_on(secret_changes)
        .reconcile_all_on(ctx.signer.changes())
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.config.controller_concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

/// What of a Service matters to its serving Secret. Our own annotation writes
/// (errors, signed-by) leave it unchanged, so they trigger neither serving controller;
/// only what a person or the Service itself changes does.
pub(super) fn trigger_hash(svc: &Service) -> Option<u64> {
    let mut h = DefaultHasher::new();
    svc.uid().hash(&mut h);
    if let Some(spec) = &svc.spec {
        (&spec.cluster_ip, &spec.type_).hash(&mut h);
    }
    let annotations = svc.annotations();
    for f in [ann::BETA, ann::ALPHA] {
        annotations.get(f.serving_cert_secret_name).hash(&mut h);
    }
    (failures(svc) >= MAX_FAILURES).hash(&mut h);
    Some(h.finish())
}

fn error_policy(svc: Arc<Service>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(service = %ObjectRef::from_obj(svc.as_ref()), %error, "serving-cert reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_service(&svc, &ctx).await;
    ctx.observe(NAME, started, result.as_ref().map(|_| ()));
    result
}

async fn reconcile_service(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    // At the cap, nothing happens until a person edits the Service.
    if failures(svc) >= MAX_FAILURES {
        return Ok(Action::await_change());
    }
    let (name, family) = match wanted(svc) {
        Wanted::NotRequested => return Ok(Action::await_change()),
        Wanted::Empty(family) => {
            let message = format!(
                "the annotation {} is empty: set it to the name of the Secret to create",
                family.serving_cert_secret_name
            );
            return report_problem(ctx, svc, &message).await;
        }
        Wanted::Named { name, family } => (name, family),
    };
    if let Err(why) = check_secret_name(name) {
        return report_problem(ctx, svc, &format!("{:?} is not a valid Secret name: {why}", name)).await;
    }
    let Some(signer) = ctx.signer.current() else {
        // The CA is not loaded yet; loading it re-triggers every Service.
        return Ok(Action::await_change());
    };

    let namespace = svc.namespace().unwrap_or_default();
    let existing = Api::<Secret>::namespaced(ctx.client.clone(), &namespace).get_opt(name).await?;
    let labeled = existing.as_ref().is_some_and(|s| secret_facts(s).labeled);
    let now = OffsetDateTime::now_utc();
    let policy = ctx.config.leaf_policy();
    let facts = existing.as_ref().map(secret_facts);
    let decision = crate::pki::decide(facts.as_ref(), &service_facts(svc), &signer.ca, &policy, now);

    match decision {
        Decision::Foreign(why) => {
            let message = format!(
                "Secret {namespace}/{name} already exists and {why}; the operator never modifies it. \
                 Delete it, or set {} to another name",
                family.serving_cert_secret_name
            );
            return report_problem(ctx, svc, &message).await;
        }
        // Labeled Secrets are the cert-refresh controller's to fix; its write brings
        // us back here.
        Decision::Issue(_) if labeled => return Ok(Action::await_change()),
        Decision::Issue(reason) => {
            let leaf =
                ctx.keys.issue(signer.clone(), leaf_request(svc, &policy.cluster_domain), policy.lifetime).await?;
            let secret = serving_secret::desired(existing.as_ref(), svc, family, name, Content::Issued(&leaf));
            let written = if existing.is_some() {
                serving_secret::replace(ctx, &secret).await
            } else {
                serving_secret::create(ctx, &secret).await
            };
            match written {
                Ok(_) => {}
                // Someone created or changed it meanwhile: look again.
                Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Action::requeue(Duration::from_millis(500))),
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 403 => {
                    return report_problem(
                        ctx,
                        svc,
                        &format!("the API server refused Secret {namespace}/{name}: {}", s.message),
                    )
                    .await;
                }
                Err(e) => return Err(e.into()),
            }
            serving_secret::announce_issued(ctx, svc, name, &reason, &leaf, &signer.ca).await;
        }
        Decision::Tidy { expiry, .. } if !labeled => {
            let secret = serving_secret::desired(existing.as_ref(), svc, family, name, Content::Kept { expiry });
            match serving_secret::replace(ctx, &secret).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Action::requeue(Duration::from_millis(500))),
                Err(e) => return Err(e.into()),
            }
        }
        Decision::Tidy { .. } | Decision::Keep { .. } => {}
    }
    mark_signed(ctx, svc, signer.ca.subject_cn()).await?;
    Ok(Action::await_change())
}

pub(super) fn leaf_request(svc: &Service, cluster_domain: &str) -> OwnedLeafRequest {
    let facts = service_facts(svc);
    OwnedLeafRequest {
        service: facts.name.to_string(),
        namespace: facts.namespace.to_string(),
        uid: facts.uid.to_string(),
        headless: facts.headless,
        cluster_domain: cluster_domain.to_string(),
    }
}

/// Consecutive failures recorded on the Service. Both families carry the count;
/// removing (or lowering) either one is the person's edit that lifts the cap.
pub fn failures(svc: &Service) -> u32 {
    let annotations = svc.annotations();
    [ann::BETA, ann::ALPHA]
        .iter()
        .map(|f| annotations.get(f.generation_error_num).and_then(|n| n.trim().parse().ok()).unwrap_or(0))
        .min()
        .unwrap_or(0)
}

/// Success: `serving-cert-signed-by` = the CA's CN and no error annotations. Written
/// only when something differs — in the cached Service and, because the cache can lag
/// a moment behind our own previous write, in a fresh (consistent) read.
async fn mark_signed(ctx: &Context, svc: &Service, ca_cn: &str) -> Result<(), Error> {
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
    match api.get_opt(&svc.name_any()).await? {
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
    Ok(if count >= MAX_FAILURES { Action::await_change() } else { Action::requeue(backoff(count)) })
}

async fn patch_annotations(
    ctx: &Context,
    svc: &Service,
    annotations: serde_json::Map<String, serde_json::Value>,
) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let patch = json!({ "metadata": { "annotations": annotations } });
    ctx.metrics.write("services", "patch");
    api.patch(
        &svc.name_any(),
        &PatchParams { field_manager: Some(ann::FIELD_MANAGER.into()), ..Default::default() },
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// DNS-1123 subdomain: what Kubernetes accepts as a Secret name.
pub fn check_secret_name(name: &str) -> Result<(), &'static str> {
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        if bytes.is_empty() {
            return Err("empty part between dots");
        }
        if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
            return Err("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
            return Err("each part must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_follow_dns_1123_subdomain_rules() {
        for ok in ["tls", "web-tls", "a.b.c", "0x1"] {
            assert!(check_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "under_score", "-lead", "trail-", "a..b", "spa ce", &"x".repeat(254)] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn own_annotation_writes_do_not_retrigger() {
        let mut svc = Service::default();
        svc.metadata.uid = Some("u".into());
        svc.annotations_mut().insert(ann::BETA.serving_cert_secret_name.into(), "tls".into());
        let before = trigger_hash(&svc);
        svc.annotations_mut().insert(ann::BETA.signed_by.into(), "ca".into());
        svc.annotations_mut().insert(ann::BETA.generation_error.into(), "boom".into());
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "3".into());
        assert_eq!(trigger_hash(&svc), before);
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "10".into());
        svc.annotations_mut().insert(ann::ALPHA.generation_error_num.into(), "10".into());
        assert_ne!(trigger_hash(&svc), before, "reaching the cap is a change");
        assert_eq!(failures(&svc), 10);
        svc.annotations_mut().remove(ann::BETA.generation_error_num);
        assert_eq!(failures(&svc), 0, "removing the beta count (as the Event says) lifts the cap");
        assert_eq!(trigger_hash(&svc), before, "and is a change");
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "10".into());
        svc.annotations_mut().insert(ann::BETA.serving_cert_secret_name.into(), "other".into());
        assert_ne!(trigger_hash(&svc), before);
    }
}
