//! The Helm chart (charts/service-ca-operator), with Helm itself (built from its Go
//! module by scripts/helm.sh): lint, template (the same objects as manifests/), install
//! on the real API server, the operator running as the chart's ServiceAccount with the
//! chart's settings, upgrade, uninstall (the CA stays).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use serde_json::{Value, json};

use crate::support::objects::token_for;
use crate::support::{Env, Operator, RUN_LABEL, T, eventually};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/service-ca-operator");

/// The pinned helm (scripts/helm.sh builds it once and caches it outside the checkout).
fn helm_binary() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/helm.sh");
        let out = Command::new(&script).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "helm is not available: scripts/helm.sh builds helm v3.22.0 from its Go module (needs Go 1.26 and the \
             Go module proxy), or put helm v3.22.0 on PATH. It said:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn helm(args: &[&str], kubeconfig: Option<&Path>) -> String {
    helm_result(args, kubeconfig).unwrap_or_else(|failure| panic!("helm {args:?} failed:\n{failure}"))
}

/// helm's output, or what it said when it failed.
fn helm_result(args: &[&str], kubeconfig: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(helm_binary());
    cmd.args(args);
    if let Some(k) = kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    // Keep helm's own cache and config out of the user's home.
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    let out = cmd.output().expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// The objects of a multi-document YAML stream, by "Kind/namespace/name" (comments
/// and empty documents dropped).
fn objects(stream: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for doc in stream.split("\n---") {
        let doc = doc.trim_start_matches("---");
        if doc.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        let value: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{e}:\n{doc}"));
        let key = format!(
            "{}/{}/{}",
            value["kind"].as_str().unwrap_or("?"),
            value["metadata"]["namespace"].as_str().unwrap_or(""),
            value["metadata"]["name"].as_str().unwrap_or("?")
        );
        assert!(out.insert(key.clone(), value).is_none(), "{key} twice");
    }
    out
}

/// Every object kustomization.yaml lists, as in manifests/ (the `images:` rewrite of
/// kustomization.yaml sets the tag the Deployment already names).
fn manifest_objects() -> BTreeMap<String, Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let k: Value = serde_saphyr::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    let mut stream = String::new();
    for file in k["resources"].as_array().unwrap() {
        stream.push_str("\n---\n");
        stream.push_str(&std::fs::read_to_string(dir.join(file.as_str().unwrap())).unwrap());
    }
    objects(&stream)
}

fn template(extra: &[&str]) -> BTreeMap<String, Value> {
    let mut args = vec!["template", "service-ca-operator", CHART, "--namespace", "openshift-service-ca"];
    args.extend_from_slice(extra);
    objects(&helm(&args, None))
}

#[test]
fn chart_lints_and_renders_exactly_the_manifests() {
    let lint = helm(&["lint", "--strict", CHART], None);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    let manifests = manifest_objects();
    // Default values: everything in manifests/ except the Namespace, which helm
    // creates (`--create-namespace`) outside the release so that uninstalling keeps it
    // and the CA in it.
    let chart = template(&[]);
    let mut expected = manifests.clone();
    assert!(expected.remove("Namespace//openshift-service-ca").is_some());
    assert_eq!(chart.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (key, object) in &expected {
        assert_eq!(&chart[key], object, "{key} differs between the chart and manifests/");
    }
    // namespace.create=true: identical, Namespace included.
    assert_eq!(template(&["--set", "namespace.create=true"]), manifests);

    // Values reach the objects.
    let custom = template(&[
        "--set",
        "replicas=3,operator.logLevel=debug,operator.certRefreshBefore=30d,image.repository=r.example/sco,image.tag=1.2.3",
        "--set",
        "nodeSelector.disk=ssd,tolerations[0].key=dedicated,tolerations[0].operator=Exists",
        "--set",
        "serviceMonitor.enabled=true,networkPolicy.enabled=false,podDisruptionBudget.enabled=false",
    ]);
    let d = &custom["Deployment/openshift-service-ca/service-ca-operator"];
    assert_eq!(d["spec"]["replicas"], 3);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({ "disk": "ssd" }));
    assert_eq!(pod["tolerations"], json!([{ "key": "dedicated", "operator": "Exists" }]));
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "r.example/sco:1.2.3");
    let env: BTreeMap<&str, &str> =
        c["env"].as_array().unwrap().iter().filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?))).collect();
    assert_eq!((env["SERVICE_CA_LOG"], env["SERVICE_CA_CERT_REFRESH_BEFORE"]), ("debug", "30d"));
    assert!(custom.contains_key("ServiceMonitor/openshift-service-ca/service-ca-operator"));
    assert!(custom.contains_key("Service/openshift-service-ca/service-ca-operator-metrics"));
    assert!(!custom.keys().any(|k| k.starts_with("NetworkPolicy/") || k.starts_with("PodDisruptionBudget/")));
    assert!(!template(&[]).keys().any(|k| k.starts_with("ServiceMonitor/")), "ServiceMonitor is off by default");
    // The admission policy follows the pod signer's name, and has an off switch.
    let policy = "ValidatingAdmissionPolicy//service-ca-operator-pod-certificate-requests";
    let renamed = template(&["--set", "operator.podSignerName=example.com/pods"]);
    assert_eq!(
        renamed[policy]["spec"]["matchConditions"][0]["expression"],
        r#"object.spec.signerName == "example.com/pods""#
    );
    let off = template(&["--set", "podCertificateAdmissionPolicy.enabled=false"]);
    assert!(!off.keys().any(|k| k.starts_with("ValidatingAdmissionPolicy")), "{:?}", off.keys());
}

