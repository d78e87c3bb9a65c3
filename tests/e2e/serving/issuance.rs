//! Serving certificates (docs/spec.md §1), end to end: the real operator binary, the real API
//! server, real TLS handshakes with the issued certificates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use service_ca_operator::pki::{self};

use crate::support::annotations::{ALPHA_ERR_NUM, ALPHA_NAME, BETA_ALG, BETA_ERR, BETA_ERR_NUM, BETA_NAME};
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, Operator, T, annotation, certs, data, eventually};

async fn service(env: &Env, name: &str) -> Service {
    env.services().get(name).await.unwrap()
}

#[tokio::test]
async fn annotated_service_gets_a_correct_secret_and_serves_tls() {
    let env = Env::new("serving-basic").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let started = Instant::now();
    let svc = env.annotated_service("test1", "test1", false).await;
    let secret = env.serving_secret("test1", Duration::from_secs(10)).await;
    let latency = started.elapsed();
    println!("serving Secret appeared {latency:?} after the annotated Service was created");

    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["tls.crt", "tls.key"]);
    assert!(data(&secret, "tls.key").starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let m = &secret.metadata;
    assert_eq!(annotation(m, "service.beta.openshift.io/originating-service-name"), Some("test1"));
    assert_eq!(annotation(m, "service.beta.openshift.io/originating-service-uid"), svc.metadata.uid.as_deref());
    assert_eq!(annotation(m, "service.alpha.openshift.io/originating-service-uid"), None, "beta Service, beta keys");
    let (sans, not_after) = (certs::sans(&secret), certs::not_after(&secret));
    let expiry = pki::format_expiry(::time::OffsetDateTime::from_unix_timestamp(not_after).unwrap());
    assert_eq!(annotation(m, "service.beta.openshift.io/expiry"), Some(expiry.as_str()));
    assert_eq!(annotation(m, "service.alpha.openshift.io/expiry"), Some(expiry.as_str()));
    assert!(expiry.ends_with('Z') && expiry.len() == 20, "RFC 3339, UTC, whole seconds: {expiry}");
    let owner = &secret.owner_references()[0];
    assert_eq!((owner.api_version.as_str(), owner.kind.as_str(), owner.name.as_str()), ("v1", "Service", "test1"));
    assert_eq!(Some(&owner.uid), svc.metadata.uid.as_ref());
    assert_eq!(secret.labels().get("service-ca.operators.openshift.io/managed").map(String::as_str), Some("true"));
    let ns = &env.ns;
    assert_eq!(sans, [format!("test1.{ns}.svc"), format!("test1.{ns}.svc.cluster.local")]);

    // The Service records its signer.
    let cn = certs::cn(&env.op_secrets().get("signing-key").await.unwrap());
    let svc = eventually(T, "serving-cert-signed-by", || async {
        let s = service(&env, "test1").await;
        (annotation(&s.metadata, "service.beta.openshift.io/serving-cert-signed-by") == Some(cn.as_str())).then_some(s)
    })
    .await;
    assert_eq!(annotation(&svc.metadata, "service.alpha.openshift.io/serving-cert-signed-by"), Some(cn.as_str()));
    // The Normal Event may follow a moment later (it waits while urgent key work waits).
    eventually(T, "the Issued Event", || async {
        env.events(&env.ns, Some("test1"), Some("ServingCertificateIssued")).await.into_iter().next()
    })
    .await;

    // A TLS server using the Secret, verified by clients trusting signing-cabundle.
    let server = TlsServer::start(&data(&secret, "tls.crt"), &data(&secret, "tls.key"));
    for (stack, result) in tls::connect_all(server.port, &bundle, &format!("test1.{ns}.svc")) {
        result.unwrap_or_else(|e| panic!("{stack}: {e}"));
    }
    assert!(tls::rustls_connect(server.port, &bundle, &format!("other.{ns}.svc")).is_err());
}

#[tokio::test]
async fn headless_service_certificate_covers_its_pods() {
    let env = Env::new("serving-headless").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    env.annotated_service("web", "web-tls", true).await;
    let secret = env.serving_secret("web-tls", T).await;
    let ns = &env.ns;
    let sans = certs::sans(&secret);
    assert_eq!(
        sans,
        [
            format!("*.web.{ns}.svc"),
            format!("*.web.{ns}.svc.cluster.local"),
            format!("web.{ns}.svc"),
            format!("web.{ns}.svc.cluster.local")
        ]
    );
    let server = TlsServer::start(&data(&secret, "tls.crt"), &data(&secret, "tls.key"));
    for name in [format!("web-0.web.{ns}.svc"), format!("web.{ns}.svc"), format!("web-1.web.{ns}.svc.cluster.local")] {
        for (stack, result) in tls::connect_all(server.port, &bundle, &name) {
            result.unwrap_or_else(|e| panic!("{stack} for {name}: {e}"));
        }
    }
}

