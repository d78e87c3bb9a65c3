//! Cert-refresh controller: every managed serving Secret stays right.
//!
//! Keyed by Secret (only those with the managed label are cached). It re-issues when
//! the certificate is due (scheduled for the exact moment, not polled), was signed by
//! another CA (after a rotation or reset: all Secrets are re-queued at once and the
//! key pool paces the work), no longer matches the Service's names, or was tampered
//! with; it strips extra data keys without re-issuing. A Secret whose Service no
//! longer names it is released: it keeps its data but loses the managed label, so it
//! is no longer refreshed, cached or reported as managed. A write the API server
//! refuses is reported on the Service like any other failure, up to the cap.
//!
//! Watch: the managed-Secret cache (metadata only) and the Service cache (see
//! `ServingWatches`). Plan: [`decide`] on the Secret read whole from the API server.
//! Write: replace guarded by resourceVersion. Report: Event and metrics; requeue at the
//! refresh moment.

use std::sync::Arc;

use futures::Stream;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::Patch;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::decision::{IssueReason, decide};
use super::precondition::{Ask, Keyed, Step, ask, step};
use super::progress::{self, Looked, Progress};
use super::report::report_problem;
use super::request::{leaf_request, originating_service};
use super::secret::{Content, desired, issue, read_secret, wait_for_deletion, write_secret};
use super::{Error, WRITE_SECRET, secret_ref};
use crate::controllers::{
    Context, LOOK_AGAIN, Outcome, Shard, drive, is_not_found, patch_params, record_reason, until,
};
use crate::names::MANAGED_LABEL;
use crate::shutdown::Shutdown;

pub const NAME: &str = "cert-refresh";

struct State {
    ctx: Arc<Context>,
    services: Store<Service>,
    progress: Arc<Progress>,
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
    let progress = Arc::new(Progress::default());
    let every = ctx.config.progress_interval;
    let reporter =
        progress::report(ctx.clone(), secrets.clone(), services.clone(), progress.clone(), every, shutdown.clone());
    // A Service change (e.g. it became headless) concerns the Secret it names.
    let controller = Controller::for_stream(secret_events, secrets).reconcile_on(service_changes);
    let state = Arc::new(State { ctx: ctx.clone(), services, progress });
    let shard = Shard::By(super::request::secret_key);
    tokio::join!(drive(controller, NAME, ctx, shutdown, state, shard, reconcile), reporter);
}

