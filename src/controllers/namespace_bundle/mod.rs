//! The per-namespace bundle (docs/spec.md §5.5): ConfigMap `openshift-service-ca.crt`
//! with `service-ca.crt` = the CA bundle in every namespace the selector picks.
//!
//! Watch: namespaces as metadata only (a new one, or one that starts terminating, is
//! queued; label changes are not), and the ConfigMaps of that one name cluster-wide
//! (field selector), as metadata only, each folded into one compact record per
//! namespace ([`table`]; no cache of objects). A change to such a ConfigMap queues its
//! namespace; a new bundle queues every namespace. Nothing is planned before both
//! first lists are complete (a restart sends no needless creates). Plan: [`plan::plan`],
//! from the record alone: the label [`NAMESPACE_BUNDLE_LABEL`] (value: the operator's
//! namespace) marks ours, the annotation [`BUNDLE_DIGEST`] tells whether ours is
//! current, so a rotation costs one write per namespace and no read. Write: create, or
//! a merge patch of the bundle guarded by the resourceVersion planned from. Report: one
//! Warning per ConfigMap of that name that is not ours (left alone).
//!
//! Namespaces are cluster-scoped, one object each: the per-namespace slot limit of
//! [`super::turns`] has nothing to share out here; the queue runs at most
//! `--controller-concurrency` passes at once, one at a time per namespace.

pub mod plan;
pub mod table;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Patch;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tracing::Instrument;

use self::plan::{Digest, Kind, Plan};
use self::table::{Presence, Table};
use super::ca_bundle::Warned;
use super::failure::{Op, no_answer};
use super::watch::reported_events;
use super::{
    Categorised, Context, EventType, LOOK_AGAIN, Outcome, RETRY_REFUSED, Retries, UNREACHABLE_RETRY, patch_params,
    post_params, shown,
};
use crate::metrics::trust::StateLabels;
use crate::names::{BUNDLE_DIGEST, INJECTED_CONFIGMAP_KEY, NAMESPACE_BUNDLE, NAMESPACE_BUNDLE_LABEL};
use crate::shutdown::Shutdown;

pub const NAME: &str = "namespace-bundle";
const FOREIGN: &str = "NamespaceBundleNotOurs";
const REFUSED: &str = "NamespaceBundleRefused";

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

/// What the controller holds: the records and queue, and what wakes the queue's runner.
pub struct State {
    ctx: Arc<Context>,
    table: Mutex<Table>,
    wake: Notify,
    retries: Retries,
    warned: Warned,
}

/// Runs the controller until `shutdown` (at once, when `--namespace-bundles=false`).
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    if !ctx.config.trust.namespace_bundles {
        return;
    }
    let state = Arc::new(State {
        ctx: ctx.clone(),
        table: Mutex::default(),
        wake: Notify::new(),
        retries: Retries::default(),
        warned: Warned::default(),
    });
    let selector = watcher::Config::default().labels(&ctx.config.trust.namespace_bundle_selector);
    let namespaces =
        reported_events(Api::<PartialObjectMeta<Namespace>>::all(ctx.client.clone()), selector, ctx.health.clone())
            .for_each(|event| state.changed(|t| t.namespace_event(event)));
    let by_name = watcher::Config::default().fields(&format!("metadata.name={NAMESPACE_BUNDLE}"));
    let instance = ctx.config.namespace.as_str();
    let bundles =
        reported_events(Api::<PartialObjectMeta<ConfigMap>>::all(ctx.client.clone()), by_name, ctx.health.clone())
            .for_each(|event| state.changed(|t| t.bundle_event(event, instance)));
    let rotations = ctx.signer.changes().for_each(|()| state.changed(Table::enqueue_all));
    let counting = count(&state, shutdown.clone());
    let watching = async { tokio::join!(namespaces, bundles, rotations, counting) };
    tokio::select! {
        _ = work(state.clone(), shutdown) => {}
        _ = watching => {}
    }
}

