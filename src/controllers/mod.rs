//! The controllers. Each module is one room, and reads top-down the same way:
//! watch → plan (a pure function, unit-tested) → write only what changed → report
//! (Event, metrics) → requeue.
//!
//! - [`serving`]: annotated Services get their serving Secret; its two controllers,
//!   [`serving::serving_cert`] (keyed by Service: creates the Secret, reports
//!   conflicts and bad input) and [`serving::cert_refresh`] (keyed by managed Secret:
//!   re-issues on time, on CA change, on tampering), share the pieces in the rooms
//!   of [`serving`] (watches, request, secret, report) and the pure
//!   [`serving::decision`].
//! - [`ca_bundle`]: annotated ConfigMaps, APIServices, CRDs and webhook
//!   configurations carry the CA bundle.
//! - [`namespace_bundle`]: every namespace holds the bundle in ConfigMap
//!   `openshift-service-ca.crt`.
//! - [`ca_lifecycle`]: the `signing-key` Secret — create, load, rotate, reset — and the
//!   shared signer.
//! - [`pod_certs`]: PodCertificateRequests for the pod signer are signed for the names
//!   of the Services that select the pod, and the CA bundle is published as a
//!   ClusterTrustBundle for that signer.
//!
//! This module holds what they all share: the [`Context`], the cached watches
//! ([`watch`]), the controller run loop with per-object retry backoff ([`drive`]),
//! how a write ended ([`Outcome`]), when they look again ([`delays`]), how an object
//! is printed ([`shown`]), and small helpers for API errors and writes.

pub mod ca_bundle;
pub mod ca_lifecycle;
pub mod delays;
pub mod events;
pub mod failure;
pub mod namespace_bundle;
pub mod outcome;
pub mod pod_certs;
pub mod serving;
pub mod sharing;
pub mod turns;
pub mod watch;

#[cfg(test)]
pub mod test_api;

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tracing::Instrument;

pub use self::delays::{
    LOOK_AGAIN, LOOK_AGAIN_INJECTING, MAX_RETRY, NOT_YET, RETRY_REFUSED, UNREACHABLE_RETRY, WATCH_RETRY,
};
use self::events::Recorder;
pub use self::events::{EventType, digest};
pub use self::outcome::Outcome;
use crate::admin::Health;
use crate::config::Config;
use crate::keypool::KeyPool;
use crate::metrics::{ControllerLabels, ErrorLabels, Metrics};
use crate::names::FIELD_MANAGER;
use crate::shutdown::Shutdown;
use crate::signer::SignerHandle;

/// What every controller shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub signer: SignerHandle,
    pub keys: KeyPool,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub recorder: Recorder,
    /// Which objects this replica issues for (all of them unless issuance is shared).
    pub sharing: Arc<sharing::Sharing>,
    /// The PKCS#11 token holding the CA key (`--ca-key-pkcs11-uri`), if any.
    pub ca_token: Option<Arc<crate::pki::pkcs11::Token>>,
    /// The serving Secrets just written (read instead of the API server right after).
    pub written: serving::written::Written,
}

impl Context {
    /// Publishes an Event; a failure to do so is logged, never fatal.
    ///
    /// The recorder folds repeats of the same (object, reason, action) into one Event
    /// with a count, keeping the first note. So that a new message is never hidden
    /// behind an old one, the action carries a short digest of the note: the same
    /// message repeated is counted, a different message is a new Event.
    pub async fn event(&self, regarding: &ObjectReference, type_: EventType, reason: &str, note: String) {
        self.recorder.note(&self.metrics, regarding, type_, reason, note).await;
    }

    /// An Event that can wait (a certificate issued): held while urgent key work is pending
    /// (see [`Recorder::write_deferred`]), else published now.
    pub async fn event_after_urgent_work(&self, regarding: ObjectReference, reason: &'static str, note: String) {
        let report = events::Pending { regarding, type_: EventType::Normal, reason, note };
        let now = if self.keys.urgent_pending() { self.recorder.hold(report) } else { Some(report) };
        if let Some(report) = now {
            self.event(&report.regarding, report.type_, report.reason, report.note).await;
        }
    }

