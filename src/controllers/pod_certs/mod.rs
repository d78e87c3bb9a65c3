//! Pod certificates: the second front door of the same CA.
//!
//! - This module signs PodCertificateRequests addressed to `--pod-signer-name` for the
//!   names of the Services that select the pod. Watch: the requests of that signer not
//!   answered yet (field selector `spec.signerName`; answered ones leave the cache), and
//!   an index of Services by namespace (selector and headless only: [`index`]); a
//!   Service change looks again at the waiting requests of its namespace. Plan:
//!   [`plan::plan`] with the pod read by name. Write: one status update (Issued, Denied
//!   or Failed) guarded by resourceVersion. Report: metrics, a Warning Event for Denied
//!   and Failed.
//! - [`trust_bundle`] publishes the CA bundle as a ClusterTrustBundle for that signer.
//!   A request is signed only once the published bundle is the current signer's, so a
//!   pod never holds a certificate its peers' bundles do not trust yet.

pub mod index;
pub mod plan;
pub mod trust_bundle;
pub mod waiting;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use time::OffsetDateTime;
use tokio::sync::watch;

use self::index::ServiceIndex;
use self::plan::{Plan, Settings};
use super::failure::{Op, no_answer};
use super::watch::cached_watch;
use super::{
    Categorised, Context, EventType, LOOK_AGAIN, NOT_YET, Outcome, Shard, api_category, api_message, drive,
    record_reason, shown_obj,
};
use crate::metrics::ReasonLabels;
use crate::names::{CA_BUNDLE, SIGNING_CABUNDLE};
use crate::pki::PkiError;
use crate::shutdown::Shutdown;

pub const NAME: &str = "pod-certs";

/// What can fail in signing a request: what was being done, to which object (the
/// shape of every controller's errors, see [`super::failure`]). API failures are
/// counted by their status (`conflict`, `invalid`, ...), not by what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Kube { action: Op, object: String, source: kube::Error },
    #[error("{action} {object}: {source}")]
    Pki { action: Op, object: String, source: PkiError },
}

const READ: Op = Op { doing: "reading", category: "api" };
const WRITE_STATUS: Op = Op { doing: "writing the status of", category: "api" };
const SIGN: Op = Op { doing: "signing for", category: "pki" };

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => api_category(source),
            Error::Pki { action, .. } => action.category,
        }
    }
    fn unreachable(&self) -> bool {
        matches!(self, Error::Kube { source, .. } if no_answer(source))
    }
}

/// The bundle last published as the ClusterTrustBundle (shared with [`trust_bundle`]).
pub type Published = Arc<watch::Sender<Option<String>>>;

/// Whether the pod path runs: `--pod-certificates` and a cluster that serves the API
/// (Kubernetes 1.37+; otherwise it stays off, with one warning, and readiness is not
/// affected).
pub async fn enabled(ctx: &Context) -> bool {
    if !ctx.config.pod_certificates {
        return false;
    }
    let probe = Api::<PodCertificateRequest>::all(ctx.client.clone())
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await;
    if let Err(error) = probe.as_ref().map(|_| ())
        && super::is_not_found(error)
    {
        tracing::warn!(
            "this cluster does not serve certificates.k8s.io/v1 PodCertificateRequests (Kubernetes 1.37+): \
             pod certificates and the ClusterTrustBundle are off (set --pod-certificates=false to silence this)"
        );
        return false;
    }
    true
}

/// The bundle the pod signer may sign under, before anything is published.
pub fn unpublished() -> Published {
    Arc::new(watch::Sender::new(None))
}

struct State {
    ctx: Arc<Context>,
    services: Arc<ServiceIndex>,
    published: Published,
    pods_selector: Vec<crate::selector::Requirement>,
    waiting: waiting::Waiting,
}

