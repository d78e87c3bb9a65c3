//! CA bundle injection (SPEC §2): one controller per kind, one generic reconcile.
//!
//! Objects are watched as metadata only (the operator never caches ConfigMap bodies or
//! CRD schemas); the full object is read only when it is annotated. When the bundle
//! changes, every annotated object is reconciled at once.

mod targets;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
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

pub use targets::{CONFIGMAP_KEY, Target, Write};

use super::{Categorised, Context, backoff, cached_metadata_watch};
use crate::annotations::{self as ann, is_true};
use crate::app::Shutdown;

pub const NAME: &str = "ca-bundle";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Legacy(String),
}

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube(e) => e.category(),
            Error::Legacy(_) => "legacy-root-ca",
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

/// Runs the five injectors until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    tokio::join!(
        run_kind::<ConfigMap>(ctx.clone(), shutdown.signal()),
        run_kind::<APIService>(ctx.clone(), shutdown.signal()),
        run_kind::<CustomResourceDefinition>(ctx.clone(), shutdown.signal()),
        run_kind::<MutatingWebhookConfiguration>(ctx.clone(), shutdown.signal()),
        run_kind::<ValidatingWebhookConfiguration>(ctx.clone(), shutdown.signal()),
    );
}

async fn run_kind<K: Target>(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let config = watcher::Config::default().labels(&ctx.config.selector);
    let (store, stream) = cached_metadata_watch::<K>(ctx.client.clone(), config, ctx.health.clone(), keep_annotation);
    Controller::for_stream(stream, store)
        .reconcile_all_on(ctx.signer.changes())
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.config.controller_concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy::<K>, ctx)
        .for_each(|_| async {})
        .await;
}

fn error_policy<K: Target>(obj: Arc<PartialObjectMeta<K>>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(kind = K::KIND, object = %ObjectRef::from_obj(obj.as_ref()), %error, "injection failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile<K: Target>(obj: Arc<PartialObjectMeta<K>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = inject::<K>(&obj, &ctx).await;
    ctx.observe(NAME, started, result.as_ref().map(|_| ()));
    result
}

async fn inject<K: Target>(obj: &PartialObjectMeta<K>, ctx: &Context) -> Result<Action, Error> {
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
    let api = K::api(ctx.client.clone(), obj.namespace().as_deref());
    let Some(full) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let value = match mode {
        Mode::Bundle => signer.bundle_pem.clone(),
        Mode::Legacy => legacy_value(ctx, &obj.namespace().unwrap_or_default(), &signer.bundle_pem).await?,
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
    let params = PatchParams::apply(ann::FIELD_MANAGER).force();
    let merge_params = PatchParams { field_manager: Some(ann::FIELD_MANAGER.into()), ..Default::default() };
    ctx.metrics.write(K::RESOURCE, "patch");
    let result = match write {
        Write::Apply(patch) => api.patch(&name, &params, &Patch::Apply(guarded(patch))).await,
        Write::Merge(patch) => api.patch(&name, &merge_params, &Patch::Merge(guarded(patch))).await,
    };
    match result {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        Err(kube::Error::Api(s)) if s.code == 422 => {
            let note = format!("could not inject the CA bundle: the API server refused it: {}", s.message);
            tracing::warn!(kind = K::KIND, object = %ObjectRef::from_obj(obj), "{note}");
            ctx.event(&reference, EventType::Warning, "CABundleInjectionFailed", note).await;
            return Ok(Action::requeue(backoff(6)));
        }
        Err(e) => return Err(e.into()),
    }
    ctx.metrics.injections.get_or_create(&crate::metrics::KindLabels { kind: K::RESOURCE }).inc();
    tracing::info!(kind = K::KIND, object = %ObjectRef::from_obj(obj), "CA bundle injected");
    Ok(Action::await_change())
}

/// The legacy value: the bundle, then the cluster's root CA (`kube-root-ca.crt` of the
/// same namespace), then a newline — what the original system wrote.
async fn legacy_value(ctx: &Context, namespace: &str, bundle: &str) -> Result<String, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let root = api
        .get_opt("kube-root-ca.crt")
        .await?
        .and_then(|cm| cm.data.and_then(|mut d| d.remove("ca.crt")))
        .ok_or_else(|| Error::Legacy(format!("ConfigMap {namespace}/kube-root-ca.crt has no ca.crt yet")))?;
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
