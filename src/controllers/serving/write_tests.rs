//! The unit tier of the serving Secret write (`secret::write_secret`, `secret::issue`)
//! over a stubbed API server: what each failed status makes of the write. Each case
//! sends exactly one request: a write never retries by itself; the controller's next
//! pass (a requeue or the backoff of `drive`) does. And what a write returned stands in
//! for the read right after it.

use http::Method;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use time::OffsetDateTime;

use super::decision::IssueReason;
use super::fixtures::svc;
use super::secret::{Content, desired, issue, read_secret, write_secret};
use super::{Error, request};
use crate::controllers::Categorised;
use crate::controllers::Outcome;
use crate::controllers::test_api::{self, Seen};
use crate::metrics::ReasonLabels;
use crate::names as ann;
use crate::pki::KeyKind;

const SECRETS: &str = "/api/v1/namespaces/shop/secrets";

/// The Secret `tls` of Service `shop/web` as read (resourceVersion 7).
fn existing() -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some("tls".into());
    secret.metadata.namespace = Some("shop".into());
    secret.metadata.resource_version = Some("7".into());
    secret.data = Some([("tls.crt".to_string(), ByteString(b"old".to_vec()))].into());
    secret
}

/// Writes the Secret (created when `existing` is `None`, else replaced) against an
/// API server that answers every request with `answer`.
async fn write(
    existing: Option<&Secret>,
    answer: (u16, serde_json::Value),
) -> (Result<Outcome<OffsetDateTime>, Error>, Seen) {
    let (client, seen) = test_api::client(move |_, _| answer.clone());
    let ctx = test_api::context(client);
    let service = svc(&[(ann::BETA.serving_cert_secret_name, "tls")], None);
    let expiry = OffsetDateTime::now_utc();
    let secret = desired(existing, &service, ann::BETA, "tls", Content::Kept { expiry });
    (write_secret(&ctx, existing, secret).await, seen)
}

/// One request, and of the kind the case calls for (POST to create, PUT to replace).
fn one_write(seen: &Seen, existing: Option<&Secret>) {
    let sent = match existing {
        None => seen.count(Method::POST, SECRETS),
        Some(_) => seen.count(Method::PUT, &format!("{SECRETS}/tls")),
    };
    assert_eq!((sent, seen.all().len()), (1, 1), "{:?}", seen.all());
}

#[tokio::test]
async fn a_conflict_or_a_vanished_secret_is_a_race_to_look_again() {
    let old = existing();
    for existing in [None, Some(&old)] {
        for answer in [test_api::status(409, "Conflict", "changed"), test_api::status(404, "NotFound", "gone")] {
            let (written, seen) = write(existing, answer).await;
            assert!(matches!(written, Ok(Outcome::Raced)), "{written:?}");
            one_write(&seen, existing);
        }
    }
}

#[tokio::test]
async fn a_refusal_is_reported_with_the_api_servers_message_bounded() {
    let old = existing();
    let long = format!("admission webhook denied the request: {}", "x".repeat(100_000));
    for existing in [None, Some(&old)] {
        for answer in [test_api::status(403, "Forbidden", &long), test_api::status(422, "Invalid", &long)] {
            let (written, seen) = write(existing, answer).await;
            let Ok(Outcome::Refused(message)) = written else { panic!("{written:?}") };
            assert!(
                message.starts_with("the API server refused Secret shop/tls: admission webhook denied"),
                "{message}"
            );
            assert!(message.len() < 1_000, "bounded: {} bytes", message.len());
            one_write(&seen, existing);
        }
    }
}

#[tokio::test]
async fn a_namespace_being_terminated_ends_the_work() {
    let message =
        "secrets \"tls\" is forbidden: unable to create new content in namespace shop because it is being terminated";
    let (written, seen) = write(None, test_api::status(403, "Forbidden", message)).await;
    assert!(matches!(written, Ok(Outcome::Gone)), "{written:?}");
    one_write(&seen, None);
}

#[tokio::test]
async fn a_body_too_large_is_an_error_retried_with_backoff() {
    let old = existing();
    for existing in [None, Some(&old)] {
        let answer = test_api::status(413, "RequestEntityTooLarge", "limit is 3145728");
        let (written, seen) = write(existing, answer).await;
        let Err(error) = written else { panic!("{written:?}") };
        assert!(matches!(error, Error::Kube { action: super::WRITE_SECRET, .. }), "{error:?}");
        assert_eq!(error.category(), "write-secret");
        assert!(!error.unreachable(), "answered: the backoff applies, not the quick retry of an outage");
        assert!(error.to_string().contains("writing Secret shop/tls"), "{error}");
        one_write(&seen, existing);
    }
}

/// `issue` counts a certificate it could not write by reason; a race is not a failure.
#[tokio::test]
async fn issue_counts_each_unwritten_certificate_by_reason() {
    for (answer, reason) in [
        (test_api::status(409, "Conflict", "changed"), None),
        (test_api::status(422, "Invalid", "no"), Some("refused")),
        (test_api::status(413, "RequestEntityTooLarge", "limit"), Some("api")),
    ] {
        let (client, seen) = test_api::client(move |_, _| answer.clone());
        let ctx = test_api::context(client);
        test_api::load_ca(&ctx);
        let signer = ctx.signer.current().unwrap();
        let service = svc(&[(ann::BETA.serving_cert_secret_name, "tls")], None);
        let leaf = request::leaf_request(&service, "cluster.local", KeyKind::EcdsaP256);
        let _ = issue(&ctx, &service, leaf, ann::BETA, "tls", None, &signer, &IssueReason::Absent).await;
        let failures = |reason| ctx.metrics.issuance_failures.get_or_create(&ReasonLabels { reason }).get();
        for counted in ["refused", "api", "pki"] {
            assert_eq!(failures(counted), u64::from(Some(counted) == reason), "{counted} after {reason:?}");
        }
        assert_eq!(seen.all().len(), 1, "one write, no Event: {:?}", seen.all());
    }
}

/// The Secret a write returned stands in for a read at that resourceVersion (the passes
/// our own write sets off), and only at that one.
#[tokio::test]
async fn a_secret_just_written_is_not_read_back_at_the_version_written() {
    let mut created = existing();
    created.metadata.resource_version = Some("8".into());
    let body = serde_json::to_value(&created).unwrap();
    let (client, seen) = test_api::client(move |method, _| match *method {
        Method::POST => (201, body.clone()),
        _ => (200, body.clone()),
    });
    let ctx = test_api::context(client);
    let service = svc(&[(ann::BETA.serving_cert_secret_name, "tls")], None);
    let secret = desired(None, &service, ann::BETA, "tls", Content::Kept { expiry: OffsetDateTime::now_utc() });
    assert!(matches!(write_secret(&ctx, None, secret).await, Ok(Outcome::Done(_))));
    let read = read_secret(&ctx, "shop", "tls", Some("8")).await.unwrap();
    assert_eq!(read.and_then(|s| s.metadata.resource_version).as_deref(), Some("8"));
    assert_eq!(seen.all().len(), 1, "only the write: {:?}", seen.all());
    for cached in [Some("9"), None] {
        read_secret(&ctx, "shop", "tls", cached).await.unwrap();
    }
    assert_eq!(seen.count(Method::GET, &format!("{SECRETS}/tls")), 2, "{:?}", seen.all());
}
