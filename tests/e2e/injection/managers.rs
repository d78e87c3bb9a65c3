//! Injection next to other managers and next to the operator's own objects,
//! end to end on the real API server:
//!
//! - a GitOps tool that server-side-applies webhook configurations and CRDs (field
//!   manager `gitops`, as Flux or Argo CD do) can still remove a webhook entry or a
//!   CRD's conversion webhook after the operator injected the bundle; so can a plain
//!   client-side `kubectl apply`. A server-side apply of the bundle (what the operator
//!   did before) blocks it: that is shown too, and the operator clears such a
//!   leftover.
//! - the operator's own `signing-cabundle` is never an injection target.
//! - a legacy ConfigMap whose namespace has no `kube-root-ca.crt` costs one Warning
//!   and a few retries with backoff, not a loop.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::cluster::{crd_json, webhook_json};
use crate::support::{Cleanup, Env, RUN_LABEL, eventually};

const BETA: &str = "service.beta.openshift.io/inject-cabundle";
const LEGACY: &str = "service.alpha.openshift.io/inject-vulnerable-legacy-cabundle";
const OURS: &str = "service-ca-operator";
const T: Duration = Duration::from_secs(30);

fn annotated(mut obj: Value) -> Value {
    obj["metadata"]["annotations"] = json!({ BETA: "true" });
    obj
}

/// The CRD of `crd_json`, as a complete apply configuration.
fn crd(run: &str) -> Value {
    let mut crd = crd_json(run);
    crd["apiVersion"] = json!("apiextensions.k8s.io/v1");
    crd["kind"] = json!("CustomResourceDefinition");
    crd
}

fn without_conversion_webhook(mut crd: Value) -> Value {
    crd["spec"]["conversion"] = json!({ "strategy": "None" });
    crd
}

fn text(bytes: &Option<k8s_openapi::ByteString>) -> Option<String> {
    bytes.as_ref().map(|b| String::from_utf8_lossy(&b.0).to_string())
}

/// (name, injected bundle) of every webhook entry.
fn vwc_entries(v: &ValidatingWebhookConfiguration) -> Vec<(String, Option<String>)> {
    v.webhooks.iter().flatten().map(|w| (w.name.clone(), text(&w.client_config.ca_bundle))).collect()
}

fn mwc_entries(m: &MutatingWebhookConfiguration) -> Vec<(String, Option<String>)> {
    m.webhooks.iter().flatten().map(|w| (w.name.clone(), text(&w.client_config.ca_bundle))).collect()
}

fn crd_bundle(c: &CustomResourceDefinition) -> Option<String> {
    let webhook = c.spec.conversion.as_ref()?.webhook.as_ref()?;
    text(&webhook.client_config.as_ref()?.ca_bundle)
}

/// Our managedFields entries (main resource), as (operation, fields).
fn ours(managed: &[ManagedFieldsEntry]) -> Vec<(String, String)> {
    managed
        .iter()
        .filter(|m| m.manager.as_deref() == Some(OURS))
        .map(|m| {
            let fields = serde_json::to_string(&m.fields_v1).unwrap();
            (m.operation.clone().unwrap_or_default(), fields)
        })
        .collect()
}

fn all_hold(entries: &[(String, Option<String>)], bundle: &str) -> bool {
    !entries.is_empty() && entries.iter().all(|(_, b)| b.as_deref() == Some(bundle))
}

fn names(entries: &[(String, Option<String>)]) -> Vec<String> {
    entries.iter().map(|(n, _)| n.split('.').next().unwrap().to_string()).collect()
}

