//! Trust where workloads look for it (docs/spec.md §5.5), end to end on the real API
//! server: the per-namespace bundle `openshift-service-ca.crt`.
//!
//! The cluster is shared with other tests: each test's operator gets
//! `--namespace-bundle-selector e2e.service-ca/trust=<run>`, and only the namespaces
//! the test creates with that label get a bundle.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, ObjectMeta, PostParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};

use crate::support::{Env, Operator, eventually, metric};

const NAME: &str = "openshift-service-ca.crt";
const KEY: &str = "service-ca.crt";
const TRUST_LABEL: &str = "e2e.service-ca/trust";
const OURS: &str = "service-ca.operators.openshift.io/namespace-bundle";
const T: Duration = Duration::from_secs(60);

/// The test's operator with per-namespace bundles on, for its labelled namespaces only.
fn start(env: &Env, extra: &[&str]) -> Operator {
    let mut args = env.operator_args();
    args.retain(|a| a != "--namespace-bundles=false");
    args.extend(["--namespace-bundle-selector".into(), format!("{TRUST_LABEL}={}", env.run)]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Operator::start_with_kubeconfig(&env.name, &args, &env.kubeconfig)
}

/// Namespace `<run>-<suffix>` with the test's trust label; deleted with the test.
async fn labelled_namespace(env: &Env, suffix: &str) -> String {
    let name = format!("{}-{suffix}", env.run);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(TRUST_LABEL.to_string(), env.run.clone())])),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(env.client.clone()).create(&PostParams::default(), &ns).await.unwrap();
    name
}

/// The namespaces a test made, deleted when it ends (with a client of their own: the
/// test's client belongs to the runtime this drop blocks).
struct Namespaces(Vec<String>);
impl Drop for Namespaces {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let api: Api<Namespace> = Api::all(crate::support::client().await);
                for name in names {
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
            });
        })
        .join();
    }
}

fn cms(env: &Env, namespace: &str) -> Api<ConfigMap> {
    Api::namespaced(env.client.clone(), namespace)
}

/// Waits until `namespace` holds our bundle ConfigMap with `bundle`.
async fn holds(env: &Env, namespace: &str, bundle: &str) -> ConfigMap {
    eventually(T, &format!("{namespace}/{NAME} with the bundle"), || async {
        let cm = cms(env, namespace).get_opt(NAME).await.unwrap()?;
        (cm.data.as_ref()?.get(KEY)? == bundle && cm.labels().contains_key(OURS)).then_some(cm)
    })
    .await
}

#[tokio::test]
async fn namespace_bundles_reach_new_namespaces_come_back_and_follow_a_rotation_one_write_each() {
    let env = Env::new("trust-namespaces").await;
    let mut spaces = Namespaces(Vec::new());
    for suffix in ["a", "b"] {
        spaces.0.push(labelled_namespace(&env, suffix).await);
    }
    let op = start(&env, &[]);
    eprintln!("operator log: {}", op.log.display());
    let bundle = env.ca_bundle().await;
    let started = Instant::now();
    for ns in &spaces.0 {
        holds(&env, ns, &bundle).await;
    }
    println!("bundles in the namespaces there at start: {:?}", started.elapsed());

    // A namespace created after start.
    let late = labelled_namespace(&env, "late").await;
    spaces.0.push(late.clone());
    let created = Instant::now();
    holds(&env, &late, &bundle).await;
    println!("bundle in a namespace created after start: {:?}", created.elapsed());

    // Namespaces outside the selector get none (the test's own, unlabelled).
    assert!(cms(&env, &env.ns).get_opt(NAME).await.unwrap().is_none(), "an unselected namespace got a bundle");

    // Deleted: made again.
    let old = cms(&env, &late).get(NAME).await.unwrap();
    cms(&env, &late).delete(NAME, &DeleteParams::default()).await.unwrap();
    let again = holds(&env, &late, &bundle).await;
    assert_ne!(again.uid(), old.uid(), "a new ConfigMap");

    // Tampered with: put back.
    let patch = serde_json::json!({ "data": { KEY: "tampered" } });
    let params = kube::api::PatchParams::default();
    cms(&env, &late).patch(NAME, &params, &kube::api::Patch::Merge(&patch)).await.unwrap();
    holds(&env, &late, &bundle).await;

    // A rotation reaches every namespace with one write each.
    let counting = count_writes(&env, &spaces.0).await;
    env.force_rotation("trust").await;
    env.rotated("trust").await;
    let rotated = eventually(T, "a new bundle", || async {
        let b = env.ca_bundle().await;
        (b != bundle).then_some(b)
    })
    .await;
    let rotation = Instant::now();
    for ns in &spaces.0 {
        holds(&env, ns, &rotated).await;
    }
    println!("every namespace's bundle after the rotation: {:?}", rotation.elapsed());
    // Anything more would show within a few seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = counting.abort_and_count().await;
    println!("writes per namespace during the rotation: {writes:?}");
    for ns in &spaces.0 {
        assert_eq!(writes.get(ns), Some(&1), "one write in {ns} for one bundle change: {writes:?}");
    }
    trust_metrics(&op).await;
}

