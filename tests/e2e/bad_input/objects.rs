//! What tenants put in their objects, taken calmly: bad serving-cert annotations get
//! clear errors and nothing else changes; the longest names get a certificate every
//! stack accepts and their Events; a serving Secret whose delete a finalizer holds is
//! waited for, not hammered; control characters in an annotation are shown escaped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::annotations::{BETA_ERR, BETA_ERR_NUM, BETA_NAME};
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, T, annotation, certs, client_for, data, eventually, metric};

const HOLD: &str = "e2e.test/hold";
const DELETES: &str = "service_ca_api_writes_total{resource=\"secrets\",verb=\"delete\"";

/// CPU time (user + system) of process `pid` so far, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces):
    // state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    // The kernel's USER_HZ: 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// Secret DELETEs the API server has answered so far, all clients together (the
/// control plane is shared with other tests: an upper bound for ours).
async fn apiserver_secret_deletes(env: &Env) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let page = env.client.request_text(request).await.unwrap_or_default();
    page.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("verb=\"DELETE\"")
                && l.contains("resource=\"secrets\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Takes the test's finalizer off the Secret when dropped, so that a failing test
/// does not leave its namespace stuck in deletion.
struct Release {
    kubeconfig: std::path::PathBuf,
    namespace: String,
    name: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let (kubeconfig, namespace, name) = (self.kubeconfig.clone(), self.namespace.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let api: Api<Secret> = Api::namespaced(client_for(&kubeconfig).await, &namespace);
                let patch = json!({ "metadata": { "finalizers": null } });
                let _ = api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await;
            });
        })
        .join();
    }
}

