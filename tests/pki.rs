//! The PKI core, proven without a cluster: every field of the CA and leaf profiles
//! (docs/spec.md §1, §3.2), rotation with a trust bridge (§3.3), the bundle (§3.4), the
//! refresh threshold, and real TLS handshakes with rustls, OpenSSL and Go clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/tls.rs"]
mod tls;

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

// ---------------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------------

#[test]
fn ca_profile_matches_spec() {
    let at = now();
    let ca = new_ca(at);
    let data = ca.to_secret_data();
    let der = &ders(std::str::from_utf8(&data[TLS_CERT]).unwrap())[0];
    let cert = parse(der);

    let cn = format!("openshift-service-serving-signer@{}", at.unix_timestamp());
    assert_eq!(cert.subject().to_string(), format!("CN={cn}"));
    assert_eq!(cert.issuer(), cert.subject(), "self-signed");
    assert_eq!(ca.subject_cn(), cn);
    assert_eq!(rsa_bits(&cert), 2048);
    assert_eq!(cert.signature_algorithm.algorithm, OID_PKCS1_SHA256WITHRSA);
    cert.verify_signature(None).expect("self-signature verifies");
    assert_positive_serial(&cert);

    let ku = ext(&cert, "2.5.29.15");
    assert!(ku.critical, "KeyUsage is critical");
    let ParsedExtension::KeyUsage(ku) = ku.parsed_extension() else { panic!() };
    assert!(ku.digital_signature() && ku.key_encipherment() && ku.key_cert_sign());
    assert_eq!(ku.flags, 0b0010_0101, "exactly digitalSignature, keyEncipherment, keyCertSign");
    let bc = ext(&cert, "2.5.29.19");
    assert!(bc.critical, "BasicConstraints is critical");
    let ParsedExtension::BasicConstraints(bc) = bc.parsed_extension() else { panic!() };
    assert!(bc.ca);
    let ParsedExtension::SubjectKeyIdentifier(ski) = ext(&cert, "2.5.29.14").parsed_extension() else { panic!() };
    assert_eq!(ski.0, ca.subject_key_id());

    let validity = cert.validity();
    assert_eq!(validity.not_before.timestamp(), at.unix_timestamp() - 1);
    assert_eq!(validity.not_after.timestamp(), (at + 790 * DAY).unix_timestamp());

    let key_pem = std::str::from_utf8(&data[TLS_KEY]).unwrap();
    assert!(key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
    assert_eq!(data.len(), 2, "a new CA has only tls.crt and tls.key");
}

fn assert_leaf_profile(ca: &CertificateAuthority, leaf: &IssuedLeaf, at: OffsetDateTime, expected_sans: &[&str]) {
    let chain = ders(&leaf.chain_pem);
    let cert = parse(&chain[0]);

    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let sans: Vec<String> = san
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            other => panic!("only DNS SANs expected, got {other:?}"),
        })
        .collect();
    assert_eq!(sans, expected_sans, "DNS SANs, sorted bytewise, no IP SANs");
    let mut sorted = sans.clone();
    sorted.sort();
    assert_eq!(sans, sorted);
    assert_eq!(cert.subject().to_string(), format!("CN={}", expected_sans[0]), "subject is only CN = first SAN");
    assert_eq!(cert.issuer().to_string(), format!("CN={}", ca.subject_cn()));
    assert_eq!(rsa_bits(&cert), 2048);
    assert_eq!(cert.signature_algorithm.algorithm, OID_PKCS1_SHA256WITHRSA);
    assert_positive_serial(&cert);
    let ca_cert = parse(&ca.certificate().der);
    cert.verify_signature(Some(&ca_cert.tbs_certificate.subject_pki)).expect("signed by the CA key");

    assert_eq!(cert.validity().not_before.timestamp(), at.unix_timestamp() - 1, "NotBefore = now - 1s");
    let expected_not_after = (at + LEAF_LIFETIME).min(ca.not_after());
    assert_eq!(cert.validity().not_after.timestamp(), expected_not_after.unix_timestamp());
    assert_eq!(leaf.not_after, expected_not_after);

    let ku = ext(&cert, "2.5.29.15");
    assert!(ku.critical);
    let ParsedExtension::KeyUsage(ku) = ku.parsed_extension() else { panic!() };
    assert_eq!(ku.flags, 0b0000_0101, "exactly digitalSignature and keyEncipherment");
    let eku = ext(&cert, "2.5.29.37");
    let ParsedExtension::ExtendedKeyUsage(eku) = eku.parsed_extension() else { panic!() };
    assert!(eku.server_auth && !eku.client_auth && eku.other.is_empty(), "ExtKeyUsage is serverAuth only");
    let bc = ext(&cert, "2.5.29.19");
    assert!(bc.critical);
    let ParsedExtension::BasicConstraints(bc) = bc.parsed_extension() else { panic!() };
    assert!(!bc.ca, "CA:FALSE");
    assert!(matches!(ext(&cert, "2.5.29.14").parsed_extension(), ParsedExtension::SubjectKeyIdentifier(_)));
    let ParsedExtension::AuthorityKeyIdentifier(aki) = ext(&cert, "2.5.29.35").parsed_extension() else { panic!() };
    assert_eq!(aki.key_identifier.as_ref().unwrap().0, ca.subject_key_id(), "AKI = the CA's SKI");

    let uid = ext(&cert, "1.3.6.1.4.1.2312.17.100.2.1");
    assert!(!uid.critical);
    let mut printable = vec![0x13, UID.len() as u8];
    printable.extend_from_slice(UID.as_bytes());
    assert_eq!(uid.value, printable.as_slice(), "Service UID as an ASN.1 PrintableString");

    assert!(leaf.key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"), "PKCS#1 key");
    let key = PrivateKey::from_pem("tls.key", leaf.key_pem.as_bytes()).unwrap();
    assert_eq!(key.public_key().raw(), cert.tbs_certificate.subject_pki.subject_public_key.data.as_ref());
}

