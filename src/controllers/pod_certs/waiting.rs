//! Requests waiting for a Service, and the pod labels they wait with.
//!
//! Every change of a Service's selector in a namespace looks again at all the waiting
//! requests there, and a full look reads the pod (an API GET). With 300 requests
//! waiting in one namespace and a selector changed every second, that was 300 GETs a
//! second and 6 CPU-seconds in 20 s (debug build). So a request that waits notes its
//! pod's labels here, and a later pass reads the pod again only when a Service of the
//! namespace now selects those labels, or when its grace period is over (the full pass
//! then denies it or, if a Service came meanwhile, issues it). A pod relabelled while
//! its request waits is therefore seen at the latest at the end of the grace period.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use time::OffsetDateTime;

use super::plan::IndexedService;

/// The waiting requests (by `namespace/name`): their pod's labels and the end of
/// their grace period.
#[derive(Default)]
pub struct Waiting(Mutex<HashMap<String, Noted>>);

struct Noted {
    labels: BTreeMap<String, String>,
    until: OffsetDateTime,
}

impl Waiting {
    /// The request `key` waits until `until` for a Service selecting `labels`.
    pub fn note(&self, key: &str, labels: &BTreeMap<String, String>, until: OffsetDateTime, now: OffsetDateTime) {
        let Ok(mut noted) = self.0.lock() else { return };
        // Entries of requests answered or deleted meanwhile go once their grace is
        // over (checked when the map doubles: amortised constant time).
        if noted.len() >= 1024 && noted.len().is_power_of_two() {
            noted.retain(|_, n| n.until > now);
        }
        noted.insert(key.to_string(), Noted { labels: labels.clone(), until });
    }

    /// The request `key` is answered (or no longer waits).
    pub fn forget(&self, key: &str) {
        if let Ok(mut noted) = self.0.lock() {
            noted.remove(key);
        }
    }

    /// When the request `key` is next worth a full look, if it is noted as waiting,
    /// its grace is not over, and none of `services` selects its pod's labels: reading
    /// the pod now would only find it waiting again.
    pub fn still_waiting<'a>(
        &self,
        key: &str,
        mut services: impl Iterator<Item = &'a IndexedService>,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        let noted = self.0.lock().ok()?;
        let noted = noted.get(key).filter(|n| n.until > now)?;
        (!services.any(|s| s.selects(&noted.labels))).then_some(noted.until)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|n| n.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(selector: &[(&str, &str)]) -> IndexedService {
        IndexedService {
            name: "web".into(),
            selector: selector.iter().map(|(k, v)| (Box::from(*k), Box::from(*v))).collect(),
            headless: false,
        }
    }

    #[test]
    fn a_waiting_request_is_looked_at_again_only_when_a_service_selects_its_pod_or_its_grace_ends() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let until = now + time::Duration::minutes(5);
        let waiting = Waiting::default();
        let labels = BTreeMap::from([("app".to_string(), "web".to_string()), ("tier".to_string(), "a".to_string())]);
        assert_eq!(waiting.still_waiting("ns/r", [].iter(), now), None, "not noted: a full look");
        waiting.note("ns/r", &labels, until, now);
        let others = [service(&[("app", "db")]), service(&[]), service(&[("app", "web"), ("tier", "b")])];
        assert_eq!(waiting.still_waiting("ns/r", others.iter(), now), Some(until), "nothing selects it");
        let selecting = [service(&[("app", "db")]), service(&[("app", "web")])];
        assert_eq!(waiting.still_waiting("ns/r", selecting.iter(), now), None, "a Service selects it");
        assert_eq!(waiting.still_waiting("ns/r", others.iter(), until), None, "the grace is over");
        waiting.forget("ns/r");
        assert_eq!(waiting.still_waiting("ns/r", others.iter(), now), None);
    }

    #[test]
    fn entries_past_their_grace_are_dropped() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let waiting = Waiting::default();
        let labels = BTreeMap::new();
        for i in 0..1024 {
            waiting.note(&format!("ns/old-{i}"), &labels, now + time::Duration::seconds(1), now);
        }
        let later = now + time::Duration::minutes(1);
        waiting.note("ns/new", &labels, later + time::Duration::minutes(5), later);
        assert_eq!(waiting.len(), 1);
    }
}
