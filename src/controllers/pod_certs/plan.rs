//! The pure decision for one PodCertificateRequest: issue (for which names, how
//! long), wait for a Service, deny or fail — in that order of checks:
//!
//! 1. already Issued, Denied or Failed → nothing (those are final);
//! 2. any `unverifiedUserAnnotations` key → Denied `InvalidUnverifiedUserAnnotations`
//!    (this signer recognises none);
//! 3. a key type the CA cannot certify → Denied `UnsupportedKeyType`; an unreadable
//!    request → Failed;
//! 4. the pod gone or replaced (another UID) → Failed;
//! 5. no Service selects the pod → pending until the grace period (from the request's
//!    creation) ends, then Denied `NoServiceSelectsPod`;
//! 6. less than the API server's one-hour minimum left before the CA expires → Failed;
//! 7. otherwise issue.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;

use crate::pki::{KeyError, RequestedKey, format_expiry, requested_key};

/// The shortest pod certificate the API server accepts.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);

/// What the request asks for (the parts the decision reads).
pub struct Request<'a> {
    pub namespace: &'a str,
    pub created: OffsetDateTime,
    pub pod_uid: &'a str,
    pub max_expiration_seconds: Option<i32>,
    pub stub_pkcs10: &'a [u8],
    pub user_annotations: Option<&'a BTreeMap<String, String>>,
    /// Issued, Denied or Failed already.
    pub answered: bool,
}

/// The pod the request was made for, as read now.
pub struct Pod {
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

/// A Service of the request's namespace, as indexed: its selector (label pairs, as
/// a slice: a map would cost half a KiB per Service) and whether it is headless.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedService {
    pub selector: Box<[(String, String)]>,
    pub headless: bool,
}

/// Settings and the moment of the decision.
pub struct Settings<'a> {
    pub now: OffsetDateTime,
    pub grace: Duration,
    /// The longest certificate handed out (the flag, and never longer than the old CA
    /// stays in the bundle after a rotation).
    pub max_lifetime: Duration,
    pub cluster_domain: &'a str,
    pub ca_not_after: OffsetDateTime,
}

#[derive(Debug)]
pub enum Plan {
    /// Answered already: nothing to do.
    Nothing,
    /// No Service selects the pod yet: look again when one appears, or at `until`.
    Wait {
        until: OffsetDateTime,
    },
    Deny {
        reason: &'static str,
        message: String,
    },
    Fail {
        message: String,
    },
    Issue {
        names: Vec<String>,
        lifetime: Duration,
        key: RequestedKey,
    },
}

pub const DENIED_ANNOTATIONS: &str = "InvalidUnverifiedUserAnnotations";
pub const DENIED_KEY: &str = "UnsupportedKeyType";
pub const DENIED_NO_SERVICE: &str = "NoServiceSelectsPod";

pub fn plan(
    request: &Request<'_>,
    pod: Option<&Pod>,
    services: &BTreeMap<String, IndexedService>,
    settings: &Settings<'_>,
) -> Plan {
    if request.answered {
        return Plan::Nothing;
    }
    if let Some(keys) = request.user_annotations.filter(|a| !a.is_empty()) {
        let keys: Vec<&str> = keys.keys().map(String::as_str).collect();
        let message = format!("this signer recognises no unverifiedUserAnnotations; remove {}", keys.join(", "));
        return Plan::Deny { reason: DENIED_ANNOTATIONS, message: crate::bounded(&message).into_owned() };
    }
    let key = match requested_key(request.stub_pkcs10) {
        Ok(key) => key,
        Err(error @ KeyError::Unsupported { .. }) => {
            return Plan::Deny { reason: DENIED_KEY, message: error.to_string() };
        }
        Err(error) => return Plan::Fail { message: error.to_string() },
    };
    let Some(pod) = pod.filter(|p| p.uid == request.pod_uid) else {
        return Plan::Fail { message: format!("pod UID {} no longer exists", crate::bounded(request.pod_uid)) };
    };
    let names = dns_names(request.namespace, pod, services, settings.cluster_domain);
    if names.is_empty() {
        let until = crate::dates::after(request.created, settings.grace);
        if settings.now < until {
            return Plan::Wait { until };
        }
        let message = format!(
            "no Service in namespace {} selects the pod's labels (waited {} for one); create a Service whose selector matches the pod",
            request.namespace,
            humantime::format_duration(settings.grace)
        );
        return Plan::Deny { reason: DENIED_NO_SERVICE, message };
    }
    let asked = Duration::from_secs(request.max_expiration_seconds.map_or(86_400, |s| u64::try_from(s).unwrap_or(0)));
    let ca_left = crate::dates::between(settings.now, settings.ca_not_after);
    let lifetime = asked.min(settings.max_lifetime).min(ca_left);
    if lifetime < MIN_LIFETIME {
        let message = format!(
            "the service CA expires at {}, less than the one-hour minimum of a pod certificate from now; it is rotated before that",
            format_expiry(settings.ca_not_after)
        );
        return Plan::Fail { message };
    }
    Plan::Issue { names, lifetime, key }
}

