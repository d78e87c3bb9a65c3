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

fn entry(manager: &str, operation: &str) -> Value {
    json!({ "manager": manager, "operation": operation, "apiVersion": "v1", "fieldsType": "FieldsV1",
            "fieldsV1": { "f:spec": {} }, "time": "2026-11-30T12:00:00Z" })
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
fn a_configmap_naming_its_key_gets_that_key_alone() {
    let keyed = |data: &[(&str, &str)], key: &str| {
        let mut cm = configmap(data);
        cm.metadata.annotations = Some(BTreeMap::from([(INJECT_CABUNDLE_KEY.to_string(), key.to_string())]));
        cm
    };
    assert_eq!(keyed(&[("ca.crt", "B"), ("other", "x")], "ca.crt").plan("B"), None, "other keys stay");
    let Some(Write::Apply(v)) = keyed(&[("ca.crt", "old"), ("other", "x")], "ca.crt").plan("B") else { panic!() };
    assert_eq!(v["data"], json!({ "ca.crt": "B" }), "only that key is applied");
    assert_eq!(keyed(&[], "../etc").plan("B"), None, "an invalid key: nothing written");
    let bad = BTreeMap::from([(INJECT_CABUNDLE_KEY.to_string(), "a/b".to_string())]);
    assert!(ConfigMap::bad_annotation(&bad).is_some_and(|w| w.contains("\"a/b\"")));
    let good = BTreeMap::from([(INJECT_CABUNDLE_KEY.to_string(), "ca.crt".to_string())]);
    assert_eq!(ConfigMap::bad_annotation(&good), None);
    assert_eq!(APIService::bad_annotation(&bad), None, "ConfigMaps only");
}

#[test]
fn guards_name_the_planned_version() {
    let Write::Merge(v) = Write::Merge(json!({ "spec": {} })).guarded("7") else { panic!() };
    assert_eq!(v, json!({ "spec": {}, "metadata": { "resourceVersion": "7" } }));
    let Write::Apply(v) = Write::Apply(json!({ "metadata": { "name": "a" } })).guarded("7") else { panic!() };
    assert_eq!(v["metadata"], json!({ "name": "a", "resourceVersion": "7" }));
    let op = json!({ "op": "add", "path": "/x", "value": 1 });
    let guard = json!({ "op": "replace", "path": "/metadata/resourceVersion", "value": "7" });
    assert_eq!(Write::Json(vec![op.clone()]).guarded("7"), Write::Json(vec![guard.clone(), op.clone()]));
    assert_eq!(Write::Disown(vec![op.clone()]).guarded("7"), Write::Disown(vec![guard, op]));
}

fn crd(conversion: Value, managed: &[Value]) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "metadata": { "name": "widgets.example.com", "managedFields": managed },
        "spec": { "group": "example.com", "names": { "plural": "widgets", "kind": "Widget" }, "scope": "Namespaced",
                  "versions": [], "conversion": conversion }
    }))
    .unwrap()
}

#[test]
fn crd_is_patched_only_with_webhook_conversion_then_disowned() {
    let webhook = json!({ "strategy": "Webhook",
        "webhook": { "conversionReviewVersions": ["v1"], "clientConfig": { "url": "https://x" } } });
    assert_eq!(crd(json!({ "strategy": "None" }), &[]).plan("B"), None);
    let Some(Write::Merge(v)) = crd(webhook.clone(), &[entry("gitops", "Apply")]).plan("B") else { panic!() };
    assert_eq!(v, json!({ "spec": { "conversion": { "webhook": { "clientConfig": { "caBundle": "Qg==" } } } } }));

    // Injected: our Update entry is dropped, every other entry is kept as it was.
    let mut injected = webhook.clone();
    injected["webhook"]["clientConfig"]["caBundle"] = json!("Qg==");
    let managed = [entry("gitops", "Apply"), entry(FIELD_MANAGER, "Update"), entry("kubectl", "Update")];
    let Some(Write::Disown(ops)) = crd(injected.clone(), &managed).plan("B") else { panic!() };
    assert_eq!(
        ops,
        vec![json!({ "op": "replace", "path": "/metadata/managedFields",
                     "value": [entry("gitops", "Apply"), entry("kubectl", "Update")] })]
    );
    assert_eq!(crd(injected.clone(), &[entry("gitops", "Apply")]).plan("B"), None, "nothing of ours: nothing");
    assert_eq!(crd(injected, &[entry(FIELD_MANAGER, "Update")]).plan("B"), None, "only ours: nobody is blocked");
    // A status entry under our name (we never write status) is not ours to drop.
    let mut status = entry(FIELD_MANAGER, "Update");
    status["subresource"] = json!("status");
    assert_eq!(crd(json!({ "strategy": "None" }), &[entry("gitops", "Apply"), status]).plan("B"), None);
    // Strategy switched to None by someone else: a leftover entry of ours goes too.
    let left = [entry("gitops", "Apply"), entry(FIELD_MANAGER, "Apply")];
    assert!(matches!(crd(json!({ "strategy": "None" }), &left).plan("B"), Some(Write::Disown(_))));
}

