//! One tenant cannot delay the others (issue 23 item 7), end to end: a namespace with a
//! backlog of RSA-4096 Services does not make a Service of another namespace wait for
//! the backlog, neither for a controller slot nor for the key-generation threads.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::support::{Env, eventually, time_scale};

const BETA_NAME: &str = "service.beta.openshift.io/serving-cert-secret-name";
const BETA_ALG: &str = "service.beta.openshift.io/serving-cert-key-algorithm";

/// Serving Secrets with a certificate in `namespace`.
async fn issued(env: &Env, namespace: &str) -> usize {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.client.clone(), namespace);
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items.iter().filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("tls.crt"))).count()
}

#[tokio::test]
async fn a_backlog_of_rsa_4096_services_in_one_namespace_does_not_delay_another_namespace() {
    const BACKLOG: usize = 24;
    let env = Env::new("fair").await;
    // Namespace B: a second test world, whose Services carry the first one's label.
    let b = Env::new("fair-b").await;
    // One key at a time and no ready keys, so that every Secret waits for key
    // generation; four controller slots, so that the backlog fills them.
    let _op =
        env.start_operator(&["--key-buffer", "0", "--max-concurrent-issuance", "1", "--controller-concurrency", "4"]);
    env.ca_bundle().await;
    for i in 0..BACKLOG {
        let (name, secret) = (format!("a{i}"), format!("a{i}-tls"));
        env.service_with(&name, &[(BETA_NAME, &secret), (BETA_ALG, "rsa-4096")], false).await;
    }
    // The backlog is being worked on.
    let scale = time_scale();
    let timeout = Duration::from_secs(120).mul_f64(scale);
    eventually(timeout, "the first RSA-4096 Secret", || async { (issued(&env, &env.ns).await > 0).then_some(()) })
        .await;

    let before = issued(&env, &env.ns).await;
    let started = Instant::now();
    let mut svc: Service = serde_json::from_value(json!({
        "spec": { "ports": [{ "port": 443, "targetPort": 8443 }], "selector": { "app": "web" } }
    }))
    .unwrap();
    svc.metadata = env.meta("web");
    svc.metadata.namespace = Some(b.ns.clone());
    svc.metadata.annotations = Some([(BETA_NAME.to_string(), "web-tls".to_string())].into());
    Api::<Service>::namespaced(env.client.clone(), &b.ns).create(&PostParams::default(), &svc).await.unwrap();
    eventually(timeout, "namespace B's Secret", || async { (issued(&env, &b.ns).await == 1).then_some(()) }).await;
    let waited = started.elapsed();
    let after = issued(&env, &env.ns).await;
    let behind = after.saturating_sub(before);
    println!(
        "fairness: namespace B's Secret after {waited:.1?}; namespace A's RSA-4096 Secrets issued meanwhile: \
         {behind} ({after} of {BACKLOG} done) (time scale {scale:.1})"
    );
    // Only the key being generated when B's Service came, one whose write was on its
    // way, and one that raced the count may go first; the backlog behind must not.
    assert!(behind <= 3, "B waited for {behind} of A's Secrets ({waited:?})");
    assert!(after < BACKLOG, "A's backlog had drained: the test shows nothing");
}
