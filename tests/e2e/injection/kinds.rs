//! CA bundle injection (docs/spec.md §2), end to end on the real API server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::support::annotations::{INJECT, INJECT_ALPHA, INJECT_LEGACY};
use crate::support::objects::{apiservice_json, crd_json, webhook_json};
use crate::support::{Cleanup, Env, T, eventually};

async fn configmap(env: &Env, name: &str, annotations: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    let mut cm: ConfigMap =
        serde_json::from_value(json!({ "data": data.iter().cloned().collect::<BTreeMap<_, _>>() })).unwrap();
    cm.metadata = env.meta(name);
    cm.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap()
}

async fn injected_configmap(env: &Env, name: &str, bundle: &str) -> ConfigMap {
    eventually(T, &format!("ConfigMap {name} injected"), || async {
        let cm = env.configmaps().get(name).await.unwrap();
        (cm.data.as_ref()?.get("service-ca.crt")? == bundle).then_some(cm)
    })
    .await
}

fn b64(bytes: &Option<k8s_openapi::ByteString>) -> Option<String> {
    bytes.as_ref().map(|b| String::from_utf8_lossy(&b.0).to_string())
}

/// The injected field(s) of any target kind, as text.
trait Injected: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug {
    fn injected(&self) -> Vec<Option<String>>;
}

impl Injected for APIService {
    fn injected(&self) -> Vec<Option<String>> {
        vec![b64(&self.spec.as_ref().unwrap().ca_bundle)]
    }
}

impl Injected for CustomResourceDefinition {
    fn injected(&self) -> Vec<Option<String>> {
        let webhook = self.spec.conversion.as_ref().and_then(|c| c.webhook.as_ref());
        vec![b64(&webhook.and_then(|w| w.client_config.as_ref()).and_then(|c| c.ca_bundle.clone()))]
    }
}

impl Injected for MutatingWebhookConfiguration {
    fn injected(&self) -> Vec<Option<String>> {
        self.webhooks.iter().flatten().map(|w| b64(&w.client_config.ca_bundle)).collect()
    }
}

impl Injected for ValidatingWebhookConfiguration {
    fn injected(&self) -> Vec<Option<String>> {
        self.webhooks.iter().flatten().map(|w| b64(&w.client_config.ca_bundle)).collect()
    }
}

impl Injected for ConfigMap {
    fn injected(&self) -> Vec<Option<String>> {
        vec![self.data.as_ref().and_then(|d| d.get("service-ca.crt").cloned())]
    }
}

async fn create_cluster<K: Injected + serde::Serialize>(
    env: &Env,
    value: serde_json::Value,
    annotation: Option<(&str, &str)>,
) -> K {
    let mut obj: K = serde_json::from_value(value).unwrap();
    if let Some((k, v)) = annotation {
        obj.meta_mut().annotations.get_or_insert_with(Default::default).insert(k.into(), v.into());
    }
    Api::<K>::all(env.client.clone()).create(&PostParams::default(), &obj).await.unwrap()
}

async fn wait_injected<K: Injected>(api: &Api<K>, name: &str, bundle: &str) -> K {
    eventually(T, &format!("{} {name} injected", K::kind(&())), || async {
        let obj = api.get(name).await.unwrap();
        let fields = obj.injected();
        (!fields.is_empty() && fields.iter().all(|f| f.as_deref() == Some(bundle))).then_some(obj)
    })
    .await
}

#[tokio::test]
async fn configmap_gets_the_bundle_other_data_removed_binary_data_labels_annotations_kept() {
    let env = Env::new("inject-cm").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let mut cm: ConfigMap = serde_json::from_value(json!({
        "data": { "old": "x", "other": "y" },
        "binaryData": { "blob": "AAEC" }
    }))
    .unwrap();
    cm.metadata = env.meta("cm");
    cm.metadata.labels.as_mut().unwrap().insert("team".into(), "a".into());
    cm.metadata.annotations =
        Some(BTreeMap::from([(INJECT.to_string(), "true".to_string()), ("note".to_string(), "kept".to_string())]));
    let started = Instant::now();
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    let cm = injected_configmap(&env, "cm", &bundle).await;
    println!("ConfigMap injected {:?} after creation", started.elapsed());
    assert_eq!(cm.data.as_ref().unwrap().len(), 1, "every other data key is removed: {:?}", cm.data);
    assert_eq!(cm.binary_data.as_ref().unwrap()["blob"].0, vec![0, 1, 2], "binaryData kept");
    assert_eq!(cm.labels()["team"], "a");
    assert_eq!(cm.annotations()["note"], "kept");
}