/// Signs the requests this replica owns until `shutdown`, once `published` (the
/// ClusterTrustBundle, written by the leader's [`trust_bundle::run`]) holds the CA.
pub async fn sign_requests(ctx: Arc<Context>, published: Published, shutdown: Shutdown) {
    let signer = &ctx.config.pod_signer_name;
    let (requests, request_events) = cached_watch(
        Api::<PodCertificateRequest>::all(ctx.client.clone()),
        watcher::Config::default().fields(&format!("spec.signerName={signer}")),
        ctx.health.clone(),
        |pcr: &PodCertificateRequest| !answered(pcr),
        |_| {},
        |_, _| true,
    );
    let services = Arc::new(ServiceIndex::default());
    let service_changes = services.clone().follow(&ctx, requests.clone());
    let published_changes = {
        let rx = published.subscribe();
        futures::stream::unfold(rx, |mut rx| async move { rx.changed().await.ok().map(|_| ((), rx)) })
    };
    let controller = Controller::for_stream(request_events, requests)
        .reconcile_on(service_changes)
        .reconcile_all_on(published_changes);
    let pods_selector = crate::selector::parse_selector(&ctx.config.selector).unwrap_or_default();
    let waiting = waiting::Waiting::default();
    let state = Arc::new(State { ctx: ctx.clone(), services, published, pods_selector, waiting });
    let shard =
        Shard::By(|pcr: &PodCertificateRequest| format!("{}/{}", pcr.namespace().unwrap_or_default(), pcr.name_any()));
    drive(controller, NAME, ctx, shutdown, state, shard, reconcile).await;
}

/// Whether the request carries a final condition (Issued, Denied or Failed).
fn answered(pcr: &PodCertificateRequest) -> bool {
    let conditions = pcr.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    conditions.iter().any(|c| matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed") && c.status == "True")
}

/// Fetch (the CA, its published bundle, the Services, the pod) -> plan ([`plan::plan`])
/// -> write and report the answer ([`write_status`]).
async fn reconcile(pcr: Arc<PodCertificateRequest>, state: Arc<State>) -> Result<Action, Error> {
    let ctx = &state.ctx;
    let namespace = pcr.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", pcr.name_any());
    let Some(signer) = ctx.signer.current() else { return Ok(Action::requeue(NOT_YET)) };
    // Trust first: the bundle pods trust must hold this CA before a leaf of it is
    // handed out (the bundle publisher wakes every request when it does). Nothing is
    // read meanwhile.
    let bundle_published = state.published.borrow().as_deref() == Some(signer.bundle_pem.as_str());
    if !bundle_published || !state.services.synced() {
        return Ok(Action::requeue(NOT_YET));
    }
    // Waiting, and still no Service selects the pod: nothing to read (see [`waiting`]).
    let services = state.services.in_namespace(&namespace);
    if let Some(until) =
        state.waiting.still_waiting(&key, services.iter().map(|s| s.as_ref()), OffsetDateTime::now_utc())
    {
        return Ok(look_again_at(until));
    }
    let pod = match read_pod(ctx, &namespace, &pcr.spec.pod_name).await? {
        Some(pod) if !crate::selector::selector_matches(&state.pods_selector, pod.labels()) => {
            // Another instance's pod (--selector): not ours to answer.
            return Ok(Action::await_change());
        }
        pod => pod.map(|pod| planned_pod(&pod, &ctx.config.pod_signer_name)),
    };
    let now = OffsetDateTime::now_utc();
    let planned =
        plan::plan(&planned_request(&pcr, &namespace, now), pod.as_ref(), &services, &settings(ctx, &signer, now));
    match (&planned, &pod) {
        (Plan::Wait { until }, Some(pod)) => state.waiting.note(&key, &pod.labels, *until, now),
        _ => state.waiting.forget(&key),
    }
    let status = match planned {
        Plan::Nothing => return Ok(Action::await_change()),
        Plan::Wait { until } => {
            tracing::debug!(object = %shown_obj(pcr.as_ref()), "no Service selects the pod yet; waiting");
            return Ok(look_again_at(until));
        }
        Plan::Deny { reason, message } => {
            record_reason(reason);
            final_status("Denied", reason, message, &pcr)
        }
        Plan::Fail { message } => {
            record_reason("CannotSign");
            final_status("Failed", "CannotSign", message, &pcr)
        }
        Plan::Issue { names, lifetime, key: public } => {
            record_reason("Issued");
            // The watches may be behind (a replica paused, then resumed after a hard
            // reset): sign only while the API server's signing-cabundle holds this CA.
            if !bundle_holds(ctx, &signer).await? {
                tracing::info!(object = %shown_obj(pcr.as_ref()), ca = signer.ca.subject_cn(), "signing-cabundle no longer holds this replica's CA; waiting for the current one");
                return Ok(Action::requeue(NOT_YET));
            }
            sign(&pcr, &signer, names, lifetime, public, ctx.config.pod_timing.timing()).await?
        }
    };
    write_status(ctx, &pcr, status).await
}

/// What the plan reads of the request.
fn planned_request<'a>(pcr: &'a PodCertificateRequest, namespace: &'a str, now: OffsetDateTime) -> plan::Request<'a> {
    plan::Request {
        namespace,
        created: pcr.creation_timestamp().map_or(now, |t| time_of(&t)),
        pod_name: &pcr.spec.pod_name,
        pod_uid: &pcr.spec.pod_uid,
        node_name: &pcr.spec.node_name,
        service_account_name: &pcr.spec.service_account_name,
        max_expiration_seconds: pcr.spec.max_expiration_seconds,
        stub_pkcs10: &pcr.spec.stub_pkc_s10_request.0,
        user_annotations: pcr.spec.unverified_user_annotations.as_ref(),
        answered: answered(pcr),
    }
}

/// What the plan reads of the configuration and the CA.
fn settings<'a>(ctx: &'a Context, signer: &crate::signer::Signer, now: OffsetDateTime) -> Settings<'a> {
    Settings {
        now,
        grace: ctx.config.pod_certificate_grace,
        // Never longer than the previous CA stays in the bundle after a rotation.
        max_lifetime: ctx.config.pod_certificate_max_lifetime.min(ctx.config.policy.ca_rotate_before),
        cluster_domain: &ctx.config.cluster_domain,
        ca_not_after: signer.ca.not_after(),
        signer_name: &ctx.config.pod_signer_name,
    }
}