#[test]
fn leaf_profile_matches_spec() {
    let at = now();
    let ca = new_ca(at);
    let leaf = issue(&ca, false, at);
    assert_leaf_profile(&ca, &leaf, at, &["web.shop.svc", "web.shop.svc.cluster.local"]);
    assert_eq!(ders(&leaf.chain_pem).len(), 2, "before any rotation: leaf, CA");
    assert_eq!(ders(&leaf.chain_pem)[1], ca.certificate().der);
}

#[test]
fn headless_leaf_adds_wildcards_and_the_wildcard_is_the_cn() {
    let at = now();
    let ca = new_ca(at);
    let leaf = issue(&ca, true, at);
    assert_leaf_profile(
        &ca,
        &leaf,
        at,
        &["*.web.shop.svc", "*.web.shop.svc.cluster.local", "web.shop.svc", "web.shop.svc.cluster.local"],
    );
}

#[test]
fn cluster_domain_is_configurable() {
    let req = LeafRequest { cluster_domain: "corp.example".into(), ..request(false) };
    assert_eq!(req.dns_names(), ["web.shop.svc", "web.shop.svc.corp.example"]);
}

#[test]
fn leaf_validity_is_capped_at_the_ca_expiry() {
    let at = now();
    let ca = CertificateAuthority::create(key(), at, &CaPolicy { lifetime: 10 * DAY, rotate_before: 5 * DAY }).unwrap();
    let leaf = issue(&ca, false, at);
    assert_eq!(leaf.not_after, ca.not_after());
    assert_leaf_profile(&ca, &leaf, at, &["web.shop.svc", "web.shop.svc.cluster.local"]);
    // Once the CA itself has expired it signs nothing.
    let later = ca.not_after() + Duration::from_secs(1);
    assert_eq!(
        ca.issue(&request(false), &key(), later, LEAF_LIFETIME).unwrap_err(),
        PkiError::Expired { not_after: ca.not_after() }
    );
}

#[test]
fn serials_are_unique() {
    let at = now();
    let ca = new_ca(at);
    let key = key();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..300 {
        let leaf = ca.issue(&request(false), &key, at, LEAF_LIFETIME).unwrap();
        let der = &ders(&leaf.chain_pem)[0];
        assert!(seen.insert(parse(der).raw_serial().to_vec()), "duplicate serial");
    }
}

#[test]
fn uid_that_is_not_printable_is_refused() {
    let ca = new_ca(now());
    let req = LeafRequest { uid: "héllo".into(), ..request(false) };
    assert_eq!(ca.issue(&req, &key(), now(), LEAF_LIFETIME).unwrap_err(), PkiError::BadServiceUid("héllo".into()));
}

// ---------------------------------------------------------------------------------
// Rotation, bundle, persistence
// ---------------------------------------------------------------------------------

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