#[tokio::test]
async fn alpha_annotation_gets_alpha_keys_and_beta_wins_over_alpha() {
    let env = Env::new("serving-alpha").await;
    let _op = env.start_operator(&[]);
    env.service_with("old", &[(ALPHA_NAME, "old-tls")], false).await;
    env.service_with("both", &[(ALPHA_NAME, "alpha-tls"), (BETA_NAME, "beta-tls")], false).await;
    let old = env.serving_secret("old-tls", T).await;
    assert!(annotation(&old.metadata, "service.alpha.openshift.io/originating-service-uid").is_some());
    assert!(annotation(&old.metadata, "service.beta.openshift.io/originating-service-uid").is_none());
    assert!(annotation(&old.metadata, "service.beta.openshift.io/expiry").is_some(), "expiry in both forms");
    assert!(annotation(&old.metadata, "service.alpha.openshift.io/expiry").is_some());
    env.serving_secret("beta-tls", T).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(env.secrets().get_opt("alpha-tls").await.unwrap().is_none(), "beta wins when both are set");
}

/// Service `svc` asks for Secret `taken`, which is not ours: the error is reported in
/// both annotation forms and in a Warning Event of ours.
async fn assert_the_foreign_secret_is_reported(env: &Env) {
    let svc = eventually(T, "generation error annotations", || async {
        let s = service(env, "svc").await;
        annotation(&s.metadata, BETA_ERR_NUM).is_some().then_some(s)
    })
    .await;
    let message = annotation(&svc.metadata, BETA_ERR).unwrap().to_string();
    assert!(message.contains(&format!("{}/taken", env.ns)) && message.contains("never modifies it"), "{message}");
    assert_eq!(
        annotation(&svc.metadata, "service.alpha.openshift.io/serving-cert-generation-error"),
        Some(message.as_str())
    );
    assert!(annotation(&svc.metadata, ALPHA_ERR_NUM).is_some());
    // Ours, by reason: the API server's own ClusterIP repair loop may also put a
    // Warning on a Service when the machine is busy.
    let warning = env.warning(&env.ns, "svc", Some("ServingCertificateError")).await;
    assert!(
        warning.note.as_deref().unwrap_or_default().contains("taken"),
        "{warning:?}\nall events: {:?}",
        env.events(&env.ns, Some("svc"), None).await
    );
}

/// No more attempts on `svc` after the cap (`capped`: the Service at 10 failures),
/// whatever makes the operator look again: its own report that reached the cap
/// (reaching it is a change it acts on), then a change that matters (a key algorithm
/// asked for). A retry on a timer would come only after the longest backoff (5 min),
/// more than a test can wait; every pass starts from the same check of the count, which
/// this exercises.
async fn assert_no_attempt_after_the_cap(env: &Env, op: &Operator, capped: &Service) {
    let passes = || async {
        let page = op.metrics_page().await;
        crate::support::metric(&page, "service_ca_reconcile_total{controller=\"serving-cert\"")
    };
    // Settled: no pass in the last second (at most 30 s of looking).
    let mut settled = passes().await;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = passes().await;
        if now == settled {
            break;
        }
        settled = now;
    }
    let later = service(env, "svc").await;
    assert_eq!(later.resource_version(), capped.resource_version(), "no more attempts after 10 failures");
    let touch = json!({ "metadata": { "annotations": { BETA_ALG: "ecdsa-p256" } } });
    let touched = env.services().patch("svc", &PatchParams::default(), &Patch::Merge(&touch)).await.unwrap();
    // A pass ends after its writes: once counted, an attempt would show.
    eventually(T, "a pass over the changed Service", || async { (passes().await > settled).then_some(()) }).await;
    let later = service(env, "svc").await;
    assert_eq!(later.resource_version(), touched.resource_version(), "no attempt after the change either");
    assert_eq!(annotation(&later.metadata, BETA_ERR_NUM), Some("10"));
}