#[tokio::test]
async fn gitops_server_side_apply_removes_an_injected_webhook_and_switches_a_crd_to_no_conversion() {
    let env = Env::new("gitops-ssa").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let run = env.run.clone();
    let mut cleanup = Cleanup::default();
    let gitops = PatchParams::apply("gitops");
    let (vwcs, mwcs, crds) = (
        Api::<ValidatingWebhookConfiguration>::all(env.client.clone()),
        Api::<MutatingWebhookConfiguration>::all(env.client.clone()),
        Api::<CustomResourceDefinition>::all(env.client.clone()),
    );

    // gitops applies two webhook configurations of two entries each and a CRD with a
    // conversion webhook, all asking for the bundle.
    let vwc = annotated(webhook_json("ValidatingWebhookConfiguration", &run, &["a", "b"]));
    let mwc = annotated(webhook_json("MutatingWebhookConfiguration", &run, &["a", "b"]));
    let crd = annotated(crd(&run));
    let (vwc_name, mwc_name, crd_name) = (
        vwc["metadata"]["name"].as_str().unwrap().to_string(),
        mwc["metadata"]["name"].as_str().unwrap().to_string(),
        crd["metadata"]["name"].as_str().unwrap().to_string(),
    );
    cleanup.add::<ValidatingWebhookConfiguration>(vwc_name.clone());
    cleanup.add::<MutatingWebhookConfiguration>(mwc_name.clone());
    cleanup.add::<CustomResourceDefinition>(crd_name.clone());
    vwcs.patch(&vwc_name, &gitops, &Patch::Apply(&vwc)).await.unwrap();
    mwcs.patch(&mwc_name, &gitops, &Patch::Apply(&mwc)).await.unwrap();
    crds.patch(&crd_name, &gitops, &Patch::Apply(&crd)).await.unwrap();

    // The operator injects every entry and the conversion webhook.
    eventually(T, "both webhook configurations injected", || async {
        let v = vwc_entries(&vwcs.get(&vwc_name).await.unwrap());
        let m = mwc_entries(&mwcs.get(&mwc_name).await.unwrap());
        (all_hold(&v, &bundle) && all_hold(&m, &bundle)).then_some(())
    })
    .await;
    let injected = eventually(T, "the CRD injected", || async {
        let c = crds.get(&crd_name).await.unwrap();
        (crd_bundle(&c).as_deref() == Some(bundle.as_str())).then_some(c)
    })
    .await;
    // (The operator drops its managedFields entry of the CRD right after injecting.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = crds.get(&crd_name).await.unwrap();
    println!("our managedFields entries on the injected CRD: {:?}", ours(c.managed_fields()));
    // gitops re-applies: one webhook fewer in each configuration, and the CRD without
    // its conversion webhook. Every apply succeeds.
    let vwc = annotated(webhook_json("ValidatingWebhookConfiguration", &run, &["a"]));
    let mwc = annotated(webhook_json("MutatingWebhookConfiguration", &run, &["a"]));
    let crd = annotated(without_conversion_webhook(crate::gitops::crd(&run)));
    let refused = |result: Result<(), kube::Error>| result.err().map(|e| api_message(&e));
    let applies = [
        (
            "remove webhook b of the ValidatingWebhookConfiguration",
            refused(vwcs.patch(&vwc_name, &gitops, &Patch::Apply(&vwc)).await.map(drop)),
        ),
        (
            "remove webhook b of the MutatingWebhookConfiguration",
            refused(mwcs.patch(&mwc_name, &gitops, &Patch::Apply(&mwc)).await.map(drop)),
        ),
        (
            "switch the CRD's conversion to None",
            refused(crds.patch(&crd_name, &gitops, &Patch::Apply(&crd)).await.map(drop)),
        ),
    ];
    let failed: Vec<_> = applies.iter().filter(|(_, error)| error.is_some()).collect();
    assert!(failed.is_empty(), "gitops could not: {failed:#?}");

    // Our webhook writes are patches (Update), naming only the bundle.
    let v = vwcs.get(&vwc_name).await.unwrap();
    for (operation, fields) in ours(v.managed_fields()) {
        assert_eq!(operation, "Update", "{fields}");
        assert!(
            fields.contains("caBundle") && !fields.contains("rules") && !fields.contains("sideEffects"),
            "{fields}"
        );
    }

    // The removed parts are gone, the remaining entries keep their bundle, and the
    // operator puts nothing back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = vwc_entries(&vwcs.get(&vwc_name).await.unwrap());
    let m = mwc_entries(&mwcs.get(&mwc_name).await.unwrap());
    assert_eq!(names(&v), ["a"], "{v:?}");
    assert_eq!(names(&m), ["a"], "{m:?}");
    assert!(all_hold(&v, &bundle) && all_hold(&m, &bundle), "the remaining entries keep the bundle");
    let c = crds.get(&crd_name).await.unwrap();
    let conversion = c.spec.conversion.clone().unwrap();
    assert_eq!(conversion.strategy, "None");
    assert!(conversion.webhook.is_none(), "{:?}", conversion.webhook);
    assert!(ours(c.managed_fields()).is_empty(), "{:?}", c.managed_fields());
    assert_ne!(c.resource_version(), injected.resource_version());
}

fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} {}", status.code, status.message),
        other => other.to_string(),
    }
}

/// `kubectl apply` (client-side, with the last-applied annotation) of `objects`.
fn kubectl_apply(env: &Env, file: &str, objects: &[Value]) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gitops-{}", env.run));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(file);
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["apply", "-f"])
        .arg(&path)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl apply -f {file}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn kubectl_client_side_apply_removes_an_injected_webhook_and_switches_a_crd_to_no_conversion() {
    let env = Env::new("gitops-kubectl").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let run = env.run.clone();
    let mut cleanup = Cleanup::default();
    let vwcs = Api::<ValidatingWebhookConfiguration>::all(env.client.clone());
    let crds = Api::<CustomResourceDefinition>::all(env.client.clone());
    let vwc = annotated(webhook_json("ValidatingWebhookConfiguration", &run, &["a", "b"]));
    let crd = annotated(crd(&run));
    let (vwc_name, crd_name) =
        (vwc["metadata"]["name"].as_str().unwrap().to_string(), crd["metadata"]["name"].as_str().unwrap().to_string());
    cleanup.add::<ValidatingWebhookConfiguration>(vwc_name.clone());
    cleanup.add::<CustomResourceDefinition>(crd_name.clone());
    kubectl_apply(&env, "v1.json", &[vwc, crd]);
    eventually(T, "the webhook configuration and the CRD injected", || async {
        let v = vwc_entries(&vwcs.get(&vwc_name).await.unwrap());
        let c = crds.get(&crd_name).await.unwrap();
        (all_hold(&v, &bundle) && crd_bundle(&c).as_deref() == Some(bundle.as_str())).then_some(())
    })
    .await;

    let vwc = annotated(webhook_json("ValidatingWebhookConfiguration", &run, &["a"]));
    let crd = annotated(without_conversion_webhook(crate::gitops::crd(&run)));
    kubectl_apply(&env, "v2.json", &[vwc, crd]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = vwc_entries(&vwcs.get(&vwc_name).await.unwrap());
    assert_eq!(names(&v), ["a"], "{v:?}");
    assert!(all_hold(&v, &bundle), "the remaining entry keeps the bundle: {v:?}");
    let conversion = crds.get(&crd_name).await.unwrap().spec.conversion.unwrap();
    assert_eq!(conversion.strategy, "None");
    assert!(conversion.webhook.is_none(), "{:?}", conversion.webhook);
}

#[tokio::test]
async fn a_server_side_apply_of_the_bundle_would_block_gitops_and_the_operator_drops_such_an_entry() {
    // What the operator once did, done here by hand under its field
    // manager: a forced server-side apply of each entry's caBundle. gitops can then no
    // longer remove an entry. The operator, once it sees the object, drops that entry
    // of its managedFields, and the same apply by gitops succeeds.
    let env = Env::new("gitops-old").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let run = env.run.clone();
    let mut cleanup = Cleanup::default();
    let vwcs = Api::<ValidatingWebhookConfiguration>::all(env.client.clone());
    let gitops = PatchParams::apply("gitops");
    // Not annotated yet: the operator leaves it alone for now.
    let vwc = webhook_json("ValidatingWebhookConfiguration", &run, &["a", "b"]);
    let name = vwc["metadata"]["name"].as_str().unwrap().to_string();
    cleanup.add::<ValidatingWebhookConfiguration>(name.clone());
    vwcs.patch(&name, &gitops, &Patch::Apply(&vwc)).await.unwrap();
    let encoded = serde_json::to_value(k8s_openapi::ByteString(bundle.as_bytes().to_vec())).unwrap();
    let entries: Vec<Value> = ["a", "b"]
        .iter()
        .map(|n| json!({ "name": format!("{n}.{run}.example.com"), "clientConfig": { "caBundle": encoded } }))
        .collect();
    let old_way = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": { "name": name }, "webhooks": entries
    });
    vwcs.patch(&name, &PatchParams::apply(OURS).force(), &Patch::Apply(&old_way)).await.unwrap();

    let one_fewer = webhook_json("ValidatingWebhookConfiguration", &run, &["a"]);
    let blocked = vwcs.patch(&name, &gitops, &Patch::Apply(&one_fewer)).await;
    let left = vwc_entries(&vwcs.get(&name).await.unwrap());
    println!("gitops apply after a server-side apply of the bundle: {:?}", blocked.as_ref().map(|_| ()));
    assert!(
        blocked.is_err() || names(&left) == ["a", "b"],
        "a server-side-applied caBundle blocks the removal of its entry: {blocked:?} {left:?}"
    );

    // Annotated: the operator sees the object, finds the bundle in place, and drops
    // its server-side-apply entry.
    let annotate = json!({ "metadata": { "annotations": { BETA: "true" } } });
    vwcs.patch(&name, &PatchParams::default(), &Patch::Merge(&annotate)).await.unwrap();
    eventually(T, "the operator to drop its server-side-apply entry", || async {
        let v = vwcs.get(&name).await.unwrap();
        ours(v.managed_fields()).iter().all(|(operation, _)| operation != "Apply").then_some(())
    })
    .await;
    let applied = vwcs.patch(&name, &gitops, &Patch::Apply(&one_fewer)).await;
    assert!(applied.is_ok(), "{applied:?}");
    let v = vwc_entries(&vwcs.get(&name).await.unwrap());
    assert_eq!(names(&v), ["a"], "{v:?}");
    assert!(all_hold(&v, &bundle), "{v:?}");
}

