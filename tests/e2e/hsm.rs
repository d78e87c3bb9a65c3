//! The CA key in a PKCS#11 token (SoftHSM2), end to end: the key is generated in the
//! token, never written to a Secret, a log or an Event; leaves it signs verify in real
//! handshakes; a forced rotation bridges old and new bundles with both signatures made
//! in the token; a hard reset makes a new key there; a refused PIN is a readiness
//! reason; pod certificates and the ClusterTrustBundle come from the key in the token;
//! `inspect` reads such a CA, and checks its key with the token's flags. Each test runs
//! its own token under a private SOFTHSM2_CONF.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams};
use serde_json::Value;

use crate::support::pods::{Kubelet, bundle_name, key_and_stub, trust_bundle};
use crate::support::tls::{self, TlsServer};
use crate::support::{Cleanup, Env, Operator, certs, data, eventually, time_scale};

pub(crate) const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub(crate) const PIN: &str = "4711-service-ca";

pub(crate) fn t(seconds: u64) -> Duration {
    Duration::from_secs_f64(seconds as f64 * time_scale())
}

/// A SoftHSM2 token of its own: a config file and token directory in a scratch dir.
pub(crate) struct SoftHsm {
    pub(crate) dir: PathBuf,
    pub(crate) conf: PathBuf,
    pub(crate) label: String,
}

impl SoftHsm {
    pub(crate) fn new(label: &str) -> SoftHsm {
        let dir = tls::scratch_dir().join("softhsm");
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        let config =
            format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display());
        std::fs::write(&conf, config).unwrap();
        std::fs::write(dir.join("pin"), format!("{PIN}\n")).unwrap();
        let hsm = SoftHsm { dir, conf, label: label.to_string() };
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "0815-so"])
            .env("SOFTHSM2_CONF", &hsm.conf)
            .output()
            .expect("softhsm2-util (Debian package softhsm2) is needed");
        assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
        hsm
    }

    pub(crate) fn pin_file(&self) -> PathBuf {
        self.dir.join("pin")
    }

    /// The operator flags that put the CA key in this token, with `pin_file`.
    pub(crate) fn flags(&self, pin_file: &Path) -> Vec<String> {
        vec![
            "--ca-key-pkcs11-uri".into(),
            format!("pkcs11:token={};object=service-ca-key", self.label),
            "--pkcs11-module".into(),
            MODULE.into(),
            "--pkcs11-pin-file".into(),
            pin_file.display().to_string(),
        ]
    }

    /// Starts the operator of this build with SOFTHSM2_CONF pointing at this token (a
    /// wrapper script: the variable is this test's alone, not the test process's).
    pub(crate) fn start_operator(&self, env: &Env, pin_file: &Path) -> Operator {
        self.start_operator_with(env, pin_file, &[])
    }

    /// [`Self::start_operator`] with `extra` flags.
    pub(crate) fn start_operator_with(&self, env: &Env, pin_file: &Path, extra: &[&str]) -> Operator {
        let wrapper = self.dir.join("operator.sh");
        let script = format!(
            "#!/bin/sh\nSOFTHSM2_CONF='{}' exec '{}' \"$@\"\n",
            self.conf.display(),
            env!("CARGO_BIN_EXE_service-ca-operator")
        );
        std::fs::write(&wrapper, script).unwrap();
        Command::new("chmod").args(["+x"]).arg(&wrapper).status().unwrap();
        let mut args = env.operator_args();
        args.extend(self.flags(pin_file));
        args.extend(extra.iter().map(|s| s.to_string()));
        Operator::start_program(&wrapper, &env.name, &args, &env.kubeconfig)
    }

    /// Runs `inspect` for the test's namespace with this token's SOFTHSM2_CONF and
    /// `extra` flags; (exit code, stdout, stderr).
    fn inspect(&self, env: &Env, extra: &[String]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_service-ca-operator"))
            .args(["inspect", "-n", &env.ns, "--operator-namespace", &env.op_ns])
            .args(extra)
            .env("KUBECONFIG", &env.kubeconfig)
            .env("SOFTHSM2_CONF", &self.conf)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    }

    /// The private key objects in the token, as `pkcs11-tool --list-objects` prints them.
    pub(crate) fn private_keys(&self) -> Vec<String> {
        let out = Command::new("pkcs11-tool")
            .args(["--module", MODULE, "--token-label", &self.label, "--login", "--pin", PIN, "--list-objects"])
            .args(["--type", "privkey"])
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("pkcs11-tool (Debian package opensc)");
        assert!(out.status.success(), "pkcs11-tool: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("Private Key Object").skip(1).map(str::to_string).collect()
    }
}

