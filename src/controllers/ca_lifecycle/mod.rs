//! CA lifecycle controller (docs/spec.md §3): the `signing-key` Secret and the shared signer.
//!
//! Watch: one loop watches `signing-key` and `signing-cabundle`, and wakes at the next
//! moment something is due (rotation, expiry of a bundle member).
//! Plan ([`plan::plan`], pure): no Secret → create a brand-new CA (first start, or
//! the documented hard reset); a Secret that cannot be used → refuse (never
//! overwritten; signing continues with the signer already held, if any); a CA that is
//! due or asked to rotate → rotate with a trust bridge; otherwise use it.
//! Write, in this order: the Secret, `signing-cabundle` ([`plan::publication`]), then
//! the in-memory signer — which re-queues every serving Secret and injected object.
//! Report: Events, metrics, readiness.

mod error;
mod new_key;
mod old_keys;
pub mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use time::OffsetDateTime;

pub use self::error::Error;
use self::error::{BUILD_CA, WRITE_SIGNING_KEY};
use self::new_key::{key_kind, new_key};
use self::plan::{Observed, Plan, publication};
use super::{Context, EventType, is_conflict, post_params, retry_delay, until};
use crate::metrics::KindLabels;
use crate::names::{
    self as ann, CA_BUNDLE, INTERMEDIATE, SECRET_TYPE_TLS, SIGNING_CABUNDLE, SIGNING_KEY, TLS_CERT, TLS_KEY,
};
use crate::pki::{CA_NAME_PREFIX, CaKey, CertificateAuthority, PKCS11_KEY_URI, PkiError, format_expiry};
use crate::shutdown::Shutdown;
use crate::signer::Signer;

pub const NAME: &str = "ca-lifecycle";

/// What the loop has seen of the two objects.
#[derive(Default)]
struct Seen {
    secret: Observed<Secret>,
    bundle: Observed<ConfigMap>,
    /// resourceVersion of an unusable Secret already reported (one Event per version).
    reported_invalid: Option<String>,
    /// The key generated for a rotation that failed, kept for the next attempt.
    spare_key: Option<CaKey>,
    /// The last rotation failure reported (one Event per distinct message).
    reported_rotation_failure: Option<String>,
}

