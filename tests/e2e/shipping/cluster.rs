//! The control plane itself: behaviour only a real API server and controller manager
//! have, which everything else relies on.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

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

/// A bound ServiceAccount token from the TokenRequest API.
pub async fn token_for(client: &Client, ns: &str, sa: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request: TokenRequest =
        serde_json::from_value(json!({ "spec": { "audiences": [], "expirationSeconds": 3600 } })).unwrap();
    let response = api.create_token_request(sa, &PostParams::default(), &request).await.expect("TokenRequest");
    response.status.and_then(|s| s.token).expect("token in the TokenRequest status")
}

/// A client that authenticates with a bearer token instead of the admin certificate.
pub async fn client_with_token(token: &str) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(support::kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    config.auth_info = kube::config::AuthInfo { token: Some(token.to_string().into()), ..Default::default() };
    Client::try_from(config).unwrap()
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

/// A CRD converted by a webhook (that never runs: only one version is stored).
pub fn crd_json(suffix: &str) -> serde_json::Value {
    json!({
        "metadata": { "name": format!("widgets.{suffix}.example.com"), "labels": { support::RUN_LABEL: suffix } },
        "spec": {
            "group": format!("{suffix}.example.com"),
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget" },
            "scope": "Namespaced",
            "versions": [{ "name": "v1", "served": true, "storage": true,
                           "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } } }],
            "conversion": { "strategy": "Webhook", "webhook": {
                "conversionReviewVersions": ["v1"],
                "clientConfig": { "service": { "namespace": "default", "name": "converter", "path": "/convert" } } } }
        }
    })
}

pub fn apiservice_json(suffix: &str) -> serde_json::Value {
    json!({
        "metadata": { "name": format!("v1alpha1.{suffix}.example.com"), "labels": { support::RUN_LABEL: suffix } },
        "spec": { "group": format!("{suffix}.example.com"), "version": "v1alpha1", "groupPriorityMinimum": 100,
                  "versionPriority": 10, "service": { "namespace": "default", "name": "aggregated", "port": 443 } }
    })
}

/// Webhooks that never get called: their rules match a resource that does not exist,
/// and failures are ignored anyway.
pub fn webhook_json(kind: &str, suffix: &str, names: &[&str]) -> serde_json::Value {
    let webhooks: Vec<_> = names
        .iter()
        .map(|n| {
            json!({
                "name": format!("{n}.{suffix}.example.com"),
                "clientConfig": { "service": { "namespace": "default", "name": "hook", "path": "/hook" } },
                "rules": [{ "apiGroups": [format!("{suffix}.example.com")], "apiVersions": ["v1"],
                            "operations": ["CREATE"], "resources": ["nothings"] }],
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": 1
            })
        })
        .collect();
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": { "name": format!("{}-{suffix}", kind.to_lowercase()), "labels": { support::RUN_LABEL: suffix } },
        "webhooks": webhooks
    })
}