/// A person frees the name and clears the errors: the operator tries again and succeeds.
async fn freed_and_cleared_the_secret_is_issued(env: &Env) {
    env.secrets().delete("taken", &DeleteParams::default()).await.unwrap();
    let patch = json!({ "metadata": { "annotations": { BETA_ERR_NUM: null, BETA_ERR: null, ALPHA_ERR_NUM: null,
        "service.alpha.openshift.io/serving-cert-generation-error": null } } });
    env.services().patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let ours = env.serving_secret("taken", T).await;
    assert_eq!(ours.type_.as_deref(), Some("kubernetes.io/tls"));
    eventually(T, "errors cleared and signed-by set", || async {
        let s = service(env, "svc").await;
        (annotation(&s.metadata, BETA_ERR_NUM).is_none()
            && annotation(&s.metadata, "service.beta.openshift.io/serving-cert-signed-by").is_some())
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn foreign_secret_is_never_modified_errors_are_counted_and_capped() {
    let env = Env::new("serving-foreign").await;
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": { "name": "taken" }, "type": "Opaque", "data": { "password": "aHVudGVyMg==" }
    }))
    .unwrap();
    let foreign = env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    let op = env.start_operator(&[]);
    env.annotated_service("svc", "taken", false).await;
    assert_the_foreign_secret_is_reported(&env).await;

    // Consecutive failures count up (retries with backoff: 2 s, 4 s, ...).
    eventually(T, "the failure count to reach 2", || async {
        let s = service(&env, "svc").await;
        (annotation(&s.metadata, BETA_ERR_NUM) == Some("2")).then_some(())
    })
    .await;

    // At 10 it stops: jump to 9 (as if 9 attempts had failed) and watch it stop at 10.
    let patch = json!({ "metadata": { "annotations": { BETA_ERR_NUM: "9", ALPHA_ERR_NUM: "9" } } });
    env.services().patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let capped = eventually(Duration::from_secs(90), "the count to reach 10", || async {
        let s = service(&env, "svc").await;
        (annotation(&s.metadata, BETA_ERR_NUM) == Some("10")).then_some(s)
    })
    .await;
    assert_no_attempt_after_the_cap(&env, &op, &capped).await;

    // The foreign Secret was never touched.
    let still = env.secrets().get("taken").await.unwrap();
    assert_eq!(still.resource_version(), foreign.resource_version());
    assert_eq!(still.data, foreign.data);

    freed_and_cleared_the_secret_is_issued(&env).await;
}

#[tokio::test]
async fn invalid_secret_name_is_reported_not_crashed_on() {
    let env = Env::new("serving-badname").await;
    let mut op = env.start_operator(&[]);
    env.annotated_service("svc", "Not_A_Valid.Name", false).await;
    let svc = eventually(T, "error annotation", || async {
        let s = service(&env, "svc").await;
        annotation(&s.metadata, "service.beta.openshift.io/serving-cert-generation-error").map(|m| m.to_string())
    })
    .await;
    assert!(svc.contains("not a valid Secret name"), "{svc}");
    assert!(op.running(), "the operator keeps running");
}

#[tokio::test]
async fn service_turning_headless_gets_a_new_certificate_with_wildcards() {
    let env = Env::new("serving-sanchange").await;
    let _op = env.start_operator(&[]);
    env.annotated_service("db", "db-tls", false).await;
    let before = env.serving_secret("db-tls", T).await;
    assert_eq!(certs::sans(&before).len(), 2);
    // clusterIP is immutable: the Service is re-created headless (same name, new UID).
    env.services().delete("db", &DeleteParams::default()).await.unwrap();
    eventually(T, "old Secret garbage-collected", || async {
        env.secrets().get_opt("db-tls").await.unwrap().is_none().then_some(())
    })
    .await;
    env.annotated_service("db", "db-tls", true).await;
    let after = eventually(T, "headless certificate", || async {
        let s = env.secrets().get_opt("db-tls").await.unwrap()?;
        (certs::sans(&s).len() == 4).then_some(s)
    })
    .await;
    assert!(certs::sans(&after)[0].starts_with("*.db."));
}

#[tokio::test]
async fn services_outside_the_selector_are_not_touched() {
    let env = Env::new("serving-selector").await;
    let _op = env.start_operator(&[]);
    let mut svc: Service = serde_json::from_value(json!({ "spec": { "ports": [{ "port": 443 }] } })).unwrap();
    svc.metadata.name = Some("other".into());
    svc.metadata.annotations = Some(BTreeMap::from([(BETA_NAME.to_string(), "other-tls".to_string())]));
    env.services().create(&PostParams::default(), &svc).await.unwrap();
    env.annotated_service("mine", "mine-tls", false).await;
    env.serving_secret("mine-tls", T).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(env.secrets().get_opt("other-tls").await.unwrap().is_none());
}
