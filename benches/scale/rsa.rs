//! B1 to B7 with RSA serving keys (the default): B1 time to ready, B2 bulk issuance vs.
//! the key-generation limit, B3 rotation, B4 injection, B5 memory, B6 API economy, B7 pod
//! certificates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Client;
use kube::api::ListParams;
use serde_json::{Value, json};
use service_ca_operator::pki::PrivateKey;

use super::b5::{MemorySoFar, b5_memory};
use super::rotation::{b3_rotation, b4_injection};
use super::{
    CREATE_CONCURRENCY, Report, Seen, WriteCounters, apiserver_writes, bulk_issue, diff, first_seen, has_cert, ms,
    operator_writes, percentile, rss_mib, scaled, settle, settled_with, support, threads_cpu_seconds,
};
use support::{Env, Operator, eventually};

/// The RSA figures the ECDSA rows are compared with.
pub struct RsaRates {
    pub b2: f64,
    pub b3: f64,
}

/// B1 to B6 with RSA serving keys (the default), on an operator run as users run it
/// (no selector).
pub async fn rsa_benchmarks(cores: usize, report: &mut Report) -> (Env, RsaRates) {
    let env = Env::new("bench").await;
    let client = env.client.clone();
    let args: Vec<String> = ["--namespace", &env.op_ns, "--leader-elect=false"].iter().map(|s| s.to_string()).collect();
    let op = Operator::start("bench", &args);
    op.wait_ready(Duration::from_secs(60)).await;
    let bundle = env.ca_bundle().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, idle_peak) = rss_mib(&op);

    let secrets_seen = first_seen(env.secrets(), "service-ca.operators.openshift.io/managed=true", has_cert);
    let before_b1 = WriteCounters::now(&client, &op).await;
    let n1 = b1_time_to_ready(&env, &secrets_seen, report).await;
    b6_writes_per_certificate(&client, &op, &before_b1, n1, report).await;
    let (n2, rate) = b2_bulk(&env, &op, &bundle, &secrets_seen, cores, report).await;
    b7_pod_certificates(&env, rate, report).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let managed = rss_mib(&op);
    let n4 = b4_injection(&env, "B4", report).await;
    let b3 = b3_rotation(&env, "B3", (n1 + n2, n4), ("B2 rate", Some(rate)), "", report).await;
    b6_quiet_window(&client, &op, report).await;
    let memory = MemorySoFar { idle_peak, managed, managed_count: n1 + n2, injected_count: n4 };
    b5_memory(&env, op, &args, &memory, report).await;
    (env, RsaRates { b2: rate, b3 })
}

/// RSA-2048 keys per second with one thread per core, for `duration`.
fn keygen_limit(threads: usize, duration: Duration) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while started.elapsed() < duration {
                    PrivateKey::generate_rsa(2048).unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / started.elapsed().as_secs_f64()
}

/// B1: time to ready, Services created one at a time. Returns how many.
async fn b1_time_to_ready(env: &Env, secrets_seen: &Seen, report: &mut Report) -> usize {
    let n1 = scaled(200);
    let mut latencies = Vec::with_capacity(n1);
    for i in 0..n1 {
        let name = format!("one{i}");
        let started = Instant::now();
        env.annotated_service(&name, &format!("{name}-tls"), false).await;
        let secret = format!("{name}-tls");
        let seen = eventually(Duration::from_secs(30), "Secret", || {
            let at = secrets_seen.lock().unwrap().get(&secret).copied();
            async move { at }
        })
        .await;
        latencies.push(seen - started);
    }
    latencies.sort();
    let (p50, p95, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.95), percentile(&latencies, 0.99));
    println!("\nB1 time to ready ({n1} Services created one at a time)");
    report.row("B1 Service created -> Secret with certificate: p50", format!("{:.0} ms", ms(p50)), "target <= 100 ms");
    report.row("B1 p95", format!("{:.0} ms", ms(p95)), "");
    report.row("B1 p99", format!("{:.0} ms", ms(p99)), "target <= 300 ms");
    report.json.insert("b1".into(), json!({ "n": n1, "p50_ms": ms(p50), "p95_ms": ms(p95), "p99_ms": ms(p99), "max_ms": ms(*latencies.last().unwrap()) }));
    n1
}