    /// Records a finished reconciliation in the metrics.
    fn observe<E: Categorised>(&self, controller: &'static str, started: Instant, result: Result<(), &E>) {
        let labels = ControllerLabels { controller };
        self.metrics.reconciles.get_or_create(&labels).inc();
        self.metrics.reconcile_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        if let Err(error) = result {
            self.metrics.reconcile_errors.get_or_create(&ErrorLabels { controller, category: error.category() }).inc();
        }
    }

    /// Runs one pass of `controller`, recording its count, duration and error category.
    pub async fn timed<T, E: Categorised>(
        &self,
        controller: &'static str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = work.await;
        self.observe(controller, started, result.as_ref().map(|_| ()));
        result
    }
}

/// How logs, Events and errors print an object: `Kind namespace/name` (`Kind name`
/// when it is cluster-scoped).
pub fn shown(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// [`shown`] for an object at hand.
pub fn shown_obj<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    let meta = obj.meta();
    shown(&K::kind(&()), meta.namespace.as_deref(), meta.name.as_deref().unwrap_or_default())
}

/// The span a reconcile pass of `controller` on `obj` runs in: it names the object, and
/// the pass records why it writes (`reason`, see [`record_reason`]). kube's enclosing
/// span ("reconciling object") carries what triggered the pass.
fn pass_span<K: Resource<DynamicType = ()>>(controller: &'static str, obj: &K) -> tracing::Span {
    tracing::info_span!("reconcile", controller, object = %shown_obj(obj), reason = tracing::field::Empty)
}

/// Records on the current reconcile span why this pass writes (a bounded label).
pub fn record_reason(reason: &str) {
    tracing::Span::current().record("reason", reason);
}

/// Errors with a bounded category for metrics.
pub trait Categorised {
    fn category(&self) -> &'static str;
    /// Whether the API server could not be reached at all (retried soon, whatever the
    /// backoff says: such an attempt costs nothing and the outage may be over).
    fn unreachable(&self) -> bool {
        false
    }
}

/// A bare API error (a single write) is categorised by its status.
impl Categorised for kube::Error {
    fn category(&self) -> &'static str {
        api_category(self)
    }
    fn unreachable(&self) -> bool {
        status_code(self).is_none()
    }
}

/// The category of an API error, for metrics.
pub fn api_category(error: &kube::Error) -> &'static str {
    match status_code(error) {
        Some(409) => "conflict",
        Some(422) => "invalid",
        Some(403) => "forbidden",
        Some(404) => "not-found",
        Some(_) => "api",
        None => "transport",
    }
}

/// The HTTP status of an API error (`None`: the request got no answer).
pub fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// The API server's message for an API error (the error itself otherwise).
pub fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// 409: someone wrote the object since it was read (or created it meanwhile).
pub fn is_conflict(error: &kube::Error) -> bool {
    status_code(error) == Some(409)
}

/// 404: the object is gone.
pub fn is_not_found(error: &kube::Error) -> bool {
    status_code(error) == Some(404)
}

/// 422 or 403: the API server (validation, admission, RBAC) refused this write; the
/// same write will be refused again.
pub fn is_refused(error: &kube::Error) -> bool {
    matches!(status_code(error), Some(422 | 403))
}

/// Create and replace options: our field manager.
pub fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }
}

/// Merge-patch options: our field manager.
pub fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() }
}

/// Whether a controller's objects are shared across replicas, and by which key.
pub enum Shard<K> {
    /// Singleton work (the leader's): every object.
    All,
    /// Issuance: only the objects whose key (`namespace/name` of the Service or request)
    /// this replica owns (see [`sharing`]).
    By(fn(&K) -> String),
}

