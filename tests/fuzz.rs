//! Property-based fuzzing of every parser of untrusted input: PEM and the
//! `signing-key` Secret, serving Secret data (through the re-issue decision), and
//! annotation values. Inputs are random bytes, random PEM blocks, and real
//! certificates and keys with bytes flipped or cut.
//!
//! Bounded: FUZZ_CASES cases per target (default 2,000 in `make test`;
//! `make fuzz` runs 100,000). A failure prints the minimal input that panicked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use service_ca_operator::controllers::ca_bundle;
use service_ca_operator::controllers::serving::decision::{self, SecretFacts};
use service_ca_operator::controllers::serving::request::{failures, wanted};
use service_ca_operator::names::{self as ann, CA_BUNDLE, INTERMEDIATE, TLS_CERT, TLS_KEY, check_subdomain};
use service_ca_operator::pki::{self, CaPolicy, CertificateAuthority, LeafPolicy, LeafRequest, PrivateKey};
use service_ca_operator::selector::parse_selector;
use time::OffsetDateTime;

/// Whether `labels` satisfy `selector` (an invalid selector matches nothing), as the
/// API server decides it (the operator's own matcher, which also decides which pods
/// its pod-certificate path serves).
fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    parse_selector(selector)
        .is_ok_and(|requirements| service_ca_operator::selector::selector_matches(&requirements, labels))
}

/// The leaf request of Service `n/s` (headless) both fuzzed Secrets are made for.
fn service_s() -> LeafRequest {
    LeafRequest {
        service: "s".into(),
        namespace: "n".into(),
        uid: "u-1".into(),
        headless: true,
        cluster_domain: "cluster.local".into(),
        key: service_ca_operator::pki::KeyKind::Rsa { bits: 2048 },
    }
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

fn run<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value)) {
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let result = runner.run(&strategy, |v| {
        test(v);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    println!("fuzz {name}: {} executions, no panic", cases());
}

/// A real rotated CA's Secret data and a real leaf: the seeds that mutations start from.
fn seeds() -> &'static (BTreeMap<String, Vec<u8>>, String, String) {
    static SEEDS: OnceLock<(BTreeMap<String, Vec<u8>>, String, String)> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let now = OffsetDateTime::now_utc();
        let policy =
            CaPolicy { lifetime: Duration::from_secs(86_400 * 30), rotate_before: Duration::from_secs(86_400) };
        let ca = CertificateAuthority::create(PrivateKey::generate_rsa(2048).unwrap(), now, &policy).unwrap();
        let ca = ca.rotate(PrivateKey::generate_rsa(2048).unwrap(), now, &policy).unwrap();
        let req = service_s();
        let leaf = ca.issue(&req, &PrivateKey::generate_rsa(2048).unwrap(), now, Duration::from_secs(86_400)).unwrap();
        (ca.to_secret_data(), leaf.chain_pem, leaf.key_pem.to_string())
    })
}

/// Random bytes, random PEM blocks, or a real seed with bytes flipped and cut.
fn untrusted(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let mutated = (proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8), any::<Option<usize>>()).prop_map(
        move |(flips, cut)| {
            let mut bytes = seed.clone();
            for (at, value) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = value;
                }
            }
            if let Some(cut) = cut
                && !bytes.is_empty()
            {
                bytes.truncate(cut % bytes.len());
            }
            bytes
        },
    );
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..600),
        1 => (
            proptest::sample::select(vec!["CERTIFICATE", "RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "PUBLIC KEY"]),
            proptest::collection::vec(any::<u8>(), 0..800)
        )
            .prop_map(|(tag, body)| pki::pem::encode(tag, &body).into_bytes()),
        4 => mutated,
    ]
}