/// Runs until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    let namespace = ctx.config.namespace.clone();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut secret_events = watcher::watch_object(secrets, SIGNING_KEY).boxed();
    let mut bundle_events = watcher::watch_object(configmaps, SIGNING_CABUNDLE).boxed();
    let mut shutdown = std::pin::pin!(shutdown.signal());
    let mut seen = Seen::default();
    let mut next: Option<tokio::time::Instant> = None;
    let mut failures = 0u32;
    loop {
        let wake = next.unwrap_or_else(|| crate::dates::deadline(crate::dates::LONGEST_WAIT));
        tokio::select! {
            _ = &mut shutdown => return,
            event = secret_events.next() => match event {
                Some(Ok(secret)) => { ctx.health.observe_api(true); seen.secret = observed(secret); }
                Some(Err(error)) => { watch_failed(&ctx, SIGNING_KEY, &error).await; continue; }
                None => return,
            },
            event = bundle_events.next() => match event {
                Some(Ok(cm)) => { ctx.health.observe_api(true); seen.bundle = observed(cm); }
                Some(Err(error)) => { watch_failed(&ctx, SIGNING_CABUNDLE, &error).await; continue; }
                None => return,
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
        let secret = match &seen.secret {
            Observed::NotListed => continue,
            Observed::Absent => None,
            Observed::Present(secret) => Some(secret.clone()),
        };
        let bundle = match &seen.bundle {
            Observed::NotListed => continue,
            Observed::Absent => None,
            Observed::Present(cm) => Some(cm.clone()),
        };
        next = match ctx.timed(NAME, reconcile(&ctx, secret, bundle, &mut seen)).await {
            Ok(due) => {
                failures = 0;
                due.map(|at| crate::dates::deadline(until(at)))
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(failures);
                tracing::warn!(%error, retry_in = ?delay, "CA lifecycle pass failed");
                Some(crate::dates::deadline(delay))
            }
        };
    }
}

/// On a replica that is not the leader (issuance shared): loads the signer from
/// `signing-key` as the leader publishes it, and only once `signing-cabundle` holds
/// that CA — never signing with a CA clients do not trust yet. Writes nothing; runs
/// until the watches end (the caller stops it when this replica becomes the leader).
pub async fn follow(ctx: Arc<Context>) {
    let namespace = ctx.config.namespace.clone();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut secret_events = watcher::watch_object(secrets, SIGNING_KEY).boxed();
    let mut bundle_events = watcher::watch_object(configmaps, SIGNING_CABUNDLE).boxed();
    let (mut secret, mut bundle): (Option<Secret>, Option<ConfigMap>) = (None, None);
    loop {
        tokio::select! {
            event = secret_events.next() => match event {
                Some(Ok(s)) => secret = s,
                Some(Err(error)) => { watch_failed(&ctx, SIGNING_KEY, &error).await; continue; }
                None => return,
            },
            event = bundle_events.next() => match event {
                Some(Ok(cm)) => bundle = cm,
                Some(Err(error)) => { watch_failed(&ctx, SIGNING_CABUNDLE, &error).await; continue; }
                None => return,
            },
        }
        ctx.health.observe_api(true);
        let now = OffsetDateTime::now_utc();
        let ca = match plan::plan_with(secret.as_ref(), &ctx.config.ca_policy(), now, ctx.ca_token.as_ref()) {
            Plan::Use(ca) | Plan::Rotate { ca, .. } => ca,
            Plan::Create | Plan::Refuse(_) => continue,
        };
        let published = bundle.as_ref().and_then(|cm| cm.data.as_ref()).and_then(|d| d.get(CA_BUNDLE));
        let trusted = published
            .and_then(|pem| crate::pki::pem::decode_certificates(CA_BUNDLE, pem.as_bytes()).ok())
            .is_some_and(|ders| ders.iter().any(|der| *der == ca.certificate().der));
        let held = ctx.signer.current();
        if !trusted || held.is_some_and(|h| h.ca.certificate().der == ca.certificate().der) {
            continue;
        }
        ctx.metrics.ca_expiry.set(ca.not_after().unix_timestamp());
        tracing::info!(ca = ca.subject_cn(), "signer loaded as published by the leader");
        ctx.signer.publish(Signer::new(ca, now));
        ctx.health.set_signer_loaded();
    }
}

fn observed<T>(object: Option<T>) -> Observed<T> {
    object.map_or(Observed::Absent, Observed::Present)
}

async fn watch_failed(ctx: &Context, object: &str, error: &watcher::Error) {
    ctx.health.observe_api(false);
    tracing::warn!(%error, "watching {object} failed; retrying");
    tokio::time::sleep(super::WATCH_RETRY).await;
}

/// One pass; returns when it next needs to run by itself.
async fn reconcile(
    ctx: &Context,
    secret: Option<Secret>,
    bundle: Option<ConfigMap>,
    seen: &mut Seen,
) -> Result<Option<OffsetDateTime>, Error> {
    let now = OffsetDateTime::now_utc();
    let mut created_now = None;
    let ca = match plan::plan_with(secret.as_ref(), &ctx.config.ca_policy(), now, ctx.ca_token.as_ref()) {
        Plan::Create => match create(ctx).await {
            Ok((ca, created)) => {
                seen.secret = Observed::Present(created.clone());
                created_now = Some(created);
                ca
            }
            // Another writer was faster; the watch brings its Secret to us.
            Err(Error::Kube { action: WRITE_SIGNING_KEY, source, .. }) if is_conflict(&source) => return Ok(None),
            Err(e) => return Err(e),
        },
        Plan::Refuse(error) => {
            if let Some(secret) = &secret {
                report_unusable(ctx, secret, &error, seen).await;
            }
            // The token may come back (inserted, PIN fixed): look again with backoff.
            if matches!(error, PkiError::Token(_)) {
                return Err(Error::pki(BUILD_CA, &ctx.config.namespace)(error));
            }
            return Ok(None);
        }
        Plan::Rotate { ca, forced } => {
            mark_usable(ctx, seen);
            let Some(secret) = &secret else { return Ok(None) };
            match rotate(ctx, secret, &ca, forced, seen).await {
                Ok(Some((rotated, written))) => {
                    // Passes before the watch brings our write must not plan from the
                    // version we just replaced (they would rotate again).
                    seen.secret = Observed::Present(written);
                    rotation_recovered(ctx, seen);
                    rotated
                }
                // Someone changed the Secret meanwhile: the watch brings it back to us.
                Ok(None) => return Ok(None),
                Err(error) => {
                    report_rotation_failure(ctx, secret, &error, seen).await;
                    return Err(error);
                }
            }
        }
        Plan::Use(ca) => {
            mark_usable(ctx, seen);
            ca
        }
    };
    let next = publish(ctx, ca, bundle.as_ref(), now, seen).await?;
    if let Some(created) = created_now {
        old_keys::destroy_unused(ctx, &created, &mut seen.spare_key).await;
    }
    Ok(next)
}

/// A rotation that failed: a Warning Event on `signing-key` (once per distinct
/// failure), the failure metric, and readiness `degraded`; the loop retries with
/// backoff, signing with the current CA meanwhile.
async fn report_rotation_failure(ctx: &Context, secret: &Secret, error: &Error, seen: &mut Seen) {
    ctx.metrics.rotation_failures.inc();
    ctx.health.set_rotation_failing(true);
    let note = format!(
        "Rotating the service CA failed: {error}. The operator keeps signing with the current CA and retries with backoff"
    );
    if seen.reported_rotation_failure.as_deref() == Some(note.as_str()) {
        return;
    }
    seen.reported_rotation_failure = Some(note.clone());
    tracing::error!("{note}");
    ctx.event(&secret.object_ref(&()), EventType::Warning, "ServiceCARotationFailed", note).await;
}

fn rotation_recovered(ctx: &Context, seen: &mut Seen) {
    ctx.health.set_rotation_failing(false);
    seen.reported_rotation_failure = None;
}

fn mark_usable(ctx: &Context, seen: &mut Seen) {
    ctx.metrics.signing_key_valid.set(1);
    ctx.health.set_signing_key_usable(true);
    seen.reported_invalid = None;
}

/// First start, or hard reset: a brand-new CA, written with create (never over an
/// existing Secret).
async fn create(ctx: &Context) -> Result<(CertificateAuthority, Secret), Error> {
    let previous = ctx.signer.current();
    // The CN carries the creation second: make sure a reset right after a creation
    // still gets a new name.
    let mut now = OffsetDateTime::now_utc();
    if let Some(prev) = &previous {
        while prev.ca.subject_cn() == format!("{CA_NAME_PREFIX}{}", now.unix_timestamp()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            now = OffsetDateTime::now_utc();
        }
    }
    let key = new_key(ctx, key_kind(ctx, None)).await?;
    let ca = CertificateAuthority::create(key, now, &ctx.config.ca_policy())
        .map_err(Error::pki(BUILD_CA, &ctx.config.namespace))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SIGNING_KEY.into()),
            namespace: Some(ctx.config.namespace.clone()),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE_TLS.into()),
        data: Some(to_bytestrings(ca.to_secret_data())),
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    ctx.metrics.write("secrets", "create");
    let created = api.create(&post_params(), &secret).await.map_err(Error::write_signing_key(&ctx.config.namespace))?;
    let (kind, note) = match &previous {
        None => (
            "created",
            format!("Created the service CA {} (valid until {})", ca.subject_cn(), format_expiry(ca.not_after())),
        ),
        Some(prev) => (
            "reset",
            format!(
                "{SIGNING_KEY} was deleted: hard reset to a new CA {} (valid until {}), with no trust bridge to {}; \
                 every serving certificate is re-issued and every bundle re-injected, and clients must load the new bundle",
                ca.subject_cn(),
                format_expiry(ca.not_after()),
                prev.ca.subject_cn()
            ),
        ),
    };
    ctx.metrics.rotations.get_or_create(&KindLabels { kind }).inc();
    tracing::info!("{note}");
    let reason = if kind == "reset" { "ServiceCAReset" } else { "ServiceCACreated" };
    ctx.event(&created.object_ref(&()), EventType::Normal, reason, note).await;
    Ok((ca, created))
}

