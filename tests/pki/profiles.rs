//! Profiles: every field of the CA and leaf certificates (docs/spec.md §1, §3.2).

use super::*;

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
