//! Cert-refresh controller: every managed serving Secret stays right.
//!
//! Keyed by Secret (only those with the managed label are cached). It re-issues when
//! the certificate is due (scheduled for the exact moment, not polled), was signed by
//! another CA (after a rotation or reset: all Secrets are re-queued at once and the
//! key pool paces the work), no longer matches the Service's names, or was tampered
//! with; it strips extra data keys without re-issuing. A Secret whose Service no
//! longer names it is left alone.
//!
//! Watch: the managed-Secret cache (metadata only) and the Service cache (see
//! `ServingWatches`). Plan: [`decide`] on the Secret read whole from the API server.
//! Write: replace guarded by resourceVersion. Report: Event and metrics; requeue at the
//! refresh moment.

use std::sync::Arc;

use futures::Stream;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::decision::{Decision, decide};
use super::{
    Content, Error, Wanted, announce_issued, desired, leaf_request, originating_service, secret_facts, secret_ref,
    wanted,
};
use crate::controllers::{Context, LOOK_AGAIN, drive, is_conflict, is_not_found, until};
use crate::shutdown::Shutdown;

pub const NAME: &str = "cert-refresh";

struct State {
    ctx: Arc<Context>,
    services: Store<Service>,
}

/// Runs the controller until `shutdown` (in-flight work finishes first).
pub async fn run(
    ctx: Arc<Context>,
    secrets: Store<PartialObjectMeta<Secret>>,
    secret_events: impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static,
    services: Store<Service>,
    service_changes: impl Stream<Item = ObjectRef<PartialObjectMeta<Secret>>> + Send + 'static,
    shutdown: Shutdown,
) {
    // A Service change (e.g. it became headless) concerns the Secret it names.
    let controller = Controller::for_stream(secret_events, secrets).reconcile_on(service_changes);
    let state = Arc::new(State { ctx: ctx.clone(), services });
    drive(controller, NAME, ctx, shutdown, state, reconcile).await;
}

async fn reconcile(meta: Arc<PartialObjectMeta<Secret>>, st: Arc<State>) -> Result<Action, Error> {
    let ctx = &st.ctx;
    let namespace = meta.namespace().unwrap_or_default();
    let name = meta.name_any();
    // Gone (garbage collection follows), not annotated any more, or not ours to
    // manage (selector).
    let Some(svc) = originating_service(meta.as_ref()).and_then(|svc| st.services.get(&svc)) else {
        return Ok(Action::await_change());
    };
    // The annotation was removed or now names another Secret: leave this one alone.
    let family = match wanted(&svc) {
        Wanted::Named { name: wanted_name, family } if wanted_name == name => family,
        _ => return Ok(Action::await_change()),
    };
    let Some(signer) = ctx.signer.current() else {
        return Ok(Action::await_change());
    };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&name)
        .await
        .map_err(|source| Error::ReadSecret { secret: secret_ref(&namespace, &name), source })?;
    let Some(secret) = secret else {
        return Ok(Action::await_change());
    };

    let policy = ctx.config.leaf_policy();
    let request = leaf_request(&svc, &policy.cluster_domain);
    let now = OffsetDateTime::now_utc();
    match decide(Some(&secret_facts(&secret)), &request, &signer.ca, &policy, now) {
        Decision::Foreign(_) => Ok(Action::await_change()),
        Decision::Keep { refresh_at } => Ok(wake_at(refresh_at)),
        Decision::Tidy { extra_keys, expiry, refresh_at } => {
            let desired = desired(Some(&secret), &svc, family, &name, Content::Kept { expiry });
            if !write(ctx, &desired).await? {
                return Ok(Action::requeue(LOOK_AGAIN));
            }
            if !extra_keys.is_empty() {
                tracing::info!(secret = %secret_ref(&namespace, &name), ?extra_keys, "removed extra data keys");
            }
            Ok(wake_at(refresh_at))
        }
        Decision::Issue(reason) => {
            let leaf = ctx.keys.issue(signer.clone(), request, policy.lifetime).await.map_err(|source| {
                Error::IssueLeaf { service: ObjectRef::from_obj(svc.as_ref()).to_string(), source }
            })?;
            let desired = desired(Some(&secret), &svc, family, &name, Content::Issued(&leaf));
            if !write(ctx, &desired).await? {
                return Ok(Action::requeue(LOOK_AGAIN));
            }
            announce_issued(ctx, &svc, &name, &reason, &leaf, &signer.ca).await;
            Ok(wake_at(policy.refresh_at(leaf.not_after, signer.ca.not_after())))
        }
    }
}

/// Look again at `at` (the refresh moment), or only when something changes.
fn wake_at(at: Option<OffsetDateTime>) -> Action {
    at.map_or_else(Action::await_change, |at| Action::requeue(until(at)))
}

/// Replaces the Secret; `false` when it changed or went meanwhile (look again).
async fn write(ctx: &Context, desired: &Secret) -> Result<bool, Error> {
    match super::replace(ctx, desired).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(false),
        Err(source) => Err(Error::WriteSecret {
            secret: secret_ref(&desired.namespace().unwrap_or_default(), &desired.name_any()),
            source,
        }),
    }
}
