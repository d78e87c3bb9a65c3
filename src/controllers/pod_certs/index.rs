//! The index of Services the pod signer matches requests against: by namespace, only
//! the selector (bounded) and whether headless, kept current in place by a watch of the
//! Services the selector (`--selector`) picks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};

use super::plan::{self, IndexedService};
use crate::controllers::watch::{WatchBackoff, watch_events};
use crate::controllers::{Context, EventType};

/// Services by namespace and name — only what matching needs: the selector, bounded
/// ([`plan::bounded_selector`]), and whether headless — so that a request costs no
/// list of Services. Filled by a watch of the Services the selector (`--selector`)
/// picks, in place: a relist marks what it shows and drops the rest when complete
/// (never a second map beside the first). A request gets the entries of its
/// namespace as shared pointers, not copies.
#[derive(Default)]
pub struct ServiceIndex {
    inner: Mutex<IndexInner>,
}

#[derive(Default)]
struct IndexInner {
    by_namespace: HashMap<Box<str>, BTreeMap<Box<str>, Slot>>,
    /// The number of the current list: entries a list shows carry it.
    list: u64,
    synced: bool,
}

struct Slot {
    kept: Kept,
    /// The list that last showed it.
    list: u64,
}

#[derive(PartialEq)]
enum Kept {
    Service(Arc<IndexedService>),
    /// A selector beyond the bound: reported once, not used.
    Oversize,
}

/// What one watch event changed.
#[derive(Debug, Default, PartialEq)]
struct Applied {
    /// The namespaces whose Services changed (`None`: all of them, after a list).
    namespaces: Option<Vec<String>>,
    /// Services whose selector just went beyond the bound, to report (once).
    oversize: Vec<(ObjectReference, usize, usize)>,
}

impl ServiceIndex {
    pub fn synced(&self) -> bool {
        self.inner.lock().is_ok_and(|i| i.synced)
    }

    /// The usable Services of `namespace` (pointers into the index).
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<IndexedService>> {
        let Ok(inner) = self.inner.lock() else { return Vec::new() };
        let Some(services) = inner.by_namespace.get(namespace) else { return Vec::new() };
        services
            .values()
            .filter_map(|slot| match &slot.kept {
                Kept::Service(service) => Some(service.clone()),
                Kept::Oversize => None,
            })
            .collect()
    }

    /// Takes in one watch event.
    fn apply(&self, event: watcher::Event<Service>) -> Applied {
        let Ok(mut inner) = self.inner.lock() else { return Applied::default() };
        let mut applied = Applied { namespaces: Some(Vec::new()), oversize: Vec::new() };
        match event {
            watcher::Event::Init => inner.list = inner.list.wrapping_add(1),
            watcher::Event::InitApply(s) => {
                inner.put(s, &mut applied);
            }
            watcher::Event::InitDone => {
                let list = inner.list;
                inner.by_namespace.retain(|_, services| {
                    services.retain(|_, slot| slot.list == list);
                    !services.is_empty()
                });
                inner.synced = true;
                applied.namespaces = None;
            }
            watcher::Event::Apply(s) => {
                let namespace = s.namespace().unwrap_or_default();
                if inner.put(s, &mut applied) {
                    applied.namespaces = Some(vec![namespace]);
                }
            }
            watcher::Event::Delete(s) => {
                let namespace = s.namespace().unwrap_or_default();
                inner.remove(&namespace, &s.name_any());
                applied.namespaces = Some(vec![namespace]);
            }
        }
        applied
    }
}

