//! The manifests on the real API server: they apply, the operator runs with the identity
//! they create and needs exactly the permissions they grant (checked against the API
//! server's audit log).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::support::objects::{apiservice_json, crd_json, token_for, webhook_json};
use crate::support::{self, Env, Operator, RUN_LABEL, T, controlplane_dir, eventually, kubeconfig_path};

const NS: &str = "openshift-service-ca";
/// The manifests grant `sign` and `attest` for the default pod signer only.
const POD_SIGNER: &str = "service-ca.operators.openshift.io/serving";
const SA: &str = "system:serviceaccount:openshift-service-ca:service-ca-operator";

fn kubectl(args: &[&str]) -> String {
    let out =
        Command::new("kubectl").args(args).env("KUBECONFIG", kubeconfig_path()).output().unwrap_or_else(|e| {
            panic!("cannot run kubectl ({e}): install it (https://kubernetes.io/docs/tasks/tools/)")
        });
    assert!(out.status.success(), "kubectl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A kubeconfig for the test cluster that authenticates with `token`.
fn token_kubeconfig(token: &str, dir: &Path) -> PathBuf {
    let admin: Value = serde_saphyr::from_str(&std::fs::read_to_string(kubeconfig_path()).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{ "name": "c", "cluster": cluster }],
        "users": [{ "name": "sa", "user": { "token": token } }],
        "contexts": [{ "name": "sa", "context": { "cluster": "c", "user": "sa" } }]
    });
    let path = dir.join("sa-kubeconfig");
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    path
}

fn start_as(kubeconfig: &Path, test: &str, args: &[String]) -> Operator {
    // Operator::start points KUBECONFIG at the admin config; run it under the
    // ServiceAccount's instead.
    let op = Operator::start_with_kubeconfig(test, args, kubeconfig);
    eprintln!("operator (as {SA}) log: {}", op.log.display());
    op
}

/// (apiGroup, resource, verb) triples, with whether they apply in the operator's own
/// namespace only (Role) or cluster-wide (ClusterRole).
type Grant = (String, String, String);

fn granted() -> (BTreeSet<Grant>, BTreeSet<Grant>) {
    let read = |file: &str| -> Value {
        serde_saphyr::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap())
            .unwrap()
    };
    let expand = |doc: Value| -> BTreeSet<Grant> {
        let mut out = BTreeSet::new();
        for rule in doc["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        out.insert((
                            g.as_str().unwrap().into(),
                            r.as_str().unwrap().into(),
                            v.as_str().unwrap().into(),
                        ));
                    }
                }
            }
        }
        out
    };
    (expand(read("manifests/clusterrole.yaml")), expand(read("manifests/role.yaml")))
}

fn audit_log() -> Vec<u8> {
    std::fs::read(controlplane_dir().join("audit.log")).unwrap_or_default()
}

/// What the operator's ServiceAccount did, from the API server's audit log (from
/// byte `since` on: earlier runs against the same control plane do not count).
fn used_by_operator(since: usize) -> (BTreeSet<Grant>, Vec<String>) {
    let log = audit_log();
    let log = String::from_utf8_lossy(log.get(since..).unwrap_or_default());
    let mut used = BTreeSet::new();
    let mut denied = Vec::new();
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
        if entry["user"]["username"] != SA {
            continue;
        }
        let object = &entry["objectRef"];
        let group = object["apiGroup"].as_str().unwrap_or("").to_string();
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or("")),
            None => object["resource"].as_str().unwrap_or("").to_string(),
        };
        let verb = entry["verb"].as_str().unwrap_or("").to_string();
        if entry["responseStatus"]["code"] == 403 {
            denied.push(format!("{verb} {group}/{resource} {}", object["name"]));
        }
        // A server-side apply that creates its object is authorised as a create too
        // (it answers 201): count that as a use of "create".
        if verb == "patch" && entry["responseStatus"]["code"] == 201 {
            used.insert((group.clone(), resource.clone(), "create".to_string()));
        }
        used.insert((group, resource, verb));
    }
    (used, denied)
}