/// `signing-key` names its key in the token and holds none itself.
pub(crate) fn assert_key_in_token(ca: &Secret, hsm: &SoftHsm) -> String {
    assert_eq!(data(ca, "tls.key"), "", "tls.key stays empty (the type kubernetes.io/tls requires the key)");
    let uri = data(ca, "pkcs11-key-uri");
    assert!(uri.starts_with(&format!("pkcs11:token={};object=service-ca-key;id=%", hsm.label)), "{uri}");
    uri
}

/// No PEM or DER private key in any Secret of the operator namespace, the operator
/// log or the Events there; every key object in the token is sensitive and never
/// extractable.
pub(crate) async fn assert_no_private_key_leaves(env: &Env, op: &Operator, hsm: &SoftHsm) {
    let mut looked = 0;
    for secret in env.op_secrets().list(&ListParams::default()).await.unwrap() {
        for (key, value) in secret.data.unwrap_or_default() {
            let text = String::from_utf8_lossy(&value.0);
            assert!(!text.contains("PRIVATE KEY"), "a private key in Secret {:?} {key}", secret.metadata.name);
            // DER PKCS#8 / SEC1 EC keys start with SEQUENCE, INTEGER 0 or 1.
            assert!(!value.0.starts_with(&[0x30]), "DER in Secret {:?} {key}", secret.metadata.name);
            looked += 1;
        }
    }
    assert!(!op.logs().contains("PRIVATE KEY"), "a private key in the operator log");
    for event in env.events(&env.op_ns, None, None).await {
        assert!(!event.note.unwrap_or_default().contains("PRIVATE KEY"), "a private key in an Event");
    }
    let keys = hsm.private_keys();
    for key in &keys {
        assert!(key.contains("never extractable") && key.contains("sensitive"), "a key the token may export: {key}");
    }
    println!(
        "no private key in {looked} Secret fields, the log or the Events; {} key object(s) in the token",
        keys.len()
    );
}

pub(crate) async fn readyz(op: &Operator) -> (u16, String) {
    op.admin_get("/readyz").await.unwrap_or((0, String::new()))
}

#[tokio::test]
async fn the_ca_key_is_made_in_the_token_and_leaves_it_signs_verify() {
    let env = Env::new("hsm-create").await;
    let hsm = SoftHsm::new("hsm-create");
    let started = Instant::now();
    let op = hsm.start_operator(&env, &hsm.pin_file());
    let bundle = env.ca_bundle().await;
    let ca_after = started.elapsed();
    let ca = env.op_secrets().get("signing-key").await.unwrap();
    assert_key_in_token(&ca, &hsm);
    assert_eq!(hsm.private_keys().len(), 1, "the key was generated in the token");
    env.annotated_service("web", "web-tls", false).await;
    let leaf = env.serving_secret("web-tls", t(60)).await;
    assert_eq!(certs::leaf_aki(&leaf), certs::ca_ski(&ca));
    let server = TlsServer::start(&data(&leaf, "tls.crt"), &data(&leaf, "tls.key"));
    for (stack, result) in tls::connect_all(server.port, &bundle, &format!("web.{}.svc", env.ns)) {
        assert!(result.is_ok(), "{stack}: {result:?}");
    }
    op.wait_ready(t(30)).await;
    assert_no_private_key_leaves(&env, &op, &hsm).await;
    println!("CA created in SoftHSM2 after {ca_after:?}; leaf issued and verified by 3 client stacks");
}

