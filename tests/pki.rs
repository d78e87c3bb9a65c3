//! The PKI core, proven without a cluster: every field of the CA and leaf profiles
//! (docs/spec.md §1, §3.2), rotation with a trust bridge (§3.3), the bundle (§3.4), the
//! refresh threshold, and real TLS handshakes with rustls, OpenSSL and Go clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/tls.rs"]
mod tls;

#[path = "pki/handshakes.rs"]
mod handshakes;
#[path = "pki/key_kinds.rs"]
mod key_kinds;
#[path = "pki/profiles.rs"]
mod profiles;
#[path = "pki/rotation.rs"]
mod rotation;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use ::time::OffsetDateTime;
use service_ca_operator::names::{CA_BUNDLE, INTERMEDIATE, TLS_CERT, TLS_KEY};
use service_ca_operator::pki::{
    CaPolicy, CertificateAuthority, IssuedLeaf, KeyKind, LeafPolicy, LeafRequest, PkiError, PrivateKey, pem,
};
use x509_parser::oid_registry::{OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA256WITHRSA};
use x509_parser::prelude::*;

const DAY: Duration = Duration::from_secs(86_400);
const UID: &str = "3f1c2b9e-6d1a-4c55-9a0e-8b7f0c2d4e61";
const LEAF_LIFETIME: Duration = Duration::from_secs(730 * 86_400);

fn policy() -> CaPolicy {
    CaPolicy { lifetime: 790 * DAY, rotate_before: 395 * DAY }
}

fn now() -> OffsetDateTime {
    // Whole seconds, like certificate times.
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn key() -> PrivateKey {
    PrivateKey::generate_rsa(2048).unwrap()
}

fn new_ca(at: OffsetDateTime) -> CertificateAuthority {
    CertificateAuthority::create(key(), at, &policy()).unwrap()
}

fn request(headless: bool) -> LeafRequest {
    LeafRequest {
        service: "web".into(),
        namespace: "shop".into(),
        uid: UID.into(),
        headless,
        cluster_domain: "cluster.local".into(),
        key: KeyKind::Rsa { bits: 2048 },
    }
}

fn issue(ca: &CertificateAuthority, headless: bool, at: OffsetDateTime) -> IssuedLeaf {
    ca.issue(&request(headless), &key(), at, LEAF_LIFETIME).unwrap()
}

fn ders(pem_text: &str) -> Vec<Vec<u8>> {
    pem::decode_certificates("test", pem_text.as_bytes()).unwrap()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).unwrap().1
}

fn to_system(t: OffsetDateTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp() as u64)
}

fn ext<'a>(cert: &'a X509Certificate<'_>, oid: &str) -> &'a X509Extension<'a> {
    cert.extensions().iter().find(|e| e.oid.to_id_string() == oid).unwrap_or_else(|| panic!("extension {oid} missing"))
}

fn rsa_bits(cert: &X509Certificate<'_>) -> usize {
    assert_eq!(cert.tbs_certificate.subject_pki.algorithm.algorithm, OID_PKCS1_RSAENCRYPTION);
    match cert.tbs_certificate.subject_pki.parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(rsa) => rsa.key_size(),
        other => panic!("not RSA: {other:?}"),
    }
}

fn assert_positive_serial(cert: &X509Certificate<'_>) {
    let raw = cert.raw_serial();
    assert!(!raw.is_empty() && raw.len() <= 20, "serial of {} bytes", raw.len());
    assert_eq!(raw[0] & 0x80, 0, "serial must be positive");
    assert!(raw.iter().any(|b| *b != 0), "serial must not be zero");
}

/// An old CA created at `created`, rotated at `at` into `new`.
struct Rotated {
    old: CertificateAuthority,
    new: CertificateAuthority,
    at: OffsetDateTime,
}

fn rotated(created: OffsetDateTime, at: OffsetDateTime) -> Rotated {
    let old = new_ca(created);
    let new = old.rotate(key(), at, &policy()).unwrap();
    Rotated { old, new, at }
}

// ---------------------------------------------------------------------------------
// Micro-benchmark (figures printed; `cargo test --test pki -- --nocapture bench`)
// ---------------------------------------------------------------------------------

#[test]
fn bench_key_generation_signature_and_issuance() {
    let n = 20;
    let ca = new_ca(now());
    let t = Instant::now();
    let keys: Vec<PrivateKey> = (0..n).map(|_| key()).collect();
    let keygen = t.elapsed() / n;
    let t = Instant::now();
    for k in &keys {
        ca.issue(&request(false), k, now(), LEAF_LIFETIME).unwrap();
    }
    let sign = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        issue(&ca, false, now());
    }
    let full = t.elapsed() / n;
    println!(
        "pki micro-benchmark over {n} runs: RSA-2048 key generation {:.1} ms (the floor), certificate signing {:.2} ms, full issuance {:.1} ms ({:.2}x the floor)",
        keygen.as_secs_f64() * 1e3,
        sign.as_secs_f64() * 1e3,
        full.as_secs_f64() * 1e3,
        full.as_secs_f64() / keygen.as_secs_f64()
    );
    // A gross-regression guard only (the figure is ~50 ms on 2 cores).
    assert!(full < Duration::from_secs(2), "issuance took {full:?}");
}
