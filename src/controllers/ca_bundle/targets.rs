//! The five kinds that can receive the CA bundle (SPEC §2), each with the pure plan of
//! what to write: a partial object for server-side apply that names only the injected
//! field (plus the list keys needed to reach it), or nothing when it already holds the
//! bundle.

use std::fmt::Debug;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::names::INJECTED_CONFIGMAP_KEY as CONFIGMAP_KEY;

/// A write that makes the injected field hold the bundle.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Server-side apply (forced) of this partial object with the operator's field
    /// manager: only the injected field changes owner and value.
    Apply(Value),
    /// JSON merge patch: used only to remove a ConfigMap's other `data` keys, which
    /// apply cannot do for fields another manager owns.
    ///
    /// Both are sent guarded by the resourceVersion the plan was made from.
    Merge(Value),
}

pub trait Target: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    /// Kind, as in events and logs.
    const KIND: &'static str;
    /// Resource (plural), as in metrics.
    const RESOURCE: &'static str;
    /// Whether `service.alpha.openshift.io/inject-cabundle` is honoured too.
    const ALPHA_HONOURED: bool;
    /// What to write so the object carries `value`; `None` when nothing is needed.
    fn plan(&self, value: &str) -> Option<Write>;
    /// The API for an object of this kind (cluster-scoped unless overridden).
    fn api(client: Client, _namespace: Option<&str>) -> Api<Self> {
        Api::all(client)
    }
}

fn b64(value: &str) -> Value {
    serde_json::to_value(ByteString(value.as_bytes().to_vec())).unwrap_or(Value::Null)
}

fn holds(current: Option<&ByteString>, value: &str) -> bool {
    current.is_some_and(|b| b.0 == value.as_bytes())
}

impl Target for ConfigMap {
    const KIND: &'static str = "ConfigMap";
    const RESOURCE: &'static str = "configmaps";
    const ALPHA_HONOURED: bool = true;

    fn api(client: Client, namespace: Option<&str>) -> Api<Self> {
        match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        }
    }

    fn plan(&self, value: &str) -> Option<Write> {
        let data = self.data.clone().unwrap_or_default();
        if data.len() == 1 && data.get(CONFIGMAP_KEY).map(String::as_str) == Some(value) {
            return None;
        }
        let stray: Vec<&String> = data.keys().filter(|k| *k != CONFIGMAP_KEY).collect();
        if stray.is_empty() {
            return Some(Write::Apply(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": self.name_any(), "namespace": self.namespace() },
                "data": { CONFIGMAP_KEY: value },
            })));
        }
        // The documented behaviour: every other data key goes (binaryData stays).
        let mut entries = serde_json::Map::new();
        for key in stray {
            entries.insert(key.clone(), Value::Null);
        }
        entries.insert(CONFIGMAP_KEY.into(), json!(value));
        Some(Write::Merge(json!({ "data": entries })))
    }
}

impl Target for APIService {
    const KIND: &'static str = "APIService";
    const RESOURCE: &'static str = "apiservices";
    const ALPHA_HONOURED: bool = true;

    fn plan(&self, value: &str) -> Option<Write> {
        if holds(self.spec.as_ref().and_then(|s| s.ca_bundle.as_ref()), value) {
            return None;
        }
        Some(Write::Apply(json!({
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": { "name": self.name_any() },
            "spec": { "caBundle": b64(value) },
        })))
    }
}

impl Target for CustomResourceDefinition {
    const KIND: &'static str = "CustomResourceDefinition";
    const RESOURCE: &'static str = "customresourcedefinitions";
    const ALPHA_HONOURED: bool = false;

    fn plan(&self, value: &str) -> Option<Write> {
        let conversion = self.spec.conversion.as_ref()?;
        if conversion.strategy != "Webhook" {
            return None;
        }
        let current =
            conversion.webhook.as_ref().and_then(|w| w.client_config.as_ref()).and_then(|c| c.ca_bundle.as_ref());
        if holds(current, value) {
            return None;
        }
        Some(Write::Apply(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": { "name": self.name_any() },
            "spec": { "conversion": { "webhook": { "clientConfig": { "caBundle": b64(value) } } } },
        })))
    }
}