#[tokio::test]
async fn annotation_values_and_alpha_keys() {
    let env = Env::new("inject-values").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    configmap(&env, "upper", &[(INJECT, "TRUE")], &[]).await;
    configmap(&env, "alpha", &[(INJECT_ALPHA, "true")], &[]).await;
    let no = configmap(&env, "no", &[(INJECT, "false")], &[("k", "v")]).await;
    let yes = configmap(&env, "yes", &[(INJECT, "yes")], &[("k", "v")]).await;
    injected_configmap(&env, "upper", &bundle).await;
    injected_configmap(&env, "alpha", &bundle).await;
    let warning = env.warning(&env.ns, "yes", None).await;
    assert!(warning.note.unwrap().contains("only \"true\""));
    assert_eq!(env.configmaps().get("no").await.unwrap().resource_version(), no.resource_version());
    assert_eq!(env.configmaps().get("yes").await.unwrap().resource_version(), yes.resource_version());
}

#[tokio::test]
async fn legacy_configmap_gets_bundle_root_ca_and_newline_only_under_its_name() {
    let env = Env::new("inject-legacy").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let root = eventually(T, "kube-root-ca.crt", || async {
        env.configmaps().get_opt("kube-root-ca.crt").await.unwrap()?.data?.remove("ca.crt")
    })
    .await;
    configmap(&env, "openshift-service-ca.crt", &[(INJECT_LEGACY, "true")], &[]).await;
    let other = configmap(&env, "something-else", &[(INJECT_LEGACY, "true")], &[("k", "v")]).await;
    let expected = format!("{bundle}{root}\n");
    injected_configmap(&env, "openshift-service-ca.crt", &expected).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.configmaps().get("something-else").await.unwrap().resource_version(), other.resource_version());

    // An inject-cabundle key of any value takes the ConfigMap out of legacy mode.
    let env2 = Env::new("inject-legacy2").await;
    let _op2 = env2.start_operator(&[]);
    env2.ca_bundle().await;
    let stand_down = configmap(
        &env2,
        "openshift-service-ca.crt",
        &[(INJECT_LEGACY, "true"), (INJECT_ALPHA, "false")],
        &[("k", "v")],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env2.configmaps().get("openshift-service-ca.crt").await.unwrap().resource_version(),
        stand_down.resource_version()
    );
}

#[tokio::test]
async fn crd_webhooks_and_apiservice_are_injected_every_entry_including_later_ones() {
    let env = Env::new("inject-kinds").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let mut cleanup = Cleanup::default();
    let run = env.run.clone();

    let crd: CustomResourceDefinition = create_cluster(&env, crd_json(&run), Some((INJECT, "true"))).await;
    cleanup.add::<CustomResourceDefinition>(crd.name_any());
    let mwc: MutatingWebhookConfiguration =
        create_cluster(&env, webhook_json("MutatingWebhookConfiguration", &run, &["a", "b"]), Some((INJECT, "true")))
            .await;
    cleanup.add::<MutatingWebhookConfiguration>(mwc.name_any());
    let vwc: ValidatingWebhookConfiguration =
        create_cluster(&env, webhook_json("ValidatingWebhookConfiguration", &run, &["a"]), Some((INJECT, "true")))
            .await;
    cleanup.add::<ValidatingWebhookConfiguration>(vwc.name_any());
    let apis: APIService = create_cluster(&env, apiservice_json(&run), Some((INJECT_ALPHA, "true"))).await;
    cleanup.add::<APIService>(apis.name_any());

    wait_injected(&Api::<CustomResourceDefinition>::all(env.client.clone()), &crd.name_any(), &bundle).await;
    let vwc_api = Api::<ValidatingWebhookConfiguration>::all(env.client.clone());
    let mwc_api = Api::<MutatingWebhookConfiguration>::all(env.client.clone());
    wait_injected(&mwc_api, &mwc.name_any(), &bundle).await;
    let injected = wait_injected(&vwc_api, &vwc.name_any(), &bundle).await;
    wait_injected(&Api::<APIService>::all(env.client.clone()), &apis.name_any(), &bundle).await;
    // The APIService points at nothing; remove it at once (see Cleanup).
    cleanup.now_the_last();

    // A webhook added later gets the bundle too.
    let mut grown = injected.clone();
    let mut extra = grown.webhooks.as_ref().unwrap()[0].clone();
    extra.name = format!("later.{run}.example.com");
    extra.client_config.ca_bundle = None;
    grown.webhooks.as_mut().unwrap().push(extra);
    vwc_api.replace(&vwc.name_any(), &PostParams::default(), &grown).await.unwrap();
    let after = wait_injected(&vwc_api, &vwc.name_any(), &bundle).await;
    assert_eq!(after.webhooks.unwrap().len(), 2);
}