/// The trust metrics after a rotation: three namespaces, all current; the bundle's
/// certificates by role (the new CA and the bridge that keeps the previous one trusted).
async fn trust_metrics(op: &Operator) {
    let page = eventually(Duration::from_secs(30), "service_ca_namespace_bundles current", || async {
        let page = op.metrics_page().await;
        (metric(&page, "service_ca_namespace_bundles{state=\"current\"}") == 3.0).then_some(page)
    })
    .await;
    let lines: Vec<&str> =
        page.lines().filter(|l| l.starts_with("service_ca_bundle_certificate_expiry_seconds{")).collect();
    println!("{}", lines.join("\n"));
    assert_eq!(metric(&page, "service_ca_namespace_bundles{state=\"selected\"}"), 3.0);
    for role in ["current", "bridge"] {
        let series =
            format!("service_ca_bundle_certificate_expiry_seconds{{bundle=\"signing-cabundle\",role=\"{role}\"");
        assert!(metric(&page, &series) > 1.7e9, "{role}: {lines:?}");
    }
}

/// Counts the modifications of the bundle ConfigMaps in `namespaces` from now on.
struct Counting(tokio::task::JoinHandle<()>, std::sync::Arc<std::sync::Mutex<BTreeMap<String, u32>>>);

impl Counting {
    async fn abort_and_count(self) -> BTreeMap<String, u32> {
        self.0.abort();
        let _ = self.0.await;
        self.1.lock().unwrap().clone()
    }
}

async fn count_writes(env: &Env, namespaces: &[String]) -> Counting {
    let counts = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    // Every watch starts from the version read here, before the caller changes anything:
    // a write that came before the watch was open is still counted.
    let mut streams = Vec::new();
    for ns in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), ns);
        let version = api.get(NAME).await.unwrap().resource_version().unwrap();
        let params = WatchParams::default().fields(&format!("metadata.name={NAME}"));
        streams.push(api.watch(&params, &version).await.unwrap().boxed());
    }
    let shared = counts.clone();
    let task = tokio::spawn(async move {
        let mut all = futures::stream::select_all(streams);
        while let Some(event) = all.next().await {
            if let Ok(WatchEvent::Modified(cm)) = event {
                *shared.lock().unwrap().entry(cm.namespace().unwrap()).or_insert(0) += 1;
            }
        }
    });
    Counting(task, counts)
}

