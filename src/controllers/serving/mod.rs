//! Serving certificates for Services (docs/spec.md §1): the two controllers and what they
//! share.
//!
//! - [`serving_cert`] (keyed by Service): the Secret exists; conflicts and bad input
//!   are reported on the Service.
//! - [`cert_refresh`] (keyed by managed Secret): the Secret stays right; re-issued on
//!   time, on CA change, on tampering.
//! - [`decision`]: the pure decision both make from (Secret, Service, CA, now).
//!
//! This module holds the rest they share: the caches and the streams that drive them
//! ([`ServingWatches`]), what a Service asks for ([`wanted`], [`leaf_request`]), its
//! failure count, the Secret as it should be ([`desired`]) and the writes.

pub mod cert_refresh;
pub mod decision;
pub mod progress;
pub mod serving_cert;

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::Patch;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use time::OffsetDateTime;

use self::decision::{IssueReason, SecretFacts};
use super::watch::{cached_metadata_watch, cached_watch};
use super::{
    Categorised, Context, EventType, LOOK_AGAIN, api_category, api_message, is_conflict, is_not_found, is_refused,
    patch_params, post_params, retry_delay,
};
use crate::admin::Health;
use crate::metrics::ReasonLabels;
use crate::names::{self as ann, Family, SECRET_TYPE_TLS, TLS_CERT, TLS_KEY};
use crate::pki::{CertificateAuthority, IssuedLeaf, KeyKind, LeafRequest, PkiError, format_expiry};
use crate::signer::{Priority, Signer};

/// What can fail in the serving controllers: the operation and the object it was for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {secret}: {source}")]
    ReadSecret { secret: String, source: kube::Error },
    #[error("writing Secret {secret}: {source}")]
    WriteSecret { secret: String, source: kube::Error },
    #[error("issuing a certificate for Service {service}: {source}")]
    IssueLeaf { service: String, source: PkiError },
    #[error("reading Service {service}: {source}")]
    ReadService { service: String, source: kube::Error },
    #[error("annotating Service {service}: {source}")]
    PatchService { service: String, source: kube::Error },
}

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::ReadSecret { .. } => "read-secret",
            Error::WriteSecret { source, .. } => match api_category(source) {
                "conflict" => "write-secret-conflict",
                _ => "write-secret",
            },
            Error::IssueLeaf { .. } => "issue",
            Error::ReadService { .. } => "read-service",
            Error::PatchService { .. } => "patch-service",
        }
    }

    fn unreachable(&self) -> bool {
        match self {
            Error::ReadSecret { source, .. }
            | Error::WriteSecret { source, .. }
            | Error::ReadService { source, .. }
            | Error::PatchService { source, .. } => !matches!(source, kube::Error::Api(_)),
            Error::IssueLeaf { .. } => false,
        }
    }
}

/// After this many consecutive failures the Service is left alone until a person
/// edits (or removes) its error annotations.
pub const MAX_FAILURES: u32 = 10;

/// The caches of the two serving controllers and the streams that drive them.
///
/// Annotated Services are cached whole (they are small). Serving Secrets are cached
/// as metadata only — no certificate and no private key stays in the operator's
/// memory — and read whole when acted on. A change to one kind is passed to the other
/// controller only after the cache has taken it in, so the controller that is told
/// reads a cache that already shows it.
pub struct ServingWatches {
    /// Annotated Services (those the selector picks).
    pub services: Store<Service>,
    /// Serving Secrets carrying the managed label (metadata).
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// Services changed in what matters to their Secret (name annotation, UID,
    /// clusterIP, type; not our own annotation writes): the serving-cert controller's
    /// main stream.
    pub service_events: BoxStream<'static, Result<Service, watcher::Error>>,
    /// Changed Secrets: the cert-refresh controller's main stream.
    pub secret_events: BoxStream<'static, Result<PartialObjectMeta<Secret>, watcher::Error>>,
    /// A Secret changed: reconcile the Service it was made for (serving-cert).
    pub secret_changes: BoxStream<'static, ObjectRef<Service>>,
    /// A Service changed: reconcile the Secret it names (cert-refresh).
    pub service_changes: BoxStream<'static, ObjectRef<PartialObjectMeta<Secret>>>,
}

impl ServingWatches {
    pub fn new(client: &Client, selector: &str, health: Arc<Health>) -> Self {
        let (to_cert_refresh, service_changes) = tokio::sync::mpsc::unbounded_channel();
        let (to_serving_cert, secret_changes) = tokio::sync::mpsc::unbounded_channel();
        // Only a change in what matters to the Secret goes on (see `trigger_hash`).
        // The Secret a Service names goes to cert-refresh, and so does the one it
        // named before when the name changed: cert-refresh releases it. (A restart
        // needs no memory: cert-refresh looks at every managed Secret once after its
        // first list.)
        let changed = move |before: Option<&Service>, svc: &Service| {
            if before.is_some_and(|before| trigger_hash(before) == trigger_hash(svc)) {
                return false;
            }
            let namespace = svc.namespace().unwrap_or_default();
            let named = wanted_name(svc);
            let named_before = before.and_then(wanted_name).filter(|before| Some(*before) != named);
            for name in named.into_iter().chain(named_before) {
                let _ = to_cert_refresh.send(ObjectRef::new(name).within(&namespace));
            }
            true
        };
        let (services, service_events) = cached_watch(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(selector),
            health.clone(),
            is_annotated,
            trim_service,
            changed,
        );
        let (secrets, secret_events) = cached_metadata_watch::<Secret>(
            client.clone(),
            watcher::Config::default().labels(&format!("{}={}", ann::MANAGED_LABEL, ann::MANAGED_LABEL_VALUE)),
            health,
            |key| {
                key == ann::BETA.originating_service_name
                    || key == ann::ALPHA.originating_service_name
                    || key == ann::BETA.expiry
            },
        );
        let secret_events = secret_events.inspect(move |event| {
            if let Ok(secret) = event
                && let Some(service) = originating_service(secret)
            {
                let _ = to_serving_cert.send(service);
            }
        });
        ServingWatches {
            services,
            secrets,
            service_events: service_events.boxed(),
            secret_events: secret_events.boxed(),
            secret_changes: receiver_stream(secret_changes).boxed(),
            service_changes: receiver_stream(service_changes).boxed(),
        }
    }
}