#[test]
fn apiservice_is_patched_then_disowned() {
    let api = |spec: Value, managed: &[Value]| -> APIService {
        serde_json::from_value(json!({ "metadata": { "name": "v1.x", "managedFields": managed }, "spec": spec }))
            .unwrap()
    };
    let spec = json!({ "groupPriorityMinimum": 1, "versionPriority": 1 });
    let Some(Write::Merge(v)) = api(spec.clone(), &[]).plan("B") else { panic!() };
    assert_eq!(v, json!({ "spec": { "caBundle": "Qg==" } }));
    let mut injected = spec;
    injected["caBundle"] = json!("Qg==");
    let managed = [entry("gitops", "Apply"), entry(FIELD_MANAGER, "Update")];
    assert!(matches!(api(injected.clone(), &managed).plan("B"), Some(Write::Disown(_))));
    assert_eq!(api(injected, &managed[..1]).plan("B"), None);
}

fn webhooks(managed: &[Value]) -> ValidatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": { "name": "v", "managedFields": managed },
        "webhooks": [
            { "name": "a.example.com", "clientConfig": { "caBundle": "Qg==" }, "admissionReviewVersions": ["v1"], "sideEffects": "None" },
            { "name": "b.example.com", "clientConfig": {}, "admissionReviewVersions": ["v1"], "sideEffects": "None" },
            { "name": "c.example.com", "clientConfig": { "caBundle": "b2xk" }, "admissionReviewVersions": ["v1"], "sideEffects": "None" }
        ]
    }))
    .unwrap()
}

#[test]
fn each_webhook_entry_lacking_the_bundle_is_patched_by_index_after_a_test_of_its_name() {
    let Some(Write::Json(ops)) = webhooks(&[]).plan("B") else { panic!() };
    assert_eq!(
        ops,
        vec![
            json!({ "op": "test", "path": "/webhooks/1/name", "value": "b.example.com" }),
            json!({ "op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "Qg==" }),
            json!({ "op": "test", "path": "/webhooks/2/name", "value": "c.example.com" }),
            json!({ "op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": "Qg==" }),
        ]
    );
    let empty: ValidatingWebhookConfiguration = serde_json::from_value(json!({ "metadata": { "name": "v" } })).unwrap();
    assert_eq!(empty.plan("B"), None, "no webhooks: nothing to inject");
}

#[test]
fn bundle_fields_name_where_each_kind_keeps_the_bundle() {
    assert_eq!(configmap(&[(CONFIGMAP_KEY, "B"), ("other", "x")]).bundle_fields(), [Some(&b"B"[..])]);
    assert_eq!(configmap(&[]).bundle_fields(), [None]);
    let webhook = json!({ "strategy": "Webhook",
        "webhook": { "conversionReviewVersions": ["v1"], "clientConfig": { "caBundle": "Qg==" } } });
    assert_eq!(crd(webhook, &[]).bundle_fields(), [Some(&b"B"[..])]);
    assert!(crd(json!({ "strategy": "None" }), &[]).bundle_fields().is_empty(), "no place for a bundle");
    let api: APIService = serde_json::from_value(json!({ "metadata": { "name": "v1.x" },
        "spec": { "groupPriorityMinimum": 1, "versionPriority": 1, "caBundle": "Qg==" } }))
    .unwrap();
    assert_eq!(api.bundle_fields(), [Some(&b"B"[..])]);
    assert_eq!(webhooks(&[]).bundle_fields(), [Some(&b"B"[..]), None, Some(&b"old"[..])]);
}

#[test]
fn webhook_ownership_from_a_patch_is_kept_from_an_apply_dropped() {
    let mut done = webhooks(&[entry("gitops", "Apply"), entry(FIELD_MANAGER, "Update")]);
    for w in done.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ByteString(b"B".to_vec()));
    }
    assert_eq!(done.plan("B"), None, "an Update entry does not block the applier: kept");
    done.metadata.managed_fields =
        webhooks(&[entry("gitops", "Apply"), entry(FIELD_MANAGER, "Apply")]).metadata.managed_fields;
    let Some(Write::Disown(ops)) = done.plan("B") else { panic!() };
    assert_eq!(ops[0]["value"], json!([entry("gitops", "Apply")]));
}
