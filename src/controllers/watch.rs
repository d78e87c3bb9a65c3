//! The watches behind every controller's cache: a streaming first list that falls back
//! to list-then-watch ([`watch_events`]), caches fed in place that keep only relevant,
//! trimmed objects and hand on only changes ([`cached_watch`],
//! [`cached_metadata_watch`]), and the quick retry delays of a failed watch
//! ([`WatchBackoff`]).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::admin::Health;

/// The longest annotation value a cache keeps. Every value the operator reads is far
/// shorter when valid (a Secret name: 253 bytes); a longer one is invalid however it
/// ends, and is cut here so that it costs no more than that.
pub(crate) const MAX_CACHED_VALUE: usize = 1024;

/// How long the first (streaming) list may take before the watch lists instead.
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(120);

/// The events behind every cache. The first list is a streaming list (KEP-3157): the
/// objects arrive one by one as watch events and are trimmed as they come, so a start
/// never holds a whole list response — 500 Services carrying 200 KB of tenant
/// annotations each would otherwise pass through memory at once (hundreds of MiB, over
/// the Deployment's limit). From the first error on (an API server restart, an expired
/// resourceVersion), or when the first list does not complete within
/// [`FIRST_LIST_TIMEOUT`] (an API server that ignores `sendInitialEvents`), the watch
/// goes on as list-then-watch: streaming re-lists right after an API server restart
/// went unanswered on the test control plane (docs/design.md, *Watches*).
pub fn watch_events<K>(
    api: kube::Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let streaming = watcher(api.clone(), config.clone().streaming_lists()).boxed();
    let deadline = crate::dates::deadline(FIRST_LIST_TIMEOUT);
    let first = futures::stream::unfold((streaming, false), move |(mut events, synced)| async move {
        let next = if synced {
            events.next().await
        } else {
            tokio::time::timeout_at(deadline, events.next()).await.unwrap_or_else(|_| {
                tracing::warn!(kind = %K::kind(&()), "the streaming list did not complete; listing instead");
                None
            })
        };
        match next? {
            Ok(event) => {
                let synced = synced || matches!(event, watcher::Event::InitDone);
                Some((Ok(event), (events, synced)))
            }
            Err(error) => {
                tracing::info!(kind = %K::kind(&()), %error, "watch interrupted; going on with list-then-watch");
                None
            }
        }
    });
    first.chain(watcher(api, config))
}

/// The events of [`watch_events`], retried quickly after an error ([`WatchBackoff`]).
/// Errors are logged and reported to the readiness probe, not handed on: the watch
/// retries by itself, and a controller handed an error would add its own, longer
/// backoff before it looked at the stream again.
pub fn reported_events<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    health: Arc<Health>,
) -> impl Stream<Item = watcher::Event<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watch_events(api, config).backoff(WatchBackoff::default()).filter_map(move |event| {
        health.observe_api(event.is_ok());
        match &event {
            Err(error) => tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying"),
            Ok(watcher::Event::InitDone) => tracing::debug!(kind = %K::kind(&()), "listed"),
            Ok(_) => {}
        }
        futures::future::ready(event.ok())
    })
}

