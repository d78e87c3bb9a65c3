//! CA bundle injection (SPEC §2): one controller per kind, one generic reconcile.
//!
//! Watch: objects as metadata only (the operator never caches ConfigMap bodies or CRD
//! schemas); when the bundle changes, every annotated object is reconciled at once.
//! Plan: [`mode`] reads the annotations; [`Target::plan`] (pure, per kind, in
//! `targets`) compares the full object, read when acting, with the bundle.
//! Write: only the injected field, guarded by the resourceVersion the plan was made
//! from. Report: metrics, and a Warning Event when the API server refuses.

mod targets;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

pub use targets::{Target, Write};

use super::{
    Categorised, Context, RETRY_REFUSED, api_message, cached_metadata_watch, drive, is_conflict, is_not_found,
    patch_params,
};
use crate::names::{self as ann, KUBE_ROOT_CA, KUBE_ROOT_CA_KEY, is_true};
use crate::shutdown::Shutdown;

pub const NAME: &str = "ca-bundle";

/// How soon to look again after the object changed or went while we wrote.
const RACE_LOST: Duration = Duration::from_millis(200);

/// What can fail in an injection: the operation and the object it was for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {kind} {object}: {source}")]
    Read { kind: &'static str, object: String, source: kube::Error },
    #[error("injecting the CA bundle into {kind} {object}: {source}")]
    Write { kind: &'static str, object: String, source: kube::Error },
    #[error("reading ConfigMap {namespace}/{KUBE_ROOT_CA} for the legacy bundle: {source}")]
    ReadRootCa { namespace: String, source: kube::Error },
    #[error("ConfigMap {namespace}/{KUBE_ROOT_CA} has no {KUBE_ROOT_CA_KEY} yet: the legacy bundle cannot be made")]
    NoRootCa { namespace: String },
}

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Write { .. } => "write",
            Error::ReadRootCa { .. } | Error::NoRootCa { .. } => "legacy-root-ca",
        }
    }

    fn unreachable(&self) -> bool {
        match self {
            Error::Read { source, .. } | Error::Write { source, .. } | Error::ReadRootCa { source, .. } => {
                !matches!(source, kube::Error::Api(_))
            }
            Error::NoRootCa { .. } => false,
        }
    }
}

/// How an object asks for the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `inject-cabundle: "true"`: the bundle.
    Bundle,
    /// The legacy ConfigMap `openshift-service-ca.crt`: bundle + cluster root CA + "\n".
    Legacy,
}

/// Reads the annotations: the mode asked for, and a warning for a value that is
/// neither true nor false (it is treated as false).
pub fn mode<K: Target>(meta: &ObjectMeta) -> (Option<Mode>, Option<String>) {
    let annotations = meta.annotations.clone().unwrap_or_default();
    let mut keys = vec![ann::BETA.inject_cabundle];
    if K::ALPHA_HONOURED {
        keys.push(ann::ALPHA.inject_cabundle);
    }
    let warning = keys.iter().find_map(|k| {
        let v = annotations.get(*k)?;
        let known = v.trim().eq_ignore_ascii_case("true") || v.trim().eq_ignore_ascii_case("false");
        (!known).then(|| {
            format!("{k} has value {v:?}; only \"true\" (any case) turns injection on, so nothing is injected")
        })
    });
    if keys.iter().any(|k| is_true(annotations.get(*k))) {
        return (Some(Mode::Bundle), None);
    }
    let legacy = K::KIND == "ConfigMap"
        && meta.name.as_deref() == Some(ann::LEGACY_CONFIGMAP_NAME)
        && is_true(annotations.get(ann::INJECT_VULNERABLE_LEGACY_CABUNDLE))
        && !annotations.contains_key(ann::BETA.inject_cabundle)
        && !annotations.contains_key(ann::ALPHA.inject_cabundle);
    (legacy.then_some(Mode::Legacy), warning)
}

fn keep_annotation(key: &str) -> bool {
    key == ann::BETA.inject_cabundle
        || key == ann::ALPHA.inject_cabundle
        || key == ann::INJECT_VULNERABLE_LEGACY_CABUNDLE
}

/// Runs the five injectors until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    tokio::join!(
        run_kind::<ConfigMap>(ctx.clone(), shutdown.clone()),
        run_kind::<APIService>(ctx.clone(), shutdown.clone()),
        run_kind::<CustomResourceDefinition>(ctx.clone(), shutdown.clone()),
        run_kind::<MutatingWebhookConfiguration>(ctx.clone(), shutdown.clone()),
        run_kind::<ValidatingWebhookConfiguration>(ctx.clone(), shutdown),
    );
}

async fn run_kind<K: Target>(ctx: Arc<Context>, shutdown: Shutdown) {
    let config = watcher::Config::default().labels(&ctx.config.selector);
    let (store, stream) = cached_metadata_watch::<K>(ctx.client.clone(), config, ctx.health.clone(), keep_annotation);
    drive(Controller::for_stream(stream, store), NAME, ctx.clone(), shutdown, ctx, inject::<K>).await;
}