/// The tail every keyed controller shares: reconcile every object when the signer
/// changes, the configured concurrency, graceful shutdown, metrics per pass, and a
/// per-object exponential backoff after errors (see [`Retries`]), at most half the
/// slots for one namespace (see [`turns`]). With
/// [`Shard::By`], objects another replica owns are skipped (they cost nothing but
/// their cache entry) and every object is looked at again when the members change.
pub async fn drive<K, S, E, Fut>(
    controller: Controller<K>,
    name: &'static str,
    ctx: Arc<Context>,
    shutdown: Shutdown,
    state: Arc<S>,
    shard: Shard<K>,
    reconcile: impl Fn(Arc<K>, Arc<S>) -> Fut + Send + 'static,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    S: Send + Sync + 'static,
    E: Categorised + std::error::Error + Send + 'static,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    let retries = Arc::new(Retries::default());
    let key_of = match shard {
        Shard::All => None,
        Shard::By(key_of) => Some(key_of),
    };
    let controller = match key_of {
        Some(_) => controller.reconcile_all_on(ctx.sharing.changes()),
        None => controller,
    };
    // One namespace holds at most half the slots (see [`turns`]). A deferred object
    // deleted meanwhile is skipped (the controller would drop it), and so is one another
    // replica owns since the members changed: its pass would take no slot, so it could
    // not pass the turn on, and the objects deferred behind it would wait for ever.
    let cache = controller.store();
    let sharing = ctx.sharing.clone();
    let (gate, turn_again) = turns::Gate::new(ctx.config.controller_concurrency, move |object| {
        cache.get(object).is_some_and(|obj| key_of.is_none_or(|key_of| sharing.owns(&key_of(&obj))))
    });
    let controller = controller.reconcile_on(turn_again);
    let run = {
        let (ctx, retries) = (ctx.clone(), retries.clone());
        move |obj: Arc<K>, state: Arc<S>| {
            let object = ObjectRef::from_obj(obj.as_ref());
            let key = object.to_string();
            let owned = key_of.is_none_or(|key_of| ctx.sharing.owns(&key_of(&obj)));
            // Cluster-scoped objects take no turns.
            let slot = match (owned, obj.meta().namespace.clone()) {
                (true, Some(namespace)) => gate.enter(&namespace, object).map(Some),
                (owned, _) => owned.then_some(None),
            };
            let span = pass_span(name, obj.as_ref());
            let pass = slot.map(|slot| (slot, reconcile(obj, state)));
            let (ctx, retries) = (ctx.clone(), retries.clone());
            let pass = async move {
                // Another replica's: nothing to do until it changes or the members do.
                // Deferred: started again when its namespace's turn comes.
                let Some((_slot, pass)) = pass else { return Ok(Action::await_change()) };
                let result = ctx.timed(name, pass).await;
                if result.is_ok() {
                    retries.forget(&key);
                }
                result
            };
            pass.instrument(span)
        }
    };
    let error_policy = move |obj: Arc<K>, error: &E, _: Arc<S>| {
        let key = ObjectRef::from_obj(obj.as_ref()).to_string();
        let mut delay = retries.next_delay(&key);
        if error.unreachable() {
            delay = delay.min(UNREACHABLE_RETRY);
        }
        tracing::warn!(controller = name, object = %shown_obj(obj.as_ref()), %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    };
    controller
        .reconcile_all_on(ctx.signer.changes())
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.config.controller_concurrency))
        .graceful_shutdown_on(shutdown.signal())
        .run(run, error_policy, state)
        .for_each(|_| async {})
        .await;
}

/// Consecutive failures per object, for the retry delay after an error: 2 s doubling
/// to 5 minutes (±10 % jitter), forgotten after the object's next success. An object
/// whose writes keep failing costs one attempt per delay, not one every few seconds.
///
/// An object that failed and then went (deleted before it succeeded) is forgotten too:
/// a count not renewed within [`FORGET_FAILURES_AFTER`] is dropped (a failing object is
/// retried well within it), and at most [`MAX_TRACKED`] objects are counted.
#[derive(Default)]
pub struct Retries(Mutex<Failures>);

#[derive(Default)]
struct Failures {
    /// Per object: consecutive failures and when the last one was.
    counts: HashMap<String, (u32, Instant)>,
    /// When the counts were last swept of expired ones.
    swept: Option<Instant>,
}

