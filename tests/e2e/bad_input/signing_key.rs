//! What a person may put in `signing-key` (docs/spec.md §3): unusable keys are refused
//! with clear messages, user-supplied CAs are used, no private key reaches the logs.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::PostParams;
use serde_json::json;
use service_ca_operator::pki;

use crate::support::annotations::INJECT;
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, T, certs, data, eventually};

/// Writes a self-signed CA made by the openssl command line: (tls.crt, tls.key).
fn openssl_ca(dir: &std::path::Path, key_args: &[&str], extra: &[&str]) -> (Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let (key, crt) = (dir.join("ca.key"), dir.join("ca.crt"));
    let status = Command::new("openssl")
        // 1000 days: more than --ca-rotate-before (395 days) left, so it is not due
        // for rotation at once.
        .args(["req", "-x509", "-nodes", "-days", "1000", "-subj", "/O=Example/CN=example-service-ca"])
        .args(key_args)
        .args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,digitalSignature",
        ])
        .args(extra)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl (install the openssl package)");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    (std::fs::read(&crt).unwrap(), std::fs::read(&key).unwrap())
}

async fn put_signing_key(env: &Env, crt: Vec<u8>, key: Vec<u8>) {
    let secret: Secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("signing-key".into()), ..Default::default() },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(crt)),
            ("tls.key".to_string(), ByteString(key)),
        ])),
        ..Default::default()
    };
    env.op_secrets().create(&PostParams::default(), &secret).await.unwrap();
}

#[tokio::test]
async fn unusable_signing_keys_are_refused_with_clear_messages() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-ca-{}", std::process::id()));
    let rsa = ["-newkey", "rsa:2048"];
    let now = time::OffsetDateTime::now_utc();
    let leaf_ca = pki::CertificateAuthority::create(
        pki::PrivateKey::generate_rsa(2048).unwrap(),
        now,
        &pki::CaPolicy { lifetime: Duration::from_secs(86_400), rotate_before: Duration::from_secs(3_600) },
    )
    .unwrap();
    let leaf_key = pki::PrivateKey::generate_rsa(2048).unwrap();
    let req = pki::LeafRequest {
        service: "x".into(),
        namespace: "y".into(),
        uid: "z".into(),
        headless: false,
        cluster_domain: "cluster.local".into(),
        key: service_ca_operator::pki::KeyKind::Rsa { bits: 2048 },
    };
    let leaf = leaf_ca.issue(&req, &leaf_key, now, Duration::from_secs(3_600)).unwrap();
    let leaf_only =
        pki::pem::encode("CERTIFICATE", &pki::pem::decode_certificates("c", leaf.chain_pem.as_bytes()).unwrap()[0]);
    let expired = pki::CertificateAuthority::create(
        pki::PrivateKey::generate_rsa(2048).unwrap(),
        now - Duration::from_secs(7_200),
        &pki::CaPolicy { lifetime: Duration::from_secs(3_600), rotate_before: Duration::from_secs(60) },
    )
    .unwrap()
    .to_secret_data();
    let (no_ski_crt, no_ski_key) = openssl_ca(&dir.join("noski"), &rsa, &["-addext", "subjectKeyIdentifier=none"]);
    let (small_crt, small_key) = openssl_ca(&dir.join("small"), &["-newkey", "rsa:1024"], &[]);
    let (ed_crt, ed_key) = openssl_ca(&dir.join("ed"), &["-newkey", "ed25519"], &[]);
    // Signs fine, but rotation could never re-create its subject (refused at
    // load, not when its rotation falls due).
    let (multi_crt, multi_key) = openssl_ca(&dir.join("multi"), &rsa, &["-subj", "/O=Example/CN=multi+OU=valued"]);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("not a CA", leaf_only.into_bytes(), leaf.key_pem.as_bytes().to_vec(), "is not a CA"),
        ("expired", expired["tls.crt"].clone(), expired["tls.key"].clone(), "expired at"),
        ("no SubjectKeyIdentifier", no_ski_crt, no_ski_key, "SubjectKeyIdentifier"),
        ("RSA-1024", small_crt, small_key, "RSA-1024: only RSA keys of 2048 to 8192 bits"),
        ("Ed25519", ed_crt, ed_key, "the CA certificate's key: only RSA keys of 2048 to 8192 bits and ECDSA keys"),
        (
            "multi-valued RDN",
            multi_crt,
            multi_key,
            "could never be rotated (tls.crt does not hold a valid X.509 certificate: unsupported subject: multi-valued or empty RDN)",
        ),
    ];
    for (case, crt, key, expected) in cases {
        let env = Env::new("bad-ca").await;
        put_signing_key(&env, crt, key).await;
        let before = env.op_secrets().get("signing-key").await.unwrap();
        let op = env.start_operator(&[]);
        let note = env.warning_containing(&env.op_ns, "signing-key", expected).await;
        println!("{case}: {note}");
        let (status, _) = op.admin_get("/readyz").await.unwrap();
        assert_eq!(status, 503, "{case}: not ready without a usable CA");
        assert_eq!(
            env.op_secrets().get("signing-key").await.unwrap().resource_version(),
            before.resource_version(),
            "{case}: never overwritten"
        );
    }
}