/// B6 (part 1): writes per issued certificate during B1, counted by the API server.
async fn b6_writes_per_certificate(
    client: &Client,
    op: &Operator,
    before: &WriteCounters,
    n1: usize,
    report: &mut Report,
) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = diff(&apiserver_writes(client).await, &before.apiserver);
    let op_writes = operator_writes(&op.metrics().await.unwrap().1) - before.operator;
    let per = |resource: &str, verb: &str| {
        *writes.get(&(resource.to_string(), verb.to_string())).unwrap_or(&0) as f64 / n1 as f64
    };
    println!("\nB6 API economy (API server's own request counters during B1)");
    report.row(
        "B6 Secret writes per certificate (POST)",
        format!("{:.2}", per("secrets", "POST") + per("secrets", "PUT")),
        "target 1",
    );
    report.row("B6 Service writes per certificate (PATCH)", format!("{:.2}", per("services", "PATCH")), "target 1");
    report.row(
        "B6 Event writes per certificate (POST+PATCH)",
        format!("{:.2}", per("events", "POST") + per("events", "PATCH")),
        "(not in the target)",
    );
    report.json.insert(
        "b6_writes".into(),
        json!({ "certificates": n1, "by_resource_verb": writes.iter().map(|((r, v), n)| (format!("{r} {v}"), *n)).collect::<BTreeMap<_, _>>(),
                "operator_counted_writes": op_writes }),
    );
}

/// B2: many Services at once, compared with the key-generation limit. Returns (how
/// many, certificates per second).
async fn b2_bulk(
    env: &Env,
    op: &Operator,
    bundle: &str,
    secrets_seen: &Seen,
    cores: usize,
    report: &mut Report,
) -> (usize, f64) {
    // Key-generation limit, measured on the same cores while the cluster is idle, just
    // before and just after B2 (one RSA key takes a random number of prime candidates, so a
    // short sample is noisy); B2 is compared with the mean of the two.
    let mut processes = settled_with(op).await;
    let limit_before = keygen_limit(cores, Duration::from_secs(15));
    processes.push(("bench client", std::process::id()));

    let keys_before = threads_cpu_seconds(op.pid(), "keygen-");
    let b2 = bulk_issue(env, bundle, secrets_seen, &processes, ("bulk", scaled(1000), None)).await;
    // (Includes the refill of the few ready keys right after the last Secret.)
    let keys_cpu = threads_cpu_seconds(op.pid(), "keygen-") - keys_before;
    settle(&processes[..processes.len() - 1]).await;
    let limit_after = keygen_limit(cores, Duration::from_secs(15));
    let limit = (limit_before + limit_after) / 2.0;
    let (n2, rate) = (b2.n, b2.rate);
    println!("\nB2 bulk ({n2} Services created at once; creation itself took {:.1?})", b2.create_took);
    report.row("B2 all Secrets valid after", format!("{:.1} s ({} invalid)", b2.total.as_secs_f64(), b2.invalid), "");
    report.row("B2 certificates per second", format!("{rate:.1}/s"), "");
    report.row(
        &format!("B2 RSA-2048 key-generation limit ({cores} threads, same run)"),
        format!("{limit:.1}/s (before {limit_before:.1}, after {limit_after:.1})"),
        "",
    );
    report.row("B2 ratio to the key-generation limit", format!("{:.0} %", rate / limit * 100.0), "target >= 80 %");
    // What bounds the ratio: the operator turns its own CPU time into certificates at the
    // key-generation rate of one core; the rest of the two cores is the control plane's.
    report.row(
        "B2 certificates per operator CPU-second vs. limit per core",
        format!("{:.1} vs {:.1}", n2 as f64 / b2.cpu_of("operator"), limit / cores as f64),
        "",
    );
    b2.report_common("B2", cores, report);
    report.row(
        "B2 CPU used by the operator's key threads",
        format!("{keys_cpu:.1} s ({:.2} of {cores} CPUs)", keys_cpu / b2.total.as_secs_f64()),
        "",
    );
    let mut json = b2.json();
    json.extend([
        ("key_threads_cpu_seconds".to_string(), json!(keys_cpu)),
        ("keygen_limit_per_second".to_string(), json!(limit)),
        ("keygen_limit_before".to_string(), json!(limit_before)),
        ("keygen_limit_after".to_string(), json!(limit_after)),
        ("ratio".to_string(), json!(rate / limit)),
    ]);
    report.json.insert("b2".into(), Value::Object(json));
    (n2, rate)
}