async fn reconcile(meta: Arc<PartialObjectMeta<Secret>>, st: Arc<State>) -> Result<Action, Error> {
    let ctx = &st.ctx;
    let namespace = meta.namespace().unwrap_or_default();
    let name = meta.name_any();
    // Gone (garbage collection follows), or not ours to manage (selector).
    let Some(svc) = originating_service(meta.as_ref()).and_then(|svc| st.services.get(&svc)) else {
        return Ok(Action::await_change());
    };
    // Counted once the Secret is settled for this CA (for the re-issue progress).
    let settled = |looked: Looked, ca: &[u8]| st.progress.looked_at(secret_ref(&namespace, &name), looked, ca);
    let current_ca = || ctx.signer.current().map(|s| s.ca.subject_key_id().to_vec()).unwrap_or_default();
    let keyed = Keyed::Secret(&name);
    let (family, key) = match ask(&svc, keyed, ctx.config.default_key_algorithm, &ctx.config.allowed_key_algorithms) {
        Ask::Read { family, key, .. } => (family, key),
        Ask::Release => {
            settled(Looked::Left, &current_ca());
            return release(ctx, &namespace, &name).await;
        }
        Ask::Wait | Ask::Report(_) => {
            settled(Looked::Left, &current_ca());
            return Ok(Action::await_change());
        }
    };
    let Some(signer) = ctx.signer.current() else {
        return Ok(Action::await_change());
    };
    let secret = read_secret(ctx, &namespace, &name, meta.resource_version().as_deref()).await?;
    let policy = ctx.config.leaf_policy();
    let request = leaf_request(&svc, &policy.cluster_domain, key);
    let now = OffsetDateTime::now_utc();
    let (written, refresh_at, reissued) =
        match step(keyed, secret.as_ref(), |facts| decide(facts, &request, &signer.ca, &policy, now)) {
            Step::Wait => return Ok(Action::await_change()),
            Step::WaitForDeletion(held) => {
                settled(Looked::Left, signer.ca.subject_key_id());
                return wait_for_deletion(ctx, NAME, &svc, held).await;
            }
            Step::Foreign(_) => {
                settled(Looked::Left, signer.ca.subject_key_id());
                return Ok(Action::await_change());
            }
            Step::Leave { refresh_at } => {
                settled(Looked::Left, signer.ca.subject_key_id());
                return Ok(wake_at(refresh_at));
            }
            Step::Tidy { extra_keys, expiry, refresh_at } => {
                record_reason("tidy");
                let desired = desired(secret.as_ref(), &svc, family, &name, Content::Kept { expiry });
                if !extra_keys.is_empty() {
                    tracing::info!(object = %secret_ref(&namespace, &name), ?extra_keys, "removing extra data keys");
                }
                (write_secret(ctx, secret.as_ref(), desired).await?, refresh_at, Looked::Left)
            }
            Step::Issue(reason) => {
                record_reason(reason.category());
                let written = issue(ctx, &svc, request, family, &name, secret.as_ref(), &signer, &reason).await?;
                let refresh_at = match &written {
                    Outcome::Done(expiry) => policy.refresh_at(*expiry, signer.ca.not_after()),
                    _ => None,
                };
                let by_ca = matches!(reason, IssueReason::OtherCa);
                (written, refresh_at, if by_ca { Looked::ReissuedForTheCa } else { Looked::Reissued })
            }
        };
    let settled = |done: bool| settled(if done { reissued } else { Looked::Left }, signer.ca.subject_key_id());
    finish(ctx, &svc, written, settled, refresh_at).await
}

/// What follows a write: on success the Secret is settled (`settled(true)`) and looked
/// at again at `refresh_at`; after a race soon; a Secret held in deletion is waited
/// for and a refusal reported on the Service (both settled, `settled(false)`).
async fn finish(
    ctx: &Context,
    svc: &Service,
    written: Outcome<OffsetDateTime>,
    settled: impl Fn(bool),
    refresh_at: Option<OffsetDateTime>,
) -> Result<Action, Error> {
    match written {
        Outcome::Done(_) => {
            settled(true);
            Ok(wake_at(refresh_at))
        }
        Outcome::Raced => Ok(Action::requeue(LOOK_AGAIN)),
        Outcome::Gone => Ok(Action::await_change()),
        Outcome::Held(held) => {
            settled(false);
            wait_for_deletion(ctx, NAME, svc, &held).await
        }
        Outcome::Refused(message) => {
            settled(false);
            report_problem(ctx, NAME, svc, &message).await
        }
    }
}

/// Look again at `at` (the refresh moment), or only when something changes.
fn wake_at(at: Option<OffsetDateTime>) -> Action {
    at.map_or_else(Action::await_change, |at| Action::requeue(until(at)))
}

/// The Service no longer names this Secret: it stays (docs/spec.md §1), but without our managed
/// label, so it leaves the cache, the metrics and every refresh.
async fn release(ctx: &Context, namespace: &str, name: &str) -> Result<Action, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({ "metadata": { "labels": { MANAGED_LABEL: null } } });
    ctx.metrics.write("secrets", "patch");
    match api.patch(name, &patch_params(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            tracing::info!(object = %secret_ref(namespace, name), "its Service no longer names it: no longer managed");
            Ok(Action::await_change())
        }
        Err(e) if is_not_found(&e) => Ok(Action::await_change()),
        Err(source) => Err(Error::Kube { action: WRITE_SECRET, object: secret_ref(namespace, name), source }),
    }
}