#[tokio::test]
async fn a_configmap_of_that_name_not_ours_is_left_alone_and_reported_once() {
    let env = Env::new("trust-foreign").await;
    let mut spaces = Namespaces(Vec::new());
    let ns = labelled_namespace(&env, "x").await;
    spaces.0.push(ns.clone());
    let mine = ConfigMap {
        metadata: ObjectMeta { name: Some(NAME.into()), ..Default::default() },
        data: Some(BTreeMap::from([("mine".to_string(), "keep".to_string())])),
        ..Default::default()
    };
    let mine = cms(&env, &ns).create(&PostParams::default(), &mine).await.unwrap();
    let op = start(&env, &[]);
    eprintln!("operator log: {}", op.log.display());
    env.ca_bundle().await;
    let warning = env.the_one_warning(&ns, NAME).await;
    println!("Warning: {:?}", warning.note);
    assert_eq!(warning.reason.as_deref(), Some("NamespaceBundleNotOurs"));
    // Nudge the operator (a change to it), then check it was neither written nor reported again.
    let patch = serde_json::json!({ "metadata": { "labels": { "touched": "1" } } });
    let params = kube::api::PatchParams::default();
    let touched = cms(&env, &ns).patch(NAME, &params, &kube::api::Patch::Merge(&patch)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = cms(&env, &ns).get(NAME).await.unwrap();
    assert_eq!(now.resource_version(), touched.resource_version(), "not written");
    assert_eq!(now.data, mine.data);
    env.the_one_warning(&ns, NAME).await;
}

const INJECT: &str = "service.beta.openshift.io/inject-cabundle";
const INJECT_KEY: &str = "service-ca.operators.openshift.io/inject-cabundle-key";

/// Server-side applies ConfigMap `name` in the test namespace as field manager `manager`.
async fn apply_as(env: &Env, manager: &str, name: &str, annotations: serde_json::Value, data: serde_json::Value) {
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": name, "labels": env.labels(), "annotations": annotations },
        "data": data,
    });
    let params = kube::api::PatchParams::apply(manager);
    env.configmaps().patch(name, &params, &kube::api::Patch::Apply(&cm)).await.unwrap();
}

/// Waits until ConfigMap `name` has `key` = `value`; returns its data.
async fn data_with(env: &Env, name: &str, key: &str, value: &str) -> BTreeMap<String, String> {
    eventually(T, &format!("{name}[{key}] injected"), || async {
        let data = env.configmaps().get(name).await.ok()?.data?;
        (data.get(key).map(String::as_str) == Some(value)).then_some(data)
    })
    .await
}

#[tokio::test]
async fn inject_cabundle_key_writes_that_key_alone_and_another_managers_key_survives_a_rotation() {
    let env = Env::new("trust-key").await;
    let op = env.start_operator(&[]);
    eprintln!("operator log: {}", op.log.display());
    let annotations = serde_json::json!({ INJECT: "true", INJECT_KEY: "ca.crt" });
    apply_as(&env, "gitops", "trust", annotations.clone(), serde_json::json!({ "app.conf": "one" })).await;
    let bundle = env.ca_bundle().await;
    let data = data_with(&env, "trust", "ca.crt", &bundle).await;
    assert_eq!(data.get("app.conf").map(String::as_str), Some("one"), "{data:?}");
    assert!(!data.contains_key("service-ca.crt"), "only the key asked for: {data:?}");
    // The other manager applies again (a change of its key): no conflict, nothing of ours lost.
    apply_as(&env, "gitops", "trust", annotations, serde_json::json!({ "app.conf": "two" })).await;
    env.force_rotation("trust-key").await;
    env.rotated("trust-key").await;
    let rotated = eventually(T, "a new bundle", || async {
        let b = env.ca_bundle().await;
        (b != bundle).then_some(b)
    })
    .await;
    let data = data_with(&env, "trust", "ca.crt", &rotated).await;
    assert_eq!(data.get("app.conf").map(String::as_str), Some("two"), "{data:?}");
    let series = "service_ca_injected_objects{kind=\"configmaps\",status=\"current\"}";
    eventually(Duration::from_secs(10), series, || async {
        (metric(&op.metrics_page().await, series) == 1.0).then_some(())
    })
    .await;
    let cm = env.configmaps().get("trust").await.unwrap();
    let owners: Vec<(String, String)> = cm
        .managed_fields()
        .iter()
        .map(|m| (m.manager.clone().unwrap_or_default(), serde_json::to_string(&m.fields_v1).unwrap()))
        .collect();
    println!("managedFields: {owners:?}");
    let owner_of =
        |field: &str| owners.iter().filter(|(_, f)| f.contains(field)).map(|(m, _)| m.clone()).collect::<Vec<_>>();
    assert_eq!(owner_of("f:ca.crt"), ["service-ca-operator"]);
    assert_eq!(owner_of("f:app.conf"), ["gitops"]);
}

