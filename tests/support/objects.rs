//! Cluster objects and credentials several end-to-end tests need: a ServiceAccount's
//! token and a client that uses it; a CRD, an APIService and webhook configurations
//! that are never called (injection targets).

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};

use super::annotations::INJECT;

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
    let kubeconfig = kube::config::Kubeconfig::read_from(super::kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    config.auth_info = kube::config::AuthInfo { token: Some(token.to_string().into()), ..Default::default() };
    Client::try_from(config).unwrap()
}

/// A CRD converted by a webhook (that never runs: only one version is stored).
pub fn crd_json(suffix: &str) -> serde_json::Value {
    json!({
        "metadata": { "name": format!("widgets.{suffix}.example.com"), "labels": { super::RUN_LABEL: suffix } },
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
        "metadata": { "name": format!("v1alpha1.{suffix}.example.com"), "labels": { super::RUN_LABEL: suffix } },
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
        "metadata": { "name": format!("{}-{suffix}", kind.to_lowercase()), "labels": { super::RUN_LABEL: suffix } },
        "webhooks": webhooks
    })
}

/// `obj` with the annotation asking for the CA bundle (docs/spec.md §2).
pub fn with_inject_annotation(mut obj: Value) -> Value {
    obj["metadata"]["annotations"] = json!({ INJECT: "true" });
    obj
}
