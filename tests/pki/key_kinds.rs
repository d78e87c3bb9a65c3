//! Key algorithms: every kind of serving key in every stack, and a CA moving between
//! RSA and ECDSA with its trust bridge.

use super::tls::TlsServer;
use super::*;

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