impl IndexInner {
    /// Indexes one Service as read; returns whether what matching sees changed.
    fn put(&mut self, service: Service, applied: &mut Applied) -> bool {
        let (namespace, name) = (service.namespace().unwrap_or_default(), service.name_any());
        let spec = service.spec.as_ref();
        let headless = spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None");
        let kept = match plan::bounded_selector(spec.and_then(|s| s.selector.as_ref())) {
            plan::Selector::None => None,
            plan::Selector::Oversize { pairs, bytes } => {
                let known = self.by_namespace.get(namespace.as_str()).and_then(|s| s.get(name.as_str()));
                if !known.is_some_and(|slot| slot.kept == Kept::Oversize) {
                    applied.oversize.push((service.object_ref(&()), pairs, bytes));
                }
                Some(Kept::Oversize)
            }
            plan::Selector::Pairs(selector) => {
                Some(Kept::Service(Arc::new(IndexedService { name: name.as_str().into(), selector, headless })))
            }
        };
        let Some(kept) = kept else { return self.remove(&namespace, &name) };
        let list = self.list;
        let services = self.by_namespace.entry(namespace.into()).or_default();
        match services.get_mut(name.as_str()) {
            Some(slot) => {
                slot.list = list;
                if slot.kept == kept {
                    return false;
                }
                slot.kept = kept;
            }
            None => {
                services.insert(name.into(), Slot { kept, list });
            }
        }
        true
    }

    /// Drops one Service; returns whether it was indexed.
    fn remove(&mut self, namespace: &str, name: &str) -> bool {
        let Some(services) = self.by_namespace.get_mut(namespace) else { return false };
        let removed = services.remove(name).is_some();
        if services.is_empty() {
            self.by_namespace.remove(namespace);
        }
        removed
    }
}

impl ServiceIndex {
    /// Keeps the index current from a watch; yields the waiting requests to look at
    /// again when Services of their namespace change. A Service whose selector goes
    /// beyond the bound is reported once (a log line and a Warning Event on it).
    pub(super) fn follow(
        self: Arc<Self>,
        ctx: &Arc<Context>,
        requests: Store<PodCertificateRequest>,
    ) -> impl Stream<Item = ObjectRef<PodCertificateRequest>> + Send + 'static {
        let health = ctx.health.clone();
        let ctx = ctx.clone();
        let config = watcher::Config::default().labels(&ctx.config.selector);
        watch_events(Api::<Service>::all(ctx.client.clone()), config)
            .backoff(WatchBackoff::default())
            .then(move |event| {
                health.observe_api(event.is_ok());
                let (index, ctx, requests) = (self.clone(), ctx.clone(), requests.clone());
                async move {
                    let applied = match event {
                        Ok(event) => index.apply(event),
                        Err(error) => {
                            tracing::warn!(%error, "watching Services for pod certificates failed; retrying");
                            Applied::default()
                        }
                    };
                    for (service, pairs, bytes) in applied.oversize {
                        report_oversize(&ctx, &service, pairs, bytes).await;
                    }
                    let refs: Vec<_> = match applied.namespaces {
                        Some(namespaces) if namespaces.is_empty() => Vec::new(),
                        Some(namespaces) => requests
                            .state()
                            .iter()
                            .filter(|r| namespaces.contains(&r.namespace().unwrap_or_default()))
                            .map(|r| ObjectRef::from_obj(r.as_ref()))
                            .collect(),
                        None => requests.state().iter().map(|r| ObjectRef::from_obj(r.as_ref())).collect(),
                    };
                    futures::stream::iter(refs)
                }
            })
            .flatten()
    }
}