#[tokio::test]
async fn manifests_apply_and_the_operator_needs_exactly_the_permissions_they_grant() {
    let audit_start = rbac_clean_slate().await;
    rbac_apply_manifests();
    let env = Env::new("rbac-operator").await;
    let (op, bundle) = rbac_start_operator_as_service_account(&env).await;
    rbac_serving_certificates(&env).await;
    rbac_secure_metrics(&env, &op, &bundle).await;
    let injected = rbac_injection_into_every_kind(&env, &bundle).await;
    let kubelet = rbac_pod_certificates(&env).await;
    rbac_ca_lifecycle(&env).await;
    rbac_delete_injection_targets(&env, injected).await;
    drop(kubelet);
    // A graceful stop: the replica deletes its member Lease (and hands the leader
    // Lease back).
    let mut op = op;
    assert!(op.stop().is_some_and(|status| status.success()), "graceful stop");
    rbac_compare_with_the_audit_log(audit_start);
}

/// RBAC phase 1: from a clean slate, so that the operator's own creates (CA, bundle
/// ConfigMap, Lease) are among the permissions to prove. Returns where the audit log
/// stands (what the operator does from here on counts).
async fn rbac_clean_slate() -> usize {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(support::client().await);
    let _ = namespaces.delete(NS, &DeleteParams::default()).await;
    // The ClusterTrustBundle of an earlier run (cluster-scoped): the operator must
    // create it again.
    let bundles: Api<ClusterTrustBundle> = Api::all(support::client().await);
    let bundle = crate::support::pods::bundle_name(POD_SIGNER, NS);
    let _ = bundles.delete(&bundle, &DeleteParams::default()).await;
    eventually(Duration::from_secs(180), "namespace openshift-service-ca gone", || async {
        namespaces.get_opt(NS).await.unwrap().is_none().then_some(())
    })
    .await;
    audit_log().len()
}

/// RBAC phase 2: `kubectl apply -k manifests` on the real API server (the Deployment's
/// pods never run: the test cluster has no nodes, so the operator runs here as the
/// ServiceAccount the manifests create).
fn rbac_apply_manifests() {
    let root = env!("CARGO_MANIFEST_DIR");
    let applied = kubectl(&["apply", "-k", &format!("{root}/manifests")]);
    for kind in [
        "namespace/",
        "serviceaccount/",
        "clusterrole.",
        "clusterrolebinding.",
        "role.",
        "rolebinding.",
        "deployment.",
        "poddisruptionbudget.",
        "service/service-ca-operator-metrics",
    ] {
        assert!(applied.contains(kind), "{kind} missing from:\n{applied}");
    }
}

/// RBAC phase 3: the operator, as the manifests' ServiceAccount, with leader
/// election; returns it once ready, with the bundle it published.
async fn rbac_start_operator_as_service_account(env: &Env) -> (Operator, String) {
    let token = token_for(&env.client, NS, "service-ca-operator").await;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rbac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = token_kubeconfig(&token, &dir);
    let args: Vec<String> = [
        "--namespace",
        NS,
        "--selector",
        &format!("{RUN_LABEL}={}", env.run),
        "--leader-elect=true",
        "--lease-duration",
        "5s",
        "--metrics-secure=true",
        // The per-namespace bundle (namespaces watched, one ConfigMap created) only in
        // this test's spare namespace, not in every namespace of the shared cluster.
        "--namespace-bundle-selector",
        &format!("kubernetes.io/metadata.name={}", env.op_ns),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let op = start_as(&kubeconfig, "rbac-operator", &args);
    op.wait_ready(Duration::from_secs(60)).await;
    let ns_cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), NS);
    let bundle = eventually(T, "signing-cabundle", || async {
        ns_cms.get_opt("signing-cabundle").await.unwrap()?.data?.remove("ca-bundle.crt")
    })
    .await;
    (op, bundle)
}

/// RBAC phase 4b: the metrics server, as shipped: its Service (from the manifests,
/// labelled for this test's operator) gets its certificate, and a scrape is reviewed
/// (TokenReview, SubjectAccessReview). The operator's own token may not read /metrics.
async fn rbac_secure_metrics(env: &Env, op: &Operator, bundle: &str) {
    kubectl(&["label", "-n", NS, "service/service-ca-operator-metrics", &format!("{RUN_LABEL}={}", env.run)]);
    let port: u16 = op.metrics_addr.rsplit(':').next().unwrap().parse().unwrap();
    let name = format!("service-ca-operator-metrics.{NS}.svc");
    let token = token_for(&env.client, NS, "service-ca-operator").await;
    let (status, body) = eventually(T, "the metrics server with its issued certificate", || async {
        crate::support::tls::rustls_https_get(port, bundle, &name, "/metrics", Some(&token)).ok()
    })
    .await;
    assert_eq!(status, 403, "{body}");
}

