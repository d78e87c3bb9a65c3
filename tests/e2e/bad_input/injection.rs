//! Bad injection input and injection targets the API server refuses (docs/spec.md §2):
//! reported, backed off, nothing else changes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::annotations::{INJECT, INJECT_LEGACY};
use crate::support::objects::{apiservice_json, crd_json, webhook_json, with_inject_annotation};
use crate::support::steps::metric_with;
use crate::support::{Cleanup, Env, T, eventually};

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
    env.warning_containing(&env.ns, "yes", "only \"true\"").await;
    let note = env.warning_containing(&env.ns, "huge", "could not inject").await;
    assert!(note.contains("Too long") || note.contains("too long") || note.contains("must have at most"), "{note}");
    let note = env.warning_containing("default", &api_service.name_any(), "could not inject").await;
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
    legacy.metadata.annotations = Some([(INJECT_LEGACY.to_string(), "true".to_string())].into());
    let legacy = cms.create(&PostParams::default(), &legacy).await.unwrap();
    let op = env.start_operator(&[]);
    env.ca_bundle().await;
    let errors = |text: &str| metric_with(text, "service_ca_reconcile_errors_total", &[("controller", "ca-bundle")]);
    eventually(T, "a failed injection", || async { (errors(&op.metrics_page().await) > 0.0).then_some(()) }).await;

    // 12 seconds: retries 2 s, 4 s, 8 s … apart, so at most 3 failed attempts (a retry
    // every 3 s or sooner makes 4).
    let before = errors(&op.metrics_page().await);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = errors(&op.metrics_page().await);
    println!("failed injection attempts in 12 s: {}", after - before);
    assert!(after - before <= 3.0, "{before} → {after} errors in 12 s");
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
    let mut vwc = with_inject_annotation(webhook_json("ValidatingWebhookConfiguration", &run, &names));
    for webhook in vwc["webhooks"].as_array_mut().unwrap() {
        webhook.as_object_mut().unwrap().remove("rules");
        webhook["objectSelector"] = json!({ "matchLabels": { "nothing": "matches" } });
    }
    let name = vwc["metadata"]["name"].as_str().unwrap().to_string();
    cleanup.add::<ValidatingWebhookConfiguration>(name.clone());
    let vwcs = Api::<ValidatingWebhookConfiguration>::all(env.client.clone());
    let created = vwcs.create(&PostParams::default(), &serde_json::from_value(vwc).unwrap()).await.unwrap();

    let errors = |text: &str| metric_with(text, "service_ca_reconcile_errors_total", &[("controller", "ca-bundle")]);
    let writes = |text: &str| {
        metric_with(
            text,
            "service_ca_api_writes_total",
            &[("resource", "validatingwebhookconfigurations"), ("verb", "patch")],
        )
    };
    eventually(T, "a failed injection", || async { (errors(&op.metrics_page().await) > 0.0).then_some(()) }).await;
    let text = op.metrics_page().await;
    let (errors_before, writes_before) = (errors(&text), writes(&text));
    // 12 seconds: retries 2 s, 4 s, 8 s … apart, so at most 3 (a retry every 3 s or
    // sooner makes 4).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let text = op.metrics_page().await;
    let (errors_after, writes_after) = (errors(&text), writes(&text));
    println!("in 12 s: {} failed attempts, {} patches", errors_after - errors_before, writes_after - writes_before);
    assert!(errors_after - errors_before <= 3.0, "{errors_before} → {errors_after} errors in 12 s");
    assert!(writes_after - writes_before <= 3.0, "{writes_before} → {writes_after} patches in 12 s");
    let warning = env.the_one_warning("default", &name).await;
    println!("{:?}: {:?}", warning.reason, warning.note);
    assert!(warning.note.as_deref().unwrap_or_default().contains("could not inject"), "{warning:?}");
    let now = vwcs.get(&name).await.unwrap();
    assert_eq!(now.resource_version(), created.resource_version(), "nothing was written");
}