#[tokio::test]
async fn an_invalid_inject_cabundle_key_is_reported_and_nothing_is_written() {
    let env = Env::new("trust-badkey").await;
    let op = env.start_operator(&[]);
    eprintln!("operator log: {}", op.log.display());
    // Made once the CA is loaded: the warning comes from one pass.
    env.ca_bundle().await;
    let annotations = serde_json::json!({ INJECT: "true", INJECT_KEY: "../ca.crt" });
    apply_as(&env, "user", "bad", annotations, serde_json::json!({ "keep": "me" })).await;
    let warning = env.the_one_warning(&env.ns, "bad").await;
    println!("Warning: {:?}", warning.note);
    assert_eq!(warning.reason.as_deref(), Some("InvalidInjectAnnotation"));
    assert!(warning.note.as_deref().unwrap_or_default().contains("not a ConfigMap key"), "{warning:?}");
    let data = env.configmaps().get("bad").await.unwrap().data.unwrap();
    assert_eq!(data, BTreeMap::from([("keep".to_string(), "me".to_string())]));
}

/// The Gateway API module whose standard-channel BackendTLSPolicy CRD the test installs:
/// the newest release the local Go toolchain accepts (v1.7.0 asks for Go 1.27).
const GATEWAY_API: &str = "sigs.k8s.io/gateway-api@v1.6.3";