fn receiver_stream<T: Send + 'static>(rx: tokio::sync::mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

/// What the serving controllers read of a Service, and nothing else: its identity,
/// our annotations, and the spec fields that decide its names. Other annotations (a
/// tenant's 200 KB of JSON), labels, ports and status never stay in memory.
fn trim_service(svc: &mut Service) {
    let ours = |key: &str| {
        [ann::BETA, ann::ALPHA].iter().any(|f| {
            [
                f.serving_cert_secret_name,
                f.serving_cert_key_algorithm,
                f.signed_by,
                f.generation_error,
                f.generation_error_num,
            ]
            .contains(&key)
        })
    };
    if let Some(annotations) = svc.metadata.annotations.as_mut() {
        annotations.retain(|k, _| ours(k));
    }
    svc.metadata.labels = None;
    svc.metadata.owner_references = None;
    svc.metadata.finalizers = None;
    svc.status = None;
    if let Some(spec) = svc.spec.take() {
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: spec.cluster_ip,
            type_: spec.type_,
            ..Default::default()
        });
    }
}

/// Whether a Service carries a serving-cert annotation (of any value): the only
/// Services worth caching.
pub fn is_annotated(svc: &Service) -> bool {
    let annotations = svc.annotations();
    [ann::BETA, ann::ALPHA].iter().any(|f| annotations.contains_key(f.serving_cert_secret_name))
}

/// The sharing key of a Service: `namespace/name`.
pub fn service_key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// The sharing key of a serving Secret: its Service's (so that one replica handles
/// both), or `namespace/name` of the Secret when it names no Service.
pub fn secret_key(secret: &PartialObjectMeta<Secret>) -> String {
    match originating_service(secret) {
        Some(svc) => format!("{}/{}", svc.namespace.unwrap_or_default(), svc.name),
        None => format!("{}/{}", secret.namespace().unwrap_or_default(), secret.name_any()),
    }
}

/// The Service a serving Secret was made for (from its originating-service-name).
pub fn originating_service(secret: &impl ResourceExt) -> Option<ObjectRef<Service>> {
    let annotations = secret.annotations();
    let name = [ann::BETA, ann::ALPHA].iter().find_map(|f| annotations.get(f.originating_service_name))?;
    Some(ObjectRef::new(name).within(&secret.namespace().unwrap_or_default()))
}

/// What a Service's annotations ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted<'a> {
    NotRequested,
    /// The annotation is present but empty (in every family that has it).
    Empty(Family),
    Named {
        name: &'a str,
        family: Family,
    },
}

/// The Secret name the Service asks for, if any.
fn wanted_name(svc: &Service) -> Option<&str> {
    match wanted(svc) {
        Wanted::Named { name, .. } => Some(name),
        _ => None,
    }
}

/// Reads the serving-cert annotation: beta wins when both are set and non-empty.
pub fn wanted(svc: &Service) -> Wanted<'_> {
    let annotations = svc.annotations();
    let value = |f: Family| annotations.get(f.serving_cert_secret_name).map(|v| v.trim());
    match (value(ann::BETA), value(ann::ALPHA)) {
        (Some(name), _) if !name.is_empty() => Wanted::Named { name, family: ann::BETA },
        (_, Some(name)) if !name.is_empty() => Wanted::Named { name, family: ann::ALPHA },
        (Some(_), _) => Wanted::Empty(ann::BETA),
        (_, Some(_)) => Wanted::Empty(ann::ALPHA),
        (None, None) => Wanted::NotRequested,
    }
}

/// The kind of key a Service asks for: its serving-cert-key-algorithm annotation (beta
/// wins when both are set and non-empty; an empty one counts as absent), else
/// `default`. An unknown value, or one not in `allowed` (`--allowed-key-algorithms`;
/// empty: all), is an error to report on the Service (the value is echoed bounded).
pub fn key_algorithm(svc: &Service, default: KeyKind, allowed: &[KeyKind]) -> Result<KeyKind, String> {
    let annotations = svc.annotations();
    let set = [ann::BETA, ann::ALPHA].into_iter().find_map(|f| {
        let value = annotations.get(f.serving_cert_key_algorithm)?;
        (!value.trim().is_empty()).then_some((f, value))
    });
    let Some((family, value)) = set else { return Ok(default) };
    let problem = |why: &str| {
        format!("the annotation {} is {:?}: {why}", family.serving_cert_key_algorithm, crate::bounded(value))
    };
    let kind: KeyKind = value.parse().map_err(|why: String| problem(&why))?;
    if !allowed.is_empty() && !allowed.contains(&kind) {
        let why = format!("{kind} keys are not allowed here; use one of {}", crate::pki::key_values(allowed));
        return Err(problem(&why));
    }
    Ok(kind)
}

