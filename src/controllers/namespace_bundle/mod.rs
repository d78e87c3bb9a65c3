//! The per-namespace bundle (docs/spec.md §5.5): ConfigMap `openshift-service-ca.crt`
//! with `service-ca.crt` = the CA bundle in every namespace the selector picks.
//!
//! Watch: namespaces as metadata only (a new one, or one that starts terminating, is
//! handed on; label changes are not), and the ConfigMaps of that one name cluster-wide
//! (field selector), as metadata only, trimmed to our label and digest annotation. A
//! change to such a ConfigMap reconciles its namespace; a new bundle reconciles every
//! namespace. Plan: [`plan::plan`], from metadata alone: the label
//! [`NAMESPACE_BUNDLE_LABEL`] (value: the operator's namespace) marks ours, the
//! annotation [`BUNDLE_DIGEST`] tells whether ours is current, so a rotation costs one
//! write per namespace and no read. Write: create, or a merge patch of the bundle
//! guarded by the resourceVersion planned from. Report: one Warning per ConfigMap of
//! that name that is not ours (left alone).
//!
//! Namespaces are cluster-scoped, one object each: the per-namespace slot limit of
//! [`super::turns`] has nothing to share out here.

pub mod plan;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Patch;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;

use self::plan::Plan;
use super::ca_bundle::Warned;
use super::failure::{Op, no_answer};
use super::watch::cached_watch;
use super::{
    Categorised, Context, EventType, LOOK_AGAIN, Outcome, RETRY_REFUSED, Shard, drive, patch_params, post_params, shown,
};
use crate::metrics::trust::StateLabels;
use crate::names::{self as ann, BUNDLE_DIGEST, INJECTED_CONFIGMAP_KEY, NAMESPACE_BUNDLE, NAMESPACE_BUNDLE_LABEL};
use crate::shutdown::Shutdown;

pub const NAME: &str = "namespace-bundle";
const FOREIGN: &str = "NamespaceBundleNotOurs";
const REFUSED: &str = "NamespaceBundleRefused";

type NamespaceMeta = PartialObjectMeta<Namespace>;
type BundleMeta = PartialObjectMeta<ConfigMap>;

/// What can fail in a pass (the shape of every controller's errors, see
/// [`super::failure`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Kube { action: Op, object: String, source: kube::Error },
}

const READ: Op = Op { doing: "reading", category: "read" };
const WRITE: Op = Op { doing: "writing", category: "write" };

impl Error {
    fn kube(action: Op, namespace: &str) -> impl FnOnce(kube::Error) -> Error {
        let object = shown("ConfigMap", Some(namespace), NAMESPACE_BUNDLE);
        move |source| Error::Kube { action, object, source }
    }
}

impl Categorised for Error {
    fn category(&self) -> &'static str {
        let Error::Kube { action, .. } = self;
        action.category
    }
    fn unreachable(&self) -> bool {
        let Error::Kube { source, .. } = self;
        no_answer(source)
    }
}

/// What the controller holds between passes.
pub struct State {
    ctx: Arc<Context>,
    /// The bundle ConfigMaps of every namespace (metadata, trimmed).
    pub bundles: Store<BundleMeta>,
    /// Per namespace: the resourceVersion its ConfigMap was last seen current at.
    seen_current: Mutex<HashMap<String, String>>,
    warned: Warned,
}

/// Runs the controller until `shutdown` (at once, when `--namespace-bundles=false`).
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    if !ctx.config.trust.namespace_bundles {
        return;
    }
    let health = ctx.health.clone();
    let selector = watcher::Config::default().labels(&ctx.config.trust.namespace_bundle_selector);
    let (namespaces, namespace_changes) = cached_watch(
        Api::<NamespaceMeta>::all(ctx.client.clone()),
        selector,
        health.clone(),
        |_| true,
        |ns| {
            let deletion = ns.metadata.deletion_timestamp.take();
            ns.metadata = ObjectMeta { deletion_timestamp: deletion, ..trimmed(ns) };
        },
        |cached, ns| cached.is_none_or(|c| c.metadata.deletion_timestamp != ns.metadata.deletion_timestamp),
    );
    let by_name = watcher::Config::default().fields(&format!("metadata.name={NAMESPACE_BUNDLE}"));
    let (bundles, bundle_changes) = cached_watch(
        Api::<BundleMeta>::all(ctx.client.clone()),
        by_name,
        health,
        |_| true,
        |cm| {
            let (labels, annotations) = (kept(&cm.metadata.labels), kept(&cm.metadata.annotations));
            cm.metadata = ObjectMeta { labels, annotations, ..trimmed(cm) };
        },
        |_, _| true,
    );
    let counting = count(ctx.clone(), namespaces.clone(), bundles.clone(), shutdown.clone());
    let controller = Controller::for_stream(namespace_changes, namespaces)
        .watches_stream(bundle_changes, |cm: BundleMeta| {
            cm.metadata.namespace.map(|ns| ObjectRef::<NamespaceMeta>::new(&ns))
        });
    let state =
        Arc::new(State { ctx: ctx.clone(), bundles, seen_current: Mutex::default(), warned: Warned::default() });
    tokio::join!(drive(controller, NAME, ctx, shutdown, state, Shard::All, reconcile), counting);
}