#[tokio::test]
async fn crd_without_webhook_conversion_and_alpha_on_webhooks_are_left_alone() {
    let env = Env::new("inject-skip").await;
    let _op = env.start_operator(&[]);
    env.ca_bundle().await;
    let mut cleanup = Cleanup::default();
    let run = env.run.clone();
    let mut plain = crd_json(&run);
    plain["spec"]["conversion"] = json!({ "strategy": "None" });
    let crd: CustomResourceDefinition = create_cluster(&env, plain, Some((INJECT, "true"))).await;
    cleanup.add::<CustomResourceDefinition>(crd.name_any());
    let vwc: ValidatingWebhookConfiguration = create_cluster(
        &env,
        webhook_json("ValidatingWebhookConfiguration", &run, &["a"]),
        Some((INJECT_ALPHA, "true")),
    )
    .await;
    cleanup.add::<ValidatingWebhookConfiguration>(vwc.name_any());
    let mut empty = webhook_json("MutatingWebhookConfiguration", &run, &[]);
    empty["webhooks"] = json!([]);
    let mwc: MutatingWebhookConfiguration = create_cluster(&env, empty, Some((INJECT, "true"))).await;
    cleanup.add::<MutatingWebhookConfiguration>(mwc.name_any());
    tokio::time::sleep(Duration::from_secs(4)).await;
    // (A CRD's status changes by itself after creation: look for our writes, not for
    // an unchanged resourceVersion.)
    let ours = |fields: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry]| {
        fields.iter().any(|m| m.manager.as_deref() == Some("service-ca-operator"))
    };
    let crd = Api::<CustomResourceDefinition>::all(env.client.clone()).get(&crd.name_any()).await.unwrap();
    assert!(!ours(crd.managed_fields()) && crd.injected() == [None], "strategy None: nothing");
    let vwc = Api::<ValidatingWebhookConfiguration>::all(env.client.clone()).get(&vwc.name_any()).await.unwrap();
    assert!(!ours(vwc.managed_fields()) && vwc.injected() == [None], "alpha not honoured for webhooks");
    let mwc = Api::<MutatingWebhookConfiguration>::all(env.client.clone()).get(&mwc.name_any()).await.unwrap();
    assert!(!ours(mwc.managed_fields()), "no webhooks: nothing");
}