#[test]
fn rotation_builds_the_bridge_per_spec() {
    let created = now() - 400 * DAY;
    let Rotated { old, new, at } = rotated(created, now());
    let data = new.to_secret_data();
    assert_eq!(data.keys().map(String::as_str).collect::<Vec<_>>(), [CA_BUNDLE, INTERMEDIATE, TLS_CERT, TLS_KEY]);

    let old_der = &old.certificate().der;
    let new_der = &ders(std::str::from_utf8(&data[TLS_CERT]).unwrap())[0];
    let (old_cert, new_cert) = (parse(old_der), parse(new_der));
    assert_eq!(new_cert.subject().as_raw(), old_cert.subject().as_raw(), "same subject, byte for byte");
    assert_ne!(new_cert.tbs_certificate.subject_pki.raw, old_cert.tbs_certificate.subject_pki.raw, "fresh key");
    assert_eq!(new_cert.validity().not_after.timestamp(), (at + 790 * DAY).unix_timestamp());
    assert_eq!(new.subject_cn(), old.subject_cn());

    let bundle = ders(std::str::from_utf8(&data[CA_BUNDLE]).unwrap());
    assert_eq!(bundle.len(), 2, "ca-bundle.crt = [new CA, X1]");
    assert_eq!(&bundle[0], new_der);
    let x1 = parse(&bundle[1]);
    assert_eq!(x1.subject().as_raw(), old_cert.subject().as_raw());
    assert_eq!(
        x1.tbs_certificate.subject_pki.raw, old_cert.tbs_certificate.subject_pki.raw,
        "X1 certifies the old key"
    );
    x1.verify_signature(Some(&new_cert.tbs_certificate.subject_pki)).expect("X1 is signed by the new key");
    assert_ne!(x1.raw_serial(), old_cert.raw_serial(), "X1 has a fresh serial");
    let ParsedExtension::AuthorityKeyIdentifier(aki) = ext(&x1, "2.5.29.35").parsed_extension() else { panic!() };
    assert_eq!(aki.key_identifier.as_ref().unwrap().0, new.subject_key_id());
    let ParsedExtension::SubjectKeyIdentifier(ski) = ext(&x1, "2.5.29.14").parsed_extension() else { panic!() };
    assert_eq!(ski.0, old.subject_key_id());
    // The old CA had 390 days left, less than the 395-day threshold: X1 lasts 395 days.
    assert_eq!(x1.validity().not_after.timestamp(), (at + 395 * DAY).unix_timestamp());

    let x2_der = ders(std::str::from_utf8(&data[INTERMEDIATE]).unwrap()).remove(0);
    let x2 = parse(&x2_der);
    assert_eq!(
        x2.tbs_certificate.subject_pki.raw, new_cert.tbs_certificate.subject_pki.raw,
        "X2 certifies the new key"
    );
    x2.verify_signature(Some(&old_cert.tbs_certificate.subject_pki)).expect("X2 is signed by the old key");
    assert_ne!(x2.raw_serial(), new_cert.raw_serial());
    let ParsedExtension::AuthorityKeyIdentifier(aki) = ext(&x2, "2.5.29.35").parsed_extension() else { panic!() };
    assert_eq!(aki.key_identifier.as_ref().unwrap().0, old.subject_key_id());
    assert_eq!(x2.validity().not_after, new_cert.validity().not_after);
    for cert in [&x1, &x2] {
        let ParsedExtension::BasicConstraints(bc) = ext(cert, "2.5.29.19").parsed_extension() else { panic!() };
        assert!(bc.ca);
    }

    // New leaves: leaf, then X2, then the new CA.
    let leaf = issue(&new, false, at);
    let chain = ders(&leaf.chain_pem);
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[1], x2.as_ref());
    assert_eq!(&chain[2], new_der);
}

#[test]
fn x1_lasts_at_least_as_long_as_the_old_ca() {
    // A forced rotation early in the CA's life: X1 keeps the old CA's own expiry.
    let created = now() - 10 * DAY;
    let Rotated { old, new, .. } = rotated(created, now());
    let bundle = ders(&new.bundle_pem(now()));
    assert_eq!(parse(&bundle[1]).validity().not_after.timestamp(), old.not_after().unix_timestamp());
}

#[test]
fn secret_data_round_trips_byte_for_byte() {
    let at = now();
    let ca = new_ca(at);
    let back = CertificateAuthority::from_secret_data(&ca.to_secret_data(), at).unwrap();
    assert_eq!(back.to_secret_data(), ca.to_secret_data());
    let rotated = ca.rotate(key(), at, &policy()).unwrap();
    let back = CertificateAuthority::from_secret_data(&rotated.to_secret_data(), at).unwrap();
    assert_eq!(back.to_secret_data(), rotated.to_secret_data());
    assert_eq!(back.intermediates(), rotated.intermediates());
    // A loaded CA signs like the original: same issuer bytes, same chain shape.
    let leaf = issue(&back, false, at);
    assert_eq!(ders(&leaf.chain_pem)[1], rotated.intermediates()[0].der);
}