/// RBAC phase 4: serving certificates: create, then a tidy update.
async fn rbac_serving_certificates(env: &Env) {
    env.annotated_service("web", "web-tls", false).await;
    let secret = env.serving_secret("web-tls", T).await;
    let mut extra = secret.clone();
    extra.data.as_mut().unwrap().insert("x".into(), k8s_openapi::ByteString(b"x".to_vec()));
    env.secrets().replace("web-tls", &PostParams::default(), &extra).await.unwrap();
    eventually(T, "extra key stripped", || async {
        (env.secrets().get("web-tls").await.unwrap().data?.len() == 2).then_some(())
    })
    .await;
    // A user freezes it: the rotation of phase 6 re-creates it (delete, then create).
    let patch = json!({ "immutable": true });
    env.secrets().patch("web-tls", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

/// The cluster-scoped injection targets of phase 5, deleted after the CA lifecycle
/// (which re-injects into them).
struct InjectionTargets {
    crd: String,
    mwc: String,
    vwc: String,
}

/// RBAC phase 5: injection into every kind, and a repeated Event (patched, not
/// re-created).
async fn rbac_injection_into_every_kind(env: &Env, bundle: &str) -> InjectionTargets {
    let run = env.run.clone();
    let mut cm: ConfigMap = serde_json::from_value(json!({})).unwrap();
    cm.metadata = env.meta("cm");
    cm.metadata.annotations =
        Some(BTreeMap::from([("service.beta.openshift.io/inject-cabundle".into(), "true".into())]));
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    let mut legacy: ConfigMap = serde_json::from_value(json!({})).unwrap();
    legacy.metadata = env.meta("openshift-service-ca.crt");
    legacy.metadata.annotations =
        Some(BTreeMap::from([("service.alpha.openshift.io/inject-vulnerable-legacy-cabundle".into(), "true".into())]));
    env.configmaps().create(&PostParams::default(), &legacy).await.unwrap();
    let mut odd: ConfigMap = serde_json::from_value(json!({})).unwrap();
    odd.metadata = env.meta("odd");
    odd.metadata.annotations =
        Some(BTreeMap::from([("service.beta.openshift.io/inject-cabundle".into(), "yes".into())]));
    env.configmaps().create(&PostParams::default(), &odd).await.unwrap();
    let with_annotation = |crd: Value| -> Value {
        let mut crd = crd;
        crd["metadata"]["annotations"] = json!({ "service.beta.openshift.io/inject-cabundle": "true" });
        crd
    };
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds
        .create(&PostParams::default(), &serde_json::from_value(with_annotation(crd_json(&run))).unwrap())
        .await
        .unwrap();
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    let mwc = mwcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(with_annotation(webhook_json("MutatingWebhookConfiguration", &run, &["a"])))
                .unwrap(),
        )
        .await
        .unwrap();
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let vwc = vwcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(with_annotation(webhook_json("ValidatingWebhookConfiguration", &run, &["a"])))
                .unwrap(),
        )
        .await
        .unwrap();
    let apis: Api<APIService> = Api::all(env.client.clone());
    let api_service = apis
        .create(&PostParams::default(), &serde_json::from_value(with_annotation(apiservice_json(&run))).unwrap())
        .await
        .unwrap();
    eventually(T, "APIService injected", || async {
        apis.get(&api_service.name_any())
            .await
            .unwrap()
            .spec?
            .ca_bundle
            .filter(|b| b.0 == bundle.as_bytes())
            .map(|_| ())
    })
    .await;
    apis.delete(&api_service.name_any(), &DeleteParams::default()).await.unwrap();
    for name in ["cm", "openshift-service-ca.crt"] {
        eventually(T, "ConfigMap injected", || async {
            env.configmaps().get(name).await.unwrap().data?.get("service-ca.crt").map(|_| ())
        })
        .await;
    }
    eventually(T, "CRD injected", || async {
        crds.get(&crd.name_any()).await.unwrap().spec.conversion?.webhook?.client_config?.ca_bundle.map(|_| ())
    })
    .await;
    for poke in 0..2 {
        // The same warning twice: the second time the Event is patched.
        let patch = json!({ "metadata": { "labels": { "poke": poke.to_string() } } });
        env.configmaps().patch("odd", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    InjectionTargets { crd: crd.name_any(), mwc: mwc.name_any(), vwc: vwc.name_any() }
}

/// RBAC phase 5b: a PodCertificateRequest for the default signer is issued (the API
/// server checks `sign` on the signer for the status update, and `attest` for the
/// ClusterTrustBundle the operator created before).
async fn rbac_pod_certificates(env: &Env) -> crate::support::pods::Kubelet {
    let kubelet = crate::support::pods::Kubelet::new(env, POD_SIGNER).await;
    kubelet.service("pods", "pods", false).await;
    let pod = kubelet.pod("pod", "pods", None).await;
    let (_, stub) = crate::support::pods::key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    kubelet.request("pod", POD_SIGNER, &pod, stub, None).await;
    let chain = kubelet.issued("pod").await;
    let bundle = crate::support::pods::trust_bundle(env, POD_SIGNER, NS).await;
    let name = format!("pods.{}.svc", env.ns);
    support::tls::rustls_verify_at(&chain, &bundle, &name, std::time::SystemTime::now()).unwrap();
    kubelet
}

/// RBAC phase 6: CA lifecycle: a forced rotation (update) and a hard reset (create),
/// until the serving Secret is re-issued.
async fn rbac_ca_lifecycle(env: &Env) {
    let ns_cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), NS);
    let ns_secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "rbac" } } });
    ns_secrets.patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually(T, "the forced rotation", || async {
        let s = ns_secrets.get("signing-key").await.unwrap();
        s.data?.contains_key("ca-bundle.crt").then_some(())
    })
    .await;
    ns_secrets.delete("signing-key", &DeleteParams::default()).await.unwrap();
    eventually(T, "the CA re-created", || async {
        let s = ns_secrets.get_opt("signing-key").await.unwrap()?;
        (!s.data?.contains_key("ca-bundle.crt")).then_some(())
    })
    .await;
    eventually(T, "the serving Secret re-issued", || async {
        let b = ns_cms.get("signing-cabundle").await.unwrap().data?.remove("ca-bundle.crt")?;
        // Frozen in phase 4, it is deleted and created again: absent for a moment.
        let s = env.secrets().get_opt("web-tls").await.unwrap()?;
        let chain = support::data(&s, "tls.crt");
        support::tls::rustls_verify_at(&chain, &b, &format!("web.{}.svc", env.ns), std::time::SystemTime::now()).ok()
    })
    .await;
}