/// Runs the queue until `shutdown`, at most `--controller-concurrency` passes at once;
/// the passes under way when it comes are finished.
async fn work(state: Arc<State>, shutdown: Shutdown) {
    let limit = usize::from(state.ctx.config.controller_concurrency.max(1));
    let mut running = FuturesUnordered::new();
    let mut stop = std::pin::pin!(shutdown.signal());
    let mut stopping = false;
    loop {
        while !stopping && running.len() < limit {
            let Some(namespace) = state.table().take() else { break };
            running.push(pass(state.clone(), namespace));
        }
        tokio::select! {
            _ = &mut stop, if !stopping => stopping = true,
            _ = state.wake.notified(), if !stopping => {}
            Some(()) = running.next(), if !running.is_empty() => {}
            else => return,
        }
    }
}

/// One pass over `namespace`, then its next turn: queued again after the delay the pass
/// asked for, or after the backoff of [`Retries`] when it failed.
async fn pass(state: Arc<State>, namespace: Arc<str>) {
    let object = shown("Namespace", None, &namespace);
    let span = tracing::info_span!("reconcile", controller = NAME, %object, reason = tracing::field::Empty);
    let result = state.ctx.timed(NAME, reconcile(&state, &namespace)).instrument(span).await;
    let again = match result {
        Ok(again) => {
            state.retries.forget(&namespace);
            again
        }
        Err(error) => {
            let mut delay = state.retries.next_delay(&namespace);
            if error.unreachable() {
                delay = delay.min(UNREACHABLE_RETRY);
            }
            tracing::warn!(controller = NAME, %object, %error, retry_in = ?delay, "reconcile failed");
            Some(delay)
        }
    };
    state.table().done(&namespace);
    if let Some(delay) = again {
        let state = state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            state.changed(|t| t.enqueue(namespace)).await;
        });
    }
}

/// `service_ca_namespace_bundles{state="selected"|"current"}` every 10 s, from the records.
async fn count(state: &State, shutdown: Shutdown) {
    let ctx = &state.ctx;
    let mut every = tokio::time::interval(Duration::from_secs(10));
    let mut stop = std::pin::pin!(shutdown.signal());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = every.tick() => {}
        }
        let Some(signer) = ctx.signer.current() else { continue };
        let digest = Digest::of(&signer.bundle_pem);
        let (selected, current) = {
            let table = state.table();
            let live: Vec<_> = table.selected().filter(|r| r.presence == Presence::Live).collect();
            let current = live.iter().filter(|r| r.bundle.as_ref().is_some_and(|b| b.current(&digest))).count();
            (live.len(), current)
        };
        let gauge = |state| ctx.metrics.trust.namespace_bundles.get_or_create(&StateLabels { state });
        gauge("selected").set(i64::try_from(selected).unwrap_or(i64::MAX));
        gauge("current").set(i64::try_from(current).unwrap_or(i64::MAX));
    }
}