/// The certificate a Service asks for (its identity and DNS names), over a key of
/// kind `key` (see [`key_algorithm`]).
pub fn leaf_request(svc: &Service, cluster_domain: &str, key: KeyKind) -> LeafRequest {
    let meta = &svc.metadata;
    LeafRequest {
        service: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        headless: svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None"),
        cluster_domain: cluster_domain.to_string(),
        key,
    }
}

/// What of a Service matters to its serving Secret. Our own annotation writes
/// (errors, signed-by) leave it unchanged, so they trigger neither serving controller;
/// only what a person or the Service itself changes does.
pub fn trigger_hash(svc: &Service) -> u64 {
    let mut h = DefaultHasher::new();
    svc.uid().hash(&mut h);
    if let Some(spec) = &svc.spec {
        (&spec.cluster_ip, &spec.type_).hash(&mut h);
    }
    let annotations = svc.annotations();
    for f in [ann::BETA, ann::ALPHA] {
        annotations.get(f.serving_cert_secret_name).hash(&mut h);
        annotations.get(f.serving_cert_key_algorithm).hash(&mut h);
    }
    (failures(svc) >= MAX_FAILURES).hash(&mut h);
    h.finish()
}

/// Consecutive failures recorded on the Service. Both families carry the count;
/// removing (or lowering) either one is the person's edit that lifts the cap.
pub fn failures(svc: &Service) -> u32 {
    let annotations = svc.annotations();
    [ann::BETA, ann::ALPHA]
        .iter()
        .map(|f| annotations.get(f.generation_error_num).and_then(|n| n.trim().parse().ok()).unwrap_or(0))
        .min()
        .unwrap_or(0)
}

pub fn secret_facts(secret: &Secret) -> SecretFacts<'_> {
    SecretFacts {
        secret_type: secret.type_.as_deref().unwrap_or("Opaque"),
        data: secret.data.iter().flatten().map(|(k, v)| (k.as_str(), v.0.as_slice())).collect(),
        annotations: secret.metadata.annotations.as_ref().unwrap_or(&EMPTY),
        owner_service_uids: secret
            .owner_references()
            .iter()
            .filter(|o| is_service_owner(o))
            .map(|o| o.uid.as_str())
            .collect(),
        labeled: secret.labels().get(ann::MANAGED_LABEL).map(String::as_str) == Some(ann::MANAGED_LABEL_VALUE),
    }
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

/// The certificate and key a Secret should hold after the write.
pub enum Content<'a> {
    Issued(&'a IssuedLeaf),
    /// Keep the current tls.crt/tls.key (whose leaf expires at `expiry`).
    Kept {
        expiry: OffsetDateTime,
    },
}

/// The Secret as it should be: starting from `existing` (so labels, annotations and
/// owner references of others survive), with our label, annotations, owner reference
/// and exactly `tls.crt` and `tls.key`.
pub fn desired(existing: Option<&Secret>, svc: &Service, family: Family, name: &str, content: Content<'_>) -> Secret {
    let mut secret = existing.cloned().unwrap_or_else(|| Secret {
        metadata: ObjectMeta { name: Some(name.to_string()), namespace: svc.namespace(), ..ObjectMeta::default() },
        ..Secret::default()
    });
    // Never send managedFields back: an empty list would reset the server's record.
    secret.metadata.managed_fields = None;
    secret.type_ = Some(SECRET_TYPE_TLS.into());
    secret.labels_mut().insert(ann::MANAGED_LABEL.into(), ann::MANAGED_LABEL_VALUE.into());

    let (tls_crt, tls_key, expiry) = match content {
        Content::Issued(leaf) => (
            ByteString(leaf.chain_pem.as_bytes().to_vec()),
            ByteString(leaf.key_pem.as_bytes().to_vec()),
            leaf.not_after,
        ),
        Content::Kept { expiry } => {
            let data = existing.and_then(|s| s.data.as_ref());
            let get = |k: &str| data.and_then(|d| d.get(k)).cloned().unwrap_or_else(|| ByteString(Vec::new()));
            (get(TLS_CERT), get(TLS_KEY), expiry)
        }
    };
    secret.data = Some(BTreeMap::from([(TLS_CERT.to_string(), tls_crt), (TLS_KEY.to_string(), tls_key)]));
    secret.string_data = None;

    let annotations = secret.annotations_mut();
    annotations.insert(family.originating_service_name.into(), svc.name_any());
    annotations.insert(family.originating_service_uid.into(), svc.uid().unwrap_or_default());
    for f in [ann::BETA, ann::ALPHA] {
        annotations.insert(f.expiry.into(), format_expiry(expiry));
    }

    let uid = svc.uid().unwrap_or_default();
    let owners = secret.metadata.owner_references.get_or_insert_with(Vec::new);
    // A reference with the Service's UID but another kind or apiVersion (made by hand)
    // would never count as ours: it is replaced.
    owners.retain(|o| o.uid != uid || is_service_owner(o));
    if !owners.iter().any(|o| o.uid == uid) {
        owners.push(OwnerReference {
            api_version: "v1".into(),
            kind: "Service".into(),
            name: svc.name_any(),
            uid,
            ..OwnerReference::default()
        });
    }
    secret
}