/// One `leaseIdentity` for several replicas would make them all one
/// member (split brain): the chart refuses it, naming the value; with one replica it is
/// passed on.
#[test]
fn chart_refuses_one_lease_identity_for_several_replicas() {
    let refused =
        helm_result(&["template", "service-ca-operator", CHART, "--set", "operator.leaseIdentity=pinned"], None);
    let Err(said) = refused else { panic!("two replicas (the default) with one leaseIdentity must be refused") };
    assert!(said.contains("operator.leaseIdentity") && said.contains("replicas"), "{said}");
    let one = template(&["--set", "operator.leaseIdentity=pinned,replicas=1"]);
    let env =
        &one["Deployment/openshift-service-ca/service-ca-operator"]["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array().unwrap().iter().any(|e| e["name"] == "SERVICE_CA_LEASE_IDENTITY" && e["value"] == "pinned"),
        "{env}"
    );
}

/// Environment of the Deployment's container → the same settings as flags for the
/// binary run here (the API server has no nodes, so the Deployment's pods never run).
fn flags_from_deployment(d: &Deployment) -> Vec<String> {
    let container = &d.spec.template.spec.as_ref().unwrap().containers[0];
    let mut flags = Vec::new();
    for e in container.env.iter().flatten() {
        let Some(value) = &e.value else { continue };
        let flag = match e.name.as_str() {
            // The test harness picks the ports and reads plain logs.
            "SERVICE_CA_ADMIN_ADDR" | "SERVICE_CA_METRICS_ADDR" | "SERVICE_CA_LOG" | "SERVICE_CA_LOG_FORMAT" => {
                continue;
            }
            name => format!("--{}", name.trim_start_matches("SERVICE_CA_").to_lowercase().replace('_', "-")),
        };
        flags.push(format!("{flag}={value}"));
    }
    flags
}

/// Writes the release's values to `path`: the objects' `name`, this test's selector and a
/// 5 s lease, each top-level key of `extra` in place of these.
fn write_values(path: &Path, name: &str, env: &Env, extra: Value) {
    let mut v = json!({
        "name": name,
        "operator": { "selector": format!("{RUN_LABEL}={}", env.run), "leaseDuration": "5s" },
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    std::fs::write(path, v.to_string()).unwrap();
}

/// Writes to `path` a kubeconfig for the test cluster that authenticates as the chart's
/// ServiceAccount `name` (a bound token).
async fn write_service_account_kubeconfig(env: &Env, name: &str, path: &Path) {
    let token = token_for(&env.client, &env.op_ns, name).await;
    let admin: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(crate::support::kubeconfig_path()).unwrap()).unwrap();
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{ "name": "c", "cluster": admin["clusters"][0]["cluster"] }],
        "users": [{ "name": "sa", "user": { "token": token } }],
        "contexts": [{ "name": "sa", "context": { "cluster": "c", "user": "sa" } }]
    });
    std::fs::write(path, config.to_string()).unwrap();
}

/// The chart's settings from Deployment `d` as flags, for this test's operator namespace.
fn chart_operator_args(d: &Deployment, env: &Env) -> Vec<String> {
    let mut args = flags_from_deployment(d);
    args.extend(["--namespace".to_string(), env.op_ns.clone()]);
    // The per-namespace bundle only in this test's operator namespace (not every
    // namespace of the shared cluster).
    args.retain(|a| !a.starts_with("--namespace-bundle-selector"));
    args.push(format!("--namespace-bundle-selector=kubernetes.io/metadata.name={}", env.op_ns));
    args
}

