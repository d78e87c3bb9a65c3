//! Fairness: a new Service and a pod request while another namespace has RSA-4096 pending;
//! the operator's CPU while requests wait for a Service.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use super::{CREATE_CONCURRENCY, Report, create_services, scaled, settle, support};
use support::pods::{Kubelet, bundle_name, key_and_stub, trust_bundle};
use support::{Env, cpu_seconds, eventually};

/// Fairness: while namespace A has 300 RSA-4096 Services pending,
/// the time a new Service in namespace B takes to get its Secret and a pod request in
/// namespace C to be issued; then, once A is served, the operator's CPU in 20 s while
/// 300 requests of one namespace wait for a Service (a Service there changing its
/// selector every second, each change a reason to look at them again).
pub async fn fairness(report: &mut Report) -> Vec<Env> {
    let n = scaled(300);
    let (a, b, c) = (Env::new("bench-fair-a").await, Env::new("bench-fair-b").await, Env::new("bench-fair-c").await);
    let signer = format!("bench.service-ca.test/{}", a.run);
    let op = a.start_operator(&["--pod-signer-name", &signer]);
    op.wait_ready(Duration::from_secs(60)).await;
    a.ca_bundle().await;
    let mut cleanup = support::Cleanup::default();
    cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &a.op_ns));
    trust_bundle(&a, &signer, &a.op_ns).await;

    create_services(&a, "a", n, Some("rsa-4096")).await;
    eventually(Duration::from_secs(300), "A's first Secret", || async { (issued(&a, &a.ns).await > 0).then_some(()) })
        .await;
    let b_took = service_in_b_took(&a, &b).await;
    let a_done_at_b = issued(&a, &a.ns).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (c_took, _kubelet_c) = pod_request_in_c_took(&a, &c, &signer, stub.clone()).await;
    let a_done_at_c = issued(&a, &a.ns).await;
    println!("\nFairness ({n} RSA-4096 Services pending in namespace A)");
    report.row(
        "Fairness: new Service in B while A has RSA-4096 pending",
        format!("{:.1} s (A: {a_done_at_b} of {n} done)", b_took.as_secs_f64()),
        "target < 5 s",
    );
    report.row(
        "Fairness: pod request in C meanwhile",
        format!("{:.1} s (A: {a_done_at_c} of {n} done)", c_took.as_secs_f64()),
        "target < 5 s",
    );

    // Once A is served: n requests waiting in one namespace for 20 s.
    eventually(Duration::from_secs(1800), "all of A's Secrets", || async {
        (issued(&a, &a.ns).await >= n).then_some(())
    })
    .await;
    let kubelet_a = Kubelet::new(&a, &signer).await;
    requests_waiting_for_a_service(&kubelet_a, &signer, &stub, n).await;
    settle(&[("operator", op.pid())]).await;
    let cpu_before = cpu_seconds(op.pid());
    let started = Instant::now();
    let changes = kubelet_a.churn_selector("churn", Duration::from_secs(20)).await;
    let cpu = cpu_seconds(op.pid()) - cpu_before;
    let window = started.elapsed().as_secs_f64();
    report.row(
        &format!("Fairness: operator CPU, {n} requests waiting, {changes} selector changes"),
        format!("{cpu:.2} CPU-s in {window:.1} s"),
        "target < 3 CPU-s in 20 s",
    );
    report.json.insert(
        "fairness".into(),
        json!({ "n": n, "b_seconds": b_took.as_secs_f64(), "a_done_at_b": a_done_at_b, "c_seconds": c_took.as_secs_f64(),
                "a_done_at_c": a_done_at_c, "waiting_cpu_seconds": cpu, "window_seconds": window, "selector_changes": changes }),
    );
    drop(cleanup);
    vec![a, b, c]
}

/// How many Secrets in namespace `ns` have a certificate (read with `env`'s client).
async fn issued(env: &Env, ns: &str) -> usize {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let list = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.iter().filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("tls.crt"))).count()
}

/// B: a Service (default key) in namespace `b`, labelled for `a`'s operator; how long it
/// took to get its Secret.
async fn service_in_b_took(a: &Env, b: &Env) -> Duration {
    let started = Instant::now();
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "web", "namespace": b.ns, "labels": a.labels(),
                      "annotations": { "service.beta.openshift.io/serving-cert-secret-name": "web-tls" } },
        "spec": { "ports": [{ "port": 443 }], "selector": { "app": "web" } }
    }))
    .unwrap();
    Api::<Service>::namespaced(a.client.clone(), &b.ns).create(&PostParams::default(), &svc).await.unwrap();
    eventually(Duration::from_secs(600), "B's Secret", || async { (issued(a, &b.ns).await == 1).then_some(()) }).await;
    started.elapsed()
}

/// C: a pod request in namespace `c` (with `stub`), for `a`'s operator's `signer`; how
/// long it took to be answered, and the kubelet of `c` (its Node goes when it is
/// dropped).
async fn pod_request_in_c_took(a: &Env, c: &Env, signer: &str, stub: Vec<u8>) -> (Duration, Kubelet) {
    let kubelet_c = Kubelet::in_namespace(a, signer, &c.ns).await;
    let pod = kubelet_c.pod("web", "web", None).await;
    kubelet_c.service("web", "web", false).await;
    let started = Instant::now();
    kubelet_c.request("web", signer, &pod, stub, None).await;
    kubelet_c.answered("web", Duration::from_secs(600)).await;
    (started.elapsed(), kubelet_c)
}

/// `n` pods `p<i>` in the kubelet's namespace, each with a request `r<i>` (with `stub`)
/// that waits: no Service selects the pod (`app: waiting-<i>`).
async fn requests_waiting_for_a_service(kubelet: &Kubelet, signer: &str, stub: &[u8], n: usize) {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let pod = kubelet.pod(&format!("p{i}"), &format!("waiting-{i}"), None).await;
            kubelet.request(&format!("r{i}"), signer, &pod, stub.to_vec(), None).await;
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
}