/// The sum of the samples of metric `name` whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_operators_own_signing_cabundle_is_never_an_injection_target() {
    let env = Env::new("gitops-own").await;
    let op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    // Someone annotates the operator's own ConfigMap (and labels it for this test's
    // operator, whose selector would otherwise hide it).
    let patch = json!({ "metadata": { "labels": { RUN_LABEL: env.run }, "annotations": { BETA: "true" } } });
    env.op_configmaps().patch("signing-cabundle", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // For five seconds: no ConfigMap patch by the operator, and ca-bundle.crt intact in
    // every read.
    let patches =
        |text: &str| metric(text, "service_ca_api_writes_total", &[("resource", "configmaps"), ("verb", "patch")]);
    let before = patches(&op.metrics_page().await);
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let cm = env.op_configmaps().get("signing-cabundle").await.unwrap();
        let data = cm.data.unwrap_or_default();
        assert_eq!(data.get("ca-bundle.crt"), Some(&bundle), "read {reads}: {:?}", data.keys().collect::<Vec<_>>());
        assert!(!data.contains_key("service-ca.crt"));
        reads += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = patches(&op.metrics_page().await);
    assert_eq!((before, after), (0.0, 0.0), "ConfigMap patches by the operator");
    let warning = env.the_one_warning(&env.op_ns, "signing-cabundle").await;
    println!("{:?}: {:?}", warning.reason, warning.note);
    assert!(warning.note.as_deref().unwrap_or_default().contains("never an injection target"), "{warning:?}");
    println!("{reads} reads, all intact");
}

