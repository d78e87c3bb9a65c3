//! The five kinds that can receive the CA bundle (docs/spec.md §2), each with the pure plan of
//! what to write: only the injected field, or nothing when it already holds the bundle.
//!
//! How each kind is written, so that the operator never becomes a co-owner that stops
//! another manager (Flux, Argo CD, `kubectl apply --server-side`) from removing what
//! surrounds the injected field (measured on the real API server, see
//! `tests/e2e/injection/managers.rs`):
//!
//! - ConfigMap: server-side apply of `data["service-ca.crt"]` (nobody else removes a
//!   ConfigMap's structure around one data key); a merge patch when other `data` keys
//!   must go.
//! - Webhook configurations: a JSON patch per entry (`test` of the entry's name, `add`
//!   of its `clientConfig.caBundle`). A patch is an Update: our managedFields entry then
//!   does not stop the applier from removing the entry (a server-side apply does: 422).
//! - APIService and CRD: a merge patch of the bundle, then our managedFields entry is
//!   dropped. Even an Update-owned `caBundle` stops the applier from switching a CRD's
//!   conversion to `None` (422: the webhook block would be left holding our field);
//!   without the entry the same apply succeeds.
//!
//! Every write is sent guarded by the resourceVersion the plan was made from
//! ([`Write::guarded`]).

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::names::{FIELD_MANAGER, INJECT_CABUNDLE_KEY, INJECTED_CONFIGMAP_KEY as CONFIGMAP_KEY, check_configmap_key};

/// A write that makes the injected field hold the bundle, or that gives up our
/// ownership of it.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Server-side apply (forced) of this partial object with the operator's field
    /// manager: only the injected field changes owner and value. ConfigMaps only.
    Apply(Value),
    /// JSON merge patch of the injected field (or a ConfigMap's `data`).
    Merge(Value),
    /// JSON patch (RFC 6902) operations that inject the bundle.
    Json(Vec<Value>),
    /// JSON patch that drops the operator's own managedFields entry (the injected
    /// value stays, owned by nobody), so that it blocks no other manager.
    Disown(Vec<Value>),
}

impl Write {
    /// The same write, applied only over `resource_version` (otherwise 409): a
    /// `metadata.resourceVersion` in a merge patch or apply, and a `replace` of it
    /// first in a JSON patch (a `test` would fail with 422, which means "refused").
    pub fn guarded(self, resource_version: &str) -> Write {
        let set = |mut patch: Value| {
            patch["metadata"]["resourceVersion"] = json!(resource_version);
            patch
        };
        let prepend = |ops: Vec<Value>| {
            let guard = json!({ "op": "replace", "path": "/metadata/resourceVersion", "value": resource_version });
            std::iter::once(guard).chain(ops).collect()
        };
        match self {
            Write::Apply(patch) => Write::Apply(set(patch)),
            Write::Merge(patch) => Write::Merge(set(patch)),
            Write::Json(ops) => Write::Json(prepend(ops)),
            Write::Disown(ops) => Write::Disown(prepend(ops)),
        }
    }

    /// Whether this write injects (rather than only giving up ownership).
    pub fn injects(&self) -> bool {
        !matches!(self, Write::Disown(_))
    }
}

pub trait Target: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    /// Kind, as in events and logs.
    const KIND: &'static str;
    /// Resource (plural), as in metrics.
    const RESOURCE: &'static str;
    /// Whether `service.alpha.openshift.io/inject-cabundle` is honoured too.
    const ALPHA_HONOURED: bool;
    /// What to write so the object carries `value` (and we own nothing that blocks
    /// others); `None` when nothing is needed.
    fn plan(&self, value: &str) -> Option<Write>;
    /// Where this kind keeps the bundle: one entry per field that should hold it (one
    /// per webhook entry), `None` for a field not set; no entry when the object has no
    /// place for a bundle (a CRD whose conversion is not a webhook). `inspect` reads
    /// the bundles through it.
    fn bundle_fields(&self) -> Vec<Option<&[u8]>>;
    /// A problem with this kind's own annotations that turns injection off (reported).
    fn bad_annotation(_annotations: &BTreeMap<String, String>) -> Option<String> {
        None
    }
    /// The API for an object of this kind (cluster-scoped unless overridden).
    fn api(client: Client, _namespace: Option<&str>) -> Api<Self> {
        Api::all(client)
    }
}

fn b64(value: &str) -> Value {
    serde_json::to_value(ByteString(value.as_bytes().to_vec())).unwrap_or(Value::Null)
}

fn holds(current: Option<&[u8]>, value: &str) -> bool {
    current == Some(value.as_bytes())
}