/// A watch of `api` that feeds a cache (`Store`) and yields the relevant objects it
/// touched.
///
/// Only objects for which `relevant` holds are cached: an object that stops being
/// relevant (its annotation removed) leaves the cache, and unrelated objects never
/// enter it, so a cluster full of unannotated objects costs no memory. What the
/// operator never reads is dropped before caching (managedFields, the last-applied
/// annotation, and whatever `trim` removes). An object is yielded only when its
/// resourceVersion differs from the cached one and `changed(cached, new)` holds (a
/// deletion always is). Watch errors are logged and reported to the
/// readiness probe, and retried quickly (see [`WatchBackoff`]).
pub fn cached_watch<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    health: Arc<Health>,
    relevant: impl Fn(&K) -> bool + Clone + Send + Sync + 'static,
    mut trim: impl FnMut(&mut K) + Send + 'static,
    changed: impl FnMut(Option<&K>, &K) -> bool + Send + 'static,
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let still_relevant = relevant.clone();
    let mut cache = InPlaceCache { writer, reader: reader.clone(), listed: false, seen: None, changed };
    let stream = reported_events(api, config, health)
        .filter_map(move |event| {
            futures::future::ready(match event {
                watcher::Event::InitApply(obj) if !relevant(&obj) => None,
                watcher::Event::Apply(obj) if !relevant(&obj) => Some(watcher::Event::Delete(obj)),
                event => Some(event),
            })
        })
        .map(move |mut event| {
            if let watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) = &mut event {
                let meta = obj.meta_mut();
                meta.managed_fields = None;
                if let Some(annotations) = meta.annotations.as_mut() {
                    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
                }
                trim(obj);
                // What stays is read, not stored whole: a tenant's 200 KB "Secret name"
                // is as invalid cut to a KiB.
                for value in obj.meta_mut().annotations.iter_mut().flat_map(|a| a.values_mut()) {
                    if value.len() > MAX_CACHED_VALUE {
                        *value = crate::bounded_to(value, MAX_CACHED_VALUE).into_owned();
                    }
                }
            }
            futures::stream::iter(cache.apply(event))
        })
        .flatten()
        // An object that stopped being relevant left the cache above; it needs no
        // reconcile.
        .filter(move |obj| futures::future::ready(still_relevant(obj)))
        .map(Ok::<K, watcher::Error>);
    (reader, stream)
}

/// A cache fed in place. The first list fills it as kube's reflector does; every
/// later list (after an expired watch or an API server restart) updates it object by
/// object and, once complete, drops what the list no longer holds — so a relist never
/// builds a second copy of the cache beside the first (kube's reflector would).
///
/// The cache is also what tells a change from a replay: an object whose
/// resourceVersion is the one cached is not handed on, so a relist costs no reconcile
/// for what did not change, and nothing is remembered of deleted objects.
struct InPlaceCache<K: Resource<DynamicType = ()> + Clone + 'static, C> {
    writer: reflector::store::Writer<K>,
    reader: Store<K>,
    /// The first list is complete.
    listed: bool,
    /// During a later list: the objects it has shown so far.
    seen: Option<std::collections::HashSet<ObjectRef<K>>>,
    /// Whether a new version (of an object cached or not) is worth handing on.
    changed: C,
}