async fn inject<K: Target>(obj: Arc<PartialObjectMeta<K>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (mode, warning) = mode::<K>(&obj.metadata);
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::KIND.into()),
        name: obj.metadata.name.clone(),
        namespace: obj.metadata.namespace.clone(),
        uid: obj.metadata.uid.clone(),
        ..Default::default()
    };
    if let Some(warning) = warning {
        ctx.event(&reference, EventType::Warning, "InvalidInjectAnnotation", warning).await;
    }
    let Some(mode) = mode else {
        return Ok(Action::await_change());
    };
    let Some(signer) = ctx.signer.current() else {
        return Ok(Action::await_change());
    };
    let name = obj.name_any();
    let object = ObjectRef::from_obj(obj.as_ref()).to_string();
    let api = K::api(ctx.client.clone(), obj.namespace().as_deref());
    let full =
        api.get_opt(&name).await.map_err(|source| Error::Read { kind: K::KIND, object: object.clone(), source })?;
    let Some(full) = full else {
        return Ok(Action::await_change());
    };
    let value = match mode {
        Mode::Bundle => signer.bundle_pem.clone(),
        Mode::Legacy => legacy_value(&ctx, &obj.namespace().unwrap_or_default(), &signer.bundle_pem).await?,
    };
    let Some(write) = full.plan(&value) else {
        return Ok(Action::await_change());
    };
    // The plan was made from this version of the object: it is written only over that
    // version (a webhook entry removed meanwhile must not come back); otherwise 409 and
    // a fresh look.
    let guarded = |mut patch: serde_json::Value| {
        patch["metadata"]["resourceVersion"] = full.resource_version().into();
        patch
    };
    ctx.metrics.write(K::RESOURCE, "patch");
    let result = match write {
        Write::Apply(patch) => {
            api.patch(&name, &PatchParams::apply(ann::FIELD_MANAGER).force(), &Patch::Apply(guarded(patch))).await
        }
        Write::Merge(patch) => api.patch(&name, &patch_params(), &Patch::Merge(guarded(patch))).await,
    };
    match result {
        Ok(_) => {}
        Err(e) if is_conflict(&e) || is_not_found(&e) => return Ok(Action::requeue(RACE_LOST)),
        Err(e) if super::status_code(&e) == Some(422) => {
            let note = format!(
                "could not inject the CA bundle: the API server refused it: {}",
                crate::bounded(&api_message(&e))
            );
            tracing::warn!(kind = K::KIND, %object, "{note}");
            ctx.event(&reference, EventType::Warning, "CABundleInjectionFailed", note).await;
            return Ok(Action::requeue(RETRY_REFUSED));
        }
        Err(source) => return Err(Error::Write { kind: K::KIND, object, source }),
    }
    ctx.metrics.injections.get_or_create(&crate::metrics::KindLabels { kind: K::RESOURCE }).inc();
    tracing::info!(kind = K::KIND, %object, "CA bundle injected");
    Ok(Action::await_change())
}

/// The legacy value: the bundle, then the cluster's root CA (`kube-root-ca.crt` of the
/// same namespace), then a newline — what the original system wrote.
async fn legacy_value(ctx: &Context, namespace: &str, bundle: &str) -> Result<String, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let root = api
        .get_opt(KUBE_ROOT_CA)
        .await
        .map_err(|source| Error::ReadRootCa { namespace: namespace.to_string(), source })?
        .and_then(|cm| cm.data.and_then(|mut d| d.remove(KUBE_ROOT_CA_KEY)))
        .ok_or_else(|| Error::NoRootCa { namespace: namespace.to_string() })?;
    Ok(format!("{bundle}{root}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn annotation_values() {
        let beta = ann::BETA.inject_cabundle;
        let alpha = ann::ALPHA.inject_cabundle;
        assert_eq!(mode::<ConfigMap>(&meta("a", &[(beta, "TRUE")])), (Some(Mode::Bundle), None));
        assert_eq!(mode::<ConfigMap>(&meta("a", &[(beta, "false")])), (None, None));
        let (m, warning) = mode::<ConfigMap>(&meta("a", &[(beta, "yes")]));
        assert_eq!(m, None);
        assert!(warning.unwrap().contains("\"yes\""));
        assert_eq!(mode::<ConfigMap>(&meta("a", &[(alpha, "true")])).0, Some(Mode::Bundle));
        assert_eq!(
            mode::<CustomResourceDefinition>(&meta("a", &[(alpha, "true")])).0,
            None,
            "alpha not honoured for CRDs"
        );
        assert_eq!(mode::<APIService>(&meta("a", &[(alpha, "true")])).0, Some(Mode::Bundle));
    }

    #[test]
    fn legacy_mode_only_for_its_configmap_and_only_without_inject_keys() {
        let legacy = ann::INJECT_VULNERABLE_LEGACY_CABUNDLE;
        assert_eq!(mode::<ConfigMap>(&meta("openshift-service-ca.crt", &[(legacy, "true")])).0, Some(Mode::Legacy));
        assert_eq!(mode::<ConfigMap>(&meta("other", &[(legacy, "true")])).0, None);
        let both = meta("openshift-service-ca.crt", &[(legacy, "true"), (ann::ALPHA.inject_cabundle, "false")]);
        assert_eq!(mode::<ConfigMap>(&both).0, None, "an inject key of any value disables legacy mode");
        assert_eq!(mode::<APIService>(&meta("openshift-service-ca.crt", &[(legacy, "true")])).0, None);
    }
}