#[test]
fn bundle_is_stable_ordered_and_drops_expired_certificates() {
    let created = now() - 400 * DAY;
    let Rotated { old, new, at } = rotated(created, now());
    assert_eq!(old.bundle_pem(at), old.certificate().pem(), "no rotation yet: the bundle is tls.crt");
    let bundle = new.bundle_pem(at);
    assert_eq!(bundle, new.bundle_pem(at), "byte-identical when nothing changed");
    assert_eq!(new.bundle_pem(at + DAY), bundle);
    let members = ders(&bundle);
    assert_eq!(members[0], new.certificate().der, "new CA first, then X1");
    let x1_expiry = new.next_bundle_change(at).unwrap();
    assert_eq!(x1_expiry, at + 395 * DAY);
    assert_eq!(ders(&new.bundle_pem(x1_expiry)).len(), 2, "still valid at its NotAfter second");
    let after = new.bundle_pem(x1_expiry + Duration::from_secs(1));
    assert_eq!(ders(&after), vec![new.certificate().der.clone()], "expired X1 left out");
}

#[test]
fn malformed_signing_secrets_get_typed_readable_errors() {
    let at = now();
    let ca = new_ca(at);
    let good = ca.to_secret_data();
    let with = |key: &str, value: &[u8]| {
        let mut d = good.clone();
        d.insert(key.to_string(), value.to_vec());
        CertificateAuthority::from_secret_data(&d, at).unwrap_err()
    };
    let key_pem = good[TLS_KEY].clone();
    let cert_pem = good[TLS_CERT].clone();

    assert_eq!(with(TLS_CERT, b""), PkiError::Empty { field: TLS_CERT });
    assert_eq!(with(TLS_CERT, b"this is not a certificate"), PkiError::NotPem { field: TLS_CERT });
    assert_eq!(
        with(TLS_CERT, &key_pem),
        PkiError::WrongBlockType { field: TLS_CERT, found: "RSA PRIVATE KEY", expected: "CERTIFICATE" }
    );
    assert_eq!(
        with(TLS_CERT, &[cert_pem.clone(), cert_pem.clone()].concat()),
        PkiError::SeveralCertificates { field: TLS_CERT, count: 2 }
    );
    assert_eq!(
        with(TLS_KEY, &cert_pem),
        PkiError::WrongBlockType { field: TLS_KEY, found: "CERTIFICATE", expected: "PRIVATE KEY" }
    );
    assert_eq!(with(TLS_KEY, b""), PkiError::Empty { field: TLS_KEY });
    assert_eq!(with(TLS_KEY, key().to_pem().as_bytes()), PkiError::KeyMismatch);
    assert!(matches!(
        with(TLS_CERT, pem::encode("CERTIFICATE", b"\x30\x03\x02\x01\x01").as_bytes()),
        PkiError::BadCertificate { .. }
    ));
    assert!(matches!(with(CA_BUNDLE, b"garbage"), PkiError::NotPem { field: CA_BUNDLE }));

    let mut missing = good.clone();
    missing.remove(TLS_KEY);
    assert_eq!(CertificateAuthority::from_secret_data(&missing, at).unwrap_err(), PkiError::Missing { field: TLS_KEY });

    // A leaf and its key: a perfectly good pair, but not a CA.
    let leaf = issue(&ca, false, at);
    let first = pem::encode("CERTIFICATE", &ders(&leaf.chain_pem)[0]);
    let mut not_ca = BTreeMap::new();
    not_ca.insert(TLS_CERT.to_string(), first.into_bytes());
    not_ca.insert(TLS_KEY.to_string(), leaf.key_pem.as_bytes().to_vec());
    assert_eq!(CertificateAuthority::from_secret_data(&not_ca, at).unwrap_err(), PkiError::NotCa);

    // Expired.
    let old =
        CertificateAuthority::create(key(), at - 20 * DAY, &CaPolicy { lifetime: 10 * DAY, rotate_before: 5 * DAY })
            .unwrap();
    let err = CertificateAuthority::from_secret_data(&old.to_secret_data(), at).unwrap_err();
    assert!(matches!(err, PkiError::Expired { .. }));
    assert!(err.to_string().contains("delete the Secret"), "{err}");

    // After a rotation, tls.crt and tls.key replaced by hand next to the old bundle and
    // bridge: refused (publishing that bundle would break every client).
    let mut rotated = ca.rotate(key(), at, &policy()).unwrap().to_secret_data();
    CertificateAuthority::from_secret_data(&rotated, at).expect("a rotated CA loads");
    let other = new_ca(at).to_secret_data();
    rotated.insert(TLS_CERT.into(), other[TLS_CERT].clone());
    rotated.insert(TLS_KEY.into(), other[TLS_KEY].clone());
    let err = CertificateAuthority::from_secret_data(&rotated, at).unwrap_err();
    assert!(matches!(err, PkiError::Stale { field: CA_BUNDLE, .. }), "{err}");
    assert!(err.to_string().contains("remove it"), "{err}");
    rotated.remove(CA_BUNDLE);
    let err = CertificateAuthority::from_secret_data(&rotated, at).unwrap_err();
    assert!(matches!(err, PkiError::Stale { field: INTERMEDIATE, .. }), "{err}");

    // No message ever contains key material.
    let key_body = std::str::from_utf8(&key_pem).unwrap().lines().nth(1).unwrap();
    for err in [
        with(TLS_KEY, b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n"),
        with(TLS_CERT, &key_pem),
        with(TLS_KEY, &key_pem[..200]),
    ] {
        assert!(!err.to_string().contains(key_body) && !format!("{err:?}").contains(key_body), "{err}");
    }
}

// ---------------------------------------------------------------------------------
// The refresh threshold (the decision's table: src/controllers/serving/decision/tests.rs)
// ---------------------------------------------------------------------------------

#[test]
fn default_refresh_threshold() {
    assert_eq!(LeafPolicy::default_refresh_before(730 * DAY), Duration::from_secs(730 * 86_400 / 3));
    assert_eq!(LeafPolicy::default_refresh_before(Duration::from_secs(6 * 3600)), Duration::from_secs(7200));
    assert_eq!(
        LeafPolicy::default_refresh_before(Duration::from_secs(2 * 3600)),
        Duration::from_secs(3600),
        "never under an hour"
    );
    assert_eq!(
        LeafPolicy::default_refresh_before(Duration::from_secs(60)),
        Duration::from_secs(30),
        "but at most half a short lifetime"
    );
}

// ---------------------------------------------------------------------------------
// Real TLS: the rotation matrix, interoperability, negative cases
// ---------------------------------------------------------------------------------

fn names(headless: bool) -> Vec<&'static str> {
    if headless {
        vec!["web.shop.svc", "web-0.web.shop.svc", "web.shop.svc.cluster.local"]
    } else {
        vec!["web.shop.svc", "web.shop.svc.cluster.local"]
    }
}

