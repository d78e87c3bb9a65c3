//! Faults and bad input on the real API server: nothing lost, nothing overwritten,
//! clear errors, no crash, and no private key in the logs.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use service_ca_operator::pki;

use crate::cluster::{apiservice_json, crd_json, webhook_json};
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, PrivateControlPlane, annotation, certs, data, eventually};

const T: Duration = Duration::from_secs(30);
const BETA_NAME: &str = "service.beta.openshift.io/serving-cert-secret-name";
const BETA_ERR: &str = "service.beta.openshift.io/serving-cert-generation-error";
const INJECT: &str = "service.beta.openshift.io/inject-cabundle";

async fn error_of(env: &Env, svc: &str) -> String {
    eventually(T, &format!("an error annotation on {svc}"), || async {
        let s = env.services().get(svc).await.unwrap();
        annotation(&s.metadata, BETA_ERR).map(str::to_string)
    })
    .await
}

async fn warning_about(env: &Env, ns: &str, name: &str, contains: &str) -> String {
    eventually(T, &format!("a Warning Event about {name} containing {contains:?}"), || async {
        env.events(ns, Some(name), None).await.into_iter().find_map(|e| {
            let note = e.note.clone().unwrap_or_default();
            (e.type_.as_deref() == Some("Warning") && note.contains(contains)).then_some(note)
        })
    })
    .await
}

#[tokio::test]
async fn kill_9_while_issuing_500_certificates_ends_with_one_secret_each_and_one_ca() {
    let env = Env::new("crash").await;
    let foreign: Secret =
        serde_json::from_value(json!({ "metadata": { "name": "foreign" }, "data": { "k": "dg==" } })).unwrap();
    let foreign = env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    let mut op = env.start_operator(&[]);
    env.ca_bundle().await;
    let ca_before = certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
    let n = 500;
    futures::future::join_all((0..n).map(|i| {
        let env = &env;
        async move { env.annotated_service(&format!("c{i}"), &format!("c{i}-tls"), false).await }
    }))
    .await;
    let managed = ListParams::default().labels("service-ca.operators.openshift.io/managed=true");
    eventually(Duration::from_secs(60), "issuance under way", || async {
        (env.secrets().list(&managed).await.unwrap().items.len() >= 25).then_some(())
    })
    .await;
    op.kill();
    let at_kill = env.secrets().list(&managed).await.unwrap().items.len();
    println!("kill -9 with {at_kill}/{n} certificates issued");
    assert!(at_kill < n);
    let _op = env.start_operator(&[]);
    let secrets = eventually(Duration::from_secs(240), "all 500 Secrets", || async {
        let items = env.secrets().list(&managed).await.unwrap().items;
        (items.len() >= n).then_some(items)
    })
    .await;
    assert_eq!(secrets.len(), n, "exactly one Secret per Service");
    assert_eq!(certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap()), ca_before, "still the one CA");
    let bundle = env.ca_bundle().await;
    for secret in &secrets {
        assert_eq!(certs::leaf_aki(secret), ca_before);
        let svc = secret.name_any().trim_end_matches("-tls").to_string();
        tls::rustls_verify_at(&data(secret, "tls.crt"), &bundle, &format!("{svc}.{}.svc", env.ns), SystemTime::now())
            .unwrap();
    }
    let still = env.secrets().get("foreign").await.unwrap();
    assert_eq!(still.resource_version(), foreign.resource_version(), "nothing foreign changed");
}