/// Records a certificate just written: the metric, a log line and a Normal Event on
/// the Service (`ServingCertificateIssued` for a new Secret, else
/// `ServingCertificateRefreshed`).
pub async fn announce_issued(
    ctx: &Context,
    svc: &Service,
    name: &str,
    reason: &IssueReason,
    leaf: &IssuedLeaf,
    signer: &CertificateAuthority,
) {
    ctx.metrics.certificates_issued.get_or_create(&ReasonLabels { reason: reason.category() }).inc();
    let (verb, event_reason) = match reason {
        IssueReason::Absent => ("created", "ServingCertificateIssued"),
        _ => ("re-issued", "ServingCertificateRefreshed"),
    };
    let namespace = svc.namespace().unwrap_or_default();
    tracing::info!(secret = %secret_ref(&namespace, name), %reason, "serving certificate {verb}");
    let note = format!(
        "Secret {name} {verb} because {reason}: certificate valid until {}, signed by {}",
        format_expiry(leaf.not_after),
        signer.subject_cn()
    );
    ctx.event(&svc.object_ref(&()), EventType::Normal, event_reason, note).await;
}

/// An ownerReference that points at a Service (core/v1).
fn is_service_owner(owner: &OwnerReference) -> bool {
    owner.kind == "Service" && owner.api_version == "v1"
}

/// How a write of a serving Secret ended.
#[derive(Debug)]
pub enum Written {
    /// The Secret holds the certificate that expires at `expiry`.
    Done { expiry: OffsetDateTime },
    /// The Secret changed, appeared or went meanwhile (409/404): look again soon.
    Raced,
    /// Its namespace is being deleted: nothing more to do.
    Gone,
    /// The Secret is being deleted and something (a finalizer) holds it: nothing can be
    /// written until it is gone (see [`wait_for_deletion`]). Its metadata.
    Deleting(Box<ObjectMeta>),
    /// The API server refused the write (validation, admission policy, quota, RBAC):
    /// reported on the Service and retried with backoff up to the failure cap.
    Refused(String),
}

/// Issues a certificate for `request` (what the Service `svc` asks for) and writes it
/// into its Secret `name` (`existing`, if any), then records the outcome: on success
/// the metric, a log line and a Normal Event; otherwise the failure metric. A write
/// that fails keeps the key parked in the pool for the next attempt.
#[allow(clippy::too_many_arguments)] // the Service, its request and Secret, the CA, why
pub async fn issue(
    ctx: &Context,
    svc: &Service,
    request: LeafRequest,
    family: Family,
    name: &str,
    existing: Option<&Secret>,
    signer: &Arc<Signer>,
    reason: &IssueReason,
) -> Result<Written, Error> {
    let policy = ctx.config.leaf_policy();
    let owner = request.uid.clone();
    let failed = |reason: &'static str| {
        ctx.metrics.issuance_failures.get_or_create(&ReasonLabels { reason }).inc();
    };
    // A certificate nobody has yet goes before the bulk re-issue of existing ones.
    let priority = if *reason == IssueReason::Absent { Priority::Urgent } else { Priority::Bulk };
    let leaf = match ctx.keys.issue(signer.clone(), request, policy.lifetime, priority).await {
        Ok(leaf) => leaf,
        Err(source) => {
            failed("pki");
            return Err(Error::IssueLeaf { service: ObjectRef::from_obj(svc).to_string(), source });
        }
    };
    let written = write_secret(ctx, existing, desired(existing, svc, family, name, Content::Issued(&leaf))).await;
    match &written {
        Ok(Written::Done { .. }) => {
            ctx.keys.written(&owner);
            announce_issued(ctx, svc, name, reason, &leaf, &signer.ca).await;
        }
        // The key stays parked for the Secret's re-creation.
        Ok(Written::Raced | Written::Deleting(_)) => {}
        Ok(Written::Gone) => ctx.keys.written(&owner),
        Ok(Written::Refused(_)) => {
            failed("refused");
        }
        Err(_) => {
            failed("api");
        }
    }
    written
}

