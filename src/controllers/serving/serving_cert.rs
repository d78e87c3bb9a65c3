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
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::decision::{Decision, decide};
use super::report::{mark_signed, report_problem};
use super::request::{Wanted, failures, key_algorithm, leaf_request, wanted};
use super::secret::{Content, Written, desired, issue, secret_facts, wait_for_deletion, write_secret};
use super::{Error, MAX_FAILURES, secret_ref};
use crate::controllers::{Context, LOOK_AGAIN, Shard, drive};
use crate::names::{self as ann, Family};
use crate::shutdown::Shutdown;

pub const NAME: &str = "serving-cert";

/// Runs the controller until `shutdown` (in-flight work finishes first).
pub async fn run(
    ctx: Arc<Context>,
    services: Store<Service>,
    service_events: impl Stream<Item = Result<Service, watcher::Error>> + Send + 'static,
    secret_changes: impl Stream<Item = ObjectRef<Service>> + Send + 'static,
    shutdown: Shutdown,
) {
    let controller = Controller::for_stream(service_events, services).reconcile_on(secret_changes);
    let state = Arc::new(State { ctx: ctx.clone(), terminating: Terminating::default() });
    drive(controller, NAME, ctx, shutdown, state, Shard::By(super::request::service_key), reconcile).await;
}

struct State {
    ctx: Arc<Context>,
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
    // At the cap, nothing happens until a person edits the Service.
    if failures(&svc) >= MAX_FAILURES {
        return Ok(Action::await_change());
    }
    let (name, family) = match requested_secret(&svc) {
        Ok(Some(requested)) => requested,
        Ok(None) => return Ok(Action::await_change()),
        Err(problem) => return report_problem(ctx, NAME, &svc, &problem).await,
    };
    // An unknown key algorithm: reported, and nothing is generated or written.
    let key = match key_algorithm(&svc, ctx.config.default_key_algorithm, &ctx.config.allowed_key_algorithms) {
        Ok(key) => key,
        Err(problem) => return report_problem(ctx, NAME, &svc, &problem).await,
    };
    let Some(signer) = ctx.signer.current() else {
        // The CA is not loaded yet; loading it re-triggers every Service.
        return Ok(Action::await_change());
    };
    let namespace = svc.namespace().unwrap_or_default();
    if let Some(left) = st.terminating.remaining(&namespace) {
        return Ok(Action::requeue(left));
    }
    let existing = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadSecret { secret: secret_ref(&namespace, name), source })?;
    let policy = ctx.config.leaf_policy();
    let request = leaf_request(&svc, &policy.cluster_domain, key);
    let facts = existing.as_ref().map(secret_facts);
    let labeled = facts.as_ref().is_some_and(|f| f.labeled);
    // A Secret being deleted is waited for (by cert-refresh when it is labeled); its
    // deletion brings us back to create it.
    if let Some(held) = existing.as_ref().filter(|s| s.metadata.deletion_timestamp.is_some()) {
        if labeled {
            return Ok(Action::await_change());
        }
        return wait_for_deletion(ctx, NAME, &svc, &held.metadata).await;
    }
    let decision = decide(facts.as_ref(), &request, &signer.ca, &policy, OffsetDateTime::now_utc());

    match decision {
        Decision::Foreign(why) => {
            let message = format!(
                "Secret {} already exists and {why}; the operator never modifies it. Delete it, or set {} to another name",
                secret_ref(&namespace, name),
                family.serving_cert_secret_name
            );
            return report_problem(ctx, NAME, &svc, &message).await;
        }
        // Labeled Secrets are the cert-refresh controller's to fix; its write brings
        // us back here.
        Decision::Issue(_) if labeled => return Ok(Action::await_change()),
        Decision::Issue(reason) => {
            let written = issue(ctx, &svc, request, family, name, existing.as_ref(), &signer, &reason).await?;
            if matches!(written, Written::Gone) {
                st.terminating.note(&namespace);
            }
            if let Some(next) = settle(ctx, &svc, written).await? {
                return Ok(next);
            }
        }
        Decision::Tidy { expiry, .. } if !labeled => {
            let secret = desired(existing.as_ref(), &svc, family, name, Content::Kept { expiry });
            let written = write_secret(ctx, existing.as_ref(), secret).await?;
            if let Some(next) = settle(ctx, &svc, written).await? {
                return Ok(next);
            }
        }
        Decision::Tidy { .. } | Decision::Keep { .. } => {}
    }
    mark_signed(ctx, &svc, &signer).await?;
    Ok(Action::await_change())
}

/// The Secret name the Service asks for (`None`: none), or why it cannot have one.
fn requested_secret(svc: &Service) -> Result<Option<(&str, Family)>, String> {
    match wanted(svc) {
        Wanted::NotRequested => Ok(None),
        Wanted::Empty(family) => Err(format!(
            "the annotation {} is empty: set it to the name of the Secret to create",
            family.serving_cert_secret_name
        )),
        Wanted::Named { name, family } => match ann::check_subdomain(name) {
            Ok(()) => Ok(Some((name, family))),
            Err(why) => Err(format!("{:?} is not a valid Secret name: {why}", crate::bounded(name))),
        },
    }
}

/// What follows a write: `None` when it was done (go on), else the end of this pass —
/// look again soon after a race, or report the refusal on the Service.
async fn settle(ctx: &Context, svc: &Service, written: Written) -> Result<Option<Action>, Error> {
    match written {
        Written::Done { .. } => Ok(None),
        Written::Raced => Ok(Some(Action::requeue(LOOK_AGAIN))),
        Written::Gone => Ok(Some(Action::await_change())),
        Written::Deleting(held) => wait_for_deletion(ctx, NAME, svc, &held).await.map(Some),
        Written::Refused(message) => report_problem(ctx, NAME, svc, &message).await.map(Some),
    }
}
