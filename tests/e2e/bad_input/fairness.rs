//! One tenant cannot delay or cost the others, end to end: a namespace with a backlog of
//! RSA-4096 Services does not make a Service of another namespace wait for the backlog,
//! neither for a controller slot nor for the key-generation threads; requests waiting
//! for a Service cost little; memory does not grow with what tenants put in annotations.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::annotations::{BETA_ALG, BETA_ERR, BETA_NAME};
use crate::support::{Env, cpu_seconds, eventually, time_scale};

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
    // way, one that raced the count, and on a loaded machine up to two started before
    // B's key request reached the queue may go first (B's reconcile waits for a CPU
    // with the key threads of the other tests' operators; seen once in CI: a12 raced
    // the count, a13 was in flight, a8 and a16 started 0.12 s and 0.96 s after B's
    // Service was created, B's key next). Without the turns and the fair key queue, B
    // waits for the rest of the backlog (12 or more here).
    assert!(behind <= 5, "B waited for {behind} of A's Secrets ({waited:?})");
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

    // 10 s: a Service of A changes its selector every second (each change makes every
    // waiting request of A be looked at again); after 5 s a pod of C asks.
    let pid = op.pid();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let churn = a.churn_selector("churn", Duration::from_secs(10));
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
    // The targets: 3 CPU-s in 20 s, here in 10 s (an operator that re-reads
    // every waiting request's pod at each change spent 3.69 CPU-s in 20 s).
    assert!(issued_after < Duration::from_secs(5), "C's request waited {issued_after:?}");
    assert!(cpu < 1.5, "{cpu:.2} CPU-s in {window:?}");
}

#[tokio::test]
async fn memory_does_not_grow_with_what_tenants_put_in_annotations() {
    let env = Env::new("bigannotations").await;
    // ECDSA keys: what is measured here is the annotations, not 300 RSA keys' CPU.
    let ecdsa = ["--default-key-algorithm", "ecdsa"];
    let op = env.start_operator(&ecdsa);
    env.ca_bundle().await;
    // 60 MB in all: kept, it alone would exceed the 64 MiB bound below.
    let n = 300;
    let blob = "x".repeat(200_000);
    // Annotated while the operator runs: each arrives by watch, is trimmed to what the
    // controllers read, and only that stays.
    create_16_at_a_time(&env, "b", n, |name| {
        vec![(BETA_NAME, format!("{name}-tls")), ("tenant.example/blob", blob.clone())]
    })
    .await;
    let managed = kube::api::ListParams::default().labels("service-ca.operators.openshift.io/managed=true");
    eventually(Duration::from_secs(180), "every Secret", || async {
        (env.secrets().list_metadata(&managed).await.ok()?.items.len() >= n).then_some(())
    })
    .await;
    // Each Service was cached (and trimmed, or not) before its Secret was written: the
    // peak is already there; a second for what follows.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak = op.peak_rss_kib() as f64 / 1024.0;
    println!("{n} annotated Services carrying 200 KB each ({} MB in all): operator peak RSS {peak:.1} MiB", n / 5);
    drop(op);
    assert!(peak < 64.0, "peak RSS {peak:.1} MiB with {n} Services of 200 KB each (target < 64 MiB)");
    // A fresh start with all of it present: the first list streams object by object,
    // each trimmed as it comes, never held whole.
    let restarted = env.start_operator(&ecdsa);
    // Ready once the caches are synced: the whole first list has been through.
    restarted.wait_ready(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh = restarted.peak_rss_kib() as f64 / 1024.0;
    println!("fresh start with all {n} present: operator peak RSS {fresh:.1} MiB");
    assert!(fresh < 64.0, "peak RSS {fresh:.1} MiB starting with {n} Services of 200 KB each (target < 64 MiB)");
    drop(restarted);
    drop(env);

    // Our own annotation, with a value no Secret name can have: such a Service stays
    // in the cache (it asks for a certificate), but not its 200 KB. (After the phases
    // above, not beside them: 100 MB of Services at once is load enough for the
    // shared API server.)
    let env = Env::new("bignames").await;
    let op = env.start_operator(&[]);
    env.ca_bundle().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = op.rss_kib() as f64 / 1024.0;
    let n = 150;
    let name = "n".repeat(200_000);
    create_16_at_a_time(&env, "n", n, |_| vec![(BETA_NAME, name.clone())]).await;
    // Every one was looked at: each carries the error annotation. A list carries 30 MB:
    // the operator's log (a line per Service reported, after its annotations were
    // written) says when to list, and the list confirms.
    let reported_in_log = || {
        let logs = op.logs();
        let lines = logs.lines().filter(|l| l.contains("serving certificate not issued"));
        lines.filter_map(|l| l.rsplit("object=").next()?.split_whitespace().nth(1)).collect::<BTreeSet<_>>().len()
    };
    eventually(Duration::from_secs(180), "an error annotation on all 150 Services", || async {
        (reported_in_log() >= n).then_some(())?;
        let services = env.services().list_metadata(&Default::default()).await.ok()?;
        let reported = services.items.iter().filter(|s| s.annotations().contains_key(BETA_ERR)).count();
        (reported >= n).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let growth = op.peak_rss_kib() as f64 / 1024.0 - before;
    println!("{n} Services naming a 200 KB Secret ({} MB in all): operator peak RSS +{growth:.1} MiB", n / 5);
    assert!(growth < 15.0, "peak RSS grew {growth:.1} MiB with {n} Services naming a 200 KB Secret (30 MB in all)");
}

/// Creates Services `{prefix}0` to `{prefix}{n-1}`, each with `annotations(its name)`,
/// 16 at a time: 500 requests of 200 KB at once stall the shared API server past its
/// timeouts, and the client's retry of a create that went through then fails with
/// AlreadyExists.
async fn create_16_at_a_time(
    env: &Env,
    prefix: &str,
    n: usize,
    annotations: impl Fn(&str) -> Vec<(&'static str, String)>,
) {
    futures::stream::iter(0..n)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let annotations = annotations(&name);
            async move {
                let pairs: Vec<(&str, &str)> = annotations.iter().map(|(k, v)| (*k, v.as_str())).collect();
                env.service_with(&name, &pairs, false).await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}
