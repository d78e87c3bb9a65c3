//! Key algorithms, end to end: the Service annotation
//! `serving-cert-key-algorithm`, the cluster default `--default-key-algorithm`, and
//! the CA's move between RSA and ECDSA with `--ca-key-algorithm`, on the real API
//! server, with the issued pairs loaded and served by rustls, OpenSSL and Go.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use service_ca_operator::pki::{KeyKind, PrivateKey};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::support::annotations::{ALPHA_ALG, ALPHA_NAME, BETA_ALG, BETA_ERR, BETA_ERR_NUM, BETA_NAME};
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, T, annotation, certs, data, eventually, metric};

const RSA: KeyKind = KeyKind::Rsa { bits: 2048 };

/// The kind of the private key in a Secret's `tls.key`.
fn key_kind(secret: &Secret) -> KeyKind {
    PrivateKey::from_pem("tls.key", data(secret, "tls.key").as_bytes()).unwrap().kind()
}

/// The signature algorithm OID of the leaf in a Secret's `tls.crt`.
fn signature_oid(secret: &Secret) -> String {
    let ders = certs::ders(&data(secret, "tls.crt"));
    let (_, cert) = X509Certificate::from_der(&ders[0]).unwrap();
    cert.signature_algorithm.algorithm.to_id_string()
}

/// Waits for Secret `name` to hold a key of `kind`.
async fn secret_with_key(env: &Env, name: &str, kind: KeyKind) -> Secret {
    let api = env.secrets();
    eventually(T, &format!("Secret {name} with a {kind} key"), || {
        let api = api.clone();
        async move {
            let secret = api.get_opt(name).await.ok().flatten()?;
            let key = secret.data.as_ref()?.get("tls.key")?;
            (PrivateKey::from_pem("tls.key", &key.0).ok()?.kind() == kind).then_some(secret)
        }
    })
    .await
}

