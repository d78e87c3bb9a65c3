use std::sync::Arc;

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
        node_name: Some("node-1".into()),
        service_account_name: Some("web".into()),
        phase: Some("Running".into()),
        deleting: false,
        asks_this_signer: true,
    }
}

fn service(name: &str, selector: &[(&str, &str)], headless: bool) -> Arc<IndexedService> {
    Arc::new(IndexedService {
        name: name.into(),
        selector: selector.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        headless,
    })
}

fn settings(now: OffsetDateTime) -> Settings<'static> {
    Settings {
        now,
        grace: Duration::from_secs(300),
        max_lifetime: Duration::from_secs(86_400),
        cluster_domain: "cluster.local",
        ca_not_after: now + Duration::from_secs(86_400 * 365),
        signer_name: "example.com/serving",
    }
}

fn request<'a>(stub: &'a [u8], created: OffsetDateTime) -> Request<'a> {
    Request {
        namespace: "shop",
        created,
        pod_name: "web-0",
        pod_uid: "pod-uid",
        node_name: "node-1",
        service_account_name: "web",
        max_expiration_seconds: Some(7200),
        stub_pkcs10: stub,
        user_annotations: None,
        answered: false,
    }
}

#[test]
fn names_come_from_every_selecting_service_and_the_headless_one_the_pod_names() {
    let services = [
        service("web", &[("app", "web")], false),
        service("peers", &[("app", "web"), ("tier", "front")], true),
        service("other", &[("app", "db")], false),
        service("manual", &[], false),
    ];
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
    let none: [Arc<IndexedService>; 0] = [];
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
    let services = [service("web", &[("app", "web")], false)];
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
    let none: [Arc<IndexedService>; 0] = [];
    let annotations = BTreeMap::from([("example.com/x".to_string(), "y".to_string())]);
    let mut r = request(&stub, now);
    r.user_annotations = Some(&annotations);
    assert!(matches!(plan(&r, Some(&pod()), &none, &settings(now)), Plan::Deny { reason: DENIED_ANNOTATIONS, .. }));
    let r = request(b"junk", now);
    assert!(matches!(plan(&r, Some(&pod()), &none, &settings(now)), Plan::Fail { .. }));
    let r = request(&stub, now);
    assert!(matches!(plan(&r, None, &none, &settings(now)), Plan::Deny { reason: DENIED_NO_POD, .. }));
    let mut answered = request(&stub, now);
    answered.answered = true;
    assert!(matches!(plan(&answered, None, &none, &settings(now)), Plan::Nothing));
}

#[test]
fn requests_created_at_either_end_of_time_are_decided_without_overflow() {
    use crate::dates::{EARLIEST, LATEST};
    let now = OffsetDateTime::now_utc();
    let stub = csr();
    let none: [Arc<IndexedService>; 0] = [];
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
    let services = [service("web", &[("app", "web")], false)];
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

#[test]
fn only_the_pod_that_asked_this_signer_gets_a_certificate_each_refusal_with_its_own_reason() {
    let now = OffsetDateTime::now_utc();
    let stub = csr();
    let services = [service("web", &[("app", "web")], false)];
    let settings = settings(now);
    let request = Request { max_expiration_seconds: None, ..request(&stub, now) };
    let good = || Pod { phase: None, ..pod() };
    let outcome = |pod: Pod| match plan(&request, Some(&pod), &services, &settings) {
        Plan::Issue { .. } => "issue".to_string(),
        Plan::Deny { reason, message } => {
            assert!(message.contains("web-0"), "{message}");
            reason.to_string()
        }
        other => format!("{other:?}"),
    };
    assert_eq!(outcome(good()), "issue", "no phase yet counts as Pending");
    assert_eq!(outcome(Pod { phase: Some("Running".into()), ..good() }), "issue");
    assert_eq!(outcome(Pod { uid: "other".into(), ..good() }), DENIED_POD_UID);
    assert_eq!(outcome(Pod { asks_this_signer: false, ..good() }), DENIED_NOT_ASKED);
    assert_eq!(outcome(Pod { node_name: Some("node-2".into()), ..good() }), DENIED_NODE);
    assert_eq!(outcome(Pod { node_name: None, ..good() }), DENIED_NODE, "not scheduled");
    assert_eq!(outcome(Pod { service_account_name: None, ..good() }), DENIED_SERVICE_ACCOUNT);
    assert_eq!(outcome(Pod { phase: Some("Succeeded".into()), ..good() }), DENIED_NOT_ACTIVE);
    assert_eq!(outcome(Pod { phase: Some("Failed".into()), ..good() }), DENIED_NOT_ACTIVE);
    assert_eq!(outcome(Pod { deleting: true, ..good() }), DENIED_NOT_ACTIVE);
    // Denied before waiting for a Service: the answer does not depend on one.
    let none: [Arc<IndexedService>; 0] = [];
    let stranger = Pod { asks_this_signer: false, ..good() };
    assert!(matches!(plan(&request, Some(&stranger), &none, &settings), Plan::Deny { reason: DENIED_NOT_ASKED, .. }));
    assert!(matches!(plan(&request, None, &none, &settings), Plan::Deny { reason: DENIED_NO_POD, .. }));
}

#[test]
fn a_selector_is_kept_only_within_its_bound() {
    assert_eq!(bounded_selector(None), Selector::None);
    assert_eq!(bounded_selector(Some(&BTreeMap::new())), Selector::None);
    let small = BTreeMap::from([("app".to_string(), "web".to_string())]);
    assert_eq!(bounded_selector(Some(&small)), Selector::Pairs(Box::new([("app".into(), "web".into())])));
    let many: BTreeMap<String, String> = (0..=MAX_SELECTOR_PAIRS).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(
        bounded_selector(Some(&many)),
        Selector::Oversize { pairs: 65, bytes: many.iter().map(|(k, v)| k.len() + v.len()).sum() }
    );
    let most: BTreeMap<String, String> = (0..MAX_SELECTOR_PAIRS).map(|i| (format!("k{i}"), "v".into())).collect();
    assert!(matches!(bounded_selector(Some(&most)), Selector::Pairs(p) if p.len() == MAX_SELECTOR_PAIRS));
    let long = BTreeMap::from([("app".to_string(), "x".repeat(MAX_SELECTOR_BYTES))]);
    assert!(matches!(bounded_selector(Some(&long)), Selector::Oversize { pairs: 1, .. }));
    let just = BTreeMap::from([("app".to_string(), "x".repeat(MAX_SELECTOR_BYTES - 3))]);
    assert!(matches!(bounded_selector(Some(&just)), Selector::Pairs(_)));
}