impl<K, C> InPlaceCache<K, C>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    C: FnMut(Option<&K>, &K) -> bool,
{
    /// Applies one watch event; returns the objects it touched (changed or deleted).
    fn apply(&mut self, event: watcher::Event<K>) -> Vec<K> {
        match event {
            watcher::Event::Init if self.listed => {
                self.seen = Some(Default::default());
                Vec::new()
            }
            watcher::Event::InitApply(obj) if !self.listed => {
                let obj = self.write(watcher::Event::InitApply(obj));
                obj.filter(|obj| (self.changed)(None, obj)).into_iter().collect()
            }
            watcher::Event::InitDone if self.listed => {
                let seen = self.seen.take().unwrap_or_default();
                let gone: Vec<K> = self
                    .reader
                    .state()
                    .into_iter()
                    .filter(|obj| !seen.contains(&ObjectRef::from_obj(obj.as_ref())))
                    .map(|obj| obj.as_ref().clone())
                    .collect();
                gone.into_iter().filter_map(|obj| self.write(watcher::Event::Delete(obj))).collect()
            }
            event @ (watcher::Event::Init | watcher::Event::InitDone) => {
                self.listed |= matches!(event, watcher::Event::InitDone);
                self.writer.apply_watcher_event(&event);
                Vec::new()
            }
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                let key = ObjectRef::from_obj(&obj);
                let cached = self.reader.get(&key);
                if let Some(seen) = self.seen.as_mut() {
                    seen.insert(key);
                }
                if cached.as_ref().is_some_and(|cached| cached.meta().resource_version == obj.meta().resource_version) {
                    return Vec::new();
                }
                let obj = self.write(watcher::Event::Apply(obj));
                obj.filter(|obj| (self.changed)(cached.as_deref(), obj)).into_iter().collect()
            }
            watcher::Event::Delete(obj) => self.write(watcher::Event::Delete(obj)).into_iter().collect(),
        }
    }

    /// Writes `event` to the cache (the writer stores its own copy) and gives back its
    /// object, if it has one.
    fn write(&mut self, event: watcher::Event<K>) -> Option<K> {
        self.writer.apply_watcher_event(&event);
        match event {
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) | watcher::Event::Delete(obj) => Some(obj),
            watcher::Event::Init | watcher::Event::InitDone => None,
        }
    }
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
    let trim = move |obj: &mut kube::core::PartialObjectMeta<K>| {
        let meta = &mut obj.metadata;
        meta.labels = None;
        meta.owner_references = None;
        meta.finalizers = None;
        if let Some(annotations) = meta.annotations.as_mut() {
            annotations.retain(|k, _| keep(k));
        }
    };
    cached_watch(api, config, health, relevant, trim, |_, _| true)
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
        self.next = self.next.saturating_mul(2).min(Duration::from_secs(5));
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        Some(delay.mul_f64(jitter))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = WatchBackoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;
    use watcher::Event;

    fn cm(name: &str, rv: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("ns".into());
        cm.metadata.resource_version = Some(rv.into());
        cm
    }

    fn names(objects: &[ConfigMap]) -> Vec<String> {
        objects.iter().map(|o| o.name_any()).collect()
    }

    type Everything = fn(Option<&ConfigMap>, &ConfigMap) -> bool;

    fn cache() -> (Store<ConfigMap>, InPlaceCache<ConfigMap, Everything>) {
        let (reader, writer) = reflector::store();
        (reader.clone(), InPlaceCache { writer, reader, listed: false, seen: None, changed: |_, _| true })
    }

    #[test]
    fn a_relist_updates_the_cache_in_place_and_hands_on_only_changes() {
        let (store, mut cache) = cache();
        assert!(cache.apply(Event::Init).is_empty());
        assert_eq!(names(&cache.apply(Event::InitApply(cm("a", "1")))), ["a"]);
        cache.apply(Event::InitApply(cm("b", "1")));
        cache.apply(Event::InitApply(cm("c", "1")));
        assert!(cache.apply(Event::InitDone).is_empty());
        assert_eq!(store.len(), 3);
        let held = store.get(&ObjectRef::new("a").within("ns")).unwrap();

        // A relist: "a" unchanged, "b" changed, "c" gone, "d" new.
        cache.apply(Event::Init);
        assert!(cache.apply(Event::InitApply(cm("a", "1"))).is_empty(), "unchanged: not handed on");
        assert_eq!(names(&cache.apply(Event::InitApply(cm("b", "2")))), ["b"]);
        // In place: the new version is visible at once, beside no second copy.
        assert_eq!(store.get(&ObjectRef::new("b").within("ns")).unwrap().resource_version().as_deref(), Some("2"));
        assert_eq!(store.len(), 3);
        assert_eq!(names(&cache.apply(Event::InitApply(cm("d", "1")))), ["d"]);
        assert_eq!(store.len(), 4, "until the list completes, what it has not shown yet stays");
        assert_eq!(names(&cache.apply(Event::InitDone)), ["c"], "what the list no longer holds is dropped");
        let mut left: Vec<String> = store.state().iter().map(|o| o.name_any()).collect();
        left.sort();
        assert_eq!(left, ["a", "b", "d"]);
        // The unchanged object was not even replaced.
        assert!(Arc::ptr_eq(&held, &store.get(&ObjectRef::new("a").within("ns")).unwrap()));
    }

    #[test]
    fn watch_events_between_relists_apply_as_they_come() {
        let (store, mut cache) = cache();
        cache.apply(Event::Init);
        cache.apply(Event::InitDone);
        assert_eq!(names(&cache.apply(Event::Apply(cm("a", "1")))), ["a"]);
        assert!(cache.apply(Event::Apply(cm("a", "1"))).is_empty(), "a replayed version is not handed on");
        assert_eq!(names(&cache.apply(Event::Delete(cm("a", "2")))), ["a"]);
        assert!(store.is_empty());
    }
}