/// Signs the leaf the plan asks for (off the reactor): the Issued status, or Failed
/// when it cannot be signed (what cannot be signed now never will be: the same names,
/// key and CA).
async fn sign(
    pcr: &PodCertificateRequest,
    signer: &Arc<crate::signer::Signer>,
    names: Vec<String>,
    lifetime: Duration,
    public: crate::pki::RequestedKey,
    timing: crate::pki::PodTiming,
) -> Result<PodCertificateRequestStatus, Error> {
    let pod_uid = pcr.spec.pod_uid.clone();
    let signing = signer.clone();
    let signed = tokio::task::spawn_blocking(move || {
        signing.ca.issue_pod_leaf(&names, &pod_uid, &public, OffsetDateTime::now_utc(), lifetime, timing)
    })
    .await
    .map_err(|e| Error::Pki {
        action: SIGN,
        object: shown_obj(pcr),
        source: PkiError::Signing(format!("worker failed: {e}")),
    })?;
    let leaf = match signed {
        Ok(leaf) => leaf,
        Err(error) => return Ok(final_status("Failed", "CannotSign", format!("cannot sign: {error}"), pcr)),
    };
    let mut status = final_status("Issued", "Issued", format!("signed by {}", signer.ca.subject_cn()), pcr);
    status.certificate_chain = Some(leaf.chain_pem);
    status.not_before = Some(Time(to_jiff(leaf.not_before)));
    status.not_after = Some(Time(to_jiff(leaf.not_after)));
    status.begin_refresh_at = Some(Time(to_jiff(leaf.begin_refresh_at)));
    Ok(status)
}

/// Looks again just after `until` (a waiting request's grace period ends).
fn look_again_at(until: OffsetDateTime) -> Action {
    Action::requeue(super::until(until).saturating_add(Duration::from_millis(100)))
}

/// A status with one final condition (`type_` True).
fn final_status(
    type_: &str,
    reason: &str,
    message: String,
    pcr: &PodCertificateRequest,
) -> PodCertificateRequestStatus {
    PodCertificateRequestStatus {
        conditions: Some(vec![Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: reason.into(),
            message: crate::bounded_to(&message, 1000).into_owned(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: pcr.metadata.generation,
        }]),
        ..Default::default()
    }
}