/// A failure count not renewed this long is forgotten: twice the longest delay, so a
/// failing object is always retried (and counted again) before.
pub const FORGET_FAILURES_AFTER: Duration = Duration::from_secs(600);
/// At most this many objects' failures are counted; past it a new failing object
/// retries after the shortest delay, as on its first failure.
pub const MAX_TRACKED: usize = 65_536;
/// Expired counts are swept at most this often (each sweep walks every count).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl Failures {
    /// Records a failure of `key` at `now`; returns its consecutive count.
    fn failed(&mut self, key: &str, now: Instant) -> u32 {
        let live = |last: &Instant| now.saturating_duration_since(*last) < FORGET_FAILURES_AFTER;
        if self.swept.is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY) {
            self.counts.retain(|_, (_, last)| live(last));
            self.counts.shrink_to(MAX_TRACKED);
            self.swept = Some(now);
        }
        match self.counts.get_mut(key) {
            Some((n, last)) => {
                *n = if live(last) { n.saturating_add(1) } else { 1 };
                *last = now;
                *n
            }
            None => {
                if self.counts.len() < MAX_TRACKED {
                    self.counts.insert(key.to_string(), (1, now));
                }
                1
            }
        }
    }
}

impl Retries {
    /// Records a failure of `key` and returns how long to wait before the next attempt.
    pub fn next_delay(&self, key: &str) -> Duration {
        let attempt = match self.0.lock() {
            Ok(mut failures) => failures.failed(key, Instant::now()),
            Err(_) => 1,
        };
        retry_delay(attempt)
    }

    /// `key` succeeded: its next failure starts from the shortest delay again.
    pub fn forget(&self, key: &str) {
        if let Ok(mut failures) = self.0.lock() {
            failures.counts.remove(key);
        }
    }
}

/// The delay after the `attempt`-th consecutive failure (1-based): 2 s, 4 s, 8 s …
/// capped at [`MAX_RETRY`], with ±10 % jitter so that failures that began together
/// spread out.
pub fn retry_delay(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.clamp(1, 9)).min(MAX_RETRY);
    base.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

/// Time from now until `at` (zero if past, at most a year), for `Action::requeue`.
pub use crate::dates::until;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_shown_as_kind_namespace_slash_name() {
        assert_eq!(shown("Secret", Some("shop"), "web-tls"), "Secret shop/web-tls");
        assert_eq!(shown("APIService", None, "v1.example.com"), "APIService v1.example.com");
        let mut cm = k8s_openapi::api::core::v1::ConfigMap::default();
        cm.metadata.name = Some("trust".into());
        cm.metadata.namespace = Some("shop".into());
        assert_eq!(shown_obj(&cm), "ConfigMap shop/trust");
    }

    #[test]
    fn failure_counts_of_objects_that_went_expire_and_are_bounded() {
        let mut failures = Failures::default();
        let t0 = Instant::now();
        assert_eq!(failures.failed("ns/a", t0), 1);
        assert_eq!(failures.failed("ns/a", t0 + MAX_RETRY), 2, "retried within the longest delay: counted on");
        // A count not renewed for long starts again, and is swept with the others.
        let later = t0 + MAX_RETRY + FORGET_FAILURES_AFTER;
        assert_eq!(failures.failed("ns/a", later), 1);
        for i in 0..100 {
            failures.failed(&format!("ns/gone-{i}"), later);
        }
        assert_eq!(failures.counts.len(), 101);
        let much_later = later + FORGET_FAILURES_AFTER;
        failures.failed("ns/b", much_later);
        assert_eq!(failures.counts.keys().collect::<Vec<_>>(), ["ns/b"], "the objects that went are forgotten");
        // Bounded: past the cap a new object is not counted (its delay is the first one).
        for i in 0..MAX_TRACKED + 10 {
            failures.failed(&format!("ns/many-{i}"), much_later);
        }
        assert_eq!(failures.counts.len(), MAX_TRACKED);
        assert_eq!(failures.failed("ns/one-more", much_later), 1);
        assert_eq!(failures.failed("ns/one-more", much_later), 1);
    }
}
