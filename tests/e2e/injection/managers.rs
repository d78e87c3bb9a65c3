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

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::support::annotations::INJECT;
use crate::support::objects::{crd_json, webhook_json, with_inject_annotation};
use crate::support::steps::metric_with;
use crate::support::{Cleanup, Env, RUN_LABEL, T, eventually};

const OURS: &str = "service-ca-operator";

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

/// What gitops server-side-applies in the first test: a validating and a mutating
/// webhook configuration and a CRD, by name, with their APIs.
struct GitopsObjects {
    vwcs: Api<ValidatingWebhookConfiguration>,
    mwcs: Api<MutatingWebhookConfiguration>,
    crds: Api<CustomResourceDefinition>,
    vwc_name: String,
    mwc_name: String,
    crd_name: String,
    run: String,
    gitops: PatchParams,
}

impl GitopsObjects {
    /// gitops applies two webhook configurations of two entries each and a CRD with a
    /// conversion webhook, all asking for the bundle.
    async fn apply(env: &Env, cleanup: &mut Cleanup) -> GitopsObjects {
        let run = env.run.clone();
        let vwc = with_inject_annotation(webhook_json("ValidatingWebhookConfiguration", &run, &["a", "b"]));
        let mwc = with_inject_annotation(webhook_json("MutatingWebhookConfiguration", &run, &["a", "b"]));
        let crd = with_inject_annotation(self::crd(&run));
        let objects = GitopsObjects {
            vwcs: Api::all(env.client.clone()),
            mwcs: Api::all(env.client.clone()),
            crds: Api::all(env.client.clone()),
            vwc_name: vwc["metadata"]["name"].as_str().unwrap().to_string(),
            mwc_name: mwc["metadata"]["name"].as_str().unwrap().to_string(),
            crd_name: crd["metadata"]["name"].as_str().unwrap().to_string(),
            run,
            gitops: PatchParams::apply("gitops"),
        };
        cleanup.add::<ValidatingWebhookConfiguration>(objects.vwc_name.clone());
        cleanup.add::<MutatingWebhookConfiguration>(objects.mwc_name.clone());
        cleanup.add::<CustomResourceDefinition>(objects.crd_name.clone());
        objects.vwcs.patch(&objects.vwc_name, &objects.gitops, &Patch::Apply(&vwc)).await.unwrap();
        objects.mwcs.patch(&objects.mwc_name, &objects.gitops, &Patch::Apply(&mwc)).await.unwrap();
        objects.crds.patch(&objects.crd_name, &objects.gitops, &Patch::Apply(&crd)).await.unwrap();
        objects
    }

    /// Waits until the operator injected every entry and the conversion webhook; returns
    /// the injected CRD.
    async fn injected(&self, bundle: &str) -> CustomResourceDefinition {
        eventually(T, "both webhook configurations injected", || async {
            let v = vwc_entries(&self.vwcs.get(&self.vwc_name).await.unwrap());
            let m = mwc_entries(&self.mwcs.get(&self.mwc_name).await.unwrap());
            (all_hold(&v, bundle) && all_hold(&m, bundle)).then_some(())
        })
        .await;
        eventually(T, "the CRD injected", || async {
            let c = self.crds.get(&self.crd_name).await.unwrap();
            (crd_bundle(&c).as_deref() == Some(bundle)).then_some(c)
        })
        .await
    }

    /// gitops re-applies: one webhook fewer in each configuration, and the CRD without
    /// its conversion webhook. Returns the applies that failed, with the API's message.
    async fn remove_an_entry_each_and_the_conversion(&self) -> Vec<(&'static str, Option<String>)> {
        let vwc = with_inject_annotation(webhook_json("ValidatingWebhookConfiguration", &self.run, &["a"]));
        let mwc = with_inject_annotation(webhook_json("MutatingWebhookConfiguration", &self.run, &["a"]));
        let crd = with_inject_annotation(without_conversion_webhook(self::crd(&self.run)));
        let refused = |result: Result<(), kube::Error>| result.err().map(|e| api_message(&e));
        let applies = [
            (
                "remove webhook b of the ValidatingWebhookConfiguration",
                refused(self.vwcs.patch(&self.vwc_name, &self.gitops, &Patch::Apply(&vwc)).await.map(drop)),
            ),
            (
                "remove webhook b of the MutatingWebhookConfiguration",
                refused(self.mwcs.patch(&self.mwc_name, &self.gitops, &Patch::Apply(&mwc)).await.map(drop)),
            ),
            (
                "switch the CRD's conversion to None",
                refused(self.crds.patch(&self.crd_name, &self.gitops, &Patch::Apply(&crd)).await.map(drop)),
            ),
        ];
        applies.into_iter().filter(|(_, error)| error.is_some()).collect()
    }