async fn reconcile(state: &State, namespace: &str) -> Result<Option<Duration>, Error> {
    let ctx = &state.ctx;
    let Some(signer) = ctx.signer.current() else {
        return Ok(None);
    };
    let Some((presence, bundle, seen)) =
        state.table().get(namespace).map(|r| (r.presence, r.bundle.clone(), r.seen_current.clone()))
    else {
        return Ok(None);
    };
    let digest = Digest::of(&signer.bundle_pem);
    let terminating = presence != Presence::Live;
    let planned = plan::plan(terminating, bundle.as_ref(), &digest, seen.as_deref());
    if !matches!(planned, Plan::Foreign { .. }) {
        state.warned.clear(namespace, Some(FOREIGN));
    }
    if terminating {
        // Terminating or no longer selected: forget it (every namespace goes this way,
        // so what is kept per namespace stays bounded by the namespaces there are).
        state.table().saw_current(namespace, None);
        state.warned.clear(namespace, None);
        return Ok(None);
    }
    let instance = ctx.config.namespace.as_str();
    let hex = digest.to_string();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let write = match planned {
        Plan::Nothing => {
            state.table().saw_current(namespace, bundle.as_ref().map(|b| &*b.version));
            return Ok(None);
        }
        Plan::Foreign { injected } => {
            state.table().saw_current(namespace, None);
            if let (false, Some(Kind::Foreign { uid, .. })) = (injected, bundle.map(|b| b.kind)) {
                state.report_foreign(namespace, uid.as_deref()).await;
            }
            return Ok(None);
        }
        Plan::Create => {
            let object = desired(namespace, instance, &signer.bundle_pem, &hex);
            ctx.metrics.write("configmaps", "create");
            api.create(&post_params(), &object).await
        }
        Plan::Update(version) => update(ctx, &api, &version, instance, &signer.bundle_pem, &hex).await,
        Plan::Verify => {
            let full = api.get_opt(NAMESPACE_BUNDLE).await.map_err(Error::kube(READ, namespace))?;
            let Some(full) = full else { return Ok(Some(LOOK_AGAIN)) };
            let version = full.resource_version().unwrap_or_default();
            let holds = full.data.as_ref().and_then(|d| d.get(INJECTED_CONFIGMAP_KEY)) == Some(&signer.bundle_pem);
            if holds && plan::ours(&full.metadata, instance) && plan::current(&full.metadata, &hex) {
                state.table().saw_current(namespace, Some(&version));
                return Ok(None);
            }
            update(ctx, &api, &version, instance, &signer.bundle_pem, &hex).await
        }
    };
    state.written(namespace, write).await
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
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `change` to the table and wakes the queue's runner.
    fn changed(&self, change: impl FnOnce(&mut Table)) -> std::future::Ready<()> {
        change(&mut self.table());
        self.wake.notify_one();
        std::future::ready(())
    }

    /// After a write: remember the version written, or decide when to look again.
    async fn written(
        &self,
        namespace: &str,
        result: Result<ConfigMap, kube::Error>,
    ) -> Result<Option<Duration>, Error> {
        match result {
            Ok(written) => {
                tracing::debug!(%namespace, "namespace bundle written");
                self.table().saw_current(namespace, Some(&written.resource_version().unwrap_or_default()));
                Ok(None)
            }
            // A terminating namespace refuses new objects: nothing to do there.
            Err(e) if super::api_message(&e).contains("because it is being terminated") => Ok(None),
            Err(source) => self.failed(namespace, source).await,
        }
    }

    /// A failed write: a lost race (the watch shows the news), a refusal (warned once),
    /// or an error for the backoff of [`Retries`].
    async fn failed(&self, namespace: &str, source: kube::Error) -> Result<Option<Duration>, Error> {
        match Outcome::<()>::of_failure(&source) {
            Some(Outcome::Refused(why)) => {
                let note = format!("could not write ConfigMap {NAMESPACE_BUNDLE}: the API server refused it: {why}");
                self.warn(namespace, None, REFUSED, note).await;
                Ok(Some(RETRY_REFUSED))
            }
            Some(_) => Ok(Some(LOOK_AGAIN)),
            None => Err(Error::kube(WRITE, namespace)(source)),
        }
    }

    async fn report_foreign(&self, namespace: &str, uid: Option<&str>) {
        let note = format!(
            "ConfigMap {NAMESPACE_BUNDLE} in this namespace was not made by the operator (no label \
             {NAMESPACE_BUNDLE_LABEL}={}): it is left alone and does not receive the CA bundle. Delete it to let \
             the operator publish the bundle here.",
            self.ctx.config.namespace
        );
        self.warn(namespace, uid, FOREIGN, note).await;
    }

    async fn warn(&self, namespace: &str, uid: Option<&str>, reason: &'static str, note: String) {
        if !self.warned.first(namespace, reason, &note) {
            return;
        }
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some(NAMESPACE_BUNDLE.into()),
            namespace: Some(namespace.into()),
            uid: uid.map(String::from),
            ..Default::default()
        };
        self.ctx.event(&regarding, EventType::Warning, reason, note).await;
    }
}