#[test]
fn rotation_matrix_all_four_combinations_handshake_with_rustls_openssl_and_go() {
    for headless in [false, true] {
        let Rotated { old, new, at } = rotated(now() - 400 * DAY, now());
        let old_leaf = issue(&old, headless, at - DAY);
        let new_leaf = issue(&new, headless, at);
        let old_bundle = old.bundle_pem(at);
        let new_bundle = new.bundle_pem(at);
        let servers = [
            ("old leaf", TlsServer::start(&old_leaf.chain_pem, &old_leaf.key_pem), &old_leaf),
            ("new leaf", TlsServer::start(&new_leaf.chain_pem, &new_leaf.key_pem), &new_leaf),
        ];
        let mut handshakes = 0;
        for (leaf_name, server, leaf) in &servers {
            for (bundle_name, bundle) in [("old bundle", &old_bundle), ("new bundle", &new_bundle)] {
                for name in names(headless) {
                    for (stack, result) in tls::connect_all(server.port, bundle, name) {
                        assert!(
                            result.is_ok(),
                            "{stack}: {leaf_name} × {bundle_name} for {name} (headless={headless}): {result:?}"
                        );
                        handshakes += 1;
                    }
                    tls::openssl_verify(&leaf.chain_pem, bundle, name)
                        .unwrap_or_else(|e| panic!("openssl verify {leaf_name} × {bundle_name}: {e}"));
                    tls::go_verify(&leaf.chain_pem, bundle, name)
                        .unwrap_or_else(|e| panic!("go verify {leaf_name} × {bundle_name}: {e}"));
                }
            }
        }
        println!("headless={headless}: {handshakes} successful handshakes");
    }
}

use tls::TlsServer;

#[test]
fn negative_cases_are_rejected_by_every_stack() {
    let Rotated { old, new, at } = rotated(now() - 400 * DAY, now());
    let old_bundle = old.bundle_pem(at);

    // An expired leaf from a valid CA.
    let expired = old.issue(&request(false), &key(), at - 20 * DAY, Duration::from_secs(86_400)).unwrap();
    // A leaf from an unrelated CA.
    let stranger = issue(&new_ca(at), false, at);
    // A new leaf whose chain lacks the bridge X2, seen by a client that has only the old bundle.
    let new_leaf = issue(&new, false, at);
    let chain = ders(&new_leaf.chain_pem);
    let without_bridge = pem::encode_certificates([chain[0].as_slice(), chain[2].as_slice()]);
    let good = issue(&old, false, at);

    let cases: [(&str, &str, &str, &str); 4] = [
        ("expired leaf", &expired.chain_pem, &expired.key_pem, "web.shop.svc"),
        ("unrelated CA", &stranger.chain_pem, &stranger.key_pem, "web.shop.svc"),
        ("bridge missing, old bundle", &without_bridge, &new_leaf.key_pem, "web.shop.svc"),
        ("wrong host name", &good.chain_pem, &good.key_pem, "api.shop.svc"),
    ];
    for (case, chain, key, name) in cases {
        let server = TlsServer::start(chain, key);
        for (stack, result) in tls::connect_all(server.port, &old_bundle, name) {
            assert!(result.is_err(), "{stack} accepted: {case}");
        }
        assert!(tls::openssl_verify(chain, &old_bundle, name).is_err(), "openssl verify accepted: {case}");
        assert!(tls::go_verify(chain, &old_bundle, name).is_err(), "go verify accepted: {case}");
        assert!(tls::rustls_verify_at(chain, &old_bundle, name, SystemTime::now()).is_err(), "rustls accepted: {case}");
    }
}

