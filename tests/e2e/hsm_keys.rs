//! The CA key objects in a PKCS#11 token (SoftHSM2) over a CA's life: with
//! `--pkcs11-on-reset destroy` a hard reset destroys the keys the operator generated
//! earlier and nothing else; an existing software CA moves into the token with the
//! documented kubectl + pkcs11-tool steps ([`MIGRATION`], docs/operations.md "CA key in
//! an HSM") and keeps signing as the same CA, and until it is moved an operator started
//! with a token refuses it and says how.

use std::process::Command;
use std::time::Instant;

use crate::hsm::{MODULE, PIN, SoftHsm, assert_key_in_token, readyz, t};
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, certs, data, eventually};

/// The hex ids of the private key objects in the token, as pkcs11-tool prints them.
fn key_ids(hsm: &SoftHsm) -> Vec<String> {
    let mut ids: Vec<String> = hsm
        .private_keys()
        .iter()
        .filter_map(|key| key.lines().find_map(|l| l.trim().strip_prefix("ID:")).map(|id| id.trim().to_string()))
        .collect();
    ids.sort();
    ids
}

/// The hex id of a `pkcs11:` URI's `id=` (every byte escaped).
fn uri_id(uri: &str) -> String {
    let id = uri.split(';').find_map(|a| a.strip_prefix("id=")).unwrap_or_default();
    id.replace('%', "").to_lowercase()
}

