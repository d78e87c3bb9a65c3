//! Cert-refresh controller: every managed serving Secret stays right.
//!
//! Keyed by Secret (only those with the managed label are cached). It re-issues when
//! the certificate is due (scheduled for the exact moment, not polled), was signed by
//! another CA (after a rotation or reset: all Secrets are re-queued at once and the
//! key pool paces the work), no longer matches the Service's names, or was tampered
//! with; it strips extra data keys without re-issuing. A Secret whose Service no
//! longer names it is left alone.
//!
//! Services come from the shared cache; a Secret is read whole from the API server
//! when it is looked at (the cache holds its metadata only, see `ServingWatches`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::serving_cert::leaf_request;
use super::serving_secret::{self, Content, Wanted, originating_service, secret_facts, service_facts, wanted};
use super::{Context, Error, until};
use crate::pki::Decision;

pub const NAME: &str = "cert-refresh";

struct State {
    ctx: Arc<Context>,
    services: Store<Service>,
}

pub async fn run(
    ctx: Arc<Context>,
    secrets: Store<PartialObjectMeta<Secret>>,
    secret_events: impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static,
    services: Store<Service>,
    service_changes: impl Stream<Item = ObjectRef<PartialObjectMeta<Secret>>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    Controller::for_stream(secret_events, secrets)
        // A Service change (e.g. it became headless) concerns the Secret it names.
        .reconcile_on(service_changes)
        .reconcile_all_on(ctx.signer.changes())
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.config.controller_concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, Arc::new(State { ctx, services }))
        .for_each(|_| async {})
        .await;
}

fn error_policy(secret: Arc<PartialObjectMeta<Secret>>, error: &Error, _: Arc<State>) -> Action {
    tracing::warn!(secret = %ObjectRef::from_obj(secret.as_ref()), %error, "cert-refresh reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(secret: Arc<PartialObjectMeta<Secret>>, st: Arc<State>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_secret(&secret, &st).await;
    st.ctx.observe(NAME, started, result.as_ref().map(|_| ()));
    result
}

async fn reconcile_secret(meta: &PartialObjectMeta<Secret>, st: &State) -> Result<Action, Error> {
    let ctx = &st.ctx;
    let namespace = meta.namespace().unwrap_or_default();
    let name = meta.name_any();
    // Gone (garbage collection follows), not annotated any more, or not ours to
    // manage (selector).
    let Some(svc) = originating_service(meta).and_then(|svc| st.services.get(&svc)) else {
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
    let Some(secret) = Api::<Secret>::namespaced(ctx.client.clone(), &namespace).get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let secret = &secret;

    let policy = ctx.config.leaf_policy();
    let now = OffsetDateTime::now_utc();
    match crate::pki::decide(Some(&secret_facts(secret)), &service_facts(&svc), &signer.ca, &policy, now) {
        Decision::Foreign(_) => Ok(Action::await_change()),
        Decision::Keep { refresh_at } => Ok(wake_at(refresh_at)),
        Decision::Tidy { extra_keys, expiry, refresh_at } => {
            let desired = serving_secret::desired(Some(secret), &svc, family, &name, Content::Kept { expiry });
            if !write(ctx, &desired).await? {
                return Ok(Action::requeue(Duration::from_millis(500)));
            }
            if !extra_keys.is_empty() {
                tracing::info!(secret = %format!("{namespace}/{name}"), ?extra_keys, "removed extra data keys");
            }
            Ok(wake_at(refresh_at))
        }
        Decision::Issue(reason) => {
            let leaf =
                ctx.keys.issue(signer.clone(), leaf_request(&svc, &policy.cluster_domain), policy.lifetime).await?;
            let desired = serving_secret::desired(Some(secret), &svc, family, &name, Content::Issued(&leaf));
            if !write(ctx, &desired).await? {
                return Ok(Action::requeue(Duration::from_millis(500)));
            }
            serving_secret::announce_issued(ctx, &svc, &name, &reason, &leaf, &signer.ca).await;
            Ok(wake_at(policy.refresh_at(leaf.not_after, signer.ca.not_after())))
        }
    }
}

/// Look again at `at` (the refresh moment), or only when something changes.
fn wake_at(at: Option<OffsetDateTime>) -> Action {
    at.map_or_else(Action::await_change, |at| Action::requeue(until(at)))
}

/// Replaces the Secret; `false` when it changed meanwhile (409: look again).
async fn write(ctx: &Context, desired: &Secret) -> Result<bool, Error> {
    match serving_secret::replace(ctx, desired).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
