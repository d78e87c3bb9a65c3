//! Rotation with a trust bridge (docs/spec.md §3.3), the bundle (§3.4), the signing-key
//! Secret round trip and its errors, and the refresh threshold.

use super::*;

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