async fn annotate_service(env: &Env, name: &str, annotations: serde_json::Value) {
    let patch = json!({ "metadata": { "annotations": annotations } });
    env.services().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

/// Every issued pair is served by rustls, OpenSSL and Go, each reached by all three
/// clients trusting `bundle` (9 handshakes).
fn assert_served_everywhere(env: &Env, secret: &Secret, service: &str, bundle: &str) {
    let name = format!("{service}.{}.svc", env.ns);
    let failures = tls::serve_in_every_stack(&data(secret, "tls.crt"), &data(secret, "tls.key"), bundle, &name);
    assert!(failures.is_empty(), "{service}: {failures:#?}");
}

#[tokio::test]
async fn the_annotation_gives_ecdsa_keys_that_every_stack_loads_and_serves() {
    let env = Env::new("alg-ecdsa").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    env.service_with("ec", &[(BETA_NAME, "ec-tls"), (BETA_ALG, "ECDSA")], false).await;
    env.service_with("p384", &[(ALPHA_NAME, "p384-tls"), (ALPHA_ALG, " ecdsa-P384 ")], false).await;
    env.service_with("big", &[(BETA_NAME, "big-tls"), (BETA_ALG, "rsa-3072")], false).await;
    env.annotated_service("plain", "plain-tls", false).await;

    let ec = env.serving_secret("ec-tls", T).await;
    assert!(data(&ec, "tls.key").starts_with("-----BEGIN EC PRIVATE KEY-----\n"), "SEC1");
    assert_eq!(key_kind(&ec), KeyKind::EcdsaP256);
    assert_eq!(signature_oid(&ec), "1.2.840.113549.1.1.11", "signed by the RSA CA: sha256WithRSAEncryption");
    assert_eq!(key_kind(&env.serving_secret("p384-tls", T).await), KeyKind::EcdsaP384, "the alpha family");
    let big = env.serving_secret("big-tls", T).await;
    assert!(data(&big, "tls.key").starts_with("-----BEGIN RSA PRIVATE KEY-----\n"), "PKCS#1");
    assert_eq!(key_kind(&big), KeyKind::Rsa { bits: 3072 });
    assert_eq!(key_kind(&env.serving_secret("plain-tls", T).await), RSA, "the default stays RSA-2048");

    for (service, secret) in [("ec", "ec-tls"), ("p384", "p384-tls"), ("big", "big-tls"), ("plain", "plain-tls")] {
        assert_served_everywhere(&env, &env.secrets().get(secret).await.unwrap(), service, &bundle);
    }
}

#[tokio::test]
async fn an_invalid_value_is_reported_and_nothing_is_generated_or_written() {
    let env = Env::new("alg-invalid").await;
    // No ready keys: every key generated is counted as it is asked for.
    let op = env.start_operator(&["--key-buffer", "0"]);
    env.ca_bundle().await;
    env.service_with("web", &[(BETA_NAME, "web-tls"), (BETA_ALG, "dsa-1024")], false).await;

    let svc = eventually(T, "the error annotations", || async {
        let s = env.services().get("web").await.unwrap();
        annotation(&s.metadata, BETA_ERR_NUM).is_some().then_some(s)
    })
    .await;
    let message = annotation(&svc.metadata, BETA_ERR).unwrap();
    assert!(
        message.contains(BETA_ALG) && message.contains("\"dsa-1024\"") && message.contains("ecdsa-p384"),
        "{message}"
    );
    let warning = env.warning(&env.ns, "web", Some("ServingCertificateError")).await;
    assert!(warning.note.as_deref().unwrap_or_default().contains("dsa-1024"), "{warning:?}");
    // Retried with backoff (2 s), still no Secret and no serving key: only the CA's.
    eventually(T, "the failure count to reach 2", || async {
        let s = env.services().get("web").await.unwrap();
        (annotation(&s.metadata, BETA_ERR_NUM) == Some("2")).then_some(())
    })
    .await;
    assert!(env.secrets().get_opt("web-tls").await.unwrap().is_none(), "no Secret for an invalid value");
    assert_eq!(metric(&op.metrics_page().await, "service_ca_keys_generated_total"), 1.0, "the CA key only");

    // Fixed: the Secret appears and the error annotations go.
    annotate_service(&env, "web", json!({ BETA_ALG: "ecdsa" })).await;
    let secret = secret_with_key(&env, "web-tls", KeyKind::EcdsaP256).await;
    assert!(secret.data.as_ref().unwrap().contains_key("tls.crt"));
    eventually(T, "the error annotations to go", || async {
        let s = env.services().get("web").await.unwrap();
        annotation(&s.metadata, BETA_ERR).is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_kind_outside_the_allowed_list_is_reported_and_nothing_is_generated_or_written() {
    let env = Env::new("alg-allowed").await;
    let op = env.start_operator(&["--key-buffer", "0", "--allowed-key-algorithms", "rsa,ecdsa"]);
    env.ca_bundle().await;
    env.service_with("web", &[(BETA_NAME, "web-tls"), (BETA_ALG, "rsa-4096")], false).await;
    env.service_with("ec", &[(BETA_NAME, "ec-tls"), (ALPHA_ALG, "ECDSA")], false).await;

    let svc = eventually(T, "the error annotations", || async {
        let s = env.services().get("web").await.unwrap();
        (annotation(&s.metadata, BETA_ERR_NUM) == Some("2")).then_some(s)
    })
    .await;
    let message = annotation(&svc.metadata, BETA_ERR).unwrap();
    assert!(message.contains("\"rsa-4096\"") && message.contains("use one of rsa-2048, ecdsa-p256"), "{message}");
    let warnings = env.events(&env.ns, Some("web"), Some("ServingCertificateError")).await;
    let warning = warnings.iter().find(|e| e.type_.as_deref() == Some("Warning")).expect("a Warning Event");
    assert!(warning.note.as_deref().unwrap_or_default().contains("not allowed"), "{warning:?}");
    assert!(env.secrets().get_opt("web-tls").await.unwrap().is_none(), "no Secret for a kind not allowed");
    // An allowed kind is issued; the only keys made are the CA's and that one.
    assert_eq!(key_kind(&env.serving_secret("ec-tls", T).await), KeyKind::EcdsaP256);
    assert_eq!(metric(&op.metrics_page().await, "service_ca_keys_generated_total"), 2.0, "the CA's and ec's");

    // Fixed: the Secret appears and the error annotations go.
    annotate_service(&env, "web", json!({ BETA_ALG: "rsa" })).await;
    secret_with_key(&env, "web-tls", RSA).await;
    eventually(T, "the error annotations to go", || async {
        let s = env.services().get("web").await.unwrap();
        annotation(&s.metadata, BETA_ERR).is_none().then_some(())
    })
    .await;
}

#[test]
fn a_default_outside_the_allowed_list_is_refused_at_start_up() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_service-ca-operator"))
        .args(["run", "--allowed-key-algorithms", "ecdsa"])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--default-key-algorithm (rsa-2048) must be one of --allowed-key-algorithms (ecdsa-p256)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn changing_the_annotation_reissues_with_the_new_key_kind() {
    let env = Env::new("alg-change").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    env.annotated_service("web", "web-tls", false).await;
    let rsa = env.serving_secret("web-tls", T).await;
    assert_eq!(key_kind(&rsa), RSA);

    annotate_service(&env, "web", json!({ BETA_ALG: "ecdsa" })).await;
    let ec = secret_with_key(&env, "web-tls", KeyKind::EcdsaP256).await;
    assert_ne!(certs::serial(&ec), certs::serial(&rsa));
    let refreshed = eventually(T, "the Refreshed Event", || async {
        env.events(&env.ns, Some("web"), Some("ServingCertificateRefreshed")).await.into_iter().next()
    })
    .await;
    let note = refreshed.note.unwrap_or_default();
    assert!(note.contains("RSA-2048") && note.contains("ECDSA P-256"), "{note}");
    assert_served_everywhere(&env, &ec, "web", &bundle);

    // Removing it goes back to the default.
    annotate_service(&env, "web", json!({ BETA_ALG: null })).await;
    let back = secret_with_key(&env, "web-tls", RSA).await;
    assert_served_everywhere(&env, &back, "web", &bundle);
}

#[tokio::test]
async fn changing_the_default_reissues_the_services_without_the_annotation() {
    let env = Env::new("alg-default").await;
    let mut op = env.start_operator(&[]);
    env.ca_bundle().await;
    env.annotated_service("plain", "plain-tls", false).await;
    env.service_with("pinned", &[(BETA_NAME, "pinned-tls"), (BETA_ALG, "rsa")], false).await;
    assert_eq!(key_kind(&env.serving_secret("plain-tls", T).await), RSA);
    let pinned = env.serving_secret("pinned-tls", T).await;
    op.stop();

    let op = env.start_operator(&["--default-key-algorithm", "ecdsa-p384"]);
    let plain = secret_with_key(&env, "plain-tls", KeyKind::EcdsaP384).await;
    let bundle = env.ca_bundle().await;
    assert_served_everywhere(&env, &plain, "plain", &bundle);
    // Settled: the Service that names its algorithm kept its certificate.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let page = op.metrics_page().await;
    assert_eq!(metric(&page, "service_ca_certificates_issued_total{reason=\"key-algorithm\"}"), 1.0, "{page}");
    let still = env.secrets().get("pinned-tls").await.unwrap();
    assert_eq!(certs::serial(&still), certs::serial(&pinned), "an annotated Service is not re-issued");
}

#[tokio::test]
async fn the_ca_moves_from_rsa_to_ecdsa_at_the_next_rotation_and_old_bundles_keep_working() {
    let env = Env::new("alg-ca-move").await;
    let mut op = env.start_operator(&[]);
    let old_bundle = env.ca_bundle().await;
    env.annotated_service("rsa", "rsa-tls", false).await;
    env.service_with("ec", &[(BETA_NAME, "ec-tls"), (BETA_ALG, "ecdsa")], false).await;
    let old_rsa = env.serving_secret("rsa-tls", T).await;
    let old_ec = env.serving_secret("ec-tls", T).await;
    let old_ca = env.op_secrets().get("signing-key").await.unwrap();
    assert_eq!(key_kind(&old_ca), RSA, "a new CA is RSA-2048 by default");
    op.stop();

    // The flag alone does not rotate: the CA moves at the next rotation.
    let _op = env.start_operator(&["--ca-key-algorithm", "ecdsa"]);
    env.ca_bundle().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ca = env.op_secrets().get("signing-key").await.unwrap();
    assert_eq!(certs::ca_ski(&ca), certs::ca_ski(&old_ca), "no rotation without a reason");
    assert_eq!(certs::serial(&env.secrets().get("rsa-tls").await.unwrap()), certs::serial(&old_rsa));

    env.force_rotation("to-ecdsa").await;
    let new_ca = eventually(T, "the rotation", || async {
        let s = env.op_secrets().get("signing-key").await.ok()?;
        (certs::ca_ski(&s) != certs::ca_ski(&old_ca)).then_some(s)
    })
    .await;
    assert!(data(&new_ca, "tls.key").starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
    assert_eq!(key_kind(&new_ca), KeyKind::EcdsaP256);
    let new_ski = certs::ca_ski(&new_ca);
    let reissued = |name: &'static str| {
        let (api, new_ski) = (env.secrets(), new_ski.clone());
        eventually(T, name, move || {
            let (api, new_ski) = (api.clone(), new_ski.clone());
            async move { api.get_opt(name).await.ok().flatten().filter(|s| certs::leaf_aki(s) == new_ski) }
        })
    };
    let new_rsa = reissued("rsa-tls").await;
    let new_ec = reissued("ec-tls").await;
    assert_eq!((key_kind(&new_rsa), key_kind(&new_ec)), (RSA, KeyKind::EcdsaP256), "leaves keep their kinds");
    assert_eq!(signature_oid(&new_ec), "1.2.840.10045.4.3.2", "signed by the EC CA: ecdsa-with-SHA256");
    assert_eq!(signature_oid(&new_rsa), "1.2.840.10045.4.3.2");
    let new_bundle = env.ca_bundle().await;

    // The matrix: leaves of the RSA CA and of the EC CA, RSA and EC keys, against
    // clients holding the bundle from before and after the move, in three stacks.
    let mut handshakes = 0;
    for (what, secret) in [
        ("RSA CA, RSA leaf", &old_rsa),
        ("RSA CA, EC leaf", &old_ec),
        ("EC CA, RSA leaf", &new_rsa),
        ("EC CA, EC leaf", &new_ec),
    ] {
        let server = TlsServer::start(&data(secret, "tls.crt"), &data(secret, "tls.key"));
        let service = if key_kind(secret) == RSA { "rsa" } else { "ec" };
        let name = format!("{service}.{}.svc", env.ns);
        for (bundle_name, bundle) in [("old bundle", &old_bundle), ("new bundle", &new_bundle)] {
            for (stack, result) in tls::connect_all(server.port, bundle, &name) {
                assert!(result.is_ok(), "{what} × {bundle_name}, {stack}: {result:?}");
                handshakes += 1;
            }
        }
    }
    // The new pairs in servers of every stack, for clients with the old bundle.
    assert_served_everywhere(&env, &new_rsa, "rsa", &old_bundle);
    assert_served_everywhere(&env, &new_ec, "ec", &old_bundle);
    println!(
        "RSA CA → EC CA: {handshakes} handshakes (4 leaves × 2 bundles × 3 client stacks) + 18 served by every stack, 0 failed"
    );
}