/// Says once that a Service's selector is not used for pod certificates.
async fn report_oversize(ctx: &Context, service: &ObjectReference, pairs: usize, bytes: usize) {
    let (namespace, name) =
        (service.namespace.as_deref().unwrap_or_default(), service.name.as_deref().unwrap_or_default());
    let key = format!("{namespace}/{}", crate::bounded(name));
    tracing::warn!(
        service = %key, pairs, bytes, max_pairs = plan::MAX_SELECTOR_PAIRS, max_bytes = plan::MAX_SELECTOR_BYTES,
        "Service selector too large: not used for pod certificates"
    );
    let note = format!(
        "the selector has {pairs} label pairs ({bytes} bytes), more than the {} pairs or {} bytes the pod \
         certificate signer keeps: pods it selects get no certificate for this Service's names",
        plan::MAX_SELECTOR_PAIRS,
        plan::MAX_SELECTOR_BYTES
    );
    ctx.event(service, EventType::Warning, "SelectorTooLarge", note).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ns: &str, name: &str, app: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": { "namespace": ns, "name": name },
            "spec": { "selector": { "app": app }, "clusterIP": "None" }
        }))
        .unwrap()
    }

    fn changed(namespaces: &[&str]) -> Applied {
        Applied { namespaces: Some(namespaces.iter().map(|n| n.to_string()).collect()), oversize: Vec::new() }
    }

    fn names(index: &ServiceIndex, ns: &str) -> Vec<String> {
        index.in_namespace(ns).iter().map(|s| s.name.to_string()).collect()
    }

    #[test]
    fn the_service_index_follows_the_watch_and_names_the_namespaces_that_changed() {
        let index = ServiceIndex::default();
        assert!(!index.synced());
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(service("a", "web", "web")));
        assert!(!index.synced(), "not before the list is complete");
        assert_eq!(index.apply(watcher::Event::InitDone).namespaces, None, "a list: every namespace");
        assert!(index.synced());
        let web = &index.in_namespace("a")[0];
        assert!(web.headless && *web.selector == [("app".into(), "web".into())] && &*web.name == "web");
        assert_eq!(index.apply(watcher::Event::Apply(service("a", "web", "web"))), changed(&[]), "nothing changed");
        assert_eq!(index.apply(watcher::Event::Apply(service("b", "db", "db"))), changed(&["b"]));
        assert_eq!(index.apply(watcher::Event::Delete(service("a", "web", "web"))), changed(&["a"]));
        assert!(index.in_namespace("a").is_empty());
        assert_eq!(names(&index, "b"), ["db"]);
    }

    #[test]
    fn a_relist_updates_in_place_and_drops_what_it_no_longer_shows() {
        let index = ServiceIndex::default();
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(service("a", "web", "web")));
        index.apply(watcher::Event::InitApply(service("a", "gone", "gone")));
        index.apply(watcher::Event::InitDone);
        let held = index.in_namespace("a");
        // A later list: entries are marked as it shows them; kept pointers stay valid.
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(service("a", "web", "web")));
        index.apply(watcher::Event::InitApply(service("c", "new", "new")));
        assert_eq!(names(&index, "a"), ["gone", "web"], "nothing dropped before the list is complete");
        index.apply(watcher::Event::InitDone);
        assert_eq!(names(&index, "a"), ["web"]);
        assert_eq!(names(&index, "c"), ["new"]);
        let web_before = held.iter().find(|s| &*s.name == "web").unwrap();
        assert!(Arc::ptr_eq(web_before, &index.in_namespace("a")[0]), "an unchanged Service is the same entry");
    }

    #[test]
    fn an_oversize_selector_is_reported_once_and_never_used() {
        let index = ServiceIndex::default();
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitDone);
        let mut big = service("a", "big", "web");
        let selector: BTreeMap<String, String> = (0..1000).map(|i| (format!("k{i}"), "v".repeat(50))).collect();
        big.spec.as_mut().unwrap().selector = Some(selector);
        let applied = index.apply(watcher::Event::Apply(big.clone()));
        assert_eq!(applied.oversize.len(), 1);
        assert_eq!(applied.oversize[0].1, 1000);
        assert_eq!(applied.oversize[0].0.name.as_deref(), Some("big"));
        assert!(index.in_namespace("a").is_empty(), "not used");
        big.metadata.resource_version = Some("2".into());
        assert!(index.apply(watcher::Event::Apply(big.clone())).oversize.is_empty(), "reported once");
        // A relist shows it again: still not reported again.
        index.apply(watcher::Event::Init);
        assert!(index.apply(watcher::Event::InitApply(big)).oversize.is_empty());
        index.apply(watcher::Event::InitDone);
        // Back within the bound: used again.
        assert_eq!(index.apply(watcher::Event::Apply(service("a", "big", "web"))), changed(&["a"]));
        assert_eq!(names(&index, "a"), ["big"]);
        // No selector: nothing kept.
        let mut bare = service("a", "big", "web");
        bare.spec.as_mut().unwrap().selector = None;
        assert_eq!(index.apply(watcher::Event::Apply(bare)), changed(&["a"]));
        assert!(index.in_namespace("a").is_empty());
    }
}