#[tokio::test]
async fn user_supplied_rsa_4096_and_ecdsa_cas_are_used_and_rotate_in_kind() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("user-ca-{}", std::process::id()));
    for (case, key_args) in [
        ("RSA-4096", vec!["-newkey", "rsa:4096"]),
        ("ECDSA P-256", vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    ] {
        let env = Env::new("user-ca").await;
        let (crt, key) = openssl_ca(&dir.join(case.replace(' ', "")), &key_args, &[]);
        put_signing_key(&env, crt.clone(), key).await;
        let _op = env.start_operator(&[]);
        let bundle = env.ca_bundle().await;
        assert_eq!(bundle.as_bytes(), crt.as_slice(), "{case}: the bundle is the supplied CA");
        env.annotated_service("web", "web-tls", false).await;
        let secret = env.serving_secret("web-tls", T).await;
        let name = format!("web.{}.svc", env.ns);
        let server = TlsServer::start(&data(&secret, "tls.crt"), &data(&secret, "tls.key"));
        for (stack, result) in tls::connect_all(server.port, &bundle, &name) {
            result.unwrap_or_else(|e| panic!("{case} {stack}: {e}"));
        }
        // A forced rotation keeps the kind of key, and bridges old and new.
        env.force_rotation("user-ca").await;
        let rotated = eventually(T, "the rotation", || async {
            let s = env.op_secrets().get("signing-key").await.unwrap();
            s.data.as_ref()?.contains_key("ca-bundle.crt").then_some(s)
        })
        .await;
        let new_key = pki::PrivateKey::from_pem("tls.key", data(&rotated, "tls.key").as_bytes()).unwrap();
        let expected_kind =
            if case.starts_with("RSA") { pki::KeyKind::Rsa { bits: 4096 } } else { pki::KeyKind::EcdsaP256 };
        assert_eq!(new_key.kind(), expected_kind, "{case}: rotation keeps the key type");
        let new_ski = certs::ca_ski(&rotated);
        let reissued = eventually(T, "the leaf re-issued", || async {
            let s = env.secrets().get("web-tls").await.unwrap();
            (certs::leaf_aki(&s) == new_ski).then_some(s)
        })
        .await;
        server.reload(&data(&reissued, "tls.crt"), &data(&reissued, "tls.key"));
        for (stack, result) in tls::connect_all(server.port, &bundle, &name) {
            result.unwrap_or_else(|e| panic!("{case} {stack} with the old bundle after rotation: {e}"));
        }
    }
}

#[tokio::test]
async fn no_private_key_reaches_the_logs_even_at_trace_level() {
    let env = Env::new("secrecy").await;
    // The most verbose setting for every crate.
    let mut op = env.start_operator(&["--log-level", "trace"]);
    env.ca_bundle().await;
    env.annotated_service("a", "a-tls", false).await;
    env.annotated_service("b", "b-tls", true).await;
    let first = env.serving_secret("a-tls", T).await;
    let mut tampered = first.clone();
    tampered.data.as_mut().unwrap().insert("tls.crt".into(), ByteString(b"garbage".to_vec()));
    env.secrets().replace("a-tls", &PostParams::default(), &tampered).await.unwrap();
    let mut cm: ConfigMap = serde_json::from_value(json!({})).unwrap();
    cm.metadata = env.meta("cm");
    cm.metadata.annotations = Some(BTreeMap::from([(INJECT.to_string(), "true".to_string())]));
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    let mut keys = Vec::new();
    keys.push(data(&env.op_secrets().get("signing-key").await.unwrap(), "tls.key"));
    env.force_rotation("secrecy").await;
    eventually(T, "the rotation", || async {
        env.op_secrets().get("signing-key").await.unwrap().data?.contains_key("ca-bundle.crt").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    keys.push(data(&env.op_secrets().get("signing-key").await.unwrap(), "tls.key"));
    keys.push(data(&first, "tls.key"));
    for name in ["a-tls", "b-tls"] {
        keys.push(data(&env.secrets().get(name).await.unwrap(), "tls.key"));
    }
    op.stop();
    let logs = op.logs();
    assert!(logs.lines().count() > 200, "trace logging is on ({} lines)", logs.lines().count());
    assert!(!logs.contains("PRIVATE KEY"), "a PEM private-key marker is in the logs");
    for key in &keys {
        assert!(key.contains("PRIVATE KEY"));
        // Base64, as the key travels in a Secret's data.
        let b64 = serde_json::to_string(&ByteString(key.as_bytes().to_vec())).unwrap();
        for (i, line) in key.lines().filter(|l| !l.starts_with("-----")).enumerate().take(5) {
            assert!(!logs.contains(line), "line {i} of a private key's PEM body is in the logs");
        }
        assert!(
            !logs.contains(&b64[..60]) && !logs.contains(&b64[100..160]),
            "the base64 of a private key (as sent in Secret data) is in the logs"
        );
    }
    println!("{} log lines at trace level, {} private keys searched for: none found", logs.lines().count(), keys.len());
}
