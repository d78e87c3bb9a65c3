//! `service-ca-operator inspect` (and `kubectl service-ca inspect`) on the real API
//! server, through a forced rotation and a hard reset, with a Deployment whose pod
//! mounts a serving Secret and an injected ConfigMap (its pod runs on the test control
//! plane's node).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use crate::support::{Env, T, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_service-ca-operator");

/// Runs `inspect` for the test's namespace; (exit code, stdout, stderr).
fn inspect(env: &Env, extra: &[&str]) -> (i32, String, String) {
    inspect_with(BIN, &["inspect"], env, extra)
}

fn inspect_with(program: &str, prefix: &[&str], env: &Env, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(prefix)
        .args(["-n", &env.ns, "--operator-namespace", &env.op_ns])
        .args(extra)
        .env("KUBECONFIG", &env.kubeconfig)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn json_report(env: &Env) -> (i32, Value) {
    let (code, out, err) = inspect(env, &["-o", "json"]);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect -o json ({e}):\n{out}\n{err}"));
    // What the last poll saw, for a test that times out.
    eprintln!("inspect exit {code}: {} {}", report["summary"], report["workloads"]);
    (code, report)
}

/// The Deployment `web`, whose pod (made by the cluster's controllers, run by the
/// node's kubelet, which sets its status.startTime) mounts `web-tls` and the ConfigMap
/// `trust`; returns once that pod runs.
async fn workload(env: &Env) -> Deployment {
    let labels = json!({ "app": "web" });
    let pod_spec = json!({
        "automountServiceAccountToken": false,
        "nodeSelector": { "kubernetes.io/hostname": crate::support::node::node().name },
        "containers": [{ "name": "app", "image": "example.invalid/app:1" }],
        "volumes": [
            { "name": "tls", "secret": { "secretName": "web-tls" } },
            { "name": "ca", "projected": { "sources": [{ "configMap": { "name": "trust" } }] } }
        ]
    });
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "selector": { "matchLabels": labels }, "template": { "metadata": { "labels": labels }, "spec": pod_spec } }
    }))
    .unwrap();
    let d = deployments.create(&PostParams::default(), &d).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(T, "the Deployment's pod running", || async {
        let list = pods.list(&kube::api::ListParams::default().labels("app=web")).await.ok()?.items;
        (list.len() == 1 && list[0].status.as_ref()?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    d
}

fn restarted_at(d: &Deployment) -> Option<String> {
    d.spec.template.metadata.as_ref()?.annotations.as_ref()?.get("kubectl.kubernetes.io/restartedAt").cloned()
}

/// A healthy cluster: exit 0, the summary line, the table; no workload listed.
fn assert_healthy(env: &Env) {
    let (code, table, err) = inspect(env, &[]);
    println!("{table}");
    assert_eq!(code, 0, "healthy cluster:\n{table}\n{err}");
    assert!(
        table.contains("1 of 1 serving certificates from the current CA; 0 pending re-issue; 0 untrusted"),
        "{table}"
    );
    assert!(table.contains("web-tls") && table.contains("trust") && table.contains("current"), "{table}");
    let (_, report) = json_report(env);
    assert_eq!(report["ca"]["bridge_live"], false);
    assert_eq!(report["serving_certificates"][0]["key_type"], "RSA-2048");
    assert_eq!(report["workloads"], json!([]));
}

/// Polls `inspect -o json` until the serving certificate and the injected ConfigMap are
/// current again while the Deployment still runs with the replaced material (exit 4);
/// returns that report. `what` names the wait.
async fn reissued_and_reinjected(env: &Env, what: &str) -> Value {
    eventually(T, what, || async {
        let (code, report) = json_report(env);
        (code == 4 && report["summary"]["serving_current"] == 1 && report["summary"]["injected_current"] == 1)
            .then_some(report)
    })
    .await
}

/// After the forced rotation's re-issue: a bridge is live, the reason is shown, and the
/// Deployment is listed for the Secret and the ConfigMap it mounts.
fn assert_rotated(report: &Value) {
    assert_eq!(report["ca"]["bridge_live"], true);
    assert_eq!(report["ca"]["forced_rotation_reason"], "inspect-test");
    assert!(report["ca"]["previous_ca_trusted_until"].is_string());
    let workloads = report["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 1, "{workloads:?}");
    assert_eq!((workloads[0]["kind"].as_str(), workloads[0]["name"].as_str()), (Some("Deployment"), Some("web")));
    let reasons = workloads[0]["reasons"].to_string();
    assert!(reasons.contains("Secret web-tls") && reasons.contains("ConfigMap trust"), "{reasons}");
}

/// As a kubectl plugin: `kubectl service-ca inspect`.
fn assert_kubectl_plugin_inspects(env: &Env) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("plugin-{}", env.run));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("kubectl-service_ca");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(BIN, &plugin).unwrap();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("kubectl")
        .args(["service-ca", "inspect", "-n", &env.ns, "--operator-namespace", &env.op_ns])
        .env("PATH", &path)
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}): install it (https://kubernetes.io/docs/tasks/tools/)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("serving certificates from the current CA"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = Command::new(&plugin).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("kubectl service-ca"), "help names the plugin");
}