#[tokio::test]
async fn tampering_is_undone_others_fields_survive_and_nothing_is_written_when_equal() {
    let env = Env::new("inject-ssa").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let mut cleanup = Cleanup::default();
    let run = env.run.clone();
    configmap(&env, "cm", &[(INJECT, "true")], &[]).await;
    injected_configmap(&env, "cm", &bundle).await;
    let vwc: ValidatingWebhookConfiguration =
        create_cluster(&env, webhook_json("ValidatingWebhookConfiguration", &run, &["a"]), Some((INJECT, "true")))
            .await;
    cleanup.add::<ValidatingWebhookConfiguration>(vwc.name_any());
    let vwcs = Api::<ValidatingWebhookConfiguration>::all(env.client.clone());
    wait_injected(&vwcs, &vwc.name_any(), &bundle).await;

    // Another manager sets its own fields with server-side apply.
    let theirs = PatchParams::apply("someone-else").force();
    let cm_patch =
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "cm", "labels": { "owner": "them" } } });
    env.configmaps().patch("cm", &theirs, &Patch::Apply(&cm_patch)).await.unwrap();
    let hook = format!("a.{run}.example.com");
    let vwc_patch = json!({ "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": { "name": vwc.name_any() }, "webhooks": [{ "name": hook, "timeoutSeconds": 7 }] });
    vwcs.patch(&vwc.name_any(), &theirs, &Patch::Apply(&vwc_patch)).await.unwrap();

    // Someone tampers with the injected fields.
    let tamper = json!({ "data": { "service-ca.crt": "tampered" } });
    env.configmaps().patch("cm", &PatchParams::default(), &Patch::Merge(&tamper)).await.unwrap();
    let mut current = vwcs.get(&vwc.name_any()).await.unwrap();
    current.webhooks.as_mut().unwrap()[0].client_config.ca_bundle = Some(k8s_openapi::ByteString(b"tampered".to_vec()));
    vwcs.replace(&vwc.name_any(), &PostParams::default(), &current).await.unwrap();

    let cm = injected_configmap(&env, "cm", &bundle).await;
    let restored = wait_injected(&vwcs, &vwc.name_any(), &bundle).await;
    assert_eq!(cm.labels()["owner"], "them", "a label of another manager survives");
    assert_eq!(
        restored.webhooks.as_ref().unwrap()[0].timeout_seconds,
        Some(7),
        "a webhook field of another manager survives"
    );
    // Our field manager owns only the injected field.
    let ours: Vec<_> =
        restored.managed_fields().iter().filter(|m| m.manager.as_deref() == Some("service-ca-operator")).collect();
    let owned = serde_json::to_string(&ours.iter().map(|m| m.fields_v1.clone()).collect::<Vec<_>>()).unwrap();
    assert!(owned.contains("caBundle") && !owned.contains("timeoutSeconds") && !owned.contains("rules"), "{owned}");

    // Quiet: no write when everything is up to date.
    let (cm_rv, vwc_rv) = (cm.resource_version(), restored.resource_version());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(env.configmaps().get("cm").await.unwrap().resource_version(), cm_rv);
    assert_eq!(vwcs.get(&vwc.name_any()).await.unwrap().resource_version(), vwc_rv);
}

#[tokio::test]
async fn every_kind_is_reinjected_when_the_ca_is_reset() {
    let env = Env::new("inject-reset").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let mut cleanup = Cleanup::default();
    let run = env.run.clone();
    configmap(&env, "cm", &[(INJECT, "true")], &[]).await;
    let crd: CustomResourceDefinition = create_cluster(&env, crd_json(&run), Some((INJECT, "true"))).await;
    cleanup.add::<CustomResourceDefinition>(crd.name_any());
    let mwc: MutatingWebhookConfiguration =
        create_cluster(&env, webhook_json("MutatingWebhookConfiguration", &run, &["a"]), Some((INJECT, "true"))).await;
    cleanup.add::<MutatingWebhookConfiguration>(mwc.name_any());
    let vwc: ValidatingWebhookConfiguration =
        create_cluster(&env, webhook_json("ValidatingWebhookConfiguration", &run, &["a"]), Some((INJECT, "true")))
            .await;
    cleanup.add::<ValidatingWebhookConfiguration>(vwc.name_any());
    let apis: APIService = create_cluster(&env, apiservice_json(&run), Some((INJECT, "true"))).await;
    cleanup.add::<APIService>(apis.name_any());
    let (crds, mwcs, vwcs, apiss) = (
        Api::<CustomResourceDefinition>::all(env.client.clone()),
        Api::<MutatingWebhookConfiguration>::all(env.client.clone()),
        Api::<ValidatingWebhookConfiguration>::all(env.client.clone()),
        Api::<APIService>::all(env.client.clone()),
    );
    injected_configmap(&env, "cm", &bundle).await;
    wait_injected(&crds, &crd.name_any(), &bundle).await;
    wait_injected(&mwcs, &mwc.name_any(), &bundle).await;
    wait_injected(&vwcs, &vwc.name_any(), &bundle).await;
    wait_injected(&apiss, &apis.name_any(), &bundle).await;

    // Hard reset: a person deletes signing-key.
    let started = Instant::now();
    env.hard_reset().await;
    let new_bundle = eventually(T, "a new bundle", || async {
        let b = env.op_configmaps().get("signing-cabundle").await.ok()?.data?.remove("ca-bundle.crt")?;
        (b != bundle).then_some(b)
    })
    .await;
    injected_configmap(&env, "cm", &new_bundle).await;
    wait_injected(&crds, &crd.name_any(), &new_bundle).await;
    wait_injected(&mwcs, &mwc.name_any(), &new_bundle).await;
    wait_injected(&vwcs, &vwc.name_any(), &new_bundle).await;
    wait_injected(&apiss, &apis.name_any(), &new_bundle).await;
    println!("all five kinds re-injected {:?} after signing-key was deleted", started.elapsed());
}

