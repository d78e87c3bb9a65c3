//! CA bundle injection (docs/spec.md §2): one controller per kind, one generic reconcile.
//!
//! Watch: objects as metadata only (the operator never caches ConfigMap bodies or CRD
//! schemas); when the bundle changes, every annotated object is reconciled at once.
//! Plan: [`mode`] reads the annotations; [`Target::plan`] (pure, per kind, in
//! `targets`) compares the full object, read when acting, with the bundle.
//! Write: only the injected field, guarded by the resourceVersion the plan was made
//! from, never as a co-owner that blocks another manager (see `targets`). The
//! operator's own objects are never targets ([`own_object`]). Report: metrics, and
//! one Warning Event per distinct problem ([`Warned`]); failures are retried with the
//! per-object backoff of [`drive`].

mod targets;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

pub use targets::{Target, Write};

use super::failure::{Op, no_answer};
use super::watch::cached_metadata_watch;
use super::{
    Categorised, Context, EventType, LOOK_AGAIN_INJECTING, Outcome, RETRY_REFUSED, Shard, api_message, drive,
    patch_params, shown_obj,
};
use crate::names::{self as ann, KUBE_ROOT_CA, KUBE_ROOT_CA_KEY, SIGNING_CABUNDLE, is_true};
use crate::shutdown::Shutdown;

pub const NAME: &str = "ca-bundle";

/// What can fail in an injection: what was being done, to which object (the shape of
/// every controller's errors, see [`super::failure`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Kube { action: Op, object: String, source: kube::Error },
    #[error("{action} {object}: {source}")]
    Json { action: Op, object: String, source: serde_json::Error },
    #[error("{object} has no {KUBE_ROOT_CA_KEY} yet: the legacy bundle cannot be made")]
    NoRootCa { object: String },
}

