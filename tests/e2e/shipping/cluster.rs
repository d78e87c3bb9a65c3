//! The control plane itself: behaviour only a real API server and controller manager
//! have, which everything else relies on.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::objects::{apiservice_json, client_with_token, crd_json, token_for, webhook_json};
use crate::support::{self, Env, eventually};

#[tokio::test]
async fn garbage_collector_deletes_a_configmap_owned_by_a_deleted_service() {
    let env = Env::new("gc").await;
    let svc = env.annotated_service("owner", "unused", false).await;
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "Service", "name": "owner", "uid": svc.uid().unwrap()
        }]},
        "data": { "k": "v" }
    }))
    .unwrap();
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    env.services().delete("owner", &DeleteParams::default()).await.unwrap();
    let api = env.configmaps();
    eventually(Duration::from_secs(60), "garbage collection of the owned ConfigMap", || {
        let api = api.clone();
        async move { api.get_opt("owned").await.unwrap().is_none().then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn deleting_a_namespace_completes() {
    let client = support::client().await;
    let name = format!("ns-delete-{}", std::process::id());
    support::create_namespace(&client, &name).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
    cms.create(&PostParams::default(), &serde_json::from_value(json!({ "metadata": { "name": "x" } })).unwrap())
        .await
        .unwrap();
    let api: Api<Namespace> = Api::all(client);
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    // Generous: while another test has an APIService without a backend, discovery is
    // incomplete and the namespace controller retries with backoff.
    eventually(Duration::from_secs(240), "namespace deletion to finish", || {
        let api = api.clone();
        let name = name.clone();
        async move { api.get_opt(&name).await.unwrap().is_none().then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn rbac_denies_a_service_account_without_a_role() {
    let env = Env::new("rbac").await;
    let sa: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    sa.create(&PostParams::default(), &serde_json::from_value(json!({ "metadata": { "name": "nobody" } })).unwrap())
        .await
        .unwrap();
    let token = token_for(&env.client, &env.ns, "nobody").await;
    let as_sa = client_with_token(&token).await;
    let secrets: Api<Secret> = Api::namespaced(as_sa.clone(), &env.ns);
    match secrets.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
    // The 403 is authorization, not authentication: an invalid token gets 401.
    let bad = client_with_token("not-a-token").await;
    match Api::<Secret>::namespaced(bad, &env.ns).list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 401),
        other => panic!("expected 401 for a bad token, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_with_webhook_conversion_apiservice_and_webhook_configurations_round_trip() {
    let env = Env::new("kinds").await;
    let client = env.client.clone();
    let suffix = &env.run;
    let crd: CustomResourceDefinition = serde_json::from_value(crd_json(suffix)).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let created = crds.create(&PostParams::default(), &crd).await.unwrap();
    let read = crds.get(&created.name_any()).await.unwrap();
    assert_eq!(read.spec.conversion.unwrap().strategy, "Webhook");

    let apis: Api<APIService> = Api::all(client.clone());
    let api_service: APIService = serde_json::from_value(apiservice_json(suffix)).unwrap();
    let name = apis.create(&PostParams::default(), &api_service).await.unwrap().name_any();
    assert_eq!(
        apis.get(&name).await.unwrap().spec.unwrap().group.as_deref(),
        Some(format!("{suffix}.example.com").as_str())
    );

    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let m: MutatingWebhookConfiguration =
        serde_json::from_value(webhook_json("MutatingWebhookConfiguration", suffix, &["a"])).unwrap();
    let m = mutating.create(&PostParams::default(), &m).await.unwrap();
    assert_eq!(mutating.get(&m.name_any()).await.unwrap().webhooks.unwrap().len(), 1);
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let v: ValidatingWebhookConfiguration =
        serde_json::from_value(webhook_json("ValidatingWebhookConfiguration", suffix, &["a", "b"])).unwrap();
    let v = validating.create(&PostParams::default(), &v).await.unwrap();
    assert_eq!(validating.get(&v.name_any()).await.unwrap().webhooks.unwrap().len(), 2);

    // The webhooks never block other requests: creating a ConfigMap still works.
    env.configmaps()
        .create(&PostParams::default(), &serde_json::from_value(json!({ "metadata": { "name": "after" } })).unwrap())
        .await
        .unwrap();

    crds.delete(&created.name_any(), &DeleteParams::default()).await.unwrap();
    apis.delete(&name, &DeleteParams::default()).await.unwrap();
    mutating.delete(&m.name_any(), &DeleteParams::default()).await.unwrap();
    validating.delete(&v.name_any(), &DeleteParams::default()).await.unwrap();
}