/// Rotation with a bridge; the new CA and the Secret as written, or `None` when the
/// Secret changed meanwhile (409).
async fn rotate(
    ctx: &Context,
    secret: &Secret,
    ca: &CertificateAuthority,
    forced_reason: Option<String>,
    seen: &mut Seen,
) -> Result<Option<(CertificateAuthority, Secret)>, Error> {
    let now = OffsetDateTime::now_utc();
    // A retry after a failed attempt signs with the key generated for it.
    let kind = key_kind(ctx, Some(ca.key_kind()));
    let key = match seen.spare_key.take() {
        Some(key) if key.kind() == kind => key,
        _ => new_key(ctx, kind).await?,
    };
    seen.spare_key = key.duplicate();
    let rotated = ca.rotate(key, now, &ctx.config.ca_policy()).map_err(Error::pki(BUILD_CA, &ctx.config.namespace))?;
    let mut updated = secret.clone();
    updated.metadata.managed_fields = None;
    // Data keys of others (a person's notes) stay; ours are replaced.
    let mut data = secret.data.clone().unwrap_or_default();
    data.retain(|k, _| ![TLS_CERT, TLS_KEY, CA_BUNDLE, INTERMEDIATE, PKCS11_KEY_URI].contains(&k.as_str()));
    data.extend(to_bytestrings(rotated.to_secret_data()));
    updated.data = Some(data);
    if let Some(reason) = &forced_reason {
        updated.annotations_mut().insert(ann::FORCED_ROTATION_REASON.into(), reason.clone());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    ctx.metrics.write("secrets", "update");
    let written = match api.replace(SIGNING_KEY, &post_params(), &updated).await {
        Ok(written) => written,
        Err(e) if is_conflict(&e) => return Ok(None),
        Err(e) => return Err(Error::write_signing_key(&ctx.config.namespace)(e)),
    };
    seen.spare_key = None;
    let previous_trusted_until = rotated.next_bundle_change(now).map(format_expiry).unwrap_or_default();
    let (kind, why) = match &forced_reason {
        Some(reason) => ("forced", format!("forced rotation (reason {reason:?})")),
        None => (
            "automatic",
            format!(
                "automatic rotation (less than {} left)",
                humantime::format_duration(ctx.config.policy.ca_rotate_before)
            ),
        ),
    };
    let note = format!(
        "Rotated the service CA {}: {why}. The new CA is valid until {}; the previous CA stays trusted until {previous_trusted_until}",
        rotated.subject_cn(),
        format_expiry(rotated.not_after()),
    );
    ctx.metrics.rotations.get_or_create(&KindLabels { kind }).inc();
    tracing::info!("{note}");
    ctx.event(&written.object_ref(&()), EventType::Normal, "ServiceCARotated", note).await;
    Ok(Some((rotated, written)))
}

/// `signing-cabundle` first, then the in-memory signer; returns the next due moment.
async fn publish(
    ctx: &Context,
    ca: CertificateAuthority,
    bundle: Option<&ConfigMap>,
    now: OffsetDateTime,
    seen: &mut Seen,
) -> Result<Option<OffsetDateTime>, Error> {
    let stored = bundle.and_then(|cm| cm.data.as_ref()).and_then(|d| d.get(CA_BUNDLE)).map(String::as_str);
    let held = ctx.signer.current();
    let plan = publication(&ca, stored, held.as_deref(), &ctx.config.ca_policy(), now);
    if plan.write_bundle {
        // Guarded like every write of ours: over the version planned from, or created
        // only if absent. A conflict means another writer (a leader that has not yet
        // noticed it lost the lease, or a person) moved it: the watch brings it back.
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        let written = match bundle {
            Some(current) => {
                let patch = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": SIGNING_CABUNDLE,
                        "namespace": ctx.config.namespace,
                        "resourceVersion": current.resource_version(),
                    },
                    "data": { CA_BUNDLE: plan.bundle_pem },
                });
                ctx.metrics.write("configmaps", "apply");
                api.patch(SIGNING_CABUNDLE, &PatchParams::apply(ann::FIELD_MANAGER).force(), &Patch::Apply(&patch))
                    .await
            }
            None => {
                let created = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(SIGNING_CABUNDLE.into()),
                        namespace: Some(ctx.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(CA_BUNDLE.to_string(), plan.bundle_pem.clone())])),
                    ..ConfigMap::default()
                };
                ctx.metrics.write("configmaps", "create");
                api.create(&post_params(), &created).await
            }
        };
        match written {
            Ok(written) => seen.bundle = Observed::Present(written),
            Err(e) if is_conflict(&e) => return Ok(None),
            Err(e) => return Err(Error::write_bundle(&ctx.config.namespace, e)),
        }
    }
    if plan.swap_signer {
        ctx.metrics.ca_expiry.set(ca.not_after().unix_timestamp());
        tracing::info!(ca = ca.subject_cn(), not_after = %format_expiry(ca.not_after()), "signer loaded");
        ctx.signer.publish(Signer::new(ca, now));
        ctx.health.set_signer_loaded();
    }
    Ok(plan.next)
}

/// A `signing-key` that cannot be used: never overwritten, reported once per version.
async fn report_unusable(ctx: &Context, secret: &Secret, error: &PkiError, seen: &mut Seen) {
    ctx.metrics.signing_key_valid.set(0);
    ctx.health.set_signing_key_usable(false);
    let version = secret.resource_version();
    if seen.reported_invalid.is_some() && seen.reported_invalid == version {
        return;
    }
    seen.reported_invalid = version;
    let fallback = match ctx.signer.current() {
        Some(held) => format!("the operator keeps signing with the CA it loaded earlier ({})", held.ca.subject_cn()),
        None => {
            "the operator has no CA to sign with until it is fixed or deleted (deleting it creates a new CA)".into()
        }
    };
    let note = format!("{SIGNING_KEY} cannot be used: {error}. It is left untouched; {fallback}");
    tracing::error!("{note}");
    ctx.event(&secret.object_ref(&()), EventType::Warning, "SigningKeyInvalid", note).await;
}

fn to_bytestrings(data: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, ByteString> {
    data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()
}