/// The names the pod serves: for every Service whose (non-empty) selector its labels
/// match, `<svc>.<ns>.svc` and `<svc>.<ns>.svc.<domain>`; for a headless Service named
/// by the pod's `subdomain` (a StatefulSet pod) also `<hostname>.<svc>.<ns>.svc[.<domain>]`.
/// Sorted bytewise, so the first (the CN) is the shortest form of the first Service.
pub fn dns_names(
    namespace: &str,
    pod: &Pod,
    services: &BTreeMap<String, IndexedService>,
    cluster_domain: &str,
) -> Vec<String> {
    let mut names = Vec::new();
    for (name, service) in services {
        let selects =
            !service.selector.is_empty() && service.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
        if !selects {
            continue;
        }
        let base = format!("{name}.{namespace}.svc");
        names.push(format!("{base}.{cluster_domain}"));
        if service.headless
            && pod.subdomain.as_deref() == Some(name.as_str())
            && let Some(hostname) = pod.hostname.as_deref().filter(|h| !h.is_empty())
        {
            names.push(format!("{hostname}.{base}"));
            names.push(format!("{hostname}.{base}.{cluster_domain}"));
        }
        names.push(base);
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> Vec<u8> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::CertificateParams::default().serialize_request(&pair).unwrap().der().to_vec()
    }

    fn pod() -> Pod {
        Pod {
            uid: "pod-uid".into(),
            labels: BTreeMap::from([("app".into(), "web".into()), ("tier".into(), "front".into())]),
            hostname: Some("web-0".into()),
            subdomain: Some("peers".into()),
        }
    }

    fn service(selector: &[(&str, &str)], headless: bool) -> IndexedService {
        IndexedService { selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), headless }
    }

    fn settings(now: OffsetDateTime) -> Settings<'static> {
        Settings {
            now,
            grace: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(86_400),
            cluster_domain: "cluster.local",
            ca_not_after: now + Duration::from_secs(86_400 * 365),
        }
    }

    fn request<'a>(stub: &'a [u8], created: OffsetDateTime) -> Request<'a> {
        Request {
            namespace: "shop",
            created,
            pod_uid: "pod-uid",
            max_expiration_seconds: Some(7200),
            stub_pkcs10: stub,
            user_annotations: None,
            answered: false,
        }
    }

    #[test]
    fn names_come_from_every_selecting_service_and_the_headless_one_the_pod_names() {
        let services = BTreeMap::from([
            ("web".to_string(), service(&[("app", "web")], false)),
            ("peers".to_string(), service(&[("app", "web"), ("tier", "front")], true)),
            ("other".to_string(), service(&[("app", "db")], false)),
            ("manual".to_string(), service(&[], false)),
        ]);
        assert_eq!(
            dns_names("shop", &pod(), &services, "cluster.local"),
            [
                "peers.shop.svc",
                "peers.shop.svc.cluster.local",
                "web-0.peers.shop.svc",
                "web-0.peers.shop.svc.cluster.local",
                "web.shop.svc",
                "web.shop.svc.cluster.local",
            ]
        );
    }

    #[test]
    fn a_pod_no_service_selects_waits_for_the_grace_period_then_is_denied() {
        let now = OffsetDateTime::now_utc();
        let stub = csr();
        let none = BTreeMap::new();
        match plan(&request(&stub, now - Duration::from_secs(10)), Some(&pod()), &none, &settings(now)) {
            Plan::Wait { until } => assert_eq!(until, now + Duration::from_secs(290)),
            other => panic!("{other:?}"),
        }
        match plan(&request(&stub, now - Duration::from_secs(301)), Some(&pod()), &none, &settings(now)) {
            Plan::Deny { reason, message } => {
                assert_eq!(reason, DENIED_NO_SERVICE);
                assert!(message.contains("shop"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lifetime_is_the_least_of_the_request_the_flag_and_the_ca() {
        let now = OffsetDateTime::now_utc();
        let stub = csr();
        let services = BTreeMap::from([("web".to_string(), service(&[("app", "web")], false))]);
        let mut s = settings(now);
        let lifetime = |s: &Settings<'_>| match plan(&request(&stub, now), Some(&pod()), &services, s) {
            Plan::Issue { lifetime, .. } => Ok(lifetime),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(lifetime(&s), Ok(Duration::from_secs(7200)));
        s.max_lifetime = Duration::from_secs(3600);
        assert_eq!(lifetime(&s), Ok(Duration::from_secs(3600)));
        s.max_lifetime = Duration::from_secs(86_400);
        s.ca_not_after = now + Duration::from_secs(5000);
        assert_eq!(lifetime(&s), Ok(Duration::from_secs(5000)));
        s.ca_not_after = now + Duration::from_secs(1000);
        assert!(lifetime(&s).unwrap_err().contains("Fail"));
    }

    #[test]
    fn denials_and_failures_come_before_waiting() {
        let now = OffsetDateTime::now_utc();
        let stub = csr();
        let none = BTreeMap::new();
        let annotations = BTreeMap::from([("example.com/x".to_string(), "y".to_string())]);
        let mut r = request(&stub, now);
        r.user_annotations = Some(&annotations);
        assert!(matches!(plan(&r, Some(&pod()), &none, &settings(now)), Plan::Deny { reason: DENIED_ANNOTATIONS, .. }));
        let r = request(b"junk", now);
        assert!(matches!(plan(&r, Some(&pod()), &none, &settings(now)), Plan::Fail { .. }));
        let r = request(&stub, now);
        assert!(matches!(plan(&r, None, &none, &settings(now)), Plan::Fail { .. }), "pod gone");
        let mut replaced = pod();
        replaced.uid = "other".into();
        assert!(matches!(plan(&r, Some(&replaced), &none, &settings(now)), Plan::Fail { .. }));
        let mut answered = request(&stub, now);
        answered.answered = true;
        assert!(matches!(plan(&answered, None, &none, &settings(now)), Plan::Nothing));
    }

    #[test]
    fn requests_created_at_either_end_of_time_are_decided_without_overflow() {
        use crate::dates::{EARLIEST, LATEST};
        let now = OffsetDateTime::now_utc();
        let stub = csr();
        let none = BTreeMap::new();
        let mut s = settings(now);
        s.grace = Duration::from_secs(86_400);
        // Created "in 9999" (a clock far off, or a hand-made object): waits, capped.
        match plan(&request(&stub, LATEST), Some(&pod()), &none, &s) {
            Plan::Wait { until } => assert_eq!(until, LATEST),
            other => panic!("{other:?}"),
        }
        // Created in year 0: the grace ended long ago.
        assert!(matches!(plan(&request(&stub, EARLIEST), Some(&pod()), &none, &s), Plan::Deny { .. }));
        // A CA until 9999 and a request asking for the most: the flag caps it.
        let services = BTreeMap::from([("web".to_string(), service(&[("app", "web")], false))]);
        s.ca_not_after = LATEST;
        let mut r = request(&stub, now);
        r.max_expiration_seconds = Some(i32::MAX);
        assert!(
            matches!(plan(&r, Some(&pod()), &services, &s), Plan::Issue { lifetime, .. } if lifetime == s.max_lifetime)
        );
        r.max_expiration_seconds = Some(i32::MIN);
        assert!(matches!(plan(&r, Some(&pod()), &services, &s), Plan::Fail { .. }), "less than the minimum");
        // Decided at the end of time, with a CA that ends then: too short, not a panic.
        s.now = LATEST;
        assert!(matches!(plan(&request(&stub, LATEST), Some(&pod()), &services, &s), Plan::Fail { .. }));
    }
}