/// Drops the operator's managedFields entries (only those of server-side apply when
/// `only_apply`), keeping every other entry as it is. Nothing when we have no such
/// entry, or when nobody else manages the object (an empty list would not remove
/// anything, and then we block nobody).
fn disown(managed: &[ManagedFieldsEntry], only_apply: bool) -> Option<Write> {
    let ours = |m: &ManagedFieldsEntry| {
        m.manager.as_deref() == Some(FIELD_MANAGER)
            && m.subresource.as_deref().is_none_or(str::is_empty)
            && (!only_apply || m.operation.as_deref() == Some("Apply"))
    };
    if !managed.iter().any(ours) {
        return None;
    }
    let others: Vec<&ManagedFieldsEntry> = managed.iter().filter(|m| !ours(m)).collect();
    if others.is_empty() {
        return None;
    }
    let others = serde_json::to_value(others).ok()?;
    Some(Write::Disown(vec![json!({ "op": "replace", "path": "/metadata/managedFields", "value": others })]))
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

    fn bundle_fields(&self) -> Vec<Option<&[u8]>> {
        // The key asked for with inject-cabundle-key, or the usual one.
        let key = self.annotations().get(INJECT_CABUNDLE_KEY).map_or(CONFIGMAP_KEY, String::as_str);
        vec![self.data.as_ref().and_then(|d| d.get(key)).map(String::as_bytes)]
    }

    fn bad_annotation(annotations: &BTreeMap<String, String>) -> Option<String> {
        let key = annotations.get(INJECT_CABUNDLE_KEY)?;
        let why = check_configmap_key(key).err()?;
        Some(format!(
            "{INJECT_CABUNDLE_KEY} has value {:?}, which is not a ConfigMap key ({why}), so nothing is injected",
            crate::bounded(key)
        ))
    }

    fn plan(&self, value: &str) -> Option<Write> {
        let data = self.data.clone().unwrap_or_default();
        // The key asked for, alone: every other key stays as its managers wrote it.
        if let Some(key) = self.annotations().get(INJECT_CABUNDLE_KEY) {
            if check_configmap_key(key).is_err() || data.get(key).map(String::as_str) == Some(value) {
                return None;
            }
            return Some(Write::Apply(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": self.name_any(), "namespace": self.namespace() },
                "data": { key: value },
            })));
        }
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

/// An APIService keeps the bundle in `spec.caBundle`.
fn api_service_bundle(o: &APIService) -> Option<&[u8]> {
    o.spec.as_ref()?.ca_bundle.as_ref().map(|b| b.0.as_slice())
}

impl Target for APIService {
    const KIND: &'static str = "APIService";
    const RESOURCE: &'static str = "apiservices";
    const ALPHA_HONOURED: bool = true;

    fn bundle_fields(&self) -> Vec<Option<&[u8]>> {
        vec![api_service_bundle(self)]
    }

    fn plan(&self, value: &str) -> Option<Write> {
        if !holds(api_service_bundle(self), value) {
            return Some(Write::Merge(json!({ "spec": { "caBundle": b64(value) } })));
        }
        disown(self.managed_fields(), false)
    }
}

/// A CRD keeps the bundle in its conversion webhook's `clientConfig.caBundle`, and
/// only when its conversion strategy is `Webhook` (outer `None`: no place for one).
fn crd_bundle(o: &CustomResourceDefinition) -> Option<Option<&[u8]>> {
    let conversion = o.spec.conversion.as_ref().filter(|c| c.strategy == "Webhook")?;
    let config = conversion.webhook.as_ref().and_then(|w| w.client_config.as_ref());
    Some(config.and_then(|c| c.ca_bundle.as_ref()).map(|b| b.0.as_slice()))
}

impl Target for CustomResourceDefinition {
    const KIND: &'static str = "CustomResourceDefinition";
    const RESOURCE: &'static str = "customresourcedefinitions";
    const ALPHA_HONOURED: bool = false;

    fn bundle_fields(&self) -> Vec<Option<&[u8]>> {
        crd_bundle(self).into_iter().collect()
    }

    fn plan(&self, value: &str) -> Option<Write> {
        if let Some(current) = crd_bundle(self)
            && !holds(current, value)
        {
            return Some(Write::Merge(json!({
                "spec": { "conversion": { "webhook": { "clientConfig": { "caBundle": b64(value) } } } },
            })));
        }
        // Also when the conversion is no longer a webhook: an entry left from before
        // still names fields of ours.
        disown(self.managed_fields(), false)
    }
}

/// Webhook configurations: every entry, including ones added later; each entry that
/// lacks the bundle gets it by index, after a `test` that the index still names the
/// entry the plan saw. An entry of ours from a server-side apply (earlier versions of
/// the operator) is dropped.
fn plan_webhooks<'a>(
    entries: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    managed: &[ManagedFieldsEntry],
    value: &str,
) -> Option<Write> {
    let mut ops = Vec::new();
    for (i, (name, current)) in entries.enumerate() {
        if !holds(current, value) {
            ops.push(json!({ "op": "test", "path": format!("/webhooks/{i}/name"), "value": name }));
            ops.push(
                json!({ "op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": b64(value) }),
            );
        }
    }
    if !ops.is_empty() {
        return Some(Write::Json(ops));
    }
    disown(managed, true)
}

impl Target for MutatingWebhookConfiguration {
    const KIND: &'static str = "MutatingWebhookConfiguration";
    const RESOURCE: &'static str = "mutatingwebhookconfigurations";
    const ALPHA_HONOURED: bool = false;

    fn bundle_fields(&self) -> Vec<Option<&[u8]>> {
        self.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())).collect()
    }

    fn plan(&self, value: &str) -> Option<Write> {
        let names = self.webhooks.iter().flatten().map(|w| w.name.as_str());
        plan_webhooks(names.zip(self.bundle_fields()), self.managed_fields(), value)
    }
}

impl Target for ValidatingWebhookConfiguration {
    const KIND: &'static str = "ValidatingWebhookConfiguration";
    const RESOURCE: &'static str = "validatingwebhookconfigurations";
    const ALPHA_HONOURED: bool = false;

    fn bundle_fields(&self) -> Vec<Option<&[u8]>> {
        self.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())).collect()
    }

    fn plan(&self, value: &str) -> Option<Write> {
        let names = self.webhooks.iter().flatten().map(|w| w.name.as_str());
        plan_webhooks(names.zip(self.bundle_fields()), self.managed_fields(), value)
    }
}

#[cfg(test)]
mod tests;
