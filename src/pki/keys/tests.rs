use super::*;

#[test]
fn rsa_key_round_trips_through_pkcs1_pem() {
    let key = PrivateKey::generate_rsa(2048).unwrap();
    assert!(key.to_pem().starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
    let back = PrivateKey::from_pem("tls.key", key.to_pem().as_bytes()).unwrap();
    assert_eq!(back.kind(), KeyKind::Rsa { bits: 2048 });
    assert_eq!(back.public_key(), key.public_key());
    assert_eq!(back.to_pem(), key.to_pem());
    key.signing_key().unwrap();
}

#[test]
fn ecdsa_keys_are_generated_and_read_back() {
    for kind in [KeyKind::EcdsaP256, KeyKind::EcdsaP384] {
        let key = PrivateKey::generate(kind).unwrap();
        assert!(key.to_pem().starts_with("-----BEGIN EC PRIVATE KEY-----\n"), "SEC1");
        let back = PrivateKey::from_pem("tls.key", key.to_pem().as_bytes()).unwrap();
        assert_eq!(back.kind(), kind);
        assert_eq!(back.public_key(), key.public_key());
        assert_eq!(back.to_pem(), key.to_pem());
        assert_eq!(key.public_key().kind(), Some(kind));
        back.signing_key().unwrap();
    }
}

#[test]
fn key_algorithm_values_parse_in_any_case() {
    let table = [
        ("rsa", KeyKind::Rsa { bits: 2048 }),
        ("RSA", KeyKind::Rsa { bits: 2048 }),
        (" rsa-2048 ", KeyKind::Rsa { bits: 2048 }),
        ("rsa-3072", KeyKind::Rsa { bits: 3072 }),
        ("Rsa-4096", KeyKind::Rsa { bits: 4096 }),
        ("ecdsa", KeyKind::EcdsaP256),
        ("ECDSA", KeyKind::EcdsaP256),
        ("ecdsa-p256", KeyKind::EcdsaP256),
        ("ECDSA-P384", KeyKind::EcdsaP384),
    ];
    for (value, kind) in table {
        assert_eq!(value.parse::<KeyKind>(), Ok(kind), "{value}");
    }
    for bad in ["", "rsa-1024", "rsa2048", "ec", "ecdsa-p521", "ed25519", "rsa-8192", "secret-value"] {
        let error = bad.parse::<KeyKind>().unwrap_err();
        assert_eq!(error, format!("not a key algorithm; use one of {KEY_ALGORITHMS}"), "{bad}");
    }
}

#[test]
fn rsa_public_keys_know_their_size() {
    let key = PrivateKey::generate_rsa(3072).unwrap();
    assert_eq!(key.public_key().kind(), Some(KeyKind::Rsa { bits: 3072 }));
}

#[test]
fn debug_never_shows_key_material() {
    let key = PrivateKey::generate_rsa(2048).unwrap();
    let shown = format!("{key:?}");
    assert_eq!(shown, "PrivateKey(RSA-2048, <redacted>)");
}

#[test]
fn wrong_inputs_get_typed_errors() {
    let cert_pem = pem::encode("CERTIFICATE", &[0x30, 0x00]);
    assert_eq!(
        PrivateKey::from_pem("tls.key", cert_pem.as_bytes()).unwrap_err(),
        PkiError::WrongBlockType { field: "tls.key", found: "CERTIFICATE", expected: "PRIVATE KEY" }
    );
    let garbage = pem::encode("RSA PRIVATE KEY", b"not a key");
    assert!(matches!(PrivateKey::from_pem("tls.key", garbage.as_bytes()), Err(PkiError::BadKey { .. })));
}

#[test]
fn serials_are_positive_and_distinct() {
    let a = random_serial().to_bytes();
    let b = random_serial().to_bytes();
    assert_ne!(a, b);
    assert!(a.len() <= 20 && a[0] & 0x80 == 0 && a[0] != 0);
}