fn pkcs11_tool(hsm: &SoftHsm, args: &[&str]) -> String {
    let out = Command::new("pkcs11-tool")
        .args(["--module", MODULE, "--token-label", &hsm.label, "--login", "--pin", PIN])
        .args(args)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .expect("pkcs11-tool (Debian package opensc)");
    assert!(out.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_hard_reset_with_destroy_removes_the_keys_the_operator_made_before_and_no_other() {
    let env = Env::new("hsm-destroy").await;
    let hsm = SoftHsm::new("hsm-destroy");
    // A key someone else made under the operator's label: never the operator's to destroy.
    pkcs11_tool(&hsm, &["--keypairgen", "--key-type", "EC:prime256v1", "--label", "service-ca-key", "--id", "0102"]);
    let op = hsm.start_operator_with(&env, &hsm.pin_file(), &["--pkcs11-on-reset", "destroy"]);
    env.ca_bundle().await;
    let first = assert_key_in_token(&env.op_secrets().get("signing-key").await.unwrap(), &hsm);
    assert_eq!(key_ids(&hsm), ["0102".to_string(), uri_id(&first)], "a first start destroys no foreign key");
    env.force_rotation("hsm-destroy").await;
    let rotated = assert_key_in_token(&env.rotated("hsm-destroy").await, &hsm);
    assert_eq!(key_ids(&hsm).len(), 3, "a rotation keeps the previous key (its certificate is in the bundle)");

    let started = Instant::now();
    env.hard_reset().await;
    let new_ca = eventually(t(60), "the new CA", || async {
        let s = env.op_secrets().get_opt("signing-key").await.ok().flatten()?;
        (data(&s, "pkcs11-key-uri") != rotated).then_some(s)
    })
    .await;
    let new = assert_key_in_token(&new_ca, &hsm);
    let mut wanted = vec!["0102".to_string(), uri_id(&new)];
    wanted.sort();
    eventually(t(30), "the two earlier keys destroyed", || async { (key_ids(&hsm) == wanted).then_some(()) }).await;
    let destroyed_after = started.elapsed();
    let events = env.events(&env.op_ns, Some("signing-key"), Some("ServiceCAKeysDestroyed")).await;
    let note = events.first().and_then(|e| e.note.clone()).unwrap_or_default();
    assert!(note.contains("Destroyed 2 earlier CA key(s)"), "{note}");
    assert!(note.contains(&first) && note.contains(&rotated), "{note}");

    env.annotated_service("web", "web-tls", false).await;
    let leaf = env.serving_secret("web-tls", t(60)).await;
    assert_eq!(certs::leaf_aki(&leaf), certs::ca_ski(&new_ca), "the new key in the token signs");
    assert!(!op.logs().contains("PRIVATE KEY"));
    println!(
        "hard reset with --pkcs11-on-reset destroy: 2 earlier keys gone after {destroyed_after:?}; kept the new key and 0102"
    );
}

/// The migration of a software CA into a token, as docs/operations.md ("CA key in an
/// HSM") gives it: run with the operator stopped, with NS, MODULE, TOKEN, LABEL, ID
/// (hex) and PIN set.
const MIGRATION: &str = r#"set -eu
umask 077
kubectl -n "$NS" get secret signing-key -o jsonpath='{.data.tls\.key}' | base64 -d > ca-key.pem
pkcs11-tool --module "$MODULE" --token-label "$TOKEN" --login --pin "$PIN" \
  --write-object ca-key.pem --type privkey --label "$LABEL" --id "$ID" --usage-sign --sensitive
shred -u ca-key.pem
uri="pkcs11:token=$TOKEN;object=$LABEL;id=$(printf '%s' "$ID" | sed 's/../%&/g');type=private"
kubectl -n "$NS" patch secret signing-key --type merge \
  -p "{\"data\":{\"tls.key\":\"\",\"pkcs11-key-uri\":\"$(printf '%s' "$uri" | base64 -w0)\"}}"
"#;

#[tokio::test]
async fn a_software_ca_is_refused_with_a_token_until_migrated_then_the_same_ca_signs_from_the_token() {
    let env = Env::new("hsm-migrate").await;
    let hsm = SoftHsm::new("hsm-migrate");
    let mut op = env.start_operator(&["--ca-key-algorithm", "ecdsa-p256"]);
    let bundle = env.ca_bundle().await;
    env.annotated_service("web", "web-tls", false).await;
    let web = env.serving_secret("web-tls", t(60)).await;
    let software = env.op_secrets().get("signing-key").await.unwrap();
    assert!(data(&software, "tls.key").contains("PRIVATE KEY"), "a CA key in the Secret to start with");
    op.stop();

    // Started with a token, the operator refuses the key it finds in the Secret.
    let refusing = hsm.start_operator(&env, &hsm.pin_file());
    let warning = env.warning(&env.op_ns, "signing-key", Some("SigningKeyInvalid")).await;
    let note = warning.note.unwrap_or_default();
    assert!(note.contains("import the key into the token") && note.contains("CA key in an HSM"), "{note}");
    let (status, body) = eventually(t(30), "an unready /readyz", || async {
        let (status, body) = readyz(&refusing).await;
        (status == 503).then_some((status, body))
    })
    .await;
    let untouched = env.op_secrets().get("signing-key").await.unwrap();
    assert_eq!(untouched.metadata.resource_version, software.metadata.resource_version, "signing-key untouched");
    assert!(key_ids(&hsm).is_empty(), "no key generated in the token");
    drop(refusing);

    let started = Instant::now();
    let out = Command::new("sh")
        .args(["-c", MIGRATION])
        .current_dir(&hsm.dir)
        .env("KUBECONFIG", &env.kubeconfig)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .envs([("NS", env.op_ns.as_str()), ("MODULE", MODULE), ("TOKEN", hsm.label.as_str())])
        .envs([("LABEL", "service-ca-key"), ("ID", "01"), ("PIN", PIN)])
        .output()
        .unwrap();
    let migrated_in = started.elapsed();
    assert!(out.status.success(), "the migration: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!hsm.dir.join("ca-key.pem").exists(), "the key file is gone");
    assert_eq!(key_ids(&hsm), ["01"]);
    assert!(hsm.private_keys()[0].contains("sensitive"), "{:?}", hsm.private_keys());

    let op = hsm.start_operator(&env, &hsm.pin_file());
    op.wait_ready(t(60)).await;
    env.annotated_service("api", "api-tls", false).await;
    let api = env.serving_secret("api-tls", t(60)).await;
    let ca = env.op_secrets().get("signing-key").await.unwrap();
    assert_eq!(
        data(&ca, "pkcs11-key-uri"),
        format!("pkcs11:token={};object=service-ca-key;id=%01;type=private", hsm.label)
    );
    assert_eq!(data(&ca, "tls.key"), "", "no private key left in the Secret");
    assert_eq!(data(&ca, "tls.crt"), data(&software, "tls.crt"), "the same CA: no rotation, no new CA");
    assert_eq!(certs::leaf_aki(&api), certs::ca_ski(&software), "the new leaf is signed by the same CA");
    assert_eq!(env.ca_bundle().await, bundle, "the bundle is unchanged");
    let web_now = env.secrets().get("web-tls").await.unwrap();
    assert_eq!(web_now.metadata.resource_version, web.metadata.resource_version, "web-tls was not re-issued");
    let server = TlsServer::start(&data(&api, "tls.crt"), &data(&api, "tls.key"));
    for (stack, result) in tls::connect_all(server.port, &bundle, &format!("api.{}.svc", env.ns)) {
        assert!(result.is_ok(), "{stack}: {result:?}");
    }
    for secret in env.op_secrets().list(&Default::default()).await.unwrap() {
        for (key, value) in secret.data.unwrap_or_default() {
            assert!(!String::from_utf8_lossy(&value.0).contains("PRIVATE KEY"), "{:?} {key}", secret.metadata.name);
        }
    }
    assert!(!op.logs().contains("PRIVATE KEY"));
    println!(
        "refused with a token: /readyz {status} {}; migrated in {migrated_in:?}; the same CA signs from the token, web-tls untouched",
        body.trim()
    );
}