#[test]
fn openssl_needs_the_bridge_before_the_ca_in_the_chain() {
    // Why docs/spec.md §1 fixes the chain order: with the self-signed CA before the bridge, an
    // OpenSSL client that trusts only the pre-rotation bundle fails.
    let Rotated { old, new, at } = rotated(now() - 400 * DAY, now());
    let leaf = issue(&new, false, at);
    let chain = ders(&leaf.chain_pem);
    let ca_first = pem::encode_certificates([chain[0].as_slice(), chain[2].as_slice(), chain[1].as_slice()]);
    let server = TlsServer::start(&ca_first, &leaf.key_pem);
    let err =
        tls::openssl_connect(server.port, &old.bundle_pem(at), "web.shop.svc").expect_err("CA-before-bridge order");
    assert!(err.contains("self-signed certificate in certificate chain"), "{err}");
    let ours = TlsServer::start(&leaf.chain_pem, &leaf.key_pem);
    tls::openssl_connect(ours.port, &old.bundle_pem(at), "web.shop.svc").expect("our order");
}

#[test]
fn two_consecutive_rotations_drop_the_oldest_ca_when_its_bridge_expires() {
    // Automatic schedule: CA0 created, rotated when 395 days are left (t1), CA1 rotated
    // in turn when it has 395 days left (t2).
    let p = policy();
    let t0 = now() - 900 * DAY;
    let ca0 = new_ca(t0);
    let t1 = ca0.rotation_due(&p);
    let ca1 = ca0.rotate(key(), t1, &p).unwrap();
    let t2 = ca1.rotation_due(&p);
    let ca2 = ca1.rotate(key(), t2, &p).unwrap();
    let lifetime = 900 * DAY; // long enough that only trust, not the leaf itself, expires
    let leaf0 = ca0.issue(&request(false), &key(), t0, lifetime).unwrap();
    let leaf1 = ca1.issue(&request(false), &key(), t1, lifetime).unwrap();
    let name = "web.shop.svc";

    // Between the rotations: the CA1 bundle trusts CA0's leaves through X1.
    let mid = t1 + 100 * DAY;
    tls::rustls_verify_at(&leaf0.chain_pem, &ca1.bundle_pem(mid), name, to_system(mid))
        .expect("CA0 trusted through its bridge");
    // X1 (CA0 re-signed by CA1's key) expires exactly when CA1 is rotated.
    assert_eq!(ca1.next_bundle_change(mid), Some(ca0.not_after()));
    assert_eq!(ca0.not_after(), t2);
    // From then on no bundle trusts CA0: neither CA1's (X1 expired and left out)...
    let after = t2 + Duration::from_secs(1);
    assert_eq!(ders(&ca1.bundle_pem(after)).len(), 1);
    assert!(tls::rustls_verify_at(&leaf0.chain_pem, &ca1.bundle_pem(after), name, to_system(after)).is_err());
    // ...nor CA2's, which bridges only to CA1.
    assert!(tls::rustls_verify_at(&leaf0.chain_pem, &ca2.bundle_pem(after), name, to_system(after)).is_err());
    tls::rustls_verify_at(&leaf1.chain_pem, &ca2.bundle_pem(after), name, to_system(after)).expect("CA1 still trusted");
    let leaf2 = ca2.issue(&request(false), &key(), after, LEAF_LIFETIME).unwrap();
    tls::rustls_verify_at(&leaf2.chain_pem, &ca1.bundle_pem(after), name, to_system(after))
        .expect("CA1 bundle trusts CA2 leaves via X2");
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

#[test]
fn rotations_seconds_apart_keep_every_bundle_in_its_trust_window_working() {
    // docs/spec.md §5.3: forced rotations one second apart (a person who rotated twice because
    // the first "did not seem to work"). Every bundle handed out on the way must verify
    // every leaf handed out on the way, in every stack.
    let p = policy();
    let t0 = now() - 10 * DAY;
    let ca0 = new_ca(t0);
    let t1 = now() - Duration::from_secs(2);
    let ca1 = ca0.rotate(key(), t1, &p).unwrap();
    let t2 = t1 + Duration::from_secs(1);
    let ca2 = ca1.rotate(key(), t2, &p).unwrap();
    let t3 = t2 + Duration::from_secs(1);
    let ca3 = ca2.rotate(key(), t3, &p).unwrap();
    let name = "web.shop.svc";
    let leaves = [
        ("leaf0", issue(&ca0, false, t0)),
        ("leaf1", issue(&ca1, false, t1)),
        ("leaf2", issue(&ca2, false, t2)),
        ("leaf3", issue(&ca3, false, t3)),
    ];
    let at = now();
    let bundles = [
        ("bundle0", ca0.bundle_pem(at)),
        ("bundle1", ca1.bundle_pem(at)),
        ("bundle2", ca2.bundle_pem(at)),
        ("bundle3", ca3.bundle_pem(at)),
    ];
    assert_eq!(ders(&bundles[3].1).len(), 4, "the newest CA and three bridges (X1s)");
    assert_eq!(ders(&leaves[3].1.chain_pem).len(), 5, "leaf, three bridges (X2s), CA");
    let mut checked = 0;
    for (leaf_name, leaf) in &leaves {
        let server = TlsServer::start(&leaf.chain_pem, &leaf.key_pem);
        for (bundle_name, bundle) in &bundles {
            for (stack, result) in tls::connect_all(server.port, bundle, name) {
                result.unwrap_or_else(|e| panic!("{stack}: {leaf_name} × {bundle_name}: {e}"));
                checked += 1;
            }
            tls::openssl_verify(&leaf.chain_pem, bundle, name)
                .unwrap_or_else(|e| panic!("openssl verify {leaf_name} × {bundle_name}: {e}"));
            tls::go_verify(&leaf.chain_pem, bundle, name)
                .unwrap_or_else(|e| panic!("go verify {leaf_name} × {bundle_name}: {e}"));
        }
    }
    println!("three rotations a second apart: {checked} handshakes, every leaf × every bundle");

    // The bridges persist through signing-key and stay bounded.
    let back = CertificateAuthority::from_secret_data(&ca3.to_secret_data(), at).unwrap();
    assert_eq!(back.intermediates().len(), 3);
    let mut ca = ca3;
    for i in 0..service_ca_operator::pki::MAX_BRIDGES + 2 {
        ca = ca.rotate(key(), t3 + Duration::from_secs(i as u64 + 1), &p).unwrap();
    }
    assert_eq!(ca.intermediates().len(), service_ca_operator::pki::MAX_BRIDGES);
    assert_eq!(ders(&ca.bundle_pem(at)).len(), service_ca_operator::pki::MAX_BRIDGES + 1);
}

// ---------------------------------------------------------------------------------
// Key algorithms: every kind of serving key in every stack, and a CA moving between
// RSA and ECDSA with its trust bridge
// ---------------------------------------------------------------------------------

const KINDS: [KeyKind; 5] = [
    KeyKind::Rsa { bits: 2048 },
    KeyKind::Rsa { bits: 3072 },
    KeyKind::Rsa { bits: 4096 },
    KeyKind::EcdsaP256,
    KeyKind::EcdsaP384,
];

fn leaf_of(ca: &CertificateAuthority, kind: KeyKind, at: OffsetDateTime) -> IssuedLeaf {
    let req = LeafRequest { key: kind, ..request(false) };
    ca.issue(&req, &PrivateKey::generate(kind).unwrap(), at, LEAF_LIFETIME).unwrap()
}

fn ca_of(kind: KeyKind, at: OffsetDateTime) -> CertificateAuthority {
    CertificateAuthority::create(PrivateKey::generate(kind).unwrap(), at, &policy()).unwrap()
}

#[test]
fn every_serving_key_kind_has_its_encoding_usage_and_the_cas_signature() {
    let at = now();
    for ca_kind in [KeyKind::Rsa { bits: 2048 }, KeyKind::EcdsaP256, KeyKind::EcdsaP384] {
        let ca = ca_of(ca_kind, at);
        let expected_signature = match ca_kind {
            KeyKind::Rsa { .. } => "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
            KeyKind::EcdsaP256 => "1.2.840.10045.4.3.2",    // ecdsa-with-SHA256
            KeyKind::EcdsaP384 => "1.2.840.10045.4.3.3",    // ecdsa-with-SHA384
        };
        for kind in KINDS {
            let leaf = leaf_of(&ca, kind, at);
            let ders = ders(&leaf.chain_pem);
            let cert = parse(&ders[0]);
            assert_eq!(
                cert.signature_algorithm.algorithm.to_id_string(),
                expected_signature,
                "{ca_kind} CA, {kind} leaf"
            );
            let usage = cert.key_usage().unwrap().unwrap().value;
            assert!(usage.digital_signature());
            assert_eq!(
                usage.key_encipherment(),
                matches!(kind, KeyKind::Rsa { .. }),
                "{kind}: keyEncipherment only for RSA"
            );
            let label = match kind {
                KeyKind::Rsa { .. } => "-----BEGIN RSA PRIVATE KEY-----\n",
                _ => "-----BEGIN EC PRIVATE KEY-----\n",
            };
            assert!(leaf.key_pem.starts_with(label), "{kind}: PKCS#1 for RSA, SEC1 for ECDSA");
            let back = PrivateKey::from_pem("tls.key", leaf.key_pem.as_bytes()).unwrap();
            assert_eq!(back.kind(), kind);
        }
        let ca_cert = parse(&ca.certificate().der);
        let usage_of_ca = ca_cert.key_usage().unwrap().unwrap().value;
        assert!(usage_of_ca.key_cert_sign());
        assert_eq!(usage_of_ca.key_encipherment(), matches!(ca_kind, KeyKind::Rsa { .. }));
    }
}

#[test]
fn every_serving_key_kind_is_loaded_and_served_by_rustls_openssl_and_go() {
    let at = now();
    for ca_kind in [KeyKind::Rsa { bits: 2048 }, KeyKind::EcdsaP256] {
        let ca = ca_of(ca_kind, at);
        let bundle = ca.bundle_pem(at);
        for kind in [KeyKind::Rsa { bits: 2048 }, KeyKind::EcdsaP256, KeyKind::EcdsaP384] {
            let leaf = leaf_of(&ca, kind, at);
            let failures = tls::serve_in_every_stack(&leaf.chain_pem, &leaf.key_pem, &bundle, "web.shop.svc");
            assert!(failures.is_empty(), "{ca_kind} CA, {kind} leaf: {failures:#?}");
            // And a leaf for the wrong name is refused, so the handshakes above mean something.
            let wrong = tls::serve_in_every_stack(&leaf.chain_pem, &leaf.key_pem, &bundle, "api.shop.svc");
            assert_eq!(wrong.len(), 9, "{ca_kind} CA, {kind} leaf, wrong name: {wrong:#?}");
        }
    }
}

#[test]
fn a_ca_moving_between_rsa_and_ecdsa_keeps_every_client_working_through_the_bridge() {
    for (from, to) in
        [(KeyKind::Rsa { bits: 2048 }, KeyKind::EcdsaP256), (KeyKind::EcdsaP256, KeyKind::Rsa { bits: 2048 })]
    {
        let created = now() - 400 * DAY;
        let at = now();
        let old = ca_of(from, created);
        let new = old.rotate(PrivateKey::generate(to).unwrap(), at, &policy()).unwrap();
        assert_eq!(new.key_kind(), to);
        let bundles = [("old bundle", old.bundle_pem(at)), ("new bundle", new.bundle_pem(at))];
        let mut handshakes = 0;
        for (ca_name, ca, when) in [("old CA", &old, at - DAY), ("new CA", &new, at)] {
            for kind in [KeyKind::Rsa { bits: 2048 }, KeyKind::EcdsaP256] {
                let leaf = leaf_of(ca, kind, when);
                let server = TlsServer::start(&leaf.chain_pem, &leaf.key_pem);
                for (bundle_name, bundle) in &bundles {
                    for (stack, result) in tls::connect_all(server.port, bundle, "web.shop.svc") {
                        assert!(
                            result.is_ok(),
                            "{from}→{to}: {stack}, {ca_name} {kind} leaf × {bundle_name}: {result:?}"
                        );
                        handshakes += 1;
                    }
                    tls::openssl_verify(&leaf.chain_pem, bundle, "web.shop.svc").unwrap_or_else(|e| {
                        panic!("{from}→{to}: openssl verify {ca_name} {kind} × {bundle_name}: {e}")
                    });
                    tls::go_verify(&leaf.chain_pem, bundle, "web.shop.svc")
                        .unwrap_or_else(|e| panic!("{from}→{to}: go verify {ca_name} {kind} × {bundle_name}: {e}"));
                }
            }
        }
        // Without the bridge the old bundle does not trust the new CA's leaves.
        let leaf = leaf_of(&new, KeyKind::EcdsaP256, at);
        let chain = ders(&leaf.chain_pem);
        let without_bridge = pem::encode_certificates([chain[0].as_slice(), chain[2].as_slice()]);
        assert!(tls::go_verify(&without_bridge, &old.bundle_pem(at), "web.shop.svc").is_err());
        println!("{from} → {to}: {handshakes} handshakes (2 CAs × 2 leaf kinds × 2 bundles × 3 stacks), 0 failed");
    }
}