/// `service_ca_namespace_bundles{state="selected"|"current"}` every 10 s, from the caches.
async fn count(ctx: Arc<Context>, namespaces: Store<NamespaceMeta>, bundles: Store<BundleMeta>, shutdown: Shutdown) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    let mut stop = std::pin::pin!(shutdown.signal());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = every.tick() => {}
        }
        let Some(signer) = ctx.signer.current() else { continue };
        let digest = plan::digest(&signer.bundle_pem);
        let live: Vec<String> = namespaces
            .state()
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .map(|n| n.name_any())
            .collect();
        let current = live
            .iter()
            .filter(|ns| {
                let key = ObjectRef::<BundleMeta>::new(NAMESPACE_BUNDLE).within(ns);
                bundles.get(&key).is_some_and(|cm| {
                    plan::ours(&cm.metadata, &ctx.config.namespace) && plan::current(&cm.metadata, &digest)
                })
            })
            .count();
        let gauge = |state| ctx.metrics.trust.namespace_bundles.get_or_create(&StateLabels { state });
        gauge("selected").set(i64::try_from(live.len()).unwrap_or(i64::MAX));
        gauge("current").set(i64::try_from(current).unwrap_or(i64::MAX));
    }
}

/// Name, namespace, UID and resourceVersion only.
fn trimmed<K: kube::Resource>(obj: &PartialObjectMeta<K>) -> ObjectMeta {
    let m = &obj.metadata;
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        ..Default::default()
    }
}

/// The labels and annotations the plan reads: ours, and the inject annotations.
fn kept(map: &Option<BTreeMap<String, String>>) -> Option<BTreeMap<String, String>> {
    let keep = |k: &str| {
        k == NAMESPACE_BUNDLE_LABEL
            || k == BUNDLE_DIGEST
            || k == ann::BETA.inject_cabundle
            || k == ann::ALPHA.inject_cabundle
            || k == ann::INJECT_VULNERABLE_LEGACY_CABUNDLE
    };
    map.as_ref().map(|m| m.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect())
}

async fn reconcile(ns: Arc<NamespaceMeta>, state: Arc<State>) -> Result<Action, Error> {
    let ctx = &state.ctx;
    let Some(signer) = ctx.signer.current() else {
        return Ok(Action::await_change());
    };
    let namespace = ns.name_any();
    let key = ObjectRef::<BundleMeta>::new(NAMESPACE_BUNDLE).within(&namespace);
    // Until the ConfigMaps are listed, a namespace whose bundle is not cached yet would
    // be planned as new (a create the API server refuses): look again once they are.
    if futures::FutureExt::now_or_never(state.bundles.wait_until_ready()).is_none_or(|ready| ready.is_err()) {
        return Ok(Action::requeue(LOOK_AGAIN));
    }
    let cached = state.bundles.get(&key);
    let digest = plan::digest(&signer.bundle_pem);
    let seen = state.seen_current.lock().ok().and_then(|s| s.get(&namespace).cloned());
    let instance = ctx.config.namespace.as_str();
    let planned = plan::plan(&ns.metadata, cached.as_ref().map(|c| &c.metadata), instance, &digest, seen.as_deref());
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    if !matches!(planned, Plan::Foreign { .. }) {
        state.warned.clear(&namespace, Some(FOREIGN));
    }
    if ns.metadata.deletion_timestamp.is_some() {
        // Terminating: forget it (every namespace goes this way, so what is kept per
        // namespace stays bounded by the namespaces there are).
        state.seen_current.lock().map(|mut s| s.remove(&namespace)).ok();
        state.warned.clear(&namespace, None);
        return Ok(Action::await_change());
    }
    let write = match planned {
        Plan::Nothing => {
            if let Some(version) = cached.and_then(|c| c.metadata.resource_version.clone()) {
                state.saw_current(&namespace, version);
            }
            return Ok(Action::await_change());
        }
        Plan::Foreign { injected } => {
            state.seen_current.lock().map(|mut s| s.remove(&namespace)).ok();
            if !injected && let Some(cm) = cached {
                state.report_foreign(&cm.metadata).await;
            }
            return Ok(Action::await_change());
        }
        Plan::Create => {
            let object = desired(&namespace, instance, &signer.bundle_pem, &digest);
            ctx.metrics.write("configmaps", "create");
            api.create(&post_params(), &object).await
        }
        Plan::Update(version) => update(ctx, &api, &version, instance, &signer.bundle_pem, &digest).await,
        Plan::Verify => {
            let full = api.get_opt(NAMESPACE_BUNDLE).await.map_err(Error::kube(READ, &namespace))?;
            let Some(full) = full else { return Ok(Action::requeue(LOOK_AGAIN)) };
            let version = full.resource_version().unwrap_or_default();
            let holds = full.data.as_ref().and_then(|d| d.get(INJECTED_CONFIGMAP_KEY)) == Some(&signer.bundle_pem);
            if holds && plan::ours(&full.metadata, instance) && plan::current(&full.metadata, &digest) {
                state.saw_current(&namespace, version);
                return Ok(Action::await_change());
            }
            update(ctx, &api, &version, instance, &signer.bundle_pem, &digest).await
        }
    };
    state.written(&namespace, write).await
}