/// Webhook configurations: every entry, including ones added later.
fn plan_webhooks<'a>(
    kind: &str,
    name: String,
    entries: impl Iterator<Item = (&'a str, Option<&'a ByteString>)>,
    value: &str,
) -> Option<Write> {
    let entries: Vec<_> = entries.collect();
    if entries.iter().all(|(_, current)| holds(*current, value)) {
        return None;
    }
    let webhooks: Vec<Value> =
        entries.iter().map(|(name, _)| json!({ "name": name, "clientConfig": { "caBundle": b64(value) } })).collect();
    Some(Write::Apply(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": { "name": name },
        "webhooks": webhooks,
    })))
}

impl Target for MutatingWebhookConfiguration {
    const KIND: &'static str = "MutatingWebhookConfiguration";
    const RESOURCE: &'static str = "mutatingwebhookconfigurations";
    const ALPHA_HONOURED: bool = false;

    fn plan(&self, value: &str) -> Option<Write> {
        let entries = self.webhooks.iter().flatten().map(|w| (w.name.as_str(), w.client_config.ca_bundle.as_ref()));
        plan_webhooks(Self::KIND, self.name_any(), entries, value)
    }
}

impl Target for ValidatingWebhookConfiguration {
    const KIND: &'static str = "ValidatingWebhookConfiguration";
    const RESOURCE: &'static str = "validatingwebhookconfigurations";
    const ALPHA_HONOURED: bool = false;

    fn plan(&self, value: &str) -> Option<Write> {
        let entries = self.webhooks.iter().flatten().map(|w| (w.name.as_str(), w.client_config.ca_bundle.as_ref()));
        plan_webhooks(Self::KIND, self.name_any(), entries, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn configmap(data: &[(&str, &str)]) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("cm".into());
        cm.metadata.namespace = Some("ns".into());
        cm.metadata.resource_version = Some("42".into());
        cm.data = Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>());
        cm
    }

    #[test]
    fn configmap_plans() {
        assert_eq!(configmap(&[(CONFIGMAP_KEY, "B")]).plan("B"), None);
        let Some(Write::Apply(v)) = configmap(&[]).plan("B") else { panic!() };
        assert_eq!(v["data"], json!({ CONFIGMAP_KEY: "B" }));
        assert_eq!(v["metadata"], json!({ "name": "cm", "namespace": "ns" }));
        let Some(Write::Merge(v)) = configmap(&[(CONFIGMAP_KEY, "B"), ("other", "x")]).plan("B") else { panic!() };
        assert_eq!(v, json!({ "data": { "other": null, CONFIGMAP_KEY: "B" } }));
    }

    #[test]
    fn crd_only_with_webhook_conversion() {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": { "name": "widgets.example.com" },
            "spec": { "group": "example.com", "names": { "plural": "widgets", "kind": "Widget" }, "scope": "Namespaced",
                      "versions": [], "conversion": { "strategy": "None" } }
        }))
        .unwrap();
        assert_eq!(crd.plan("B"), None);
        let mut webhook = crd.clone();
        webhook.spec.conversion = serde_json::from_value(json!({ "strategy": "Webhook",
            "webhook": { "conversionReviewVersions": ["v1"], "clientConfig": { "url": "https://x" } } }))
        .unwrap();
        let Some(Write::Apply(v)) = webhook.plan("B") else { panic!() };
        assert_eq!(v["spec"], json!({ "conversion": { "webhook": { "clientConfig": { "caBundle": "Qg==" } } } }));
    }

    #[test]
    fn every_webhook_entry_and_nothing_else() {
        let cfg: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": { "name": "v" },
            "webhooks": [
                { "name": "a.example.com", "clientConfig": { "caBundle": "Qg==" }, "admissionReviewVersions": ["v1"], "sideEffects": "None" },
                { "name": "b.example.com", "clientConfig": {}, "admissionReviewVersions": ["v1"], "sideEffects": "None" }
            ]
        }))
        .unwrap();
        let Some(Write::Apply(v)) = cfg.plan("B") else { panic!() };
        assert_eq!(
            v["webhooks"],
            json!([
                { "name": "a.example.com", "clientConfig": { "caBundle": "Qg==" } },
                { "name": "b.example.com", "clientConfig": { "caBundle": "Qg==" } }
            ])
        );
        let empty: ValidatingWebhookConfiguration =
            serde_json::from_value(json!({ "metadata": { "name": "v" } })).unwrap();
        assert_eq!(empty.plan("B"), None, "no webhooks: nothing to inject");
    }
}
