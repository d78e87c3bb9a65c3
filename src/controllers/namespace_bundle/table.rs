//! The controller's memory: one compact [`Record`] per namespace (docs/spec.md §5.5),
//! folded from the two watches (namespaces, and the bundle ConfigMaps), and the queue
//! of namespaces to reconcile. Pure: the caller locks it and does the waiting.
//!
//! A record holds only what the plan reads (whether the namespace is selected and
//! terminating, the few bytes of [`Bundle`], the version last seen current) and the
//! namespace's name once, shared with the queue: about 200 bytes a namespace, where two
//! caches of `ObjectMeta` cost 4 KiB (docs/benchmarks.md, *Namespaces*). Every list
//! (the first one, and each after an expired watch or an API server restart) updates
//! the records in place and, once complete, drops what it no longer showed.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

use super::plan::Bundle;

/// Whether the namespace is selected (listed by the namespace watch), and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Presence {
    /// Not selected (or gone): only its ConfigMap is known.
    #[default]
    Absent,
    Live,
    Terminating,
}

/// Where a namespace is in the work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Work {
    #[default]
    Idle,
    Queued,
    Running,
    /// Running, and to be queued again when done (something changed meanwhile).
    RunningAgain,
}

/// What the controller keeps of one namespace.
#[derive(Debug, Default)]
pub struct Record {
    pub presence: Presence,
    pub bundle: Option<Bundle>,
    /// The resourceVersion this replica last saw its ConfigMap current at.
    pub seen_current: Option<Box<str>>,
    work: Work,
    /// Shown by the list under way: bit [`NAMESPACES`] and bit [`BUNDLES`].
    listed: u8,
}

const NAMESPACES: u8 = 1;
const BUNDLES: u8 = 2;

/// The records by namespace name, and the queue.
#[derive(Default)]
pub struct Table {
    records: HashMap<Arc<str>, Record>,
    queue: VecDeque<Arc<str>>,
    /// The first lists are complete: [`NAMESPACES`] | [`BUNDLES`].
    ready: u8,
}

impl Table {
    /// Both first lists are complete: until then nothing is handed out, so that a
    /// namespace whose ConfigMap is not known yet is not planned as new (a needless
    /// create on every restart).
    pub fn ready(&self) -> bool {
        self.ready == NAMESPACES | BUNDLES
    }

    pub fn get(&self, namespace: &str) -> Option<&Record> {
        self.records.get(namespace)
    }

    /// The records of the selected namespaces.
    pub fn selected(&self) -> impl Iterator<Item = &Record> {
        self.records.values().filter(|r| r.presence != Presence::Absent)
    }

    /// Folds in an event of the namespace watch: a new namespace, or one whose
    /// terminating changed, is queued (label changes are not).
    pub fn namespace_event(&mut self, event: Event<PartialObjectMeta<Namespace>>) {
        match event {
            Event::Init => self.records.values_mut().for_each(|r| r.listed &= !NAMESPACES),
            Event::InitApply(ns) | Event::Apply(ns) => {
                let Some(name) = ns.metadata.name else { return };
                let presence = match ns.metadata.deletion_timestamp {
                    Some(_) => Presence::Terminating,
                    None => Presence::Live,
                };
                let (key, record) = self.record(&name);
                record.listed |= NAMESPACES;
                if std::mem::replace(&mut record.presence, presence) != presence {
                    self.enqueue(key);
                }
            }
            Event::Delete(ns) => {
                if let Some(name) = ns.metadata.name {
                    self.set_absent(&name);
                }
            }
            Event::InitDone => {
                self.ready |= NAMESPACES;
                let gone = self.unlisted(NAMESPACES, |r| r.presence != Presence::Absent);
                gone.iter().for_each(|name| self.set_absent(name));
            }
        }
    }

    /// Folds in an event of the ConfigMap watch (`instance`: this operator's name, which
    /// tells ours): a new version queues its namespace.
    pub fn bundle_event(&mut self, event: Event<PartialObjectMeta<ConfigMap>>, instance: &str) {
        match event {
            Event::Init => self.records.values_mut().for_each(|r| r.listed &= !BUNDLES),
            Event::InitApply(cm) | Event::Apply(cm) => {
                let Some(namespace) = cm.metadata.namespace.as_deref() else { return };
                let (key, record) = self.record(namespace);
                record.listed |= BUNDLES;
                let version = cm.metadata.resource_version.as_deref().unwrap_or_default();
                if record.bundle.as_ref().is_none_or(|b| &*b.version != version) {
                    record.bundle = Some(Bundle::of(&cm.metadata, instance));
                    self.enqueue(key);
                }
            }
            Event::Delete(cm) => {
                if let Some(namespace) = cm.metadata.namespace.as_deref() {
                    self.drop_bundle(namespace);
                }
            }
            Event::InitDone => {
                self.ready |= BUNDLES;
                let gone = self.unlisted(BUNDLES, |r| r.bundle.is_some());
                gone.iter().for_each(|name| self.drop_bundle(name));
            }
        }
    }

