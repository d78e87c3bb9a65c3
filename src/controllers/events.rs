//! Events (`events.k8s.io/v1`) about the objects the operator acts on.
//!
//! A repeat of the same report (same object, type, reason and action) within
//! [`SERIES_WINDOW`] is folded into the Event already written, as a series with a
//! count. To fold, the recorder remembers each recent Event's name and count — never
//! the Event itself — and at most [`MAX_SERIES`] of them: a bulk issuance writes an
//! Event per certificate, and those must not stay in memory (kube's recorder keeps
//! every Event it wrote for six minutes, about 2 KiB each).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::names::MAX_NAME;

/// How long after an Event a repeat is counted on it rather than written anew.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// How many recent Events the recorder remembers for folding. Past that, a report
/// is written as a new Event.
pub const MAX_SERIES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One report about an object.
pub struct Report<'a> {
    pub type_: EventType,
    pub reason: &'a str,
    /// What the operator did or tried (with the reason, what is folded on).
    pub action: &'a str,
    pub note: &'a str,
}

/// A recent Event, enough to count a repeat on it.
struct Series {
    name: String,
    count: i32,
    last: Instant,
}

pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
    /// Normal reports that wait while urgent key work is pending.
    deferred: Deferred,
}

/// A short digest of a message, to tell one message from another.
pub fn digest(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl Recorder {
    /// Publishes an Event (see `Context::event`: the note bounded, its digest in the
    /// action); a failure to do so is logged, never fatal.
    pub async fn note(
        &self,
        metrics: &crate::metrics::Metrics,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let note = crate::bounded_to(&note, 1000);
        let action = format!("{reason}/{:08x}", digest(&note) as u32);
        metrics.write("events", "create");
        let report = Report { type_, reason, action: &action, note: &note };
        if let Err(error) = self.publish(&report, regarding).await {
            tracing::warn!(%error, reason, "could not publish an Event");
        }
    }

    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Recorder {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
            recent: Mutex::new(Recent::default()),
            deferred: Deferred::default(),
        }
    }

    /// Keeps `report` to be written by [`Recorder::write_deferred`]; gives it back when
    /// [`MAX_DEFERRED`] already wait.
    pub fn hold(&self, report: Pending) -> Option<Pending> {
        self.deferred.hold(report)
    }

    /// Writes the held reports, in order, whenever `busy()` (urgent key work queued or
    /// running) is false, until shutdown; then what is left, for at most 5 s.
    pub async fn write_deferred(
        &self,
        metrics: &crate::metrics::Metrics,
        busy: impl Fn() -> bool,
        shutdown: crate::shutdown::Shutdown,
    ) {
        let write = async |report: Pending| {
            self.note(metrics, &report.regarding, report.type_, report.reason, report.note).await;
        };
        let mut stop = std::pin::pin!(shutdown.signal());
        loop {
            // Asleep while nothing is held; while something is, looked at every
            // DEFERRED_EVERY until the urgent work is done.
            let next = async {
                if self.deferred.is_empty() {
                    self.deferred.held.notified().await;
                }
                tokio::time::sleep(DEFERRED_EVERY).await;
            };
            tokio::select! {
                _ = &mut stop => break,
                _ = next => {}
            }
            while !busy() {
                let Some(report) = self.deferred.take() else { break };
                write(report).await;
            }
        }
        let rest = async {
            while let Some(report) = self.deferred.take() {
                write(report).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), rest).await;
    }

    /// Writes `report` about `regarding`: a new Event, or a repeat counted on the
    /// recent Event for the same report.
    pub async fn publish(&self, report: &Report<'_>, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let key = series_key(report, regarding);
        let now = Timestamp::now();
        if let Some((name, count)) = self.repeat(key) {
            let series = EventSeries { count, last_observed_time: MicroTime(now) };
            let patch = serde_json::json!({ "series": series });
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(()),
                // The Event is gone (its TTL in the API server, or deleted): write anew.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(error),
            }
        }
        let name = event_name(regarding.name.as_deref().unwrap_or(&self.controller), now.as_nanosecond());
        let event = Event {
            metadata: ObjectMeta { name: Some(name.clone()), namespace: Some(namespace), ..Default::default() },
            event_time: Some(MicroTime(now)),
            type_: Some(report.type_.as_str().into()),
            reason: Some(report.reason.into()),
            action: Some(report.action.into()),
            note: Some(report.note.into()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        api.create(&PostParams::default(), &event).await?;
        self.remember(key, name);
        Ok(())
    }

    fn repeat(&self, key: u64) -> Option<(String, i32)> {
        self.recent.lock().ok()?.repeat(key, Instant::now())
    }

    fn remember(&self, key: u64, name: String) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.remember(key, name, Instant::now());
        }
    }
}

