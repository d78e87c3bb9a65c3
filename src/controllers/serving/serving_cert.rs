//! Serving-cert controller: an annotated Service gets its serving Secret.
//!
//! Keyed by Service. It creates the Secret when none exists, reports conflicts and bad
//! input on the Service (error annotations with a consecutive-failure count, capped at
//! 10, and a Warning Event), and records the signing CA in `serving-cert-signed-by`.
//! Existing Secrets that carry the managed label belong to the cert-refresh
//! controller; this one only repairs Secrets of ours without the label (which that
//! controller cannot see), so the two never write the same Secret.
//!
//! Watch: the shared Service cache, plus the Secret a Service names (see
//! `ServingWatches`). Plan: [`decide`] on the Secret read whole from the API server.
//! Write: create, or replace guarded by resourceVersion. Report: the Service's
//! annotations, an Event and the metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use time::OffsetDateTime;

use super::decision::decide;
use super::precondition::{Ask, Keyed, Step, ask, step};
use super::report::{mark_signed, report_problem};
use super::request::leaf_request;
use super::secret::{Content, desired, issue, read_secret, wait_for_deletion, write_secret};
use super::written::Marked;
use super::{Error, secret_ref};
use crate::controllers::{Context, LOOK_AGAIN, Outcome, Shard, drive, record_reason};
use crate::shutdown::Shutdown;

pub const NAME: &str = "serving-cert";

/// Runs the controller until `shutdown` (in-flight work finishes first).
pub async fn run(
    ctx: Arc<Context>,
    services: Store<Service>,
    secrets: Store<PartialObjectMeta<Secret>>,
    service_events: impl Stream<Item = Result<Service, watcher::Error>> + Send + 'static,
    secret_changes: impl Stream<Item = ObjectRef<Service>> + Send + 'static,
    shutdown: Shutdown,
) {
    let controller = Controller::for_stream(service_events, services).reconcile_on(secret_changes);
    let state =
        Arc::new(State { ctx: ctx.clone(), secrets, marked: Marked::default(), terminating: Terminating::default() });
    drive(controller, NAME, ctx, shutdown, state, Shard::By(super::request::service_key), reconcile).await;
}

struct State {
    ctx: Arc<Context>,
    /// The managed Secrets' metadata (the version of a Secret we may have just written).
    secrets: Store<PartialObjectMeta<Secret>>,
    /// The Services this controller just marked signed (the cache shows it a moment later).
    marked: Marked,
    terminating: Terminating,
}

/// Namespaces seen being deleted (a create there was refused for it). While a
/// namespace is deleted its Secrets often go before its Services; re-issuing each
/// would spend a key on a Secret that can never be created. Remembered for a minute,
/// so that a namespace re-created under the same name is served again.
#[derive(Default)]
struct Terminating(Mutex<HashMap<String, Instant>>);

/// How long a namespace seen terminating is left alone.
const TERMINATING_FOR: Duration = Duration::from_secs(60);

impl Terminating {
    fn note(&self, namespace: &str) {
        if let Ok(mut seen) = self.0.lock() {
            seen.retain(|_, at| at.elapsed() < TERMINATING_FOR);
            seen.insert(namespace.to_string(), Instant::now());
        }
    }

    /// How much longer `namespace` is left alone, if it was seen terminating.
    fn remaining(&self, namespace: &str) -> Option<Duration> {
        let seen = self.0.lock().ok()?;
        TERMINATING_FOR.checked_sub(seen.get(namespace)?.elapsed()).filter(|left| !left.is_zero())
    }
}

async fn reconcile(svc: Arc<Service>, st: Arc<State>) -> Result<Action, Error> {
    let ctx = &st.ctx;
    let (name, family, key) =
        match ask(&svc, Keyed::Service, ctx.config.default_key_algorithm, &ctx.config.allowed_key_algorithms) {
            Ask::Read { name, family, key } => (name, family, key),
            Ask::Wait | Ask::Release => return Ok(Action::await_change()),
            Ask::Report(problem) => return report_problem(ctx, NAME, &svc, &problem).await,
        };
    let Some(signer) = ctx.signer.current() else {
        // The CA is not loaded yet; loading it re-triggers every Service.
        return Ok(Action::await_change());
    };
    let namespace = svc.namespace().unwrap_or_default();
    if let Some(left) = st.terminating.remaining(&namespace) {
        return Ok(Action::requeue(left));
    }
    let cached = st.secrets.get(&ObjectRef::new(name).within(&namespace)).and_then(|s| s.resource_version());
    let existing = read_secret(ctx, &namespace, name, cached.as_deref()).await?;
    let policy = ctx.config.leaf_policy();
    let request = leaf_request(&svc, &policy.cluster_domain, key);
    let now = OffsetDateTime::now_utc();
    let mut issued = false;
    match step(Keyed::Service, existing.as_ref(), |facts| decide(facts, &request, &signer.ca, &policy, now)) {
        Step::Wait => return Ok(Action::await_change()),
        Step::WaitForDeletion(held) => return wait_for_deletion(ctx, NAME, &svc, held).await,
        Step::Foreign(why) => {
            let message = format!(
                "{} already exists and {why}; the operator never modifies it. Delete it, or set {} to another name",
                secret_ref(&namespace, name),
                family.serving_cert_secret_name
            );
            return report_problem(ctx, NAME, &svc, &message).await;
        }
        Step::Issue(reason) => {
            record_reason(reason.category());
            let written = issue(ctx, &svc, request, family, name, existing.as_ref(), &signer, &reason).await?;
            if matches!(written, Outcome::Gone) {
                st.terminating.note(&namespace);
            }
            if let Some(next) = settle(ctx, &svc, written).await? {
                return Ok(next);
            }
            issued = true;
        }
        Step::Tidy { expiry, .. } => {
            record_reason("tidy");
            let secret = desired(existing.as_ref(), &svc, family, name, Content::Kept { expiry });
            let written = write_secret(ctx, existing.as_ref(), secret).await?;
            if let Some(next) = settle(ctx, &svc, written).await? {
                return Ok(next);
            }
        }
        Step::Leave { .. } => {}
    }
    mark_signed(ctx, &svc, &signer, issued, &st.marked).await?;
    Ok(Action::await_change())
}

/// What follows a write: `None` when it was done (go on), else the end of this pass —
/// look again soon after a race, or report the refusal on the Service.
async fn settle(ctx: &Context, svc: &Service, written: Outcome<OffsetDateTime>) -> Result<Option<Action>, Error> {
    match written {
        Outcome::Done(_) => Ok(None),
        Outcome::Raced => Ok(Some(Action::requeue(LOOK_AGAIN))),
        Outcome::Gone => Ok(Some(Action::await_change())),
        Outcome::Held(held) => wait_for_deletion(ctx, NAME, svc, &held).await.map(Some),
        Outcome::Refused(message) => report_problem(ctx, NAME, svc, &message).await.map(Some),
    }
}