    /// Queues every selected namespace (a new bundle).
    pub fn enqueue_all(&mut self) {
        let live: Vec<Arc<str>> =
            self.records.iter().filter(|(_, r)| r.presence == Presence::Live).map(|(k, _)| k.clone()).collect();
        live.into_iter().for_each(|name| self.enqueue(name));
    }

    /// Queues `namespace` if it is selected and not queued yet (one running now runs
    /// again when done).
    pub fn enqueue(&mut self, namespace: Arc<str>) {
        let Some(record) = self.records.get_mut(&namespace) else { return };
        if record.presence == Presence::Absent && record.work == Work::Idle {
            self.forget_if_empty(&namespace);
            return;
        }
        match record.work {
            Work::Idle => {
                record.work = Work::Queued;
                self.queue.push_back(namespace);
            }
            Work::Running => record.work = Work::RunningAgain,
            Work::Queued | Work::RunningAgain => {}
        }
    }

    /// The next namespace to reconcile, now running (none before [`Self::ready`]).
    pub fn take(&mut self) -> Option<Arc<str>> {
        if !self.ready() {
            return None;
        }
        while let Some(name) = self.queue.pop_front() {
            if let Some(record) = self.records.get_mut(&name)
                && record.work == Work::Queued
            {
                record.work = Work::Running;
                return Some(name);
            }
        }
        None
    }

    /// `namespace`'s pass is over: queued again if something changed meanwhile, its
    /// record dropped if nothing is left of it.
    pub fn done(&mut self, namespace: &Arc<str>) {
        let Some(record) = self.records.get_mut(namespace) else { return };
        let again = record.work == Work::RunningAgain;
        record.work = Work::Idle;
        if again {
            self.enqueue(namespace.clone());
        } else {
            self.forget_if_empty(namespace);
        }
    }

    /// Records that `namespace`'s ConfigMap was current at `version`.
    pub fn saw_current(&mut self, namespace: &str, version: Option<&str>) {
        if let Some(record) = self.records.get_mut(namespace) {
            record.seen_current = version.map(Box::from);
        }
    }