/// RBAC phase 7: the cluster-scoped injection targets go (after a second for the
/// operator to finish with them).
async fn rbac_delete_injection_targets(env: &Env, targets: InjectionTargets) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    crds.delete(&targets.crd, &DeleteParams::default()).await.unwrap();
    mwcs.delete(&targets.mwc, &DeleteParams::default()).await.unwrap();
    vwcs.delete(&targets.vwc, &DeleteParams::default()).await.unwrap();
}

/// RBAC phase 8: compare with the audit log (from `audit_start` on): nothing denied,
/// every grant used, nothing used that is not granted.
fn rbac_compare_with_the_audit_log(audit_start: usize) {
    let (mut used, denied) = used_by_operator(audit_start);
    // `sign` and `attest` on signers are checked inside the API server (no request of
    // their own in the audit log); phase 5b proved both by succeeding.
    used.extend([
        ("certificates.k8s.io".to_string(), "signers".to_string(), "sign".to_string()),
        ("certificates.k8s.io".to_string(), "signers".to_string(), "attest".to_string()),
    ]);
    // Every cache starts with a streaming list (a watch) and lists only after an
    // interruption (an API server restart, an expired resourceVersion: the outage and
    // relist tests in faults.rs go through it), so `list` goes with `watch`.
    let watched: Vec<Grant> = used.iter().filter(|(_, _, v)| v == "watch").cloned().collect();
    used.extend(watched.into_iter().map(|(g, r, _)| (g, r, "list".to_string())));
    assert!(denied.is_empty(), "requests denied to the operator: {denied:?}");
    let (cluster, namespaced) = granted();
    let all: BTreeSet<Grant> = cluster.union(&namespaced).cloned().collect();
    let unused: Vec<&Grant> = all.iter().filter(|g| !used.contains(*g)).collect();
    let ungranted: Vec<&Grant> = used.iter().filter(|u| !all.contains(*u)).collect();
    println!("operator requests by (group, resource, verb): {used:?}");
    assert!(ungranted.is_empty(), "used but not granted (would fail in a cluster): {ungranted:?}");
    assert!(unused.is_empty(), "granted but never used by the code (remove from the manifests): {unused:?}");
}
