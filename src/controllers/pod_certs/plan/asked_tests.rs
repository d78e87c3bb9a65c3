use std::sync::Arc;

use super::*;

#[test]
fn only_the_pod_that_asked_this_signer_gets_a_certificate_each_refusal_with_its_own_reason() {
    let now = OffsetDateTime::now_utc();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let stub = rcgen::CertificateParams::default().serialize_request(&pair).unwrap().der().to_vec();
    let services = [Arc::new(IndexedService {
        name: "web".into(),
        selector: Box::new([("app".into(), "web".into())]),
        headless: false,
    })];
    let settings = Settings {
        now,
        grace: Duration::from_secs(300),
        max_lifetime: Duration::from_secs(86_400),
        cluster_domain: "cluster.local",
        ca_not_after: now + Duration::from_secs(86_400 * 365),
        signer_name: "example.com/serving",
    };
    let request = Request {
        namespace: "shop",
        created: now,
        pod_name: "web-0",
        pod_uid: "uid",
        node_name: "node-1",
        service_account_name: "web",
        max_expiration_seconds: None,
        stub_pkcs10: &stub,
        user_annotations: None,
        answered: false,
    };
    let good = || Pod {
        uid: "uid".into(),
        labels: BTreeMap::from([("app".into(), "web".into())]),
        hostname: None,
        subdomain: None,
        node_name: Some("node-1".into()),
        service_account_name: Some("web".into()),
        phase: None,
        deleting: false,
        asks_this_signer: true,
    };
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