    /// The record of `namespace`, made if there is none, with its shared key.
    fn record(&mut self, namespace: &str) -> (Arc<str>, &mut Record) {
        let key = match self.records.get_key_value(namespace) {
            Some((key, _)) => key.clone(),
            None => Arc::from(namespace),
        };
        let record = match self.records.entry(key.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Record::default()),
        };
        (key, record)
    }

    /// The namespaces of records that `held` and that the list under way did not show.
    fn unlisted(&self, bit: u8, held: impl Fn(&Record) -> bool) -> Vec<Arc<str>> {
        self.records.iter().filter(|(_, r)| held(r) && r.listed & bit == 0).map(|(k, _)| k.clone()).collect()
    }

    /// The namespace is no longer selected (deleted, or its labels changed).
    fn set_absent(&mut self, namespace: &str) {
        let Some(record) = self.records.get_mut(namespace) else { return };
        record.presence = Presence::Absent;
        record.seen_current = None;
        self.forget_if_empty(namespace);
    }

    fn drop_bundle(&mut self, namespace: &str) {
        let Some((key, _)) = self.records.get_key_value(namespace) else { return };
        let key = key.clone();
        if let Some(record) = self.records.get_mut(namespace) {
            record.bundle = None;
        }
        self.enqueue(key);
    }

    fn forget_if_empty(&mut self, namespace: &str) {
        let empty = |r: &Record| r.presence == Presence::Absent && r.bundle.is_none() && r.work == Work::Idle;
        if self.records.get(namespace).is_some_and(empty) {
            self.records.remove(namespace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{BUNDLE_DIGEST, NAMESPACE_BUNDLE, NAMESPACE_BUNDLE_LABEL};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn ns(name: &str, terminating: bool) -> PartialObjectMeta<Namespace> {
        let deletion_timestamp = terminating.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let metadata = ObjectMeta { name: Some(name.into()), deletion_timestamp, ..Default::default() };
        PartialObjectMeta { types: None, metadata, _phantom: Default::default() }
    }

    fn cm(namespace: &str, version: &str) -> PartialObjectMeta<ConfigMap> {
        let metadata = ObjectMeta {
            name: Some(NAMESPACE_BUNDLE.into()),
            namespace: Some(namespace.into()),
            resource_version: Some(version.into()),
            labels: Some([(NAMESPACE_BUNDLE_LABEL.to_string(), "sca".to_string())].into()),
            annotations: Some([(BUNDLE_DIGEST.to_string(), super::super::plan::digest("b"))].into()),
            ..Default::default()
        };
        PartialObjectMeta { types: None, metadata, _phantom: Default::default() }
    }

    fn drain(table: &mut Table) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(name) = table.take() {
            out.push(name.to_string());
            table.done(&name);
        }
        out.sort();
        out
    }

    /// Both first lists: namespaces a, b (b terminating); ConfigMaps in a and in c
    /// (c not selected).
    fn listed() -> Table {
        let mut t = Table::default();
        t.namespace_event(Event::Init);
        t.namespace_event(Event::InitApply(ns("a", false)));
        t.namespace_event(Event::InitApply(ns("b", true)));
        t.namespace_event(Event::InitDone);
        assert_eq!(t.take(), None, "nothing is handed out before the ConfigMaps are listed");
        t.bundle_event(Event::Init, "sca");
        t.bundle_event(Event::InitApply(cm("a", "1")), "sca");
        t.bundle_event(Event::InitApply(cm("c", "1")), "sca");
        t.bundle_event(Event::InitDone, "sca");
        t
    }

    #[test]
    fn the_first_lists_queue_every_selected_namespace_once() {
        let mut t = listed();
        assert!(t.ready());
        assert_eq!(drain(&mut t), ["a", "b"]);
        assert_eq!(t.get("a").and_then(|r| r.bundle.as_ref()).map(|b| &*b.version), Some("1"));
        assert_eq!(
            t.get("c").map(|r| r.presence),
            Some(Presence::Absent),
            "an unselected namespace's ConfigMap is kept"
        );
        assert_eq!(t.selected().count(), 2);
    }

    #[test]
    fn changes_queue_their_namespace_and_replays_do_not() {
        let mut t = listed();
        drain(&mut t);
        t.bundle_event(Event::Apply(cm("a", "1")), "sca");
        t.namespace_event(Event::Apply(ns("a", false)));
        assert_eq!(drain(&mut t), Vec::<String>::new(), "the same version, the same presence");
        t.bundle_event(Event::Apply(cm("a", "2")), "sca");
        t.bundle_event(Event::Apply(cm("a", "3")), "sca");
        assert_eq!(drain(&mut t), ["a"], "queued once");
        t.bundle_event(Event::Delete(cm("a", "3")), "sca");
        assert_eq!(drain(&mut t), ["a"], "its ConfigMap deleted");
        assert!(t.get("a").is_some_and(|r| r.bundle.is_none()));
        t.namespace_event(Event::Apply(ns("d", false)));
        t.bundle_event(Event::Apply(cm("c", "2")), "sca");
        assert_eq!(drain(&mut t), ["d"], "a new namespace; not the unselected one");
        t.enqueue_all();
        assert_eq!(drain(&mut t), ["a", "d"], "a new bundle: the live ones");
    }

    #[test]
    fn a_change_while_running_runs_it_again_after() {
        let mut t = listed();
        let a = t.take().unwrap();
        t.bundle_event(Event::Apply(cm(&a, "9")), "sca");
        let others: Vec<Arc<str>> = std::iter::from_fn(|| t.take()).collect();
        assert!(!others.contains(&a), "not twice at once: {others:?}");
        others.iter().for_each(|n| t.done(n));
        t.done(&a);
        assert_eq!(t.take().as_deref(), Some(&*a));
    }

    #[test]
    fn a_relist_updates_in_place_and_drops_what_it_no_longer_shows() {
        let mut t = listed();
        drain(&mut t);
        t.saw_current("a", Some("1"));
        t.namespace_event(Event::Init);
        t.bundle_event(Event::Init, "sca");
        t.namespace_event(Event::InitApply(ns("a", false)));
        t.namespace_event(Event::InitApply(ns("e", false)));
        t.namespace_event(Event::InitDone);
        t.bundle_event(Event::InitApply(cm("a", "1")), "sca");
        t.bundle_event(Event::InitDone, "sca");
        assert_eq!(drain(&mut t), ["e"], "only what changed");
        assert!(t.get("b").is_none(), "a namespace gone is forgotten");
        assert!(t.get("c").is_none(), "a ConfigMap gone, in a namespace not selected: forgotten");
        assert_eq!(t.get("a").and_then(|r| r.seen_current.as_deref()), Some("1"));
        t.namespace_event(Event::Delete(ns("a", true)));
        t.bundle_event(Event::Delete(cm("a", "1")), "sca");
        assert!(t.get("a").is_none());
        assert_eq!(t.selected().count(), 1);
    }

    #[test]
    fn a_record_is_small() {
        // Per namespace: this, its name, its ConfigMap's resourceVersion and the last
        // seen one (a few bytes each), and a map slot (docs/benchmarks.md, *Namespaces*).
        assert!(size_of::<Record>() <= 64, "{}", size_of::<Record>());
    }
}
