//! One tenant cannot delay the others, end to end: a namespace with a
//! backlog of RSA-4096 Services does not make a Service of another namespace wait for
//! the backlog, neither for a controller slot nor for the key-generation threads.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::support::{Env, cpu_seconds, eventually, time_scale};

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

#[tokio::test]
async fn requests_waiting_for_a_service_in_one_namespace_cost_little_and_do_not_delay_another_namespace() {
    use futures::StreamExt;
    use k8s_openapi::api::certificates::v1::ClusterTrustBundle;

    use crate::support::Cleanup;
    use crate::support::pods::{Kubelet, bundle_name, key_and_stub, trust_bundle};

    const WAITING: usize = 300;
    let env = Env::new("fair-pods").await;
    let c = Env::new("fair-pods-c").await;
    let signer = format!("e2e.service-ca.test/{}", env.run);
    let op = env.start_operator(&["--pod-signer-name", &signer]);
    let mut cleanup = Cleanup::default();
    cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
    let a = Kubelet::new(&env, &signer).await;
    let c_kubelet = Kubelet::in_namespace(&env, &signer, &c.ns).await;
    trust_bundle(&env, &signer, &env.op_ns).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);

    // 300 pods in A that no Service selects, each with a request: they wait.
    let created = Instant::now();
    futures::stream::iter(0..WAITING)
        .map(|i| {
            let (a, stub, signer) = (&a, stub.clone(), &signer);
            async move {
                let pod = a.pod(&format!("p{i}"), &format!("waiting-{i}"), None).await;
                a.request(&format!("r{i}"), signer, &pod, stub, None).await;
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    println!("{WAITING} pods and requests created in {:.1?}", created.elapsed());
    // The operator has looked at them all once (each is waiting).
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 20 s: a Service of A changes its selector every second (each change makes every
    // waiting request of A be looked at again); after 5 s a pod of C asks.
    let pid = op.pid();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let churn = a.churn_selector("churn", Duration::from_secs(20));
    let other = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pod = c_kubelet.pod("web", "web", None).await;
        c_kubelet.service("web", "web", false).await;
        let asked = Instant::now();
        c_kubelet.request("web", &signer, &pod, stub.clone(), None).await;
        c_kubelet.issued("web").await;
        asked.elapsed()
    };
    let (changes, issued_after) = tokio::join!(churn, other);
    let cpu = cpu_seconds(pid) - cpu_before;
    let window = started.elapsed();
    let pending = a.requests().list(&ListParams::default()).await.unwrap().items;
    let answered = pending
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| !c.is_empty()))
        .count();
    println!(
        "fairness (pods): {WAITING} requests waiting in A, {changes} selector changes of a Service in A: \
         operator CPU {cpu:.2} s in {window:.1?}; a request in C issued {issued_after:.1?} after it was created \
         (time scale {:.1})",
        time_scale()
    );
    assert_eq!(answered, 0, "A's requests wait for a Service");
    // The targets.
    assert!(issued_after < Duration::from_secs(5), "C's request waited {issued_after:?}");
    assert!(cpu < 3.0, "{cpu:.2} CPU-s in {window:?}");
}