#[tokio::test]
async fn a_legacy_configmap_without_a_root_ca_backs_off_with_one_warning() {
    let env = Env::new("gitops-noroot").await;
    let mut cleanup = Cleanup::default();
    // kube-controller-manager re-creates kube-root-ca.crt within milliseconds of its
    // deletion: an admission policy (in-process CEL, no webhook) refuses that create in
    // this test's namespace only.
    let policy_name = format!("no-root-ca-{}", env.run);
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": { "name": policy_name },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": { "resourceRules": [{ "apiGroups": [""], "apiVersions": ["v1"],
                                                     "operations": ["CREATE"], "resources": ["configmaps"] }] },
            "validations": [{ "expression": "object.metadata.name != 'kube-root-ca.crt'",
                              "message": "this test's namespace has no root CA" }]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": { "name": policy_name },
        "spec": { "policyName": policy_name, "validationActions": ["Deny"],
                  "matchResources": { "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": env.ns } } } }
    }))
    .unwrap();
    Api::<ValidatingAdmissionPolicy>::all(env.client.clone()).create(&PostParams::default(), &policy).await.unwrap();
    cleanup.add::<ValidatingAdmissionPolicy>(policy_name.clone());
    Api::<ValidatingAdmissionPolicyBinding>::all(env.client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    cleanup.add::<ValidatingAdmissionPolicyBinding>(policy_name.clone());
    let cms = env.configmaps();
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    let probe: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "kube-root-ca.crt" } })).unwrap();
    eventually(T, "the admission policy to be in force", || async {
        match cms.create(&dry_run, &probe).await {
            Err(kube::Error::Api(s)) if s.message.contains("no root CA") => Some(()),
            _ => None,
        }
    })
    .await;
    eventually(T, "kube-root-ca.crt gone", || async {
        let _ = cms.delete("kube-root-ca.crt", &DeleteParams::default()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cms.get_opt("kube-root-ca.crt").await.unwrap().is_none().then_some(())
    })
    .await;

    let mut legacy = ConfigMap { metadata: env.meta("openshift-service-ca.crt"), ..Default::default() };
    legacy.metadata.annotations = Some([(LEGACY.to_string(), "true".to_string())].into());
    let legacy = cms.create(&PostParams::default(), &legacy).await.unwrap();
    let op = env.start_operator(&[]);
    env.ca_bundle().await;
    let errors = |text: &str| metric(text, "service_ca_reconcile_errors_total", &[("controller", "ca-bundle")]);
    eventually(T, "a failed injection", || async { (errors(&op.metrics_page().await) > 0.0).then_some(()) }).await;

    // 20 seconds: retries 2 s, 4 s, 8 s … apart, so at most 5 failed attempts.
    let before = errors(&op.metrics_page().await);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after = errors(&op.metrics_page().await);
    println!("failed injection attempts in 20 s: {}", after - before);
    assert!(after - before <= 5.0, "{before} → {after} errors in 20 s");
    let warning = env.the_one_warning(&env.ns, "openshift-service-ca.crt").await;
    println!("{:?}: {:?}", warning.reason, warning.note);
    assert!(warning.note.as_deref().unwrap_or_default().contains("kube-root-ca.crt"), "{warning:?}");
    assert_eq!(cms.get("openshift-service-ca.crt").await.unwrap().resource_version(), legacy.resource_version());
}

#[tokio::test]
async fn a_write_the_api_server_cannot_take_backs_off_with_one_warning() {
    // 2,000 webhook entries: the configuration itself is small enough to store, but a
    // bundle in every entry is not (the patch is over the API server's request limit,
    // the object over etcd's). The operator must not come back every few seconds with
    // the same large patch.
    let env = Env::new("gitops-large").await;
    let op = env.start_operator(&[]);
    env.ca_bundle().await;
    let run = env.run.clone();
    let mut cleanup = Cleanup::default();
    let names: Vec<String> = (0..2000).map(|i| format!("w{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut vwc = annotated(webhook_json("ValidatingWebhookConfiguration", &run, &names));
    for webhook in vwc["webhooks"].as_array_mut().unwrap() {
        webhook.as_object_mut().unwrap().remove("rules");
        webhook["objectSelector"] = json!({ "matchLabels": { "nothing": "matches" } });
    }
    let name = vwc["metadata"]["name"].as_str().unwrap().to_string();
    cleanup.add::<ValidatingWebhookConfiguration>(name.clone());
    let vwcs = Api::<ValidatingWebhookConfiguration>::all(env.client.clone());
    let created = vwcs.create(&PostParams::default(), &serde_json::from_value(vwc).unwrap()).await.unwrap();

    let errors = |text: &str| metric(text, "service_ca_reconcile_errors_total", &[("controller", "ca-bundle")]);
    let writes = |text: &str| {
        metric(
            text,
            "service_ca_api_writes_total",
            &[("resource", "validatingwebhookconfigurations"), ("verb", "patch")],
        )
    };
    eventually(T, "a failed injection", || async { (errors(&op.metrics_page().await) > 0.0).then_some(()) }).await;
    let text = op.metrics_page().await;
    let (errors_before, writes_before) = (errors(&text), writes(&text));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let text = op.metrics_page().await;
    let (errors_after, writes_after) = (errors(&text), writes(&text));
    println!("in 20 s: {} failed attempts, {} patches", errors_after - errors_before, writes_after - writes_before);
    assert!(errors_after - errors_before <= 5.0, "{errors_before} → {errors_after} errors in 20 s");
    assert!(writes_after - writes_before <= 5.0, "{writes_before} → {writes_after} patches in 20 s");
    let warning = env.the_one_warning("default", &name).await;
    println!("{:?}: {:?}", warning.reason, warning.note);
    assert!(warning.note.as_deref().unwrap_or_default().contains("could not inject"), "{warning:?}");
    let now = vwcs.get(&name).await.unwrap();
    assert_eq!(now.resource_version(), created.resource_version(), "nothing was written");
}