/// Nothing the operator asked for was denied to the ServiceAccount `sa` (the API
/// server's audit log `audit`, from byte `start` on, records every request of a service
/// account).
fn assert_nothing_denied(audit: &Path, start: usize, sa: &str) {
    let log = std::fs::read(audit).expect("the control plane's audit log");
    let log = String::from_utf8_lossy(log.get(start..).unwrap_or_default());
    let requests: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == sa)
        .collect();
    assert!(requests.len() > 5, "the audit log shows the operator's requests as {sa}");
    let denied: Vec<String> = requests
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .map(|e| format!("{} {}/{}", e["verb"], e["objectRef"]["resource"], e["objectRef"]["name"]))
        .collect();
    assert!(denied.is_empty(), "denied to the chart's ServiceAccount: {denied:?}");
}

/// The Deployment `d` after the upgrade: 3 replicas, debug logs, the lease kept.
fn assert_upgraded(d: Deployment) {
    assert_eq!(d.spec.replicas, Some(3));
    let env_vars = d.spec.template.spec.unwrap().containers[0].env.clone().unwrap();
    assert!(env_vars.iter().any(|e| e.name == "SERVICE_CA_LOG" && e.value.as_deref() == Some("debug")));
    assert!(
        env_vars.iter().any(|e| e.name == "SERVICE_CA_LEASE_DURATION" && e.value.as_deref() == Some("5s")),
        "{env_vars:?}"
    );
}

#[tokio::test]
async fn helm_install_runs_the_operator_as_its_service_account_upgrade_changes_it_uninstall_keeps_the_ca() {
    let env = Env::new("chart").await;
    let name = format!("sco-{}", env.run);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chart-{}", env.run));
    std::fs::create_dir_all(&dir).unwrap();
    let values = dir.join("values.json");
    write_values(&values, &name, &env, json!({}));
    let kubeconfig = env.kubeconfig.clone();
    let values_arg = values.to_str().unwrap().to_string();
    helm(&["install", "sco", CHART, "--namespace", &env.op_ns, "--values", &values_arg], Some(&kubeconfig));

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.op_ns);
    let d = deployments.get(&name).await.expect("the chart's Deployment");
    assert_eq!(d.spec.replicas, Some(2));
    let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.op_ns);
    sas.get(&name).await.expect("the chart's ServiceAccount");

    // The operator, as the chart's ServiceAccount, with the chart's settings.
    let sa_kubeconfig = dir.join("sa-kubeconfig");
    write_service_account_kubeconfig(&env, &name, &sa_kubeconfig).await;
    let args = chart_operator_args(&d, &env);
    assert!(args.contains(&"--leader-elect=true".to_string()), "{args:?}");
    let audit = crate::support::controlplane_dir().join("audit.log");
    let audit_start = std::fs::metadata(&audit).map(|m| m.len() as usize).unwrap_or(0);
    let mut op = Operator::start_with_kubeconfig("chart", &args, &sa_kubeconfig);
    op.wait_ready(Duration::from_secs(60)).await;
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", T).await;
    let bundle = env.injected_configmap("trust", T).await;
    // A forced rotation: the CA Secret updated, the bundle re-published, the leaf
    // re-issued, all as the chart's ServiceAccount.
    env.force_rotation("chart").await;
    eventually(T, "rotated and re-injected", || async {
        let rotated = env.ca_bundle().await;
        let data = env.configmaps().get("trust").await.ok()?.data?;
        (rotated != bundle && data.get("service-ca.crt") == Some(&rotated)).then_some(())
    })
    .await;
    op.stop();
    assert_nothing_denied(&audit, audit_start, &format!("system:serviceaccount:{}:{name}", env.op_ns));

    // Upgrade with changed values: the Deployment follows.
    write_values(
        &values,
        &name,
        &env,
        json!({ "replicas": 3, "operator": {
            "selector": format!("{RUN_LABEL}={}", env.run), "leaseDuration": "5s", "logLevel": "debug" } }),
    );
    helm(&["upgrade", "sco", CHART, "--namespace", &env.op_ns, "--values", &values_arg], Some(&kubeconfig));
    assert_upgraded(deployments.get(&name).await.unwrap());

    // Uninstall: the chart's objects go, the CA the operator made stays.
    helm(&["uninstall", "sco", "--namespace", &env.op_ns, "--wait"], Some(&kubeconfig));
    assert!(deployments.get_opt(&name).await.unwrap().is_none());
    assert!(sas.get_opt(&name).await.unwrap().is_none());
    assert!(env.op_secrets().get_opt("signing-key").await.unwrap().is_some(), "helm uninstall kept the CA");
    assert!(env.op_configmaps().get_opt("signing-cabundle").await.unwrap().is_some());
}