/// Writes the answer (guarded by the resourceVersion it was planned from) and reports
/// it. An Issued status the API server refuses becomes Failed with its reason, so no
/// request is left pending.
async fn write_status(
    ctx: &Context,
    pcr: &PodCertificateRequest,
    status: PodCertificateRequestStatus,
) -> Result<Action, Error> {
    let namespace = pcr.namespace().unwrap_or_default();
    let name = pcr.name_any();
    let api: Api<PodCertificateRequest> = Api::namespaced(ctx.client.clone(), &namespace);
    let condition = status.conditions.as_ref().and_then(|c| c.first()).cloned();
    let (outcome, reason, message) = match &condition {
        Some(c) => (c.type_.clone(), c.reason.clone(), c.message.clone()),
        None => return Ok(Action::await_change()),
    };
    let mut answered = pcr.clone();
    answered.status = Some(status);
    ctx.metrics.write("podcertificaterequests/status", "update");
    let written = match api.replace_status(&name, &super::post_params(), &answered).await {
        Ok(_) => Outcome::Done(()),
        // Only an Issued status is turned into Failed when refused (422); any other
        // refusal is retried with backoff like an error.
        Err(e) => match Outcome::<()>::of_failure(&e) {
            Some(Outcome::Refused(_)) if outcome == "Issued" && api_category(&e) == "invalid" => {
                Outcome::Refused(api_message(&e))
            }
            Some(Outcome::Raced) => Outcome::Raced,
            _ => return Err(Error::Kube { action: WRITE_STATUS, object: shown_obj(pcr), source: e }),
        },
    };
    match written {
        Outcome::Done(()) => {}
        Outcome::Raced | Outcome::Gone | Outcome::Held(_) => return Ok(Action::requeue(LOOK_AGAIN)),
        Outcome::Refused(why) => {
            let why = format!("the API server refused the issued certificate: {why}");
            tracing::warn!(object = %shown_obj(pcr), %why, "pod certificate refused");
            let failed = final_status("Failed", "CannotSign", why, pcr);
            return Box::pin(write_status(ctx, pcr, failed)).await;
        }
    }
    let label = match outcome.as_str() {
        "Issued" => "issued",
        "Denied" => "denied",
        _ => "failed",
    };
    ctx.metrics.pod_certificate_requests.get_or_create(&ReasonLabels { reason: label }).inc();
    if outcome == "Issued" {
        tracing::info!(object = %shown_obj(pcr), pod = %pcr.spec.pod_name, "pod certificate issued");
    } else {
        tracing::info!(object = %shown_obj(pcr), %outcome, %reason, %message, "pod certificate request answered");
        let note = format!("{outcome} ({reason}): {message}");
        ctx.event(&pcr.object_ref(&()), EventType::Warning, &format!("PodCertificate{outcome}"), note).await;
    }
    Ok(Action::await_change())
}

/// Whether `signing-cabundle`, read now from the API server (not from a watch), holds
/// the signer's CA certificate.
async fn bundle_holds(ctx: &Context, signer: &crate::signer::Signer) -> Result<bool, Error> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let object = || super::shown("ConfigMap", Some(&ctx.config.namespace), SIGNING_CABUNDLE);
    let bundle =
        api.get_opt(SIGNING_CABUNDLE).await.map_err(|source| Error::Kube { action: READ, object: object(), source })?;
    let pem = bundle.as_ref().and_then(|cm| cm.data.as_ref()).and_then(|d| d.get(CA_BUNDLE));
    let ders = pem.and_then(|pem| crate::pki::pem::decode_certificates(CA_BUNDLE, pem.as_bytes()).ok());
    Ok(ders.is_some_and(|ders| ders.iter().any(|der| *der == signer.ca.certificate().der)))
}

/// What the plan reads of the pod (`signer`: this signer's name).
fn planned_pod(pod: &Pod, signer: &str) -> plan::Pod {
    let spec = pod.spec.as_ref();
    let asks_this_signer = spec.and_then(|s| s.volumes.as_ref()).into_iter().flatten().any(|volume| {
        let sources = volume.projected.as_ref().and_then(|p| p.sources.as_ref());
        sources
            .into_iter()
            .flatten()
            .any(|source| source.pod_certificate.as_ref().is_some_and(|c| c.signer_name == signer))
    });
    plan::Pod {
        uid: pod.uid().unwrap_or_default(),
        labels: pod.labels().clone(),
        hostname: spec.and_then(|s| s.hostname.clone()),
        subdomain: spec.and_then(|s| s.subdomain.clone()),
        node_name: spec.and_then(|s| s.node_name.clone()),
        service_account_name: spec.and_then(|s| s.service_account_name.clone()),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        deleting: pod.metadata.deletion_timestamp.is_some(),
        asks_this_signer,
    }
}

/// The pod by name (`None` when it does not exist).
async fn read_pod(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let object = || super::shown("Pod", Some(namespace), name);
    api.get_opt(name).await.map_err(|source| Error::Kube { action: READ, object: object(), source })
}

fn time_of(t: &Time) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.0.as_second()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn to_jiff(t: OffsetDateTime) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.unix_timestamp()).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}