/// The bundle written over `version`: the key, our label and the digest (other keys and
/// fields stay).
async fn update(
    ctx: &Context,
    api: &Api<ConfigMap>,
    version: &str,
    instance: &str,
    bundle: &str,
    digest: &str,
) -> Result<ConfigMap, kube::Error> {
    let patch = json!({
        "metadata": {
            "resourceVersion": version,
            "labels": { NAMESPACE_BUNDLE_LABEL: instance },
            "annotations": { BUNDLE_DIGEST: digest },
        },
        "data": { INJECTED_CONFIGMAP_KEY: bundle },
    });
    ctx.metrics.write("configmaps", "patch");
    api.patch(NAMESPACE_BUNDLE, &patch_params(), &Patch::Merge(patch)).await
}

/// The ConfigMap as this instance makes it.
pub fn desired(namespace: &str, instance: &str, bundle: &str, digest: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(NAMESPACE_BUNDLE.into()),
            namespace: Some(namespace.into()),
            labels: Some([(NAMESPACE_BUNDLE_LABEL.to_string(), instance.to_string())].into()),
            annotations: Some([(BUNDLE_DIGEST.to_string(), digest.to_string())].into()),
            ..Default::default()
        },
        data: Some([(INJECTED_CONFIGMAP_KEY.to_string(), bundle.to_string())].into()),
        ..Default::default()
    }
}

impl State {
    fn saw_current(&self, namespace: &str, version: String) {
        if let Ok(mut seen) = self.seen_current.lock() {
            seen.insert(namespace.to_string(), version);
        }
    }

    /// After a write: remember the version written, or decide when to look again.
    async fn written(&self, namespace: &str, result: Result<ConfigMap, kube::Error>) -> Result<Action, Error> {
        match result {
            Ok(written) => {
                tracing::debug!(%namespace, "namespace bundle written");
                self.saw_current(namespace, written.resource_version().unwrap_or_default());
                Ok(Action::await_change())
            }
            // A terminating namespace refuses new objects: nothing to do there.
            Err(e) if super::api_message(&e).contains("because it is being terminated") => Ok(Action::await_change()),
            Err(source) => self.failed(namespace, source).await,
        }
    }

    /// A failed write: a lost race (the watch shows the news), a refusal (warned once),
    /// or an error for the backoff of `drive`.
    async fn failed(&self, namespace: &str, source: kube::Error) -> Result<Action, Error> {
        match Outcome::<()>::of_failure(&source) {
            Some(Outcome::Refused(why)) => {
                let note = format!("could not write ConfigMap {NAMESPACE_BUNDLE}: the API server refused it: {why}");
                let meta = ObjectMeta {
                    name: Some(NAMESPACE_BUNDLE.into()),
                    namespace: Some(namespace.into()),
                    ..Default::default()
                };
                self.warn(&meta, REFUSED, note).await;
                Ok(Action::requeue(RETRY_REFUSED))
            }
            Some(_) => Ok(Action::requeue(LOOK_AGAIN)),
            None => Err(Error::kube(WRITE, namespace)(source)),
        }
    }

    async fn report_foreign(&self, meta: &ObjectMeta) {
        let note = format!(
            "ConfigMap {NAMESPACE_BUNDLE} in this namespace was not made by the operator (no label \
             {NAMESPACE_BUNDLE_LABEL}={}): it is left alone and does not receive the CA bundle. Delete it to let \
             the operator publish the bundle here.",
            self.ctx.config.namespace
        );
        self.warn(meta, FOREIGN, note).await;
    }

    async fn warn(&self, meta: &ObjectMeta, reason: &'static str, note: String) {
        let namespace = meta.namespace.clone().unwrap_or_default();
        if !self.warned.first(&namespace, reason, &note) {
            return;
        }
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some(NAMESPACE_BUNDLE.into()),
            namespace: Some(namespace),
            uid: meta.uid.clone(),
            ..Default::default()
        };
        self.ctx.event(&regarding, EventType::Warning, reason, note).await;
    }
}