#[test]
fn signing_key_secret_parsing_never_panics() {
    let (data, _, _) = seeds().clone();
    let field = |k: &str| data[k].clone();
    let strategy = (
        untrusted(field(TLS_CERT)),
        untrusted(field(TLS_KEY)),
        untrusted(field(CA_BUNDLE)),
        untrusted(field(INTERMEDIATE)),
    );
    run("signing-key Secret", strategy, |(cert, key, bundle, intermediate)| {
        let _ = pki::pem::decode("x", &cert);
        let _ = PrivateKey::from_pem("tls.key", &key);
        let data = BTreeMap::from([
            (TLS_CERT.to_string(), cert),
            (TLS_KEY.to_string(), key),
            (CA_BUNDLE.to_string(), bundle),
            (INTERMEDIATE.to_string(), intermediate),
        ]);
        if let Err(e) = CertificateAuthority::from_secret_data(&data, OffsetDateTime::now_utc()) {
            let _ = e.to_string();
        }
    });
}

#[test]
fn serving_secret_data_through_the_decision_never_panics() {
    let (ca_data, chain, key) = seeds().clone();
    let ca = CertificateAuthority::from_secret_data(&ca_data, OffsetDateTime::now_utc()).unwrap();
    let policy = LeafPolicy {
        cluster_domain: "cluster.local".into(),
        lifetime: Duration::from_secs(86_400),
        refresh_before: Duration::from_secs(3_600),
    };
    let svc = service_s();
    let strategy = (untrusted(chain.into_bytes()), untrusted(key.into_bytes()), ".{0,40}");
    run("serving Secret decision", strategy, |(cert, key, expiry)| {
        let annotations = BTreeMap::from([
            (ann::BETA.originating_service_uid.to_string(), "u-1".to_string()),
            (ann::BETA.expiry.to_string(), expiry),
        ]);
        let facts = SecretFacts {
            secret_type: "kubernetes.io/tls",
            data: [(TLS_CERT, cert.as_slice()), (TLS_KEY, key.as_slice())].into_iter().collect(),
            annotations: &annotations,
            owner_service_uids: vec!["u-1"],
            labeled: true,
        };
        let _ = decision::decide(Some(&facts), &svc, &ca, &policy, OffsetDateTime::now_utc());
    });
}

#[test]
fn annotation_values_never_panic() {
    let value = prop_oneof![
        ".{0,80}",
        "[a-z0-9.-]{0,70}",
        proptest::collection::vec(any::<char>(), 0..300).prop_map(String::from_iter)
    ];
    let strategy = (value.clone(), value.clone(), value.clone(), value.clone(), value);
    run("annotations", strategy, |(name, alpha, num, inject, selector)| {
        let mut svc = Service::default();
        let a = svc.metadata.annotations.get_or_insert_with(Default::default);
        a.insert(ann::BETA.serving_cert_secret_name.into(), name.clone());
        a.insert(ann::ALPHA.serving_cert_secret_name.into(), alpha);
        a.insert(ann::BETA.generation_error_num.into(), num);
        let _ = wanted(&svc);
        let _ = failures(&svc);
        let _ = check_subdomain(&name);
        let _ = pki::parse_expiry(&name);
        let _ = parse_selector(&selector);
        let _ = selector_matches(&selector, &BTreeMap::new());
        let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name),
            annotations: Some(BTreeMap::from([
                (ann::BETA.inject_cabundle.to_string(), inject.clone()),
                (ann::INJECT_VULNERABLE_LEGACY_CABUNDLE.to_string(), inject),
            ])),
            ..Default::default()
        };
        let _ = ca_bundle::mode::<k8s_openapi::api::core::v1::ConfigMap>(&meta);
    });
}

#[test]
fn selectors_match_like_the_api_server() {
    let labels: BTreeMap<String, String> =
        [("app", "web"), ("tier", "front")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    for (selector, expected) in [
        ("", true),
        ("app=web", true),
        ("app==web,tier=front", true),
        ("app!=web", false),
        ("app in (web, api)", true),
        ("app notin (web)", false),
        ("tier", true),
        ("!tier", false),
        ("missing", false),
        ("app in (api),tier", false),
    ] {
        assert_eq!(selector_matches(selector, &labels), expected, "{selector}");
    }
    assert!(parse_selector("app in web").is_err());
    assert!(parse_selector("a b").is_err());
}