    /// The removed parts are gone, the remaining entries keep their bundle, and the
    /// operator puts nothing back (the CRD changed since it was `injected`).
    async fn assert_removed_parts_stay_gone(&self, bundle: &str, injected: &CustomResourceDefinition) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let v = vwc_entries(&self.vwcs.get(&self.vwc_name).await.unwrap());
        let m = mwc_entries(&self.mwcs.get(&self.mwc_name).await.unwrap());
        assert_eq!(names(&v), ["a"], "{v:?}");
        assert_eq!(names(&m), ["a"], "{m:?}");
        assert!(all_hold(&v, bundle) && all_hold(&m, bundle), "the remaining entries keep the bundle");
        let c = self.crds.get(&self.crd_name).await.unwrap();
        let conversion = c.spec.conversion.clone().unwrap();
        assert_eq!(conversion.strategy, "None");
        assert!(conversion.webhook.is_none(), "{:?}", conversion.webhook);
        assert!(ours(c.managed_fields()).is_empty(), "{:?}", c.managed_fields());
        assert_ne!(c.resource_version(), injected.resource_version());
    }
}

/// Our webhook writes are patches (Update), naming only the bundle.
fn assert_our_writes_are_bundle_patches(v: &ValidatingWebhookConfiguration) {
    for (operation, fields) in ours(v.managed_fields()) {
        assert_eq!(operation, "Update", "{fields}");
        assert!(
            fields.contains("caBundle") && !fields.contains("rules") && !fields.contains("sideEffects"),
            "{fields}"
        );
    }
}

#[tokio::test]
async fn gitops_server_side_apply_removes_an_injected_webhook_and_switches_a_crd_to_no_conversion() {
    let env = Env::new("gitops-ssa").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let mut cleanup = Cleanup::default();
    let objects = GitopsObjects::apply(&env, &mut cleanup).await;
    let injected = objects.injected(&bundle).await;
    // (The operator drops its managedFields entry of the CRD right after injecting.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = objects.crds.get(&objects.crd_name).await.unwrap();
    println!("our managedFields entries on the injected CRD: {:?}", ours(c.managed_fields()));
    // gitops removes an entry of each webhook configuration and the CRD's conversion
    // webhook: every apply succeeds.
    let failed = objects.remove_an_entry_each_and_the_conversion().await;
    assert!(failed.is_empty(), "gitops could not: {failed:#?}");
    assert_our_writes_are_bundle_patches(&objects.vwcs.get(&objects.vwc_name).await.unwrap());
    objects.assert_removed_parts_stay_gone(&bundle, &injected).await;
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
    let vwc = with_inject_annotation(webhook_json("ValidatingWebhookConfiguration", &run, &["a", "b"]));
    let crd = with_inject_annotation(self::crd(&run));
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

    let vwc = with_inject_annotation(webhook_json("ValidatingWebhookConfiguration", &run, &["a"]));
    let crd = with_inject_annotation(without_conversion_webhook(self::crd(&run)));
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
    let annotate = json!({ "metadata": { "annotations": { INJECT: "true" } } });
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

#[tokio::test]
async fn the_operators_own_signing_cabundle_is_never_an_injection_target() {
    let env = Env::new("gitops-own").await;
    let op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    // Someone annotates the operator's own ConfigMap (and labels it for this test's
    // operator, whose selector would otherwise hide it).
    let patch = json!({ "metadata": { "labels": { RUN_LABEL: env.run }, "annotations": { INJECT: "true" } } });
    env.op_configmaps().patch("signing-cabundle", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // For five seconds: no ConfigMap patch by the operator, and ca-bundle.crt intact in
    // every read.
    let patches =
        |text: &str| metric_with(text, "service_ca_api_writes_total", &[("resource", "configmaps"), ("verb", "patch")]);
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
