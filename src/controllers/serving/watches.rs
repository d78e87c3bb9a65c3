//! The caches of the serving controllers and the streams that drive them: annotated
//! Services (trimmed to what the controllers read) and serving Secrets (metadata only).

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use super::request::{is_annotated, originating_service, trigger_hash, wanted_name};
use crate::admin::Health;
use crate::controllers::watch::{cached_metadata_watch, cached_watch};
use crate::names as ann;

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::controllers::serving::fixtures::svc;
    use crate::controllers::serving::request::{failures, key_algorithm, leaf_request};
    use crate::pki::KeyKind;

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
}
