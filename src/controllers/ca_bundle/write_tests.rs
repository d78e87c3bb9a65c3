//! The unit tier of the injection write (`inject`, `inject_into`) over a stubbed API
//! server: what each failed status of the patch makes of the pass. Each pass sends
//! exactly one patch: a failed write ends the pass, and the Action (or the backoff of
//! `drive` for an error) decides when the next one comes.

use std::sync::Arc;

use http::Method;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMetaExt;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::{Error, Injector, LOOK_AGAIN_INJECTING, Warned, inject};
use crate::controllers::test_api::{self, Seen};
use crate::controllers::{Categorised, RETRY_REFUSED};
use crate::names as ann;

const CONFIGMAP: &str = "/api/v1/namespaces/shop/configmaps/bundle";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

fn meta() -> ObjectMeta {
    ObjectMeta {
        name: Some("bundle".into()),
        namespace: Some("shop".into()),
        resource_version: Some("7".into()),
        annotations: Some([(ann::BETA.inject_cabundle.to_string(), "true".to_string())].into()),
        ..Default::default()
    }
}

/// An API server that serves the annotated ConfigMap `shop/bundle` (without the
/// bundle), answers its patch with `patched`, and takes Events.
fn injector(patched: (u16, Value)) -> (Arc<Injector>, Seen) {
    let (client, seen) = test_api::client(move |method, path| match (method, path) {
        (&Method::GET, CONFIGMAP) => (200, json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta() })),
        (&Method::PATCH, CONFIGMAP) => patched.clone(),
        (&Method::POST, EVENTS) => test_api::event_created(),
        _ => test_api::status(404, "NotFound", "not stubbed"),
    });
    let ctx = test_api::context(client);
    test_api::load_ca(&ctx);
    (Arc::new(Injector { ctx: Arc::new(ctx), warned: Warned::default() }), seen)
}

async fn pass(state: &Arc<Injector>) -> Result<Action, Error> {
    inject::<ConfigMap>(Arc::new(meta().into_response_partial()), state.clone()).await
}

#[tokio::test]
async fn a_conflict_or_a_vanished_object_is_looked_at_again_soon_without_a_warning() {
    for answer in [test_api::status(409, "Conflict", "changed"), test_api::status(404, "NotFound", "gone")] {
        let (state, seen) = injector(answer);
        assert_eq!(pass(&state).await.unwrap(), Action::requeue(LOOK_AGAIN_INJECTING));
        assert_eq!(seen.count(Method::PATCH, CONFIGMAP), 1, "{:?}", seen.all());
        assert_eq!(seen.count(Method::POST, EVENTS), 0);
    }
}

#[tokio::test]
async fn a_refusal_is_warned_once_and_retried_slowly() {
    for answer in [test_api::status(403, "Forbidden", "denied"), test_api::status(422, "Invalid", "no")] {
        let (state, seen) = injector(answer);
        assert_eq!(pass(&state).await.unwrap(), Action::requeue(RETRY_REFUSED));
        assert_eq!(pass(&state).await.unwrap(), Action::requeue(RETRY_REFUSED));
        assert_eq!(seen.count(Method::PATCH, CONFIGMAP), 2, "one patch a pass: {:?}", seen.all());
        assert_eq!(seen.count(Method::POST, EVENTS), 1, "the same refusal is warned once: {:?}", seen.all());
    }
}

#[tokio::test]
async fn a_body_too_large_is_an_error_retried_with_backoff_and_warned_once() {
    let (state, seen) = injector(test_api::status(413, "RequestEntityTooLarge", "limit is 3145728"));
    for _ in 0..2 {
        let error = pass(&state).await.unwrap_err();
        assert!(matches!(error, Error::Kube { action: super::INJECT, .. }), "{error:?}");
        assert_eq!(error.category(), "write");
        assert!(!error.unreachable(), "answered: the backoff applies, not the quick retry of an outage");
    }
    assert_eq!(seen.count(Method::PATCH, CONFIGMAP), 2, "one patch a pass: {:?}", seen.all());
    assert_eq!(seen.count(Method::POST, EVENTS), 1, "warned once: {:?}", seen.all());
}