#[tokio::test]
async fn a_forced_rotation_in_the_token_bridges_old_and_new_bundles() {
    let env = Env::new("hsm-rotate").await;
    let hsm = SoftHsm::new("hsm-rotate");
    let op = hsm.start_operator(&env, &hsm.pin_file());
    let old_bundle = env.ca_bundle().await;
    env.annotated_service("web", "web-tls", false).await;
    let old_leaf = env.serving_secret("web-tls", t(60)).await;
    let old_ca = env.op_secrets().get("signing-key").await.unwrap();
    let old_uri = assert_key_in_token(&old_ca, &hsm);

    let started = Instant::now();
    env.force_rotation("hsm").await;
    let new_ca = env.rotated("hsm").await;
    let rotated_after = started.elapsed();
    let new_uri = assert_key_in_token(&new_ca, &hsm);
    assert_ne!(new_uri, old_uri, "a new key object");
    assert_eq!(hsm.private_keys().len(), 2, "the new key was generated in the token; the old one is kept");
    let new_ski = certs::ca_ski(&new_ca);
    let new_leaf = eventually(t(60), "the re-issued leaf", || async {
        env.secrets().get_opt("web-tls").await.ok().flatten().filter(|s| certs::leaf_aki(s) == new_ski)
    })
    .await;
    let new_bundle = eventually(t(30), "the new bundle", || async {
        let bundle = env.ca_bundle().await;
        (bundle != old_bundle).then_some(bundle)
    })
    .await;
    let name = format!("web.{}.svc", env.ns);
    let mut handshakes = 0;
    for (leaf_name, leaf) in [("old leaf", &old_leaf), ("new leaf", &new_leaf)] {
        let server = TlsServer::start(&data(leaf, "tls.crt"), &data(leaf, "tls.key"));
        for (bundle_name, bundle) in [("old bundle", &old_bundle), ("new bundle", &new_bundle)] {
            for (stack, result) in tls::connect_all(server.port, bundle, &name) {
                assert!(result.is_ok(), "{leaf_name} × {bundle_name}, {stack}: {result:?}");
                handshakes += 1;
            }
        }
    }
    assert_no_private_key_leaves(&env, &op, &hsm).await;
    println!("rotation in SoftHSM2 took {rotated_after:?}; {handshakes} handshakes (2 leaves × 2 bundles × 3 stacks)");
}

#[tokio::test]
async fn a_hard_reset_makes_a_new_key_in_the_token_and_keeps_the_old_object() {
    let env = Env::new("hsm-reset").await;
    let hsm = SoftHsm::new("hsm-reset");
    let op = hsm.start_operator(&env, &hsm.pin_file());
    env.ca_bundle().await;
    let old_ca = env.op_secrets().get("signing-key").await.unwrap();
    let old_uri = assert_key_in_token(&old_ca, &hsm);
    env.op_secrets().delete("signing-key", &DeleteParams::default()).await.unwrap();
    let new_ca = eventually(t(60), "the new CA", || async {
        let s = env.op_secrets().get_opt("signing-key").await.ok().flatten()?;
        (certs::ca_ski(&s) != certs::ca_ski(&old_ca)).then_some(s)
    })
    .await;
    let new_uri = assert_key_in_token(&new_ca, &hsm);
    assert_ne!(new_uri, old_uri);
    assert_eq!(hsm.private_keys().len(), 2, "a new key in the token; the old object is kept");
    env.annotated_service("web", "web-tls", false).await;
    let leaf = env.serving_secret("web-tls", t(60)).await;
    assert_eq!(certs::leaf_aki(&leaf), certs::ca_ski(&new_ca), "signed by the new key");
    assert_no_private_key_leaves(&env, &op, &hsm).await;
}