/// B7: PodCertificateRequests waiting for their Service (one per pod, as the kubelet
/// makes them, P-256 keys), all issued once the Service appears; the rate next to B2's.
async fn b7_pod_certificates(env: &Env, b2_rate: f64, report: &mut Report) {
    let n = scaled(1000);
    let signer = service_ca_operator::names::POD_SIGNER_NAME;
    let kubelet = support::pods::Kubelet::new(env, signer).await;
    let created = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let kubelet = &kubelet;
            async move {
                let pod = kubelet.pod(&format!("pod{i}"), "pods", None).await;
                let (_, stub) = support::pods::key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
                kubelet.request(&format!("pod{i}"), signer, &pod, stub, None).await;
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let create_took = created.elapsed();
    // How many requests carry a condition of `type_` (any type: None).
    let answered = |list: &[k8s_openapi::api::certificates::v1::PodCertificateRequest], type_: Option<&str>| {
        let conditions = |r: &k8s_openapi::api::certificates::v1::PodCertificateRequest| {
            r.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default()
        };
        list.iter().filter(|r| conditions(r).iter().any(|c| type_.is_none_or(|t| c.type_ == t))).count()
    };
    let early = answered(&kubelet.requests().list(&ListParams::default()).await.unwrap().items, None);
    let started = Instant::now();
    kubelet.service("pods", "pods", false).await;
    let issued = eventually(Duration::from_secs(600), "every pod certificate issued", || async {
        let list = kubelet.requests().list(&ListParams::default()).await.ok()?.items;
        (answered(&list, None) >= n).then(|| answered(&list, Some("Issued")))
    })
    .await;
    let took = started.elapsed();
    let rate = n as f64 / took.as_secs_f64();
    println!("\nB7 pod certificates ({n} pods and requests created in {create_took:.1?}, pending until their Service)");
    report.row("B7 requests answered before the Service existed", early.to_string(), "0");
    report.row(
        "B7 Service created -> every request issued",
        format!("{:.1} s ({issued} of {n} issued)", took.as_secs_f64()),
        "",
    );
    report.row("B7 pod certificates per second (B2: Service Secrets)", format!("{rate:.1}/s ({b2_rate:.1}/s)"), "");
    report.json.insert(
        "b7".into(),
        json!({ "n": n, "issued": issued, "seconds": took.as_secs_f64(), "certs_per_second": rate,
                "b2_certs_per_second": b2_rate, "creation_seconds": create_took.as_secs_f64() }),
    );
}

/// B6 (part 2): writes during a quiet minute (BENCH_QUIET_SECONDS), everything up to
/// date.
async fn b6_quiet_window(client: &Client, op: &Operator, report: &mut Report) {
    tokio::time::sleep(Duration::from_secs(10)).await;
    let quiet =
        Duration::from_secs(std::env::var("BENCH_QUIET_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
    let before = WriteCounters::now(client, op).await;
    tokio::time::sleep(quiet).await;
    let quiet_writes = diff(&apiserver_writes(client).await, &before.apiserver);
    let op_quiet = operator_writes(&op.metrics().await.unwrap().1) - before.operator;
    // Resources the operator writes; the API server's own identity Lease renewals
    // (coordination.k8s.io leases, every 10 s) are not the operator's.
    let ours = [
        "secrets",
        "services",
        "configmaps",
        "events",
        "apiservices",
        "customresourcedefinitions",
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ];
    let on_ours: u64 = quiet_writes.iter().filter(|((r, _), _)| ours.contains(&r.as_str())).map(|(_, n)| n).sum();
    let others: Vec<String> = quiet_writes
        .iter()
        .filter(|((r, _), _)| !ours.contains(&r.as_str()))
        .map(|((r, v), n)| format!("{n} {v} {r}"))
        .collect();
    println!("\nB6 quiet window ({} s, everything up to date)", quiet.as_secs());
    report.row("B6 writes by the operator (its own counter)", format!("{op_quiet}"), "target 0");
    report.row("B6 API server writes to what the operator manages", format!("{on_ours}"), "target 0");
    report.row(
        "B6 other API server writes (not the operator's)",
        if others.is_empty() { "none".into() } else { others.join(", ") },
        "",
    );
    report.json.insert("b6_quiet".into(), json!({ "seconds": quiet.as_secs(), "operator_writes": op_quiet,
        "apiserver_writes": quiet_writes.iter().map(|((r, v), n)| (format!("{r} {v}"), *n)).collect::<BTreeMap<_, _>>() }));
}