#[tokio::test]
async fn a_serving_secret_held_by_a_finalizer_is_waited_for_reported_once_and_recreated_when_released() {
    let env = Env::new("held").await;
    let op = env.start_operator(&["--default-key-algorithm", "ecdsa"]);
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", T).await;
    // The namespace's user freezes the Secret and hangs a finalizer of their own on it.
    let patch = json!({ "immutable": true, "metadata": { "finalizers": [HOLD] } });
    env.secrets().patch("web-tls", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let _release = Release { kubeconfig: env.kubeconfig.clone(), namespace: env.ns.clone(), name: "web-tls".into() };

    let deletes_before = metric(&op.metrics_page().await, DELETES);
    let apiserver_before = apiserver_secret_deletes(&env).await;
    let cpu_before = cpu_time(op.pid());
    env.force_rotation("held").await;
    let rotated = env.rotated("held").await;
    let new_ski = certs::ca_ski(&rotated);

    // 22 s of the re-issue against a Secret that cannot go: reported after 10 s in
    // deletion, and a report repeated 10 s later would show too.
    tokio::time::sleep(Duration::from_secs(22)).await;
    let deletes = metric(&op.metrics_page().await, DELETES) - deletes_before;
    let apiserver = apiserver_secret_deletes(&env).await - apiserver_before;
    let cpu = cpu_time(op.pid()).saturating_sub(cpu_before);
    let held = env.secrets().get("web-tls").await.unwrap();
    let svc = env.services().get("web").await.unwrap();
    let count = annotation(&svc.metadata, BETA_ERR_NUM).map(str::to_string);
    let message = annotation(&svc.metadata, BETA_ERR).map(str::to_string);
    let warnings: Vec<_> = env
        .events(&env.ns, Some("web"), None)
        .await
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .collect();
    println!(
        "a Secret held by a finalizer through a forced rotation, 22 s: {deletes} Secret DELETEs by the operator \
         ({apiserver} at the shared API server from every client), operator CPU {cpu:?}, error count {count:?}, \
         {} Warning Event(s), message {message:?}",
        warnings.len()
    );
    assert!(held.metadata.deletion_timestamp.is_some(), "the Secret is still there, being deleted");
    assert!(deletes <= 11.0, "{deletes} DELETEs of one Secret in 22 s");
    assert!(cpu < Duration::from_millis(2200), "operator CPU {cpu:?} in 22 s");
    assert_eq!(count.as_deref(), Some("1"), "reported on the Service, counted once");
    let message = message.unwrap_or_default();
    assert!(message.contains("being deleted") && message.contains(HOLD), "{message}");
    assert_eq!(warnings.len(), 1, "one Warning: {warnings:?}");
    assert!(warnings[0].series.is_none(), "the Warning was sent once: {:?}", warnings[0].series);
    assert_eq!(warnings[0].reason.as_deref(), Some("ServingCertificateError"));

    // The user lets it go: re-created, by the new CA, at once.
    let patch = json!({ "metadata": { "finalizers": null } });
    env.secrets().patch("web-tls", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let released = Instant::now();
    let old_uid = held.uid();
    let fresh = eventually(Duration::from_secs(60), "the Secret re-created by the new CA", || async {
        let s = env.secrets().get_opt("web-tls").await.ok()??;
        (s.uid() != old_uid && certs::try_signer_of(&data(&s, "tls.crt")).as_deref() == Some(new_ski.as_slice()))
            .then_some(s)
    })
    .await;
    let recreated = released.elapsed();
    println!("re-created {recreated:?} after the finalizer's removal");
    assert!(recreated < Duration::from_secs(60), "{recreated:?}");
    assert_eq!(fresh.immutable, None, "re-created as a regular Secret");
    eventually(T, "the error annotations cleared", || async {
        let svc = env.services().get("web").await.ok()?;
        annotation(&svc.metadata, BETA_ERR_NUM).is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_object_with_a_253_character_name_gets_its_event() {
    let env = Env::new("longname").await;
    let _op = env.start_operator(&[]);
    // The longest name the API server takes for a ConfigMap, with an inject annotation
    // the operator warns about.
    let name = format!("{}.example.com", "a".repeat(241));
    assert_eq!(name.len(), 253);
    let mut cm = ConfigMap { metadata: env.meta(&name), ..Default::default() };
    cm.metadata.annotations = Some([("service.beta.openshift.io/inject-cabundle".to_string(), "yes".into())].into());
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    let event = eventually(T, "the Warning Event about the long-named ConfigMap", || async {
        env.events(&env.ns, Some(&name), Some("InvalidInjectAnnotation")).await.into_iter().next()
    })
    .await;
    let event_name = event.name_any();
    println!("Event {event_name} ({} characters) about a ConfigMap named with 253", event_name.len());
    assert!(event_name.len() <= 253);
}

#[tokio::test]
async fn control_characters_in_an_annotation_are_shown_escaped_by_inspect_and_in_logs() {
    let env = Env::new("escape").await;
    let op = env.start_operator(&["--log-format", "plain"]);
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", T).await;
    // A reason of two lines, one of them dressed as a log line, plus a colour change.
    let reason = "planned\nERROR FORGED: all keys leaked \u{1b}[31m";
    env.force_rotation(reason).await;
    env.rotated(reason).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_service-ca-operator"))
        .args(["inspect", "-n", &env.ns, "--operator-namespace", &env.op_ns])
        .env("KUBECONFIG", &env.kubeconfig)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let shown: Vec<&str> = table.lines().filter(|l| l.contains("forced rotation") || l.contains("FORGED")).collect();
    println!("inspect shows: {shown:?}");
    assert!(table.contains("forced rotation  planned\\nERROR FORGED: all keys leaked \\u{1b}[31m"), "{table}");
    assert!(!table.lines().any(|l| l.starts_with("ERROR FORGED")), "a line of the user's own: {table}");
    assert!(!table.contains('\u{1b}'), "a raw escape character: {table}");
    let logs = op.logs();
    assert!(logs.contains("FORGED"), "the reason is logged");
    assert!(!logs.lines().any(|l| l.starts_with("ERROR FORGED")), "a forged log line");
    assert!(!logs.contains('\u{1b}'), "a raw escape character in the log");
}

async fn error_of(env: &Env, svc: &str) -> String {
    eventually(T, &format!("an error annotation on {svc}"), || async {
        let s = env.services().get(svc).await.unwrap();
        annotation(&s.metadata, BETA_ERR).map(str::to_string)
    })
    .await
}

#[tokio::test]
async fn bad_service_input_gets_clear_errors_and_nothing_else_changes() {
    let env = Env::new("bad-svc").await;
    let op = env.start_operator(&[]);
    env.ca_bundle().await;
    let other_tls: Secret = serde_json::from_value(json!({
        "metadata": { "name": "other-owner", "annotations": { "service.beta.openshift.io/originating-service-uid": "00000000-0000-0000-0000-000000000000" } },
        "type": "kubernetes.io/tls", "data": { "tls.crt": "", "tls.key": "" }
    }))
    .unwrap();
    let other_tls = env.secrets().create(&PostParams::default(), &other_tls).await.unwrap();
    let docker: Secret = serde_json::from_value(json!({
        "metadata": { "name": "docker-cfg" }, "type": "kubernetes.io/dockerconfigjson",
        "data": { ".dockerconfigjson": "e30=" }
    }))
    .unwrap();
    let docker = env.secrets().create(&PostParams::default(), &docker).await.unwrap();

    // 1. Empty annotation value.
    env.service_with("empty", &[(BETA_NAME, "")], false).await;
    assert!(error_of(&env, "empty").await.contains("is empty"));
    // 2. Invalid Secret name.
    env.annotated_service("invalid", "Bad_Name!", false).await;
    assert!(error_of(&env, "invalid").await.contains("not a valid Secret name"));
    // 3. The name of an existing Secret of another type.
    env.annotated_service("docker", "docker-cfg", false).await;
    assert!(error_of(&env, "docker").await.contains("docker-cfg"));
    // 4. A TLS Secret made for another Service.
    env.annotated_service("stolen", "other-owner", false).await;
    assert!(error_of(&env, "stolen").await.contains("another Service"));
    // 5. ExternalName Service: not bad input after all — clients (the API server's
    // aggregator among them) verify `<svc>.<ns>.svc` whatever the Service type, so it
    // gets its certificate like any Service (see the injection tests).
    let mut ext: Service =
        serde_json::from_value(json!({ "spec": { "type": "ExternalName", "externalName": "db.example.com" } }))
            .unwrap();
    ext.metadata = env.meta("ext");
    ext.metadata.annotations = Some(BTreeMap::from([(BETA_NAME.to_string(), "ext-tls".to_string())]));
    env.services().create(&PostParams::default(), &ext).await.unwrap();
    env.serving_secret("ext-tls", T).await;
    // 6. A garbage failure count is read as 0.
    env.service_with(
        "garbage-count",
        &[(BETA_NAME, "Bad_Name"), ("service.beta.openshift.io/serving-cert-generation-error-num", "many")],
        false,
    )
    .await;
    eventually(T, "the count restarted at 1", || async {
        let s = env.services().get("garbage-count").await.unwrap();
        (annotation(&s.metadata, "service.beta.openshift.io/serving-cert-generation-error-num") == Some("1"))
            .then_some(())
    })
    .await;
    // 7. Surrounding whitespace in the name is ignored.
    env.annotated_service("spaced", "  spaced-tls  ", false).await;
    env.serving_secret("spaced-tls", T).await;
    for svc in ["empty", "invalid", "docker", "stolen"] {
        env.warning_containing(&env.ns, svc, "").await;
    }
    assert_eq!(env.secrets().get("other-owner").await.unwrap().resource_version(), other_tls.resource_version());
    assert_eq!(env.secrets().get("docker-cfg").await.unwrap().resource_version(), docker.resource_version());
    let managed = env
        .secrets()
        .list(&ListParams::default().labels("service-ca.operators.openshift.io/managed=true"))
        .await
        .unwrap();
    assert_eq!(managed.items.len(), 2, "only the valid requests (spaced, ext) got a Secret");
    assert!(op.admin_get("/livez").await.is_some_and(|(s, _)| s == 200));
}

#[tokio::test]
async fn longest_names_get_a_certificate_every_stack_accepts() {
    // A 63-character Service name in a 63-character namespace: a 131-character DNS
    // name, and a common name longer than X.509's 64-character bound.
    let client = crate::support::client().await;
    let ns = format!("long-{}-{}", std::process::id(), "n".repeat(63)).chars().take(63).collect::<String>();
    crate::support::create_namespace(&client, &ns).await;
    let mut env = Env::new("long").await;
    env.ns = ns.clone();
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let svc = "s".repeat(63);
    env.annotated_service(&svc, "long-tls", false).await;
    let secret = env.serving_secret("long-tls", T).await;
    let name = format!("{svc}.{ns}.svc");
    assert_eq!(name.len(), 131);
    let server = TlsServer::start(&data(&secret, "tls.crt"), &data(&secret, "tls.key"));
    for (stack, result) in tls::connect_all(server.port, &bundle, &name) {
        result.unwrap_or_else(|e| panic!("{stack}: {e}"));
    }
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client).delete(&ns, &DeleteParams::background()).await;
}