/// Writes `desired` over `existing`: a create when there is none (never over a Secret
/// that appeared meanwhile), else a replace guarded by the resourceVersion it was read
/// at — except for an immutable Secret whose data must change, which is deleted
/// (guarded by its UID and resourceVersion) and created anew as a regular Secret (the
/// serving-cert controller may re-create it first, as for any deleted Secret).
///
/// That delete orphans what hangs on the Secret (`propagationPolicy: Orphan`): objects
/// a user made dependent on it are not collected with it. The API server then keeps
/// the Secret until the garbage collector has orphaned them, and any finalizer of the
/// user's holds it longer: a Secret still there after the delete is not created over
/// (that would fail, again and again) but waited for: [`Written::Deleting`].
pub async fn write_secret(ctx: &Context, existing: Option<&Secret>, mut desired: Secret) -> Result<Written, Error> {
    let namespace = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let expiry = expiry_of(&desired);
    let result = match existing {
        None => {
            ctx.metrics.write("secrets", "create");
            api.create(&post_params(), &desired).await
        }
        Some(old) if old.immutable == Some(true) && old.data != desired.data => {
            let preconditions = kube::api::Preconditions { uid: old.uid(), resource_version: old.resource_version() };
            let params = kube::api::DeleteParams {
                preconditions: Some(preconditions),
                propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
                ..Default::default()
            };
            ctx.metrics.write("secrets", "delete");
            match api.delete(&name, &params).await {
                Ok(deleted) => {
                    // Still there (the object, not a Status, came back): held.
                    if let Some(held) = deleted.left().filter(|s| s.metadata.deletion_timestamp.is_some()) {
                        tracing::info!(secret = %secret_ref(&namespace, &name), "deleting an immutable Secret to change its data; re-created once it is gone");
                        return Ok(Written::Deleting(Box::new(held.metadata)));
                    }
                    tracing::info!(secret = %secret_ref(&namespace, &name), "re-creating an immutable Secret to change its data");
                    desired.metadata.resource_version = None;
                    desired.metadata.uid = None;
                    desired.metadata.creation_timestamp = None;
                    desired.immutable = None;
                    ctx.metrics.write("secrets", "create");
                    api.create(&post_params(), &desired).await
                }
                Err(e) => Err(e),
            }
        }
        Some(_) => {
            ctx.metrics.write("secrets", "update");
            api.replace(&name, &post_params(), &desired).await
        }
    };
    match result {
        Ok(_) => Ok(Written::Done { expiry }),
        Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(Written::Raced),
        // A namespace being deleted refuses new objects: the Service goes with it.
        Err(e) if api_message(&e).contains("because it is being terminated") => Ok(Written::Gone),
        Err(e) if is_refused(&e) => Ok(Written::Refused(format!(
            "the API server refused Secret {}: {}",
            secret_ref(&namespace, &name),
            crate::bounded(&api_message(&e))
        ))),
        Err(source) => Err(Error::WriteSecret { secret: secret_ref(&namespace, &name), source }),
    }
}