#[tokio::test]
async fn api_server_outage_is_visible_in_readyz_and_survived_without_a_restart() {
    let cp = PrivateControlPlane::start("outage");
    let env = Env::on("outage", &cp.kubeconfig).await;
    let mut op = env.start_operator(&[]);
    op.wait_ready(T).await;
    let pid = op.pid();
    for i in 0..10 {
        env.annotated_service(&format!("before{i}"), &format!("before{i}-tls"), false).await;
    }
    // Work is pending when the API server goes away.
    for i in 0..20 {
        env.annotated_service(&format!("during{i}"), &format!("during{i}-tls"), false).await;
    }
    cp.stop_apiserver();
    let down = Instant::now();
    let mut seen_not_ready = None;
    while down.elapsed() < Duration::from_secs(20) {
        if let Some((503, body)) = op.admin_get("/readyz").await
            && body.contains("not reachable")
        {
            seen_not_ready.get_or_insert(down.elapsed());
        }
        assert!(op.running(), "the operator must not exit during the outage:\n{}", op.logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let noticed = seen_not_ready.expect("/readyz never reported the outage");
    cp.start_apiserver();
    let up = Instant::now();
    op.wait_ready(Duration::from_secs(90)).await;
    let ready_again = up.elapsed();
    for i in 0..20 {
        env.serving_secret(&format!("during{i}-tls"), Duration::from_secs(90)).await;
    }
    env.annotated_service("after", "after-tls", false).await;
    env.serving_secret("after-tls", T).await;
    println!(
        "API server down 20 s: /readyz reported it after {noticed:?}, was ready again {ready_again:?} after the API server returned; same process"
    );
    assert!(op.running() && op.pid() == pid, "no restart");
}

/// `service_ca_reconcile_total` per controller.
fn reconciles(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("service_ca_reconcile_total{controller=\""))
        .filter_map(|l| {
            let (controller, rest) = l.split_once('"')?;
            Some((controller.to_string(), rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn a_relist_after_an_api_server_restart_reconciles_only_what_changed() {
    // A restarted API server expires every watch; the relist replays every object.
    // Unchanged objects must cost nothing: no reconcile, no read.
    let cp = PrivateControlPlane::start("relist");
    let env = Env::on("relist", &cp.kubeconfig).await;
    let op = env.start_operator(&[]);
    op.wait_ready(T).await;
    let n = 10;
    for i in 0..n {
        env.annotated_service(&format!("s{i}"), &format!("s{i}-tls"), false).await;
        let mut cm = ConfigMap { metadata: env.meta(&format!("cm{i}")), ..Default::default() };
        cm.metadata.annotations = Some(BTreeMap::from([(INJECT.to_string(), "true".to_string())]));
        env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    }
    for i in 0..n {
        env.serving_secret(&format!("s{i}-tls"), T).await;
        eventually(T, "the ConfigMap injected", || async {
            let cm = env.configmaps().get(&format!("cm{i}")).await.ok()?;
            cm.data?.contains_key("service-ca.crt").then_some(())
        })
        .await;
    }
    // Quiet: the counters stand still for two seconds.
    eventually(T, "the operator to be quiet", || async {
        let now = reconciles(&op.metrics().await?.1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        (now == reconciles(&op.metrics().await?.1)).then_some(())
    })
    .await;
    let before = reconciles(&op.metrics().await.unwrap().1);

    cp.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cp.start_apiserver();
    op.wait_ready(Duration::from_secs(90)).await;
    // The relist happened (the test proves nothing otherwise) ...
    let relisted = |kind: &str| {
        let listed = format!("listed kind={kind}");
        op.logs().lines().filter(|l| l.contains(&listed)).count() >= 2
    };
    eventually(T, "the Secret and ConfigMap watches to relist", || async {
        (relisted("Secret") && relisted("ConfigMap")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // ... and replayed nothing: none of the n Secrets or n ConfigMaps was looked at again.
    let after = reconciles(&op.metrics().await.unwrap().1);
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    println!(
        "after the relist of {n} Secrets and {n} ConfigMaps: {} cert-refresh, {} serving-cert, {} ca-bundle reconciles",
        delta("cert-refresh"),
        delta("serving-cert"),
        delta("ca-bundle")
    );
    for controller in ["cert-refresh", "serving-cert", "ca-bundle"] {
        assert!(
            delta(controller) < n,
            "{controller} re-reconciled unchanged objects after the relist: {before:?} -> {after:?}"
        );
    }
}

#[tokio::test]
async fn concurrent_writers_keep_their_own_fields_and_ours_converge() {
    let env = Env::new("concurrent").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    env.annotated_service("w", "w-tls", false).await;
    env.serving_secret("w-tls", T).await;
    let mut cm: ConfigMap = serde_json::from_value(json!({ "binaryData": { "b": "AA==" } })).unwrap();
    cm.metadata = env.meta("cm");
    cm.metadata.annotations = Some(BTreeMap::from([(INJECT.to_string(), "true".to_string())]));
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let mut vwc: ValidatingWebhookConfiguration =
        serde_json::from_value(webhook_json("ValidatingWebhookConfiguration", &env.run, &["a", "b"])).unwrap();
    vwc.metadata.annotations = Some(BTreeMap::from([(INJECT.to_string(), "true".to_string())]));
    let vwc_name = vwcs.create(&PostParams::default(), &vwc).await.unwrap().name_any();

    // The other writer: their own label on each object, again and again, while they
    // also disturb our fields so that the operator writes at the same time.
    let rounds = 15;
    let theirs = PatchParams::apply("other-writer").force();
    for round in 0..rounds {
        let label = json!({ "metadata": { "labels": { "other-writer": round.to_string() } } });
        let other = async {
            let (secrets, configmaps, merge) = (env.secrets(), env.configmaps(), PatchParams::default());
            let (label_patch, hook_patch) = (
                Patch::Merge(&label),
                json!({ "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration",
                "metadata": { "name": vwc_name, "labels": { "other-writer": round.to_string() } },
                "webhooks": [{ "name": format!("b.{}.example.com", env.run), "timeoutSeconds": (round % 20) + 1 }] }),
            );
            let hook_patch = Patch::Apply(&hook_patch);
            let (a, b, c) = tokio::join!(
                secrets.patch("w-tls", &merge, &label_patch),
                configmaps.patch("cm", &merge, &label_patch),
                vwcs.patch(&vwc_name, &theirs, &hook_patch)
            );
            a.unwrap();
            b.unwrap();
            c.unwrap();
        };
        let disturb = async {
            let extra = json!({ "data": { "extra": "eA==" } });
            let _ = env.secrets().patch("w-tls", &PatchParams::default(), &Patch::Merge(&extra)).await;
            let tamper = json!({ "data": { "service-ca.crt": format!("tampered {round}") } });
            let _ = env.configmaps().patch("cm", &PatchParams::default(), &Patch::Merge(&tamper)).await;
        };
        tokio::join!(other, disturb);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = (rounds - 1).to_string();
    let secret = eventually(T, "the Secret converged", || async {
        let s = env.secrets().get("w-tls").await.unwrap();
        (s.data.as_ref()?.len() == 2).then_some(s)
    })
    .await;
    assert_eq!(secret.labels().get("other-writer"), Some(&last), "their label on the Secret survived");
    let cm = eventually(T, "the ConfigMap converged", || async {
        let c = env.configmaps().get("cm").await.unwrap();
        (c.data.as_ref()?.get("service-ca.crt")? == &bundle).then_some(c)
    })
    .await;
    assert_eq!(cm.labels().get("other-writer"), Some(&last));
    assert_eq!(cm.binary_data.unwrap()["b"].0, vec![0]);
    let hooks = eventually(T, "the webhooks carry the bundle", || async {
        let v = vwcs.get(&vwc_name).await.unwrap();
        v.webhooks
            .as_ref()?
            .iter()
            .all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == bundle.as_bytes()))
            .then_some(v)
    })
    .await;
    assert_eq!(hooks.labels().get("other-writer"), Some(&last));
    assert_eq!(
        hooks.webhooks.unwrap()[1].timeout_seconds,
        Some(((rounds - 1) % 20) + 1),
        "their webhook field survived"
    );
    vwcs.delete(&vwc_name, &DeleteParams::default()).await.unwrap();
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
        warning_about(&env, &env.ns, svc, "").await;
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

#[tokio::test]
async fn bad_injection_input_is_reported_and_nothing_else_changes() {
    let env = Env::new("bad-inject").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let configmap = |name: &str, annotations: &[(&str, &str)], body: serde_json::Value| {
        let mut cm: ConfigMap = serde_json::from_value(body).unwrap();
        cm.metadata = env.meta(name);
        cm.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        cm
    };
    // 8-10. Values: "TRUE" injects, "false" and "yes" do not ("yes" gets a Warning).
    for (name, value) in [("upper", "TRUE"), ("no", "false"), ("yes", "yes")] {
        env.configmaps()
            .create(&PostParams::default(), &configmap(name, &[(INJECT, value)], json!({ "data": { "k": "v" } })))
            .await
            .unwrap();
    }
    // 11. binaryData is kept.
    env.configmaps()
        .create(
            &PostParams::default(),
            &configmap("binary", &[(INJECT, "true")], json!({ "binaryData": { "b": "AQI=" } })),
        )
        .await
        .unwrap();
    // 12. Near the 1 MiB limit: the bundle does not fit; the API server refuses and
    // the operator says so, without looping or crashing.
    let mut huge = configmap("huge", &[(INJECT, "true")], json!({}));
    huge.binary_data = Some(BTreeMap::from([("blob".to_string(), ByteString(vec![7; 1_048_576 - 300]))]));
    env.configmaps().create(&PostParams::default(), &huge).await.unwrap();
    // 13. CRD without conversion; 14. webhook configuration without webhooks;
    // 15. APIService that skips TLS verification (caBundle not allowed with it).
    let run = env.run.clone();
    let mut crd = crd_json(&run);
    crd["spec"].as_object_mut().unwrap().remove("conversion");
    crd["metadata"]["annotations"] = json!({ INJECT: "true" });
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds.create(&PostParams::default(), &serde_json::from_value(crd).unwrap()).await.unwrap();
    let mut empty = webhook_json("ValidatingWebhookConfiguration", &run, &[]);
    empty["metadata"]["annotations"] = json!({ INJECT: "true" });
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let vwc = vwcs.create(&PostParams::default(), &serde_json::from_value(empty).unwrap()).await.unwrap();
    let mut insecure = apiservice_json(&run);
    insecure["metadata"]["annotations"] = json!({ INJECT: "true" });
    insecure["spec"]["insecureSkipTLSVerify"] = json!(true);
    let apis: Api<APIService> = Api::all(env.client.clone());
    let api_service = apis.create(&PostParams::default(), &serde_json::from_value(insecure).unwrap()).await.unwrap();

    eventually(T, "TRUE injected", || async {
        env.configmaps().get("upper").await.unwrap().data?.get("service-ca.crt").map(|_| ())
    })
    .await;
    let binary = eventually(T, "binary injected", || async {
        let c = env.configmaps().get("binary").await.unwrap();
        (c.data.as_ref()?.get("service-ca.crt")? == &bundle).then_some(c)
    })
    .await;
    assert_eq!(binary.binary_data.unwrap()["b"].0, vec![1, 2]);
    warning_about(&env, &env.ns, "yes", "only \"true\"").await;
    let note = warning_about(&env, &env.ns, "huge", "could not inject").await;
    assert!(note.contains("Too long") || note.contains("too long") || note.contains("must have at most"), "{note}");
    let note = warning_about(&env, "default", &api_service.name_any(), "could not inject").await;
    assert!(note.contains("insecureSkipTLSVerify"), "{note}");
    apis.delete(&api_service.name_any(), &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let no = env.configmaps().get("no").await.unwrap();
    assert_eq!(no.data.unwrap().get("k").map(String::as_str), Some("v"));
    assert!(!env.configmaps().get("yes").await.unwrap().data.unwrap().contains_key("service-ca.crt"));
    let ours = |m: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry]| {
        m.iter().any(|f| f.manager.as_deref() == Some("service-ca-operator"))
    };
    assert!(!ours(crds.get(&crd.name_any()).await.unwrap().managed_fields()));
    assert!(!ours(vwcs.get(&vwc.name_any()).await.unwrap().managed_fields()));
    crds.delete(&crd.name_any(), &DeleteParams::default()).await.unwrap();
    vwcs.delete(&vwc.name_any(), &DeleteParams::default()).await.unwrap();
}

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
        let note = warning_about(&env, &env.op_ns, "signing-key", expected).await;
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
        let patch =
            json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "user-ca" } } });
        env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
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
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "secrecy" } } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
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