/// The BackendTLSPolicy CRD file of [`GATEWAY_API`], from the Go module cache (fetched
/// through the Go module proxy the first time).
fn backend_tls_policy_crd() -> String {
    let out = std::process::Command::new("go")
        .args(["mod", "download", "-json", GATEWAY_API])
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("GOTOOLCHAIN", "local")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `go` ({e}): Go is needed to fetch the Gateway API CRDs ({GATEWAY_API})")
        });
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("go mod download {GATEWAY_API}: {e}\n{}", String::from_utf8_lossy(&out.stderr)));
    let dir = info["Dir"].as_str().unwrap_or_else(|| panic!("go mod download {GATEWAY_API}: {info}"));
    let file = format!("{dir}/config/crd/standard/gateway.networking.k8s.io_backendtlspolicies.yaml");
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Installs the BackendTLSPolicy CRD (kept: cluster-scoped, shared by every run) and
/// waits until it is established.
async fn install_backend_tls_policy(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&backend_tls_policy_crd()).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = kube::api::PatchParams::apply("e2e-gateway-api").force();
    api.patch(&crd.name_any(), &params, &kube::api::Patch::Apply(&crd)).await.unwrap();
    eventually(T, "the BackendTLSPolicy CRD established", || async {
        let crd = api.get(&crd.name_any()).await.ok()?;
        let conditions = crd.status?.conditions?;
        conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_backend_tls_policy_accepts_the_injected_configmap_and_its_ca_crt_verifies_our_certificate() {
    let env = Env::new("trust-gateway").await;
    install_backend_tls_policy(&env.client).await;
    let op = env.start_operator(&[]);
    eprintln!("operator log: {}", op.log.display());
    let annotations = serde_json::json!({ INJECT: "true", INJECT_KEY: "ca.crt" });
    apply_as(&env, "gitops", "backend-ca", annotations, serde_json::json!({})).await;
    env.annotated_service("web", "web-tls", false).await;
    let policy = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "BackendTLSPolicy",
        "metadata": { "name": "web", "namespace": env.ns },
        "spec": {
            "targetRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "validation": {
                "caCertificateRefs": [{ "group": "", "kind": "ConfigMap", "name": "backend-ca" }],
                "hostname": format!("web.{}.svc", env.ns),
            },
        },
    });
    let resource = kube::discovery::ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "BackendTLSPolicy".into(),
        plural: "backendtlspolicies".into(),
    };
    let policies: Api<kube::api::DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns, &resource);
    let policy: kube::api::DynamicObject = serde_json::from_value(policy).unwrap();
    let created = policies.create(&PostParams::default(), &policy).await.expect("the API server accepts the policy");
    println!("BackendTLSPolicy {} accepted (resourceVersion {:?})", created.name_any(), created.resource_version());

    // What a Gateway implementation does: read ca.crt from the ConfigMap the policy
    // names and verify the backend's certificate against it, for the policy's hostname.
    let reference = created.data["spec"]["validation"]["caCertificateRefs"][0]["name"].as_str().unwrap().to_string();
    let bundle = env.ca_bundle().await;
    let data = data_with(&env, &reference, "ca.crt", &bundle).await;
    let secret = env.serving_secret("web-tls", T).await;
    let pem = |key: &str| String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap();
    let server = crate::support::tls::TlsServer::start(&pem("tls.crt"), &pem("tls.key"));
    let hostname = format!("web.{}.svc", env.ns);
    crate::support::tls::rustls_connect(server.port, &data["ca.crt"], &hostname)
        .expect("ca.crt of the policy's ConfigMap verifies the serving certificate");
    // And not for another name (the check is a real one).
    assert!(crate::support::tls::rustls_connect(server.port, &data["ca.crt"], "other.example").is_err());
}

/// A restart over bundles all current sends no write, not even a create the API server
/// refuses: nothing is planned before the ConfigMaps are listed (docs/spec.md §5.5).
#[tokio::test]
async fn a_restart_over_current_bundles_sends_no_write() {
    const N: usize = 16;
    let env = Env::new("trust-restart").await;
    let mut spaces = Namespaces(Vec::new());
    for i in 0..N {
        spaces.0.push(labelled_namespace(&env, &format!("r{i}")).await);
    }
    let mut first = start(&env, &[]);
    let bundle = env.ca_bundle().await;
    for ns in &spaces.0 {
        holds(&env, ns, &bundle).await;
    }
    first.stop();
    let counting = count_writes(&env, &spaces.0).await;
    let started = Instant::now();
    let op = start(&env, &[]);
    eprintln!("operator log: {}", op.log.display());
    // Every namespace planned once by the new operator (the signer's arrival may add a
    // second pass each).
    let reconciles = "service_ca_reconcile_total{controller=\"namespace-bundle\"}";
    let page = eventually(T, "a pass over every namespace", || async {
        let page = op.metrics_page().await;
        (metric(&page, reconciles) >= N as f64).then_some(page)
    })
    .await;
    println!("{} passes over {N} namespaces after {:?}", metric(&page, reconciles), started.elapsed());
    // Anything more would show within a few seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let page = op.metrics_page().await;
    let creates = metric(&page, "service_ca_api_writes_total{resource=\"configmaps\",verb=\"create\"}");
    let patches = metric(&page, "service_ca_api_writes_total{resource=\"configmaps\",verb=\"patch\"}");
    let writes = counting.abort_and_count().await;
    println!(
        "after the restart: ConfigMap creates {}, patches {}, bundles modified {writes:?}",
        creates.abs(),
        patches.abs()
    );
    assert_eq!((creates, patches), (0.0, 0.0), "no write sent (see {})", op.log.display());
    assert!(writes.is_empty(), "no bundle modified: {writes:?}");
}