#[tokio::test]
async fn a_refused_pin_keeps_the_operator_unready_with_the_reason_and_no_software_key() {
    let env = Env::new("hsm-pin").await;
    let hsm = SoftHsm::new("hsm-pin");
    let wrong = hsm.dir.join("wrong-pin");
    std::fs::write(&wrong, "0000\n").unwrap();
    let op = hsm.start_operator(&env, &wrong);
    let (status, body) = eventually(t(30), "an unready /readyz naming the PIN", || async {
        let (status, body) = readyz(&op).await;
        (status != 0 && body.contains("refuses the PIN")).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    tokio::time::sleep(t(3)).await;
    assert!(env.op_secrets().get_opt("signing-key").await.unwrap().is_none(), "no CA without the token");
    assert!(op.logs().contains("C_Login answered PinIncorrect"), "the log says why");
    assert!(!op.logs().contains(PIN), "no PIN in the log");
    // The PIN fixed in the file (as a mounted Secret is updated): picked up without a restart.
    std::fs::write(&wrong, format!("{PIN}\n")).unwrap();
    op.wait_ready(t(90)).await;
    assert_key_in_token(&env.op_secrets().get("signing-key").await.unwrap(), &hsm);
    println!("/readyz with a refused PIN: {status} {}", body.trim());
}

#[tokio::test]
async fn inspect_reads_a_ca_whose_key_is_in_the_token_and_checks_the_key_with_the_token_flags() {
    let env = Env::new("hsm-inspect").await;
    let hsm = SoftHsm::new("hsm-inspect");
    let op = hsm.start_operator(&env, &hsm.pin_file());
    env.ca_bundle().await;
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", t(60)).await;
    op.wait_ready(t(30)).await;

    // Without the token's flags: the CA from tls.crt, its key not checked, no problem.
    let started = Instant::now();
    let (code, table, err) = hsm.inspect(&env, &[]);
    let unchecked_after = started.elapsed();
    assert_eq!(code, 0, "{table}\n{err}");
    assert!(table.contains("key location     in a PKCS#11 token (not checked"), "{table}");
    assert!(!table.contains("BROKEN"), "{table}");

    // With them (as the operator has them): the key is checked in the token.
    let mut flags = hsm.flags(&hsm.pin_file());
    flags.extend(["-o".to_string(), "json".to_string()]);
    let started = Instant::now();
    let (code, out, err) = hsm.inspect(&env, &flags);
    let checked_after = started.elapsed();
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(report["ca"]["key_location"], "in a PKCS#11 token (checked)");
    assert_eq!(report["ca"]["error"], Value::Null);
    assert_eq!(report["summary"]["serving_current"], 1);

    // A refused PIN is a broken CA (exit 3) and says why, without the PIN.
    let wrong = hsm.dir.join("inspect-wrong-pin");
    std::fs::write(&wrong, "0000\n").unwrap();
    let mut flags = hsm.flags(&wrong);
    flags.extend(["-o".to_string(), "json".to_string()]);
    let (code, out, err) = hsm.inspect(&env, &flags);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!(code, 3, "{out}\n{err}");
    let error = report["ca"]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("refuses the PIN"), "{error}");
    assert!(!out.contains(PIN) && !err.contains(PIN), "no PIN in the output");
    println!(
        "inspect: exit 0 without the token flags in {unchecked_after:?}, with them in {checked_after:?}; a wrong PIN: exit 3 ({error})"
    );
}

#[tokio::test]
async fn pod_certificates_and_the_cluster_trust_bundle_come_from_the_ca_key_in_the_token() {
    let env = Env::new("hsm-pods").await;
    let hsm = SoftHsm::new("hsm-pods");
    let signer = format!("e2e.service-ca.test/{}", env.run);
    let mut cleanup = Cleanup::default();
    cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
    let op = hsm.start_operator_with(&env, &hsm.pin_file(), &["--pod-signer-name", &signer]);
    let kubelet = Kubelet::new(&env, &signer).await;
    kubelet.service("web", "web", false).await;
    let pod = kubelet.pod("web-0", "web", None).await;
    let (key, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let started = Instant::now();
    kubelet.request("web-0", &signer, &pod, stub, None).await;
    let chain = kubelet.issued("web-0").await;
    let issued_after = started.elapsed();

    let ca = env.op_secrets().get("signing-key").await.unwrap();
    assert_key_in_token(&ca, &hsm);
    assert_eq!(certs::signer_of(&chain), certs::ca_ski(&ca), "signed by the CA whose key is in the token");
    let bundle = trust_bundle(&env, &signer, &env.op_ns).await;
    let ca_der = certs::ders(&data(&ca, "tls.crt")).remove(0);
    assert!(certs::ders(&bundle).contains(&ca_der), "the ClusterTrustBundle holds the CA of the token's key");
    assert_eq!(bundle, env.ca_bundle().await, "and what signing-cabundle holds");

    let name = format!("web.{}.svc", env.ns);
    let verified = [
        ("rustls", tls::rustls_verify_at(&chain, &bundle, &name, std::time::SystemTime::now())),
        ("openssl", tls::openssl_verify(&chain, &bundle, &name)),
        ("go", tls::go_verify(&chain, &bundle, &name)),
    ];
    for (stack, result) in verified {
        assert!(
            result.is_ok(),
            "{stack} does not verify the pod certificate against the ClusterTrustBundle: {result:?}"
        );
    }
    let server = TlsServer::start(&chain, &key.serialize_pem());
    for (stack, result) in tls::connect_all(server.port, &bundle, &name) {
        assert!(result.is_ok(), "{stack}: {result:?}");
    }
    assert_no_private_key_leaves(&env, &op, &hsm).await;
    println!(
        "pod certificate issued with the CA key in SoftHSM2 in {issued_after:?}; verified against the ClusterTrustBundle by 3 stacks, 3 handshakes"
    );
}