#[tokio::test]
async fn inspect_reports_through_a_forced_rotation_and_a_hard_reset_and_restarts_stale_workloads() {
    let env = Env::new("inspect").await;
    let mut op = env.start_operator(&[]);
    op.wait_ready(T).await;
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", T).await;
    env.injected_configmap("trust", T).await;
    // Wait a second so that the pod starts strictly after the Secret and ConfigMap
    // were written (the API keeps whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    workload(&env).await;

    // 1. Healthy: exit 0, the summary line, the table.
    assert_healthy(&env);

    // 2. Forced rotation: after the re-issue everything is current, a bridge is live,
    // the reason is shown, and the Deployment runs with replaced material (exit 4).
    env.force_rotation("inspect-test").await;
    assert_rotated(&reissued_and_reinjected(&env, "inspect: rotated, re-issued, re-injected").await);

    // --restart without --yes (stdin is not a terminal): a dry run.
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let (code, _, err) = inspect(&env, &["--restart"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("would restart Deployment"), "{err}");
    assert_eq!(restarted_at(&deployments.get("web").await.unwrap()), None, "dry run changed nothing");

    // 3. Hard reset while the operator is down: no CA, exit 3.
    op.stop();
    env.hard_reset().await;
    let (code, table, _) = inspect(&env, &[]);
    assert_eq!(code, 3, "{table}");
    assert!(table.contains("signing-key does not exist"), "{table}");
    // The old bundle is still published but its CA is gone: the leaf is still "from
    // the bundle" — once the operator is back, a new CA, new leaf, new bundle.
    let op = env.start_operator(&[]);
    op.wait_ready(T).await;
    let report = reissued_and_reinjected(&env, "inspect: new CA, re-issued, re-injected").await;
    assert_eq!(report["ca"]["bridge_live"], false, "a hard reset has no bridge");

    // The restart procedure after a hard reset: roll what mounts the old material.
    let (code, _, err) = inspect(&env, &["--restart", "--yes"]);
    assert_eq!(code, 0, "every listed workload restarted: {err}");
    assert!(err.contains(&format!("restarted Deployment {}/web", env.ns)), "{err}");
    assert!(restarted_at(&deployments.get("web").await.unwrap()).is_some());

    assert_kubectl_plugin_inspects(&env);
}

#[tokio::test]
async fn inspect_reports_a_foreign_secret_as_an_error_and_fails_without_a_cluster() {
    let env = Env::new("inspect-err").await;
    let _op = env.start_operator(&[]);
    let foreign: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({ "metadata": { "name": "taken" }, "stringData": { "x": "y" } })).unwrap();
    env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    env.annotated_service("svc", "taken", false).await;
    let report = eventually(T, "inspect: the Service's error", || async {
        let (code, report) = json_report(&env);
        let detail = report["serving_certificates"][0]["detail"].as_str().unwrap_or_default().to_string();
        (code == 3 && detail.contains("taken")).then_some(report)
    })
    .await;
    let detail = report["serving_certificates"][0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("taken"), "the Service's error annotation: {detail}");
    assert_eq!(report["summary"]["errors"], 1);

    // No cluster: exit 1 with the reason.
    let out = Command::new(BIN).args(["inspect", "--kubeconfig", "/nonexistent/kubeconfig"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inspect:"));
}

/// Writes `ca` as the operator would: `signing-key` first, then `signing-cabundle`.
async fn publish_ca(env: &Env, ca: &service_ca_operator::pki::CertificateAuthority) {
    use k8s_openapi::ByteString;
    let now = time::OffsetDateTime::now_utc();
    let mut secret = env.op_secrets().get("signing-key").await.unwrap();
    secret.data = Some(ca.to_secret_data().into_iter().map(|(k, v)| (k, ByteString(v))).collect());
    env.op_secrets().replace("signing-key", &PostParams::default(), &secret).await.unwrap();
    let mut cm = env.op_configmaps().get("signing-cabundle").await.unwrap();
    cm.data = Some(BTreeMap::from([("ca-bundle.crt".to_string(), ca.bundle_pem(now))]));
    env.op_configmaps().replace("signing-cabundle", &PostParams::default(), &cm).await.unwrap();
}

#[tokio::test]
async fn inspect_sees_pending_and_untrusted_certificates_while_the_operator_is_stopped() {
    use service_ca_operator::pki::{CaPolicy, CertificateAuthority, PrivateKey};
    let env = Env::new("inspect-states").await;
    let mut op = env.start_operator(&[]);
    op.wait_ready(T).await;
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", T).await;
    op.stop();

    // A rotation the operator has not acted on yet (done here with the operator's own
    // library, as its CA controller would): the leaf is from the previous CA, still
    // trusted through the bridge, re-issue pending; exit 0.
    let now = time::OffsetDateTime::now_utc();
    let policy =
        CaPolicy { lifetime: Duration::from_secs(790 * 86_400), rotate_before: Duration::from_secs(395 * 86_400) };
    let data = env.op_secrets().get("signing-key").await.unwrap().data.unwrap();
    let current =
        CertificateAuthority::from_secret_data(&data.into_iter().map(|(k, v)| (k, v.0)).collect(), now).unwrap();
    let rotated = current.rotate(PrivateKey::generate_rsa(2048).unwrap(), now, &policy).unwrap();
    publish_ca(&env, &rotated).await;
    let (code, table, err) = inspect(&env, &[]);
    println!("{table}");
    assert_eq!(code, 0, "{table}\n{err}");
    assert!(
        table.contains("0 of 1 serving certificates from the current CA; 1 pending re-issue; 0 untrusted"),
        "{table}"
    );
    assert!(table.contains("previous CA (trusted), re-issue pending"), "{table}");
    assert!(table.contains("trust bridge     live"), "{table}");

    // A brand-new CA (a hard reset) not acted on yet: the leaf is untrusted; exit 3.
    let reset = CertificateAuthority::create(PrivateKey::generate_rsa(2048).unwrap(), now, &policy).unwrap();
    publish_ca(&env, &reset).await;
    let (code, table, _) = inspect(&env, &[]);
    println!("{table}");
    assert_eq!(code, 3, "{table}");
    assert!(
        table.contains("0 of 1 serving certificates from the current CA; 0 pending re-issue; 1 untrusted"),
        "{table}"
    );
    assert!(table.contains("UNTRUSTED"), "{table}");

    // The operator, back, re-issues: all current again.
    let _op = env.start_operator(&[]);
    eventually(T, "inspect: re-issued", || async {
        let (code, report) = json_report(&env);
        (code == 0 && report["summary"]["serving_current"] == 1).then_some(())
    })
    .await;
}

/// A tenant's Secret with the managed label whose certificate starts
/// at 99991231235959Z is reported, not a panic. (Before: NotBefore + 1 s overflowed in
/// the workload check and `inspect` died with exit 101.)
#[tokio::test]
async fn inspect_reports_a_managed_secret_whose_certificate_starts_in_9999() {
    use k8s_openapi::api::core::v1::Secret;
    let env = Env::new("inspect-9999").await;
    let end = time::Date::from_calendar_date(9999, time::Month::December, 31)
        .and_then(|day| day.with_hms(23, 59, 59))
        .unwrap()
        .assume_utc();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![format!("far.{}.svc", env.ns)]).unwrap();
    params.not_before = end;
    params.not_after = end;
    let cert = params.self_signed(&key).unwrap();
    let mut meta = env.meta("far-tls");
    meta.labels.get_or_insert_default().insert("service-ca.operators.openshift.io/managed".into(), "true".into());
    let secret = Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        string_data: Some(BTreeMap::from([
            ("tls.crt".to_string(), cert.pem()),
            ("tls.key".to_string(), key.serialize_pem()),
        ])),
        ..Default::default()
    };
    env.secrets().create(&PostParams::default(), &secret).await.unwrap();
    let (code, out, err) = inspect(&env, &["-o", "json"]);
    assert!(!err.contains("panicked"), "exit {code}: {err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("exit {code} ({e}): {out}\n{err}"));
    let row = &report["serving_certificates"][0];
    println!("inspect exit {code}: {row}");
    assert_eq!(row["secret"], "far-tls");
    assert_eq!(row["not_before"], "9999-12-31T23:59:59Z");
}
