//! The four controllers, one room each:
//!
//! - [`serving_cert`]: annotated Service → its serving Secret exists (creates it,
//!   reports conflicts and bad input on the Service).
//! - [`cert_refresh`]: every managed serving Secret stays right (re-issues on time, on
//!   CA change, on tampering; strips extra keys), scheduled for the exact moment.
//! - [`ca_bundle`]: annotated ConfigMaps, APIServices, CRDs and webhook
//!   configurations carry the CA bundle.
//! - [`ca_lifecycle`]: the `signing-key` Secret — create, load, rotate, reset — and the
//!   shared signer.
//!
//! Each follows one pipeline: read (caches, signer snapshot) → decide in a pure
//! function → write only what changed → report (Event, metrics) → requeue.

pub mod ca_bundle;
pub mod ca_lifecycle;
pub mod cert_refresh;
pub mod serving_cert;
pub mod serving_secret;

pub use serving_secret::ServingWatches;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::admin::Health;
use crate::config::Config;
use crate::metrics::{ControllerLabels, ErrorLabels, Metrics};
use crate::signer::{KeyPool, SignerHandle};

/// What every controller shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub signer: SignerHandle,
    pub keys: KeyPool,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub recorder: Recorder,
}

impl Context {
    /// Publishes an Event; a failure to do so is logged, never fatal.
    ///
    /// The recorder folds repeats of the same (object, reason, action) into one Event
    /// with a count, keeping the first note. So that a new message is never hidden
    /// behind an old one, the action carries a short digest of the note: the same
    /// message repeated is counted, a different message is a new Event.
    pub async fn event(&self, regarding: &ObjectReference, type_: EventType, reason: &str, note: String) {
        use std::hash::{Hash, Hasher};
        let note = truncate(note, 1000);
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        note.hash(&mut digest);
        let action = format!("{reason}/{:08x}", digest.finish() as u32);
        let event = Event { type_, reason: reason.into(), note: Some(note), action, secondary: None };
        self.metrics.write("events", "create");
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(%error, reason, "could not publish an Event");
        }
    }

    /// Records a finished reconciliation in the metrics.
    pub fn observe<E: Categorised>(&self, controller: &'static str, started: Instant, result: Result<(), &E>) {
        let labels = ControllerLabels { controller };
        self.metrics.reconciles.get_or_create(&labels).inc();
        self.metrics.reconcile_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        if let Err(error) = result {
            self.metrics.reconcile_errors.get_or_create(&ErrorLabels { controller, category: error.category() }).inc();
        }
    }
}

/// What can fail in the serving-cert, cert-refresh and CA lifecycle controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate: {0}")]
    Pki(#[from] crate::pki::PkiError),
}

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube(e) => e.category(),
            Error::Pki(_) => "pki",
        }
    }
}

/// Errors with a bounded category for metrics.
pub trait Categorised {
    fn category(&self) -> &'static str;
}

impl Categorised for kube::Error {
    fn category(&self) -> &'static str {
        match self {
            kube::Error::Api(status) if status.code == 409 => "conflict",
            kube::Error::Api(status) if status.code == 422 => "invalid",
            kube::Error::Api(status) if status.code == 403 => "forbidden",
            kube::Error::Api(_) => "api",
            _ => "transport",
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// A watch of `api` that feeds a cache (`Store`) and yields the relevant objects it
/// touched.
///
/// Only objects for which `relevant` holds are cached: an object that stops being
/// relevant (its annotation removed) leaves the cache, and unrelated objects never
/// enter it, so a cluster full of unannotated objects costs no memory. What the
/// operator never reads is dropped before caching (managedFields, the last-applied
/// annotation, and whatever `trim` removes). An object is yielded only when its
/// resourceVersion is new to the stream. Watch errors are logged and reported to the
/// readiness probe, and retried quickly (see [`WatchBackoff`]).
pub fn cached_watch<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    health: Arc<Health>,
    relevant: impl Fn(&K) -> bool + Clone + Send + Sync + 'static,
    mut trim: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let still_relevant = relevant.clone();
    let stream = watcher(api, config)
        .backoff(WatchBackoff::default())
        .inspect(move |event| {
            health.observe_api(event.is_ok());
            if let Err(error) = event {
                tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying");
            }
        })
        .filter_map(move |event| {
            futures::future::ready(match event {
                Ok(watcher::Event::InitApply(obj)) if !relevant(&obj) => None,
                Ok(watcher::Event::Apply(obj)) if !relevant(&obj) => Some(Ok(watcher::Event::Delete(obj))),
                other => Some(other),
            })
        })
        .modify(move |obj: &mut K| {
            let meta = obj.meta_mut();
            meta.managed_fields = None;
            if let Some(annotations) = meta.annotations.as_mut() {
                annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
            trim(obj);
        })
        .reflect(writer)
        .touched_objects()
        .try_filter(move |obj| futures::future::ready(still_relevant(obj)))
        // A relist (after the watch expired, e.g. when the API server restarted)
        // replays every object: only those that changed meanwhile go on, so it costs
        // no reconcile and no read for the rest. (An object not seen for a day passes
        // again: that bounds what is remembered of deleted objects.)
        .predicate_filter(
            kube::runtime::predicates::resource_version,
            kube::runtime::PredicateConfig::default().ttl(Duration::from_secs(86_400)),
        )
        // Errors were reported above and the watch retries by itself (WatchBackoff);
        // handing them on would make the controller add its own, longer backoff before
        // it looks at the stream again.
        .filter(|event| futures::future::ready(event.is_ok()));
    (reader, stream)
}

/// [`cached_watch`] of metadata only, for objects the operator merely needs to see
/// annotated (their bodies are read when acting): only objects with an annotation
/// `keep` accepts are cached, with no labels and no other annotations.
pub fn cached_metadata_watch<K>(
    client: Client,
    config: watcher::Config,
    health: Arc<Health>,
    keep: fn(&str) -> bool,
) -> (
    Store<kube::core::PartialObjectMeta<K>>,
    impl Stream<Item = Result<kube::core::PartialObjectMeta<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let api = kube::Api::<kube::core::PartialObjectMeta<K>>::all(client);
    let relevant = move |obj: &kube::core::PartialObjectMeta<K>| {
        obj.metadata.annotations.as_ref().is_some_and(|a| a.keys().any(|k| keep(k)))
    };
    cached_watch(api, config, health, relevant, move |obj| {
        obj.metadata.labels = None;
        if let Some(annotations) = obj.metadata.annotations.as_mut() {
            annotations.retain(|k, _| keep(k));
        }
    })
}

/// Retry delays for watches: 250 ms doubling to 5 s (with ±20 % jitter), back to the
/// start after any successful event. kube's default grows to 30 s, which would leave
/// the operator idle that long after an API server outage.
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Duration::from_millis(250) }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        Some(delay.mul_f64(jitter))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = WatchBackoff::default();
    }
}

/// Exponential retry delay: 1 s, 2 s, 4 s … capped at 60 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

/// Time from now until `at` (zero if past), for `Action::requeue`.
pub fn until(at: time::OffsetDateTime) -> Duration {
    let left = at - time::OffsetDateTime::now_utc();
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}
