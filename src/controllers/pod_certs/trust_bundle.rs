//! The CA bundle as a ClusterTrustBundle, for pods' `clusterTrustBundle` projected
//! volumes: one object per instance, named `<signer with '/' as ':'>:<namespace>`,
//! `spec.signerName` the pod signer, labelled `service-ca.operators.openshift.io/managed=true`
//! and `service-ca.operators.openshift.io/instance=<namespace>`, holding exactly what
//! `signing-cabundle` holds.
//!
//! Watch: that one object and the signer. Plan: the object as it should be, compared
//! with what is there. Write: create, or replace guarded by resourceVersion (a
//! person's edit or deletion is undone). Report: the bundle published, for the pod
//! signer to wait on; failures are logged and retried with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::watcher;

use super::Published;
use crate::controllers::{Context, NOT_YET, WATCH_RETRY, is_conflict, post_params, retry_delay};
use crate::names::{self as ann, MANAGED_LABEL, MANAGED_LABEL_VALUE, TRUST_BUNDLE_INSTANCE_LABEL};
use crate::shutdown::Shutdown;

pub const NAME: &str = "trust-bundle";

/// The ClusterTrustBundle as it should be for `bundle_pem`.
pub fn desired(signer: &str, namespace: &str, bundle_pem: &str) -> ClusterTrustBundle {
    ClusterTrustBundle {
        metadata: ObjectMeta {
            name: Some(ann::trust_bundle_name(signer, namespace)),
            labels: Some(BTreeMap::from([
                (MANAGED_LABEL.to_string(), MANAGED_LABEL_VALUE.to_string()),
                (TRUST_BUNDLE_INSTANCE_LABEL.to_string(), namespace.to_string()),
            ])),
            ..Default::default()
        },
        spec: ClusterTrustBundleSpec { signer_name: Some(signer.to_string()), trust_bundle: bundle_pem.to_string() },
    }
}

/// Whether `current` already is `want` (spec and our labels; other labels are kept).
fn up_to_date(current: &ClusterTrustBundle, want: &ClusterTrustBundle) -> bool {
    let labels = current.metadata.labels.clone().unwrap_or_default();
    current.spec == want.spec && want.metadata.labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v))
}

/// Runs until `shutdown`.
pub async fn run(ctx: Arc<Context>, published: Published, shutdown: Shutdown) {
    let signer_name = ctx.config.pod_signer_name.clone();
    let name = ann::trust_bundle_name(&signer_name, &ctx.config.namespace);
    let api: Api<ClusterTrustBundle> = Api::all(ctx.client.clone());
    let mut events = watcher::watch_object(api.clone(), &name).boxed();
    let mut signer_changes = ctx.signer.changes().boxed();
    let mut shutdown = std::pin::pin!(shutdown.signal());
    // `None` until the first list: whether the object exists, and as what.
    let mut seen: Option<Option<ClusterTrustBundle>> = None;
    let mut retry: Option<tokio::time::Instant> = None;
    let mut failures = 0u32;
    loop {
        let wake = retry.unwrap_or_else(|| crate::dates::deadline(Duration::from_secs(86_400)));
        tokio::select! {
            _ = &mut shutdown => return,
            event = events.next() => match event {
                Some(Ok(object)) => { ctx.health.observe_api(true); seen = Some(object); }
                Some(Err(error)) => {
                    ctx.health.observe_api(false);
                    tracing::warn!(%error, bundle = %name, "watching the ClusterTrustBundle failed; retrying");
                    tokio::time::sleep(WATCH_RETRY).await;
                    continue;
                }
                None => return,
            },
            _ = signer_changes.next() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
        let (Some(current), Some(signer)) = (&seen, ctx.signer.current()) else { continue };
        let want = desired(&signer_name, &ctx.config.namespace, &signer.bundle_pem);
        if current.as_ref().is_some_and(|c| up_to_date(c, &want)) {
            published.send_if_modified(|p| replace(p, &signer.bundle_pem));
            retry = None;
            continue;
        }
        match ctx.timed(NAME, write(&ctx, &api, current.as_ref(), want)).await {
            Ok(()) => {
                failures = 0;
                retry = None;
                tracing::info!(bundle = %name, "ClusterTrustBundle published");
                published.send_if_modified(|p| replace(p, &signer.bundle_pem));
            }
            // Someone wrote it meanwhile: the watch brings the new state.
            Err(error) if is_conflict(&error) => retry = Some(crate::dates::deadline(NOT_YET)),
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(failures);
                tracing::warn!(%error, bundle = %name, retry_in = ?delay, "could not publish the ClusterTrustBundle");
                retry = Some(crate::dates::deadline(delay));
            }
        }
    }
}

/// On a replica that is not the leader: reports what the leader published (the
/// object's bundle), so that the pod signer here never signs with a CA pods do not
/// trust yet. Runs until the watch ends.
pub async fn observe(ctx: Arc<Context>, published: Published) {
    let name = ann::trust_bundle_name(&ctx.config.pod_signer_name, &ctx.config.namespace);
    let api: Api<ClusterTrustBundle> = Api::all(ctx.client.clone());
    let mut events = watcher::watch_object(api, &name).boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(object) => {
                let bundle = object.map(|o| o.spec.trust_bundle);
                published.send_if_modified(|p| {
                    let changed = *p != bundle;
                    p.clone_from(&bundle);
                    changed
                });
            }
            Err(error) => {
                tracing::warn!(%error, bundle = %name, "watching the ClusterTrustBundle failed; retrying");
                tokio::time::sleep(WATCH_RETRY).await;
            }
        }
    }
}

fn replace(published: &mut Option<String>, bundle: &str) -> bool {
    if published.as_deref() == Some(bundle) {
        return false;
    }
    *published = Some(bundle.to_string());
    true
}

/// Creates the object, or replaces it guarded by the resourceVersion it was seen at.
async fn write(
    ctx: &Context,
    api: &Api<ClusterTrustBundle>,
    current: Option<&ClusterTrustBundle>,
    mut want: ClusterTrustBundle,
) -> Result<(), kube::Error> {
    match current {
        None => {
            ctx.metrics.write("clustertrustbundles", "create");
            api.create(&post_params(), &want).await?;
        }
        Some(current) => {
            let mut labels = current.metadata.labels.clone().unwrap_or_default();
            labels.extend(want.metadata.labels.take().unwrap_or_default());
            want.metadata = ObjectMeta { labels: Some(labels), ..current.metadata.clone() };
            want.metadata.managed_fields = None;
            ctx.metrics.write("clustertrustbundles", "update");
            api.replace(&want.metadata.name.clone().unwrap_or_default(), &post_params(), &want).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_is_named_after_the_signer_and_the_instance() {
        let want = desired("service-ca.operators.openshift.io/serving", "openshift-service-ca", "PEM");
        assert_eq!(
            want.metadata.name.as_deref(),
            Some("service-ca.operators.openshift.io:serving:openshift-service-ca")
        );
        assert_eq!(want.spec.signer_name.as_deref(), Some("service-ca.operators.openshift.io/serving"));
        let mut edited = want.clone();
        edited.metadata.labels.as_mut().unwrap().insert("team".into(), "x".into());
        assert!(up_to_date(&edited, &want), "a person's extra label is fine");
        edited.spec.trust_bundle = "OTHER".into();
        assert!(!up_to_date(&edited, &want));
    }
}