/// The recent Events, by report.
#[derive(Default)]
struct Recent {
    series: HashMap<u64, Series>,
    /// Once full: no series leaves the window before this (the oldest `last` then plus
    /// the window; repeats only move it later), so a full map is swept only when a
    /// sweep can free room, not for every new Event.
    sweep_at: Option<Instant>,
}

impl Recent {
    /// The recent Event for `key` and its count with this repeat, if there is one.
    fn repeat(&mut self, key: u64, now: Instant) -> Option<(String, i32)> {
        let series = self.series.get_mut(&key).filter(|s| now.duration_since(s.last) < SERIES_WINDOW)?;
        series.count = series.count.saturating_add(1);
        series.last = now;
        Some((series.name.clone(), series.count))
    }

    /// Remembers a new Event, unless [`MAX_SERIES`] recent ones are remembered.
    fn remember(&mut self, key: u64, name: String, now: Instant) {
        if self.series.len() >= MAX_SERIES && self.sweep_at.is_none_or(|at| now >= at) {
            self.series.retain(|_, s| now.duration_since(s.last) < SERIES_WINDOW);
            self.series.shrink_to_fit();
            self.sweep_at = self.series.values().filter_map(|s| s.last.checked_add(SERIES_WINDOW)).min();
        }
        if self.series.len() < MAX_SERIES {
            self.series.insert(key, Series { name, count: 1, last: now });
        }
    }
}

/// An Event's name: the object's name, then `.` and the time in hex nanoseconds (as
/// client-go names them) — the object's name cut so that the whole stays within
/// [`MAX_NAME`] (a Secret or webhook configuration may have a 253-character name), and
/// cut where the rest is still a valid name (no `.` or `-` before the suffix).
pub fn event_name(object: &str, nanos: i128) -> String {
    let suffix = format!(".{:x}", u128::try_from(nanos).unwrap_or(0));
    let prefix = crate::prefix_within(object, MAX_NAME.saturating_sub(suffix.len())).trim_end_matches(['.', '-']);
    let prefix = if prefix.is_empty() { "event" } else { prefix };
    format!("{prefix}{suffix}")
}

fn series_key(report: &Report<'_>, regarding: &ObjectReference) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (report.type_.as_str(), report.reason, report.action).hash(&mut hasher);
    (&regarding.kind, &regarding.namespace, &regarding.name, &regarding.uid).hash(&mut hasher);
    hasher.finish()
}

/// At most this many reports wait in [`Deferred`]; past that they are written at once.
pub const MAX_DEFERRED: usize = 1024;

/// A report that waits for the cores (see [`Deferred`]).
pub struct Pending {
    pub regarding: ObjectReference,
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

/// Reports that can wait while urgent key work is pending: the Normal Event of each
/// certificate issued. In a burst of new Services (a backlog after a start), writing an
/// Event per certificate at once would take the API server's share of the same cores
/// from the certificates themselves; they are written, in order, once no urgent key
/// work is queued or running. At most [`MAX_DEFERRED`] wait (about 1 KiB each).
#[derive(Default)]
struct Deferred {
    waiting: Mutex<VecDeque<Pending>>,
    /// Told when a report is held (the writer sleeps while none is).
    held: tokio::sync::Notify,
}

impl Deferred {
    fn hold(&self, report: Pending) -> Option<Pending> {
        match self.waiting.lock() {
            Ok(mut waiting) if waiting.len() < MAX_DEFERRED => {
                waiting.push_back(report);
                self.held.notify_one();
                None
            }
            _ => Some(report),
        }
    }