const READ: Op = Op { doing: "reading", category: "read" };
const INJECT: Op = Op { doing: "injecting the CA bundle into", category: "write" };
const ENCODE: Op = Op { doing: "encoding the patch for", category: "write" };
const READ_ROOT_CA: Op =
    Op { doing: "reading the cluster root CA for the legacy bundle from", category: "legacy-root-ca" };

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube { action, .. } | Error::Json { action, .. } => action.category,
            Error::NoRootCa { .. } => READ_ROOT_CA.category,
        }
    }

    fn unreachable(&self) -> bool {
        match self {
            // The object was read a moment before: a write that gets no answer is more
            // likely cut off for its own sake (a body over the API server's limit) than
            // an outage, and must back off like any failing write instead of coming
            // back every few seconds with the same large patch.
            Error::Kube { action, source, .. } => *action != INJECT && no_answer(source),
            Error::NoRootCa { .. } | Error::Json { .. } => false,
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
        let bad = K::bad_annotation(&annotations);
        return (bad.is_none().then_some(Mode::Bundle), bad);
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
        || key == ann::INJECT_CABUNDLE_KEY
}

/// Whether `meta` names an object the operator writes for itself (`signing-cabundle`
/// in its namespace): never an injection target, whatever its annotations say (two
/// controllers would fight over its `data`).
pub fn own_object<K: Target>(meta: &ObjectMeta, operator_namespace: &str) -> bool {
    K::KIND == "ConfigMap"
        && meta.namespace.as_deref() == Some(operator_namespace)
        && meta.name.as_deref() == Some(SIGNING_CABUNDLE)
}

/// The Warnings already published, per (object, reason): the note's digest. A
/// problem is reported once, not once per reconcile or retry (the Event recorder
/// would turn each repeat into another write); a different note is a new Event, and
/// once the problem is gone it may be reported again.
#[derive(Default)]
pub struct Warned(Mutex<HashMap<(String, &'static str), u64>>);

impl Warned {
    /// Records `note` for (`object`, `reason`); true when it was not the last one
    /// recorded there (so it is to be published).
    pub fn first(&self, object: &str, reason: &'static str, note: &str) -> bool {
        let digest = super::digest(note);
        match self.0.lock() {
            Ok(mut seen) => seen.insert((object.to_string(), reason), digest) != Some(digest),
            Err(_) => true,
        }
    }

    /// The problem of `reason` (every reason: `None`) is gone for `object`.
    pub fn clear(&self, object: &str, reason: Option<&'static str>) {
        if let Ok(mut seen) = self.0.lock() {
            seen.retain(|(o, r), _| o != object || reason.is_some_and(|reason| reason != *r));
        }
    }
}

/// What one kind's injector holds: the shared context and the Warnings it sent.
struct Injector {
    ctx: Arc<Context>,
    warned: Warned,
}

impl Injector {
    /// Publishes a Warning Event unless this very note was the last one published
    /// for (`object`, `reason`).
    async fn warn(&self, object: &str, regarding: &ObjectReference, reason: &'static str, note: String) {
        if self.warned.first(object, reason, &note) {
            self.ctx.event(regarding, EventType::Warning, reason, note).await;
        }
    }
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
    let state = Arc::new(Injector { ctx: ctx.clone(), warned: Warned::default() });
    let forget = forget_gone::<K>(store.clone(), state.clone());
    let controller = Controller::for_stream(stream, store);
    tokio::select! {
        () = drive(controller, NAME, ctx, shutdown, state, Shard::All, inject::<K>) => {}
        () = forget => {}
    }
}

/// Every [`FORGET_GONE_EVERY`], forgets what is remembered of objects no longer in the
/// cache (deleted, or no longer annotated): their Warnings sent and their injection
/// status in the metrics. A deleted object gets no reconcile to do it.
async fn forget_gone<K: Target>(store: Store<PartialObjectMeta<K>>, state: Arc<Injector>) {
    let mut every = tokio::time::interval(FORGET_GONE_EVERY);
    loop {
        every.tick().await;
        let present: HashSet<String> =
            store.state().iter().map(|o| ObjectRef::from_obj(o.as_ref()).to_string()).collect();
        state.ctx.metrics.trust.injected.retain(K::RESOURCE, |object| present.contains(object));
        if let Ok(mut seen) = state.warned.0.lock() {
            seen.retain(|(object, _), _| present.contains(object));
        }
    }
}

const FORGET_GONE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// At most this many writes in one pass (inject, then give up ownership); anything
/// left is seen on the next pass, which our own write triggers.
const MAX_WRITES: usize = 3;

const INVALID_ANNOTATION: &str = "InvalidInjectAnnotation";
const FAILED: &str = "CABundleInjectionFailed";
const IGNORED: &str = "CABundleInjectionIgnored";

async fn inject<K: Target>(obj: Arc<PartialObjectMeta<K>>, state: Arc<Injector>) -> Result<Action, Error> {
    let ctx = &state.ctx;
    let (mode, warning) = mode::<K>(&obj.metadata);
    let reference = ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::KIND.into()),
        name: obj.metadata.name.clone(),
        namespace: obj.metadata.namespace.clone(),
        uid: obj.metadata.uid.clone(),
        ..Default::default()
    };
    let object = ObjectRef::from_obj(obj.as_ref()).to_string();
    // Sent on every pass, which happens only when a person changed the object (or the
    // bundle changed): the recorder counts the repeat on the same Event.
    if let Some(warning) = warning {
        ctx.event(&reference, EventType::Warning, INVALID_ANNOTATION, warning).await;
    }
    let Some(mode) = mode else {
        ctx.metrics.trust.injected.record(&object, K::RESOURCE, None);
        state.warned.clear(&object, Some(FAILED));
        return Ok(Action::await_change());
    };
    if own_object::<K>(&obj.metadata, &ctx.config.namespace) {
        let note = format!(
            "{} is written by the operator itself and is never an injection target: nothing is injected. \
             Remove the inject annotation.",
            crate::bounded(&shown_obj(obj.as_ref()))
        );
        state.warn(&object, &reference, IGNORED, note).await;
        return Ok(Action::await_change());
    }
    let result = inject_into::<K>(&obj, ctx, mode).await;
    let status = match &result {
        Ok(Outcome::Done(())) => {
            ctx.signer.current().map(|s| Some(crate::metrics::trust::bundle_digest(&s.bundle_pem)))
        }
        Ok(Outcome::Gone | Outcome::Raced | Outcome::Held(_)) => None,
        Ok(Outcome::Refused(_)) | Err(_) => Some(None),
    };
    ctx.metrics.trust.injected.record(&object, K::RESOURCE, status);
    match &result {
        Ok(Outcome::Done(())) => state.warned.clear(&object, Some(FAILED)),
        Ok(Outcome::Gone | Outcome::Held(_)) => state.warned.clear(&object, None),
        Ok(Outcome::Raced) => {}
        Ok(Outcome::Refused(message)) => {
            let note = format!("could not inject the CA bundle: the API server refused it: {message}");
            tracing::warn!(object = %shown_obj(obj.as_ref()), "{note}");
            state.warn(&object, &reference, FAILED, note).await;
        }
        // Retried with the per-object backoff of `drive`; reported once (a transport
        // failure says nothing about the object and is not reported).
        Err(error) if !error.unreachable() => {
            let problem = match error {
                Error::Kube { action: INJECT, source, .. } => match super::status_code(source) {
                    Some(code) => format!("the API server answered {code}: {}", api_message(source)),
                    None => source.to_string(),
                },
                other => other.to_string(),
            };
            // (`drive` logs every failed attempt.)
            let note = format!("could not inject the CA bundle: {}", crate::bounded(&problem));
            state.warn(&object, &reference, FAILED, note).await;
        }
        Err(_) => {}
    }
    result.map(|outcome| match outcome {
        Outcome::Done(()) | Outcome::Gone | Outcome::Held(_) => Action::await_change(),
        Outcome::Raced => Action::requeue(LOOK_AGAIN_INJECTING),
        Outcome::Refused(_) => Action::requeue(RETRY_REFUSED),
    })
}

/// Read → plan → write, until the plan asks for nothing (at most [`MAX_WRITES`]).
async fn inject_into<K: Target>(obj: &PartialObjectMeta<K>, ctx: &Context, mode: Mode) -> Result<Outcome, Error> {
    let Some(signer) = ctx.signer.current() else {
        return Ok(Outcome::Done(()));
    };
    let name = obj.name_any();
    let api = K::api(ctx.client.clone(), obj.namespace().as_deref());
    let full =
        api.get_opt(&name).await.map_err(|source| Error::Kube { action: READ, object: shown_obj(obj), source })?;
    let Some(mut current) = full else {
        return Ok(Outcome::Gone);
    };
    let value = match mode {
        Mode::Bundle => signer.bundle_pem.clone(),
        Mode::Legacy => legacy_value(ctx, &obj.namespace().unwrap_or_default(), &signer.bundle_pem).await?,
    };
    for _ in 0..MAX_WRITES {
        let Some(write) = current.plan(&value) else {
            break;
        };
        let injects = write.injects();
        // The plan was made from this version of the object: it is written only over
        // that version (a webhook entry removed meanwhile must not come back);
        // otherwise 409 and a fresh look.
        let write = write.guarded(&current.resource_version().unwrap_or_default());
        ctx.metrics.write(K::RESOURCE, "patch");
        // A failed patch ends the pass (unit tier: `write_tests.rs`): 409/404 is a race
        // (looked at again soon); 403/422 a refusal (warned once, again after
        // RETRY_REFUSED); anything else (413, 5xx, no answer) an error for `drive`'s backoff.
        let result = match write {
            Write::Apply(patch) => {
                api.patch(&name, &PatchParams::apply(ann::FIELD_MANAGER).force(), &Patch::Apply(patch)).await
            }
            Write::Merge(patch) => api.patch(&name, &patch_params(), &Patch::Merge(patch)).await,
            Write::Json(ops) | Write::Disown(ops) => {
                let ops = serde_json::from_value(serde_json::Value::Array(ops)).map_err(|source| Error::Json {
                    action: ENCODE,
                    object: shown_obj(obj),
                    source,
                })?;
                api.patch(&name, &patch_params(), &Patch::<serde_json::Value>::Json(ops)).await
            }
        };
        current = match result {
            Ok(written) => written,
            Err(source) => match Outcome::of_failure(&source) {
                Some(outcome) => return Ok(outcome),
                None => return Err(Error::Kube { action: INJECT, object: shown_obj(obj), source }),
            },
        };
        if injects {
            ctx.metrics.injections.get_or_create(&crate::metrics::KindLabels { kind: K::RESOURCE }).inc();
            tracing::info!(object = %shown_obj(obj), "CA bundle injected");
        } else {
            tracing::info!(object = %shown_obj(obj), "dropped our managedFields entry so that we block no other manager");
        }
    }
    Ok(Outcome::Done(()))
}

/// The legacy value: the bundle, then the cluster's root CA (`kube-root-ca.crt` of the
/// same namespace), then a newline — what the original system wrote.
async fn legacy_value(ctx: &Context, namespace: &str, bundle: &str) -> Result<String, Error> {
    let root_ca = || super::shown("ConfigMap", Some(namespace), KUBE_ROOT_CA);
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let root = api
        .get_opt(KUBE_ROOT_CA)
        .await
        .map_err(|source| Error::Kube { action: READ_ROOT_CA, object: root_ca(), source })?
        .and_then(|cm| cm.data.and_then(|mut d| d.remove(KUBE_ROOT_CA_KEY)))
        .ok_or_else(|| Error::NoRootCa { object: root_ca() })?;
    Ok(format!("{bundle}{root}\n"))
}

#[cfg(test)]
mod write_tests;

#[cfg(test)]
mod tests;
