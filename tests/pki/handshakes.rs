//! Real TLS with rustls, OpenSSL and Go: the rotation matrix, negative cases, the chain
//! order, consecutive rotations (one, and several seconds apart).

use super::tls::TlsServer;
use super::*;

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