#[tokio::test]
async fn the_real_aggregator_trusts_the_injected_bundle_for_an_issued_certificate() {
    // The whole product in one flow, judged by kube-apiserver itself: an ExternalName
    // Service (pointing at this test process) gets a serving certificate; an APIService
    // for it gets the CA bundle injected; the aggregator then reaches the server over
    // TLS, verifying `<svc>.<ns>.svc` against the injected bundle.
    let env = Env::new("inject-aggregator").await;
    let _op = env.start_operator(&[]);
    env.ca_bundle().await;
    let mut svc: k8s_openapi::api::core::v1::Service =
        serde_json::from_value(json!({ "spec": { "type": "ExternalName", "externalName": "localhost" } })).unwrap();
    svc.metadata = env.meta("aggregated");
    svc.metadata.annotations = Some(BTreeMap::from([(
        "service.beta.openshift.io/serving-cert-secret-name".to_string(),
        "aggregated-tls".to_string(),
    )]));
    env.services().create(&PostParams::default(), &svc).await.unwrap();
    let secret = env.serving_secret("aggregated-tls", T).await;

    let group = format!("{}.example.com", env.run);
    let discovery = json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{group}/v1alpha1"), "resources": [] });
    let server = crate::support::tls::HttpsServer::start(
        &crate::support::data(&secret, "tls.crt"),
        &crate::support::data(&secret, "tls.key"),
        discovery.to_string(),
    );
    let mut cleanup = Cleanup::default();
    let apis = Api::<APIService>::all(env.client.clone());
    let api_service: APIService = serde_json::from_value(json!({
        "metadata": { "name": format!("v1alpha1.{group}"), "labels": { crate::support::RUN_LABEL: env.run },
                      "annotations": { INJECT: "true" } },
        "spec": { "group": group, "version": "v1alpha1", "groupPriorityMinimum": 100, "versionPriority": 10,
                  "service": { "namespace": env.ns, "name": "aggregated", "port": server.port } }
    }))
    .unwrap();
    let name = apis.create(&PostParams::default(), &api_service).await.unwrap().name_any();
    cleanup.add::<APIService>(name.clone());
    let available = eventually(Duration::from_secs(60), "the APIService to become Available", || async {
        let status = apis.get(&name).await.unwrap().status?;
        let condition = status.conditions?.into_iter().find(|c| c.type_ == "Available")?;
        (condition.status == "True").then_some(condition)
    })
    .await;
    println!("APIService available: {:?}", available.message);
    let request = http::Request::get(format!("/apis/{group}/v1alpha1")).body(Vec::new()).unwrap();
    let answer = env.client.request_text(request).await.expect("the API server proxies to the aggregated server");
    assert!(answer.contains("APIResourceList"), "{answer}");

    // The control: the same server behind an APIService without the annotation is
    // not trusted.
    let mut plain = api_service.clone();
    plain.metadata.name = Some(format!("v1alpha2.{group}"));
    plain.metadata.annotations = None;
    plain.spec.as_mut().unwrap().version = Some("v1alpha2".into());
    let plain_name = apis.create(&PostParams::default(), &plain).await.unwrap().name_any();
    cleanup.add::<APIService>(plain_name.clone());
    let refused = eventually(Duration::from_secs(60), "the uninjected APIService to fail its check", || async {
        let condition =
            apis.get(&plain_name).await.unwrap().status?.conditions?.into_iter().find(|c| c.type_ == "Available")?;
        (condition.status == "False" && condition.message.as_deref().is_some_and(|m| m.contains("x509")))
            .then_some(condition)
    })
    .await;
    println!("APIService without the bundle: {:?}", refused.message);
}