    fn take(&self) -> Option<Pending> {
        self.waiting.lock().ok()?.pop_front()
    }

    fn is_empty(&self) -> bool {
        self.waiting.lock().map_or(true, |waiting| waiting.is_empty())
    }
}

/// How often held reports are looked at while some are.
const DEFERRED_EVERY: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_counted_within_the_window_only() {
        let mut recent = Recent::default();
        let t0 = Instant::now();
        assert_eq!(recent.repeat(1, t0), None);
        recent.remember(1, "svc.1".into(), t0);
        assert_eq!(recent.repeat(1, t0 + Duration::from_secs(60)), Some(("svc.1".into(), 2)));
        assert_eq!(recent.repeat(1, t0 + Duration::from_secs(120)), Some(("svc.1".into(), 3)));
        // Six minutes after the last repeat: a new Event.
        assert_eq!(recent.repeat(1, t0 + Duration::from_secs(120) + SERIES_WINDOW), None);
        assert_eq!(recent.repeat(2, t0), None);
    }

    #[test]
    fn event_names_stay_within_the_api_limit_for_long_object_names() {
        let nanos = 1_764_637_200_123_456_789_i128;
        assert_eq!(event_name("web", nanos), "web.187d402f1ecc6d15");
        let long = format!("{}.example.com", "a".repeat(241));
        assert_eq!(long.len(), 253);
        let name = event_name(&long, nanos);
        assert_eq!(name.len(), MAX_NAME, "{name}");
        assert!(name.starts_with("aaaa") && name.ends_with(".187d402f1ecc6d15"), "{name}");
        // A cut that would end in '.' or '-' drops them: still a valid DNS subdomain.
        for object in [format!("{}.b", "a".repeat(235)), format!("{}-{}", "a".repeat(235), "b".repeat(17))] {
            let name = event_name(&object, nanos);
            assert!(name.len() <= MAX_NAME, "{name}");
            assert!(!name.contains("..") && !name.contains("-."), "{name}");
            assert!(name.split('.').all(|label| !label.is_empty() && label.len() <= 253), "{name}");
        }
        assert_eq!(event_name("", nanos), "event.187d402f1ecc6d15");
        assert_eq!(event_name("x", -1), "x.0", "a clock before 1970: no panic");
        assert!(event_name(&"é".repeat(200), i128::MAX).len() <= MAX_NAME);
    }

    #[test]
    fn deferred_reports_keep_their_order_up_to_the_cap() {
        let deferred = Deferred::default();
        let report = |n: usize| Pending {
            regarding: ObjectReference::default(),
            type_: EventType::Normal,
            reason: "ServingCertificateIssued",
            note: n.to_string(),
        };
        for n in 0..MAX_DEFERRED {
            assert!(deferred.hold(report(n)).is_none());
        }
        let refused = deferred.hold(report(MAX_DEFERRED)).map(|r| r.note);
        assert_eq!(refused.as_deref(), Some("1024"), "past the cap, given back to be written at once");
        assert_eq!(deferred.take().map(|r| r.note).as_deref(), Some("0"));
        assert!(deferred.hold(report(9999)).is_none(), "room again");
    }

    #[test]
    fn at_most_max_series_are_remembered() {
        let mut recent = Recent::default();
        let t0 = Instant::now();
        for key in 0..(MAX_SERIES as u64 + 100) {
            recent.remember(key, format!("e{key}"), t0);
        }
        assert_eq!(recent.series.len(), MAX_SERIES);
        assert!(recent.repeat(MAX_SERIES as u64 + 50, t0).is_none(), "past the cap, not remembered");
        // Once the old ones are out of the window, room is made again.
        let later = t0 + SERIES_WINDOW;
        recent.remember(u64::MAX, "new".into(), later);
        assert_eq!(recent.series.len(), 1);
        assert_eq!(recent.repeat(u64::MAX, later), Some(("new".into(), 2)));
    }
}