/// The expiry annotation we set on a desired Secret.
fn expiry_of(secret: &Secret) -> OffsetDateTime {
    secret
        .annotations()
        .get(ann::BETA.expiry)
        .and_then(|v| crate::pki::parse_expiry(v))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `namespace/name`, for messages.
pub fn secret_ref(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Success: `serving-cert-signed-by` = the CA's CN and no error annotations. Written
/// only when something differs — in the cached Service and, because the cache can lag
/// a moment behind our own previous write, in a fresh (consistent) read.
async fn mark_signed(ctx: &Context, svc: &Service, signer: &Signer) -> Result<(), Error> {
    let ca_cn = signer.ca.subject_cn();
    let families = [ann::BETA, ann::ALPHA];
    let up_to_date = |svc: &Service| {
        let annotations = svc.annotations();
        families.iter().all(|f: &Family| {
            annotations.get(f.signed_by).map(String::as_str) == Some(ca_cn)
                && !annotations.contains_key(f.generation_error)
                && !annotations.contains_key(f.generation_error_num)
        })
    };
    if up_to_date(svc) {
        return Ok(());
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let fresh = api
        .get_opt(&svc.name_any())
        .await
        .map_err(|source| Error::ReadService { service: ObjectRef::from_obj(svc).to_string(), source })?;
    match fresh {
        Some(fresh) if !up_to_date(&fresh) => {}
        _ => return Ok(()),
    }
    let mut patch = serde_json::Map::new();
    for f in families {
        patch.insert(f.signed_by.into(), json!(ca_cn));
        patch.insert(f.generation_error.into(), json!(null));
        patch.insert(f.generation_error_num.into(), json!(null));
    }
    patch_annotations(ctx, svc, patch, None).await.map(drop)
}

/// Failure: error annotations (beta and alpha) with the consecutive count, a Warning
/// Event, and a retry with backoff — until the count reaches [`MAX_FAILURES`]. A
/// Service that is gone meanwhile ends the matter. The count is written only over the
/// Service it was counted from: if the Service changed since (a person reset the count,
/// or our previous report is not in the cache yet), the pass is run again on what it is
/// now, instead of overwriting it with a stale count.
async fn report_problem(
    ctx: &Context,
    controller: &'static str,
    svc: &Service,
    message: &str,
) -> Result<Action, Error> {
    let count = failures(svc).saturating_add(1);
    let mut patch = serde_json::Map::new();
    for f in [ann::BETA, ann::ALPHA] {
        patch.insert(f.generation_error.into(), json!(message));
        patch.insert(f.generation_error_num.into(), json!(count.to_string()));
    }
    match patch_annotations(ctx, svc, patch, svc.resource_version()).await {
        Ok(true) => {}
        Ok(false) => return Ok(Action::await_change()),
        Err(Error::PatchService { source, .. }) if is_conflict(&source) => return Ok(Action::requeue(LOOK_AGAIN)),
        Err(error) => return Err(error),
    }
    let service = ObjectRef::from_obj(svc).to_string();
    tracing::warn!(%service, failures = count, "serving certificate not issued: {message}");
    let note = if count >= MAX_FAILURES {
        format!(
            "{message}. Stopped retrying after {count} consecutive failures: remove the annotation {} to retry",
            ann::BETA.generation_error_num
        )
    } else {
        message.to_string()
    };
    ctx.event(&svc.object_ref(&()), EventType::Warning, "ServingCertificateError", note).await;
    ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::ErrorLabels { controller, category: "rejected" }).inc();
    Ok(if count >= MAX_FAILURES { Action::await_change() } else { Action::requeue(retry_delay(count)) })
}

/// How long a Secret may stay in deletion before that is reported on its Service. A
/// delete of ours holds it for a moment (the garbage collector orphans its dependents
/// first); only a finalizer of someone else's holds it this long.
pub const HELD_REPORT_AFTER: Duration = Duration::from_secs(10);

/// What to do about a Secret being deleted since `deleted_at` (Unix seconds, the API
/// server's clock), at `now`.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// Look again after this (the moment it becomes worth reporting).
    Wait(Duration),
    /// Report it on the Service (once), then look again after `again`: the longer it
    /// has been held, the later (half its age, 2 s to 5 minutes). Its final deletion
    /// wakes the controllers sooner through the watch.
    Report { again: Duration },
}

/// The plan for a Secret being deleted (pure).
pub fn held(deleted_at: Option<i64>, now: i64) -> Held {
    let age = now.saturating_sub(deleted_at.unwrap_or(now)).max(0).unsigned_abs();
    let age = Duration::from_secs(age);
    match HELD_REPORT_AFTER.checked_sub(age).filter(|left| !left.is_zero()) {
        Some(left) => Held::Wait(left.max(Duration::from_secs(1))),
        None => Held::Report {
            again: age.checked_div(2).unwrap_or_default().clamp(Duration::from_secs(2), super::MAX_RETRY),
        },
    }
}

/// The report on the Service about its Secret held in deletion: what holds it (the
/// finalizers of others than the API server's garbage collector), bounded and escaped.
pub fn held_message(namespace: &str, meta: &ObjectMeta) -> String {
    let holders: Vec<&str> = meta
        .finalizers
        .iter()
        .flatten()
        .map(String::as_str)
        .filter(|f| !matches!(*f, "orphan" | "foregroundDeletion"))
        .collect();
    let holders = if holders.is_empty() {
        "the garbage collector".to_string()
    } else {
        format!("its finalizers ({})", crate::bounded(&holders.join(", ")))
    };
    let since = meta.deletion_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    format!(
        "Secret {} is being deleted (since {since}) and is held by {holders}; the certificate is written once it \
         is gone",
        secret_ref(namespace, &meta.name.clone().unwrap_or_default()),
    )
}

/// A Secret of the Service `svc` is being deleted and something holds it (`meta`): it
/// is waited for, never written to nor deleted again. Once it has been held
/// [`HELD_REPORT_AFTER`], that is reported on the Service like a failure (counted
/// towards the cap, a Warning Event) — once: a later pass that finds the same report
/// on the Service only looks again, later each time. When the Secret is finally gone,
/// its deletion (a watch event) brings the serving-cert controller, which creates it.
pub async fn wait_for_deletion(
    ctx: &Context,
    controller: &'static str,
    svc: &Service,
    meta: &ObjectMeta,
) -> Result<Action, Error> {
    let since = meta.deletion_timestamp.as_ref().map(|t| t.0.as_second());
    match held(since, OffsetDateTime::now_utc().unix_timestamp()) {
        Held::Wait(wait) => Ok(Action::requeue(wait)),
        Held::Report { again } => {
            let message = held_message(&meta.namespace.clone().unwrap_or_default(), meta);
            // The cached Service shows our annotations cut as every cached value is.
            let shown = crate::bounded_to(&message, super::watch::MAX_CACHED_VALUE);
            let annotations = svc.annotations();
            if [ann::BETA, ann::ALPHA]
                .iter()
                .all(|f| annotations.get(f.generation_error).map(String::as_str) == Some(&*shown))
            {
                return Ok(Action::requeue(again));
            }
            report_problem(ctx, controller, svc, &message).await
        }
    }
}

/// Merges `annotations` into the Service's; `false` when the Service is gone. With
/// `expected`, only into that resourceVersion of it (409 otherwise).
async fn patch_annotations(
    ctx: &Context,
    svc: &Service,
    annotations: serde_json::Map<String, serde_json::Value>,
    expected: Option<String>,
) -> Result<bool, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let mut patch = json!({ "metadata": { "annotations": annotations } });
    if let Some(version) = expected {
        patch["metadata"]["resourceVersion"] = json!(version);
    }
    ctx.metrics.write("services", "patch");
    match api.patch(&svc.name_any(), &patch_params(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(source) => Err(Error::PatchService { service: ObjectRef::from_obj(svc).to_string(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(annotations: &[(&str, &str)], cluster_ip: Option<&str>) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("shop".into());
        svc.metadata.uid = Some("uid-1".into());
        svc.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: cluster_ip.map(Into::into),
            ..Default::default()
        });
        svc
    }

    #[test]
    fn beta_wins_when_both_are_set_and_non_empty() {
        let both = svc(&[(ann::BETA.serving_cert_secret_name, "b"), (ann::ALPHA.serving_cert_secret_name, "a")], None);
        assert_eq!(wanted(&both), Wanted::Named { name: "b", family: ann::BETA });
        let empty_beta =
            svc(&[(ann::BETA.serving_cert_secret_name, ""), (ann::ALPHA.serving_cert_secret_name, "a")], None);
        assert_eq!(wanted(&empty_beta), Wanted::Named { name: "a", family: ann::ALPHA });
        assert_eq!(wanted(&svc(&[(ann::BETA.serving_cert_secret_name, " ")], None)), Wanted::Empty(ann::BETA));
        assert_eq!(wanted(&svc(&[], None)), Wanted::NotRequested);
    }

    #[test]
    fn the_key_algorithm_annotation_picks_the_key_kind() {
        let rsa = KeyKind::Rsa { bits: 2048 };
        let key = |annotations: &[(&str, &str)], default| key_algorithm(&svc(annotations, None), default, &[]);
        assert_eq!(key(&[], rsa), Ok(rsa));
        assert_eq!(key(&[], KeyKind::EcdsaP256), Ok(KeyKind::EcdsaP256), "the cluster default");
        assert_eq!(key(&[(ann::BETA.serving_cert_key_algorithm, "ECDSA")], rsa), Ok(KeyKind::EcdsaP256));
        assert_eq!(key(&[(ann::ALPHA.serving_cert_key_algorithm, "rsa-4096")], rsa), Ok(KeyKind::Rsa { bits: 4096 }));
        let both =
            [(ann::BETA.serving_cert_key_algorithm, "ecdsa-p384"), (ann::ALPHA.serving_cert_key_algorithm, "rsa")];
        assert_eq!(key(&both, rsa), Ok(KeyKind::EcdsaP384), "beta wins");
        let empty_beta =
            [(ann::BETA.serving_cert_key_algorithm, " "), (ann::ALPHA.serving_cert_key_algorithm, "ecdsa")];
        assert_eq!(key(&empty_beta, rsa), Ok(KeyKind::EcdsaP256), "an empty value counts as absent");
        let error = key(&[(ann::BETA.serving_cert_key_algorithm, "dsa")], KeyKind::EcdsaP256).unwrap_err();
        assert!(error.contains(ann::BETA.serving_cert_key_algorithm) && error.contains("\"dsa\""), "{error}");
        let long = "x".repeat(100_000);
        let error = key(&[(ann::BETA.serving_cert_key_algorithm, &long)], rsa).unwrap_err();
        assert!(error.len() < 600, "the echo is bounded: {} bytes", error.len());
        // --allowed-key-algorithms: another kind is refused naming the allowed values;
        // the default needs no annotation.
        let allowed = [rsa, KeyKind::EcdsaP256];
        let asked = svc(&[(ann::BETA.serving_cert_key_algorithm, "RSA-4096")], None);
        let error = key_algorithm(&asked, rsa, &allowed).unwrap_err();
        assert!(error.contains("\"RSA-4096\"") && error.contains("use one of rsa-2048, ecdsa-p256"), "{error}");
        let asked = svc(&[(ann::ALPHA.serving_cert_key_algorithm, "ecdsa")], None);
        assert_eq!(key_algorithm(&asked, rsa, &allowed), Ok(KeyKind::EcdsaP256));
        assert_eq!(key_algorithm(&svc(&[], None), rsa, &allowed), Ok(rsa));
    }

    #[test]
    fn the_key_algorithm_annotation_is_cached_and_triggers() {
        let mut service = svc(&[(ann::BETA.serving_cert_secret_name, "tls")], None);
        let before = trigger_hash(&service);
        service.annotations_mut().insert(ann::ALPHA.serving_cert_key_algorithm.into(), "ecdsa".into());
        assert_ne!(trigger_hash(&service), before);
        trim_service(&mut service);
        assert_eq!(key_algorithm(&service, KeyKind::Rsa { bits: 2048 }, &[]), Ok(KeyKind::EcdsaP256));
    }

    #[test]
    fn desired_secret_keeps_what_others_wrote_and_sets_ours() {
        let service = svc(&[(ann::ALPHA.serving_cert_secret_name, "tls")], Some("None"));
        assert!(leaf_request(&service, "cluster.local", KeyKind::Rsa { bits: 2048 }).headless);
        let mut existing = Secret::default();
        existing.metadata.name = Some("tls".into());
        existing.metadata.namespace = Some("shop".into());
        existing.metadata.resource_version = Some("7".into());
        existing.metadata.labels = Some(BTreeMap::from([("team".to_string(), "a".to_string())]));
        existing.metadata.managed_fields = Some(vec![]);
        existing.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "service".into(),
            name: "web".into(),
            uid: "uid-1".into(),
            ..OwnerReference::default()
        }]);
        existing.data = Some(BTreeMap::from([
            (TLS_CERT.to_string(), ByteString(b"crt".to_vec())),
            (TLS_KEY.to_string(), ByteString(b"key".to_vec())),
            ("extra".to_string(), ByteString(b"x".to_vec())),
        ]));
        let expiry = OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        let out = desired(Some(&existing), &service, ann::ALPHA, "tls", Content::Kept { expiry });
        assert_eq!(out.metadata.resource_version.as_deref(), Some("7"), "optimistic concurrency");
        assert!(out.metadata.managed_fields.is_none());
        assert_eq!(out.labels()["team"], "a");
        assert_eq!(out.labels()[ann::MANAGED_LABEL], "true");
        let data = out.data.as_ref().unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), [TLS_CERT, TLS_KEY]);
        assert_eq!(data[TLS_CERT].0, b"crt");
        let a = out.annotations();
        assert_eq!(a[ann::ALPHA.originating_service_uid], "uid-1");
        assert!(!a.contains_key(ann::BETA.originating_service_uid), "the family the Service used");
        assert_eq!(a[ann::BETA.expiry], "2030-03-17T17:46:40Z");
        assert_eq!(a[ann::ALPHA.expiry], "2030-03-17T17:46:40Z");
        let owners = out.owner_references();
        assert_eq!(owners.len(), 1, "the hand-made reference with the wrong kind is replaced");
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str(), owners[0].name.as_str()),
            ("Service", "uid-1", "web")
        );
        assert_eq!(out.type_.as_deref(), Some("kubernetes.io/tls"));
    }

    #[test]
    fn the_service_cache_keeps_only_what_the_controllers_read() {
        let mut service =
            svc(&[(ann::BETA.serving_cert_secret_name, "tls"), ("tenant/blob", &"x".repeat(200_000))], Some("None"));
        service.metadata.labels = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
        let before = (
            trigger_hash(&service),
            leaf_request(&service, "cluster.local", KeyKind::Rsa { bits: 2048 }),
            failures(&service),
        );
        trim_service(&mut service);
        assert_eq!(service.annotations().keys().collect::<Vec<_>>(), [ann::BETA.serving_cert_secret_name]);
        assert!(service.metadata.labels.is_none());
        assert_eq!(
            (
                trigger_hash(&service),
                leaf_request(&service, "cluster.local", KeyKind::Rsa { bits: 2048 }),
                failures(&service)
            ),
            before
        );
    }

    #[test]
    fn a_held_secret_is_reported_once_it_has_been_held_a_while_then_looked_at_ever_later() {
        let t = 1_800_000_000;
        assert_eq!(held(Some(t), t), Held::Wait(HELD_REPORT_AFTER), "just deleted: the garbage collector's moment");
        assert_eq!(held(Some(t), t + 7), Held::Wait(Duration::from_secs(3)));
        assert_eq!(held(Some(t), t + 10), Held::Report { again: Duration::from_secs(5) });
        assert_eq!(held(Some(t), t + 120), Held::Report { again: Duration::from_secs(60) });
        assert_eq!(held(Some(t), t + 86_400), Held::Report { again: crate::controllers::MAX_RETRY });
        // Clocks apart, or values no clock shows: never a panic, never a hurry.
        assert_eq!(held(Some(t + 3600), t), Held::Wait(HELD_REPORT_AFTER), "deleted in our future");
        assert_eq!(held(None, t), Held::Wait(HELD_REPORT_AFTER));
        assert_eq!(held(Some(i64::MIN), i64::MAX), Held::Report { again: crate::controllers::MAX_RETRY });
        assert_eq!(held(Some(i64::MAX), i64::MIN), Held::Wait(HELD_REPORT_AFTER));
    }

    #[test]
    fn the_held_report_names_what_holds_the_secret_bounded() {
        let mut meta = ObjectMeta {
            name: Some("web-tls".into()),
            deletion_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-02T01:00:00Z".parse().unwrap(),
            )),
            finalizers: Some(vec!["orphan".into(), "e2e.test/hold".into()]),
            ..ObjectMeta::default()
        };
        let message = held_message("shop", &meta);
        assert_eq!(
            message,
            "Secret shop/web-tls is being deleted (since 2026-12-02T01:00:00Z) and is held by its finalizers \
             (e2e.test/hold); the certificate is written once it is gone"
        );
        meta.finalizers = Some(vec!["orphan".into()]);
        assert!(held_message("shop", &meta).contains("held by the garbage collector;"));
        meta.finalizers = Some((0..1000).map(|i| format!("example.com/hold-{i}")).collect());
        assert!(held_message("shop", &meta).len() < 600, "bounded");
    }

    #[test]
    fn own_annotation_writes_do_not_retrigger() {
        let mut svc = Service::default();
        svc.metadata.uid = Some("u".into());
        svc.annotations_mut().insert(ann::BETA.serving_cert_secret_name.into(), "tls".into());
        let before = trigger_hash(&svc);
        svc.annotations_mut().insert(ann::BETA.signed_by.into(), "ca".into());
        svc.annotations_mut().insert(ann::BETA.generation_error.into(), "boom".into());
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "3".into());
        assert_eq!(trigger_hash(&svc), before);
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "10".into());
        svc.annotations_mut().insert(ann::ALPHA.generation_error_num.into(), "10".into());
        assert_ne!(trigger_hash(&svc), before, "reaching the cap is a change");
        assert_eq!(failures(&svc), 10);
        svc.annotations_mut().remove(ann::BETA.generation_error_num);
        assert_eq!(failures(&svc), 0, "removing the beta count (as the Event says) lifts the cap");
        assert_eq!(trigger_hash(&svc), before, "and is a change");
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "10".into());
        svc.annotations_mut().insert(ann::BETA.serving_cert_secret_name.into(), "other".into());
        assert_ne!(trigger_hash(&svc), before);
    }
}
