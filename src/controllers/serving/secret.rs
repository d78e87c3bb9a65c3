//! The serving Secret: its facts for the decision, the Secret as it should be
//! ([`desired`]), issuing and writing it ([`issue`], [`write_secret`]), and waiting for
//! one held in deletion ([`wait_for_deletion`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::decision::{IssueReason, SecretFacts};
use super::report::{announce_issued, report_problem};
use super::{Error, ISSUE, READ_SECRET, WRITE_SECRET, secret_ref};
use crate::controllers::{Context, Outcome, api_message, post_params, shown_obj};
use crate::keypool::Priority;
use crate::metrics::ReasonLabels;
use crate::names::{self as ann, Family, SECRET_TYPE_TLS, TLS_CERT, TLS_KEY};
use crate::pki::{IssuedLeaf, LeafRequest, format_expiry};
use crate::signer::Signer;

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

/// An ownerReference that points at a Service (core/v1).
fn is_service_owner(owner: &OwnerReference) -> bool {
    owner.kind == "Service" && owner.api_version == "v1"
}

/// The Secret `namespace/name` read whole from the API server (`None`: absent).
///
/// `cached` is the resourceVersion the Secret cache shows: when it is the version our
/// own write just produced, the copy the API server returned then is the Secret (see
/// [`super::written`]) and no request is made.
pub async fn read_secret(
    ctx: &Context,
    namespace: &str,
    name: &str,
    cached: Option<&str>,
) -> Result<Option<Secret>, Error> {
    if let Some(written) = ctx.written.current(namespace, name, cached) {
        return Ok(Some(written));
    }
    Api::<Secret>::namespaced(ctx.client.clone(), namespace).get_opt(name).await.map_err(|source| Error::Kube {
        action: READ_SECRET,
        object: secret_ref(namespace, name),
        source,
    })
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
) -> Result<Outcome<OffsetDateTime>, Error> {
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
            return Err(Error::Pki { action: ISSUE, object: shown_obj(svc), source });
        }
    };
    let written = write_secret(ctx, existing, desired(existing, svc, family, name, Content::Issued(&leaf))).await;
    match &written {
        Ok(Outcome::Done(_)) => {
            ctx.keys.written(&owner);
            announce_issued(ctx, svc, name, reason, &leaf, &signer.ca).await;
        }
        // The key stays parked for the Secret's re-creation.
        Ok(Outcome::Raced | Outcome::Held(_)) => {}
        Ok(Outcome::Gone) => ctx.keys.written(&owner),
        Ok(Outcome::Refused(_)) => {
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
/// (that would fail, again and again) but waited for: [`Outcome::Held`].
pub async fn write_secret(
    ctx: &Context,
    existing: Option<&Secret>,
    mut desired: Secret,
) -> Result<Outcome<OffsetDateTime>, Error> {
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
                        tracing::info!(object = %secret_ref(&namespace, &name), "deleting an immutable Secret to change its data; re-created once it is gone");
                        return Ok(Outcome::Held(Box::new(held.metadata)));
                    }
                    tracing::info!(object = %secret_ref(&namespace, &name), "re-creating an immutable Secret to change its data");
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
    // One request, whatever the answer (the unit tier: `serving/write_tests.rs`): 409
    // or 404 is a race, looked at again soon; 403 for a namespace being terminated ends
    // the work; other 403 and 422 are refusals, reported on the Service and retried up
    // to the failure cap; anything else (413 too large, 5xx, no answer) is an error for
    // the backoff of `drive`.
    let source = match result {
        Ok(written) => {
            ctx.written.remember(written);
            return Ok(Outcome::Done(expiry));
        }
        // A namespace being deleted refuses new objects: the Service goes with it.
        Err(e) if api_message(&e).contains("because it is being terminated") => return Ok(Outcome::Gone),
        Err(e) => e,
    };
    match Outcome::of_failure(&source) {
        Some(Outcome::Refused(why)) => {
            Ok(Outcome::Refused(format!("the API server refused {}: {why}", secret_ref(&namespace, &name))))
        }
        Some(outcome) => Ok(outcome),
        None => Err(Error::Kube { action: WRITE_SECRET, object: secret_ref(&namespace, &name), source }),
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
            again: age.checked_div(2).unwrap_or_default().clamp(Duration::from_secs(2), crate::controllers::MAX_RETRY),
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
        "{} is being deleted (since {since}) and is held by {holders}; the certificate is written once it \
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
            let shown = crate::bounded_to(&message, crate::controllers::watch::MAX_CACHED_VALUE);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::serving::fixtures::svc;
    use crate::controllers::serving::request::leaf_request;
    use crate::pki::KeyKind;

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
}
