//! `make bench`: figures at scale on the real control plane (tests/controlplane), with
//! the release build of the operator, run as users run it (no selector).
//!
//! With RSA serving keys (the default): B1 time to ready, B2 bulk issuance vs. the
//! key-generation limit, B3 rotation, B4 injection, B5 memory, B6 API economy, B7 pod
//! certificates; first, RSA-2048 key generation against Go's crypto/rsa
//! (benches/scale/keygen.rs; the Go side is benches/gokeys, built by scripts/bench.sh).
//! With ECDSA serving keys (a second operator instance with its own CA): B2-EC and
//! B3-EC. Then B8 scale (10,000 ECDSA Services) and B9 tenant annotations
//! (500 Services carrying 200 KB each), B10 scale-out (1 and 2 replicas sharing
//! issuance). Last, trust distribution: the per-namespace bundle in 10,000 namespaces
//! (benches/scale/namespaces.rs; NS_COUNT sets how many). Prints a table and writes
//! target/bench/results.json. Sizes scale with BENCH_SCALE (default 1.0);
//! BENCH_ONLY=rsa,ec,b8,b9,b10,fairness,namespaces (any of them) runs only those parts;
//! BENCH_ONLY=keygen only the key-generation comparison (no cluster); BENCH_ONLY=hsm
//! only the CA key in SoftHSM2 vs in memory (benches/scale/hsm.rs; no cluster).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "scale/keygen.rs"]
mod keygen;

#[path = "scale/envelope.rs"]
mod envelope;
#[path = "scale/hsm.rs"]
mod hsm;
#[path = "scale/namespaces.rs"]
mod namespaces;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use service_ca_operator::pki::PrivateKey;

use support::{Env, Operator, certs, cpu_seconds, eventually, proc_status_kib};

const CREATE_CONCURRENCY: usize = 32;

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale).round() as usize).max(10)
}

struct Report {
    rows: Vec<(String, String, String)>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn row(&mut self, what: &str, figure: String, target: &str) {
        println!("  {what:<58} {figure:<34} {target}");
        self.rows.push((what.into(), figure, target.into()));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// First time each object of `api` (selected by `labels`) satisfied `ready`.
fn first_seen<K>(api: Api<K>, labels: &str, ready: fn(&K) -> bool) -> Arc<Mutex<HashMap<String, Instant>>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let out = seen.clone();
    let config = watcher::Config::default().labels(labels);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(Ok(obj)) = stream.next().await {
            if ready(&obj) {
                out.lock().unwrap().entry(obj.name_any()).or_insert_with(Instant::now);
            }
        }
    });
    seen
}

fn has_cert(s: &Secret) -> bool {
    s.data.as_ref().is_some_and(|d| d.get("tls.crt").is_some_and(|v| !v.0.is_empty()))
}

fn injected(cm: &ConfigMap) -> bool {
    cm.data.as_ref().is_some_and(|d| d.contains_key("service-ca.crt"))
}

/// Write requests the API server has served, per (resource, verb), from its metrics.
async fn apiserver_writes(client: &Client) -> BTreeMap<(String, String), u64> {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let label = |name: &str| {
            let key = format!("{name}=\"");
            line.split(&key).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string()
        };
        let verb = label("verb");
        if !["POST", "PUT", "PATCH", "DELETE"].contains(&verb.as_str()) || !label("subresource").is_empty() {
            continue;
        }
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry((label("resource"), verb)).or_insert(0) += value as u64;
    }
    out
}

fn diff(
    after: &BTreeMap<(String, String), u64>,
    before: &BTreeMap<(String, String), u64>,
) -> BTreeMap<(String, String), u64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).filter(|(_, v)| *v > 0).collect()
}

fn operator_writes(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("service_ca_api_writes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn rss_mib(op: &Operator) -> (f64, f64) {
    (proc_status_kib(op.pid(), "VmRSS") as f64 / 1024.0, proc_status_kib(op.pid(), "VmHWM") as f64 / 1024.0)
}

/// Waits (at most 60 s) until `processes` together use less than 10 % of one CPU over a
/// second, so that a measurement on the same cores starts from an idle cluster.
async fn settle(processes: &[(&str, u32)]) {
    let total = || processes.iter().map(|(_, pid)| cpu_seconds(*pid)).sum::<f64>();
    for _ in 0..60 {
        let before = total();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if total() - before < 0.1 {
            return;
        }
    }
    println!("(the cluster did not settle within 60 s; measuring anyway)");
}

/// The control plane's processes: (harness with embedded etcd, kube-apiserver,
/// kube-controller-manager).
fn control_plane_pids() -> Vec<(&'static str, u32)> {
    let harness: u32 = std::fs::read_to_string(support::controlplane_dir().join("harness.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut out = vec![("etcd + harness", harness)];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: u32 = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0);
        if ppid != harness || harness == 0 {
            continue;
        }
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.contains("kube-apiserver") {
            out.push(("kube-apiserver", pid));
        } else if cmdline.contains("kube-controller-manager") {
            out.push(("kube-controller-manager", pid));
        }
    }
    out
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

/// Creates `n` annotated Services `<prefix><i>` (Secret `<prefix><i>-tls`), with the
/// key-algorithm annotation `algorithm` if given; when each was created.
async fn create_services(env: &Env, prefix: &str, n: usize, algorithm: Option<&str>) -> HashMap<String, Instant> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let name = format!("{prefix}{i}");
            let secret = format!("{name}-tls");
            let mut annotations = vec![("service.beta.openshift.io/serving-cert-secret-name", secret.as_str())];
            annotations.extend(algorithm.map(|a| ("service.beta.openshift.io/serving-cert-key-algorithm", a)));
            let started = Instant::now();
            env.service_with(&name, &annotations, false).await;
            (secret, started)
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await
}

async fn count_issued_by(env: &Env, ski: &[u8]) -> usize {
    let list = env
        .secrets()
        .list(&ListParams::default().labels("service-ca.operators.openshift.io/managed=true"))
        .await
        .unwrap();
    list.items.iter().filter(|s| certs::try_signer_of(&support::data(s, "tls.crt")).as_deref() == Some(ski)).count()
}

/// When each serving Secret (by name) first had a certificate.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// Write counters at one moment: the API server's, per (resource, verb), and the
/// operator's own total.
struct WriteCounters {
    apiserver: BTreeMap<(String, String), u64>,
    operator: u64,
}

impl WriteCounters {
    async fn now(client: &Client, op: &Operator) -> WriteCounters {
        let apiserver = apiserver_writes(client).await;
        let operator = operator_writes(&op.metrics().await.unwrap().1);
        WriteCounters { apiserver, operator }
    }
}

/// Memory of the operator process (current, peak) in MiB at the points B5 reports.
struct MemorySoFar {
    idle_peak: f64,
    /// After B2, with every managed Service and Secret: (current, peak).
    managed: (f64, f64),
    managed_count: usize,
    injected_count: usize,
}

/// The RSA figures the ECDSA rows are compared with.
struct RsaRates {
    b2: f64,
    b3: f64,
}

#[tokio::main]
async fn main() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    if hsm::run_child_if_asked(cores) {
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p.trim() == name);
    let mut report = Report { rows: Vec::new(), json: serde_json::Map::new() };
    setup(&mut report, cores);
    // Each part's namespaces stay until the end, so that no deletion runs under a later
    // measurement.
    let mut envs = Vec::new();
    let mut rsa = None;
    if part("rsa") || part("keygen") {
        keygen::rsa_vs_go(cores, &mut report);
    }
    if part("hsm") {
        hsm::hsm_vs_memory(&mut report);
    }
    if part("rsa") {
        let (env, rates) = rsa_benchmarks(cores, &mut report).await;
        envs.push(env);
        rsa = Some(rates);
    }
    if part("ec") {
        envs.push(ec_benchmarks(rsa.as_ref(), cores, &mut report).await);
    }
    if part("b8") {
        envs.push(b8_scale(cores, &mut report).await);
    }
    if part("b9") {
        envs.push(b9_tenant_annotations(&mut report).await);
    }
    if part("b10") {
        envs.extend(b10_scale_out(&mut report).await);
    }
    if part("fairness") {
        envs.extend(fairness(&mut report).await);
    }
    if part("namespaces") {
        envs.push(namespaces::namespace_bundles(&mut report).await);
    }
    if part("envelope") {
        envs.push(envelope::envelope(&mut report).await);
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(report.json)).unwrap()).unwrap();
    println!("\nresults written to {}", path.display());
    drop(envs);
}

/// B1 to B6 with RSA serving keys (the default), on an operator run as users run it
/// (no selector).
async fn rsa_benchmarks(cores: usize, report: &mut Report) -> (Env, RsaRates) {
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

/// A rate with its ratio to the rate it is compared with (when that part ran).
fn times(figure: f64, other: Option<f64>) -> String {
    match other {
        Some(other) => format!("{figure:.1}/s vs {other:.1}/s ({:.1}x)", figure / other),
        None => format!("{figure:.1}/s (the RSA part did not run)"),
    }
}

/// B2-EC and B3-EC: B2 and B3 with ECDSA P-256 serving keys (the annotation `ecdsa`),
/// on a second operator instance with its own CA and a selector, so that nothing of the
/// RSA part is re-issued.
async fn ec_benchmarks(rsa: Option<&RsaRates>, cores: usize, report: &mut Report) -> Env {
    let env = Env::new("bench-ec").await;
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(60)).await;
    let bundle = env.ca_bundle().await;
    let secrets_seen = first_seen(env.secrets(), "service-ca.operators.openshift.io/managed=true", has_cert);
    let mut processes = control_plane_pids();
    processes.push(("operator", op.pid()));
    settle(&processes).await;
    processes.push(("bench client", std::process::id()));

    let b2 = bulk_issue(&env, &bundle, &secrets_seen, &processes, ("ec", scaled(1000), Some("ecdsa"))).await;
    println!(
        "\nB2-EC bulk, ECDSA P-256 ({} Services created at once; creation itself took {:.1?})",
        b2.n, b2.create_took
    );
    report.row(
        "B2-EC all Secrets valid after",
        format!("{:.1} s ({} invalid)", b2.total.as_secs_f64(), b2.invalid),
        "",
    );
    report.row("B2-EC certificates per second vs. B2 (RSA)", times(b2.rate, rsa.map(|r| r.b2)), "target >= 5x");
    let (operator, apiserver) = (b2.cpu_of("operator"), b2.cpu_of("kube-apiserver"));
    report.row(
        "B2-EC CPU: operator vs kube-apiserver",
        format!("{operator:.1} s vs {apiserver:.1} s"),
        "target operator < kube-apiserver",
    );
    b2.report_common("B2-EC", cores, report);
    report.json.insert("b2_ec".into(), Value::Object(b2.json()));

    // B3-EC: as many Secrets as B3 (B1's and B2's) and as many injected ConfigMaps.
    let more = bulk_issue(&env, &bundle, &secrets_seen, &processes, ("ecmore", scaled(200), Some("ecdsa"))).await;
    let n4 = b4_injection(&env, "B4-EC", report).await;
    b3_rotation(&env, "B3-EC", (b2.n + more.n, n4), ("B3 (RSA)", rsa.map(|r| r.b3)), "target >= 5x", report).await;
    env
}

/// B8: scale with cheap keys: 10,000 ECDSA Services on a fresh operator instance (its
/// own CA): time until every Secret is valid, peak RSS and RSS per managed Service,
/// then a restart with all of it present: time to ready, and writes (none expected).
async fn b8_scale(cores: usize, report: &mut Report) -> Env {
    let env = Env::new("bench-b8").await;
    let client = env.client.clone();
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(60)).await;
    let bundle = env.ca_bundle().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle_rss, _) = rss_mib(&op);
    let secrets_seen = first_seen(env.secrets(), "service-ca.operators.openshift.io/managed=true", has_cert);
    let mut processes = control_plane_pids();
    processes.push(("operator", op.pid()));
    settle(&processes).await;
    processes.push(("bench client", std::process::id()));

    let b8 = bulk_issue(&env, &bundle, &secrets_seen, &processes, ("s", scaled(10_000), Some("ecdsa"))).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (rss, peak) = rss_mib(&op);
    let per_service_kib = (rss - idle_rss) * 1024.0 / b8.n as f64;
    let at_100k = idle_rss + per_service_kib * 100_000.0 / 1024.0;
    println!("\nB8 scale ({} ECDSA Services created at once; creation itself took {:.1?})", b8.n, b8.create_took);
    report.row(
        "B8 all Secrets valid after",
        format!("{:.1} s, {:.1}/s ({} invalid)", b8.total.as_secs_f64(), b8.rate, b8.invalid),
        "",
    );
    report.row("B8 operator RSS: peak / current", format!("{peak:.1} / {rss:.1} MiB"), "target peak <= 96 MiB");
    report.row(
        "B8 RSS per managed Service (current - idle) / n",
        format!("{per_service_kib:.2} KiB (idle {idle_rss:.1} MiB; 100,000 Services ~ {at_100k:.0} MiB)"),
        "",
    );
    b8.report_common("B8", cores, report);

    // A restart with everything present.
    let before = apiserver_writes(&client).await;
    drop(op);
    let restarted = Instant::now();
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(120)).await;
    let ready = restarted.elapsed();
    // Until cert-refresh has looked at every Secret once (what a restart costs).
    let looked = eventually(Duration::from_secs(600), "cert-refresh to look at every Secret", || async {
        let page = op.metrics().await?.1;
        let done = support::metric(&page, "service_ca_reconcile_total{controller=\"cert-refresh\"") >= b8.n as f64;
        done.then(|| restarted.elapsed())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let op_writes = operator_writes(&op.metrics().await.unwrap().1);
    let ours = ["secrets", "services", "configmaps", "events"];
    let api_writes: u64 = diff(&apiserver_writes(&client).await, &before)
        .iter()
        .filter(|((r, _), _)| ours.contains(&r.as_str()))
        .map(|(_, n)| n)
        .sum();
    let (rss_restart, peak_restart) = rss_mib(&op);
    report.row(
        "B8 restart with everything present: ready after",
        format!("{:.1} s", ready.as_secs_f64()),
        "target <= 5 s",
    );
    report.row("B8 restart: every Secret looked at after", format!("{:.1} s", looked.as_secs_f64()), "");
    report.row(
        "B8 restart: writes by the operator / API server writes to Secrets, Services, ConfigMaps, Events",
        format!("{op_writes} / {api_writes}"),
        "target 0",
    );
    report.row("B8 restart: RSS peak / current", format!("{peak_restart:.1} / {rss_restart:.1} MiB"), "");
    let mut json = b8.json();
    json.extend([
        ("idle_rss_mib".to_string(), json!(idle_rss)),
        ("rss_mib".to_string(), json!(rss)),
        ("peak_mib".to_string(), json!(peak)),
        ("rss_per_service_kib".to_string(), json!(per_service_kib)),
        ("restart_ready_seconds".to_string(), json!(ready.as_secs_f64())),
        ("restart_looked_at_all_seconds".to_string(), json!(looked.as_secs_f64())),
        ("restart_operator_writes".to_string(), json!(op_writes)),
        ("restart_apiserver_writes".to_string(), json!(api_writes)),
        ("restart_peak_mib".to_string(), json!(peak_restart)),
        ("restart_rss_mib".to_string(), json!(rss_restart)),
    ]);
    report.json.insert("b8".into(), Value::Object(json));
    env
}

/// B9: what tenants put in annotations does not stay in memory: 500 annotated Services
/// each carrying an unrelated 200 KB annotation, created while the operator runs; then
/// a fresh start with all of them present.
async fn b9_tenant_annotations(report: &mut Report) -> Env {
    let env = Env::new("bench-b9").await;
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(60)).await;
    env.ca_bundle().await;
    let n = scaled(500);
    let blob = "x".repeat(200_000);
    futures::stream::iter(0..n)
        .map(|i| {
            let (env, blob) = (&env, &blob);
            async move {
                let annotations = [
                    ("service.beta.openshift.io/serving-cert-secret-name", format!("t{i}-tls")),
                    ("tenant.example/blob", blob.clone()),
                ];
                let annotations: Vec<(&str, &str)> = annotations.iter().map(|(k, v)| (*k, v.as_str())).collect();
                env.service_with(&format!("t{i}"), &annotations, false).await
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let managed = ListParams::default().labels("service-ca.operators.openshift.io/managed=true");
    eventually(Duration::from_secs(600), "every B9 Secret", || async {
        (env.secrets().list_metadata(&managed).await.ok()?.items.len() >= n).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, peak) = rss_mib(&op);
    drop(op);
    let started = Instant::now();
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(120)).await;
    let ready = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, fresh_peak) = rss_mib(&op);
    println!("\nB9 tenant annotations ({n} Services, 200 KB unrelated annotation each)");
    report.row("B9 peak RSS, annotated while running", format!("{peak:.1} MiB"), "target < 64 MiB");
    report.row(
        "B9 fresh start with all present: peak RSS; ready after",
        format!("{fresh_peak:.1} MiB; {:.1} s", ready.as_secs_f64()),
        "target < 64 MiB",
    );
    report.json.insert(
        "b9".into(),
        json!({ "n": n, "peak_mib": peak, "fresh_start_peak_mib": fresh_peak, "fresh_start_ready_seconds": ready.as_secs_f64() }),
    );
    env
}

/// Fairness: while namespace A has 300 RSA-4096 Services pending,
/// the time a new Service in namespace B takes to get its Secret and a pod request in
/// namespace C to be issued; then, once A is served, the operator's CPU in 20 s while
/// 300 requests of one namespace wait for a Service (a Service there changing its
/// selector every second, each change a reason to look at them again).
async fn fairness(report: &mut Report) -> Vec<Env> {
    use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
    use k8s_openapi::api::core::v1::Service;
    use support::pods::{Kubelet, bundle_name, key_and_stub, trust_bundle};

    let n = scaled(300);
    let (a, b, c) = (Env::new("bench-fair-a").await, Env::new("bench-fair-b").await, Env::new("bench-fair-c").await);
    let signer = format!("bench.service-ca.test/{}", a.run);
    let op = a.start_operator(&["--pod-signer-name", &signer]);
    op.wait_ready(Duration::from_secs(60)).await;
    a.ca_bundle().await;
    let mut cleanup = support::Cleanup::default();
    cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &a.op_ns));
    trust_bundle(&a, &signer, &a.op_ns).await;
    let issued = |ns: String| {
        let api: Api<Secret> = Api::namespaced(a.client.clone(), &ns);
        async move {
            let list = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            list.iter().filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("tls.crt"))).count()
        }
    };

    futures::stream::iter(0..n)
        .map(|i| {
            let a = &a;
            async move {
                let annotations = [
                    ("service.beta.openshift.io/serving-cert-secret-name", format!("a{i}-tls")),
                    ("service.beta.openshift.io/serving-cert-key-algorithm", "rsa-4096".to_string()),
                ];
                let annotations: Vec<(&str, &str)> = annotations.iter().map(|(k, v)| (*k, v.as_str())).collect();
                a.service_with(&format!("a{i}"), &annotations, false).await
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    eventually(Duration::from_secs(300), "A's first Secret", || async {
        (issued(a.ns.clone()).await > 0).then_some(())
    })
    .await;

    // B: a Service (default key) in another namespace.
    let started = Instant::now();
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "web", "namespace": b.ns, "labels": a.labels(),
                      "annotations": { "service.beta.openshift.io/serving-cert-secret-name": "web-tls" } },
        "spec": { "ports": [{ "port": 443 }], "selector": { "app": "web" } }
    }))
    .unwrap();
    Api::<Service>::namespaced(a.client.clone(), &b.ns).create(&PostParams::default(), &svc).await.unwrap();
    eventually(Duration::from_secs(600), "B's Secret", || async { (issued(b.ns.clone()).await == 1).then_some(()) })
        .await;
    let b_took = started.elapsed();
    let a_done_at_b = issued(a.ns.clone()).await;

    // C: a pod request, A still pending.
    let kubelet_c = Kubelet::in_namespace(&a, &signer, &c.ns).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let pod = kubelet_c.pod("web", "web", None).await;
    kubelet_c.service("web", "web", false).await;
    let started = Instant::now();
    kubelet_c.request("web", &signer, &pod, stub.clone(), None).await;
    kubelet_c.answered("web", Duration::from_secs(600)).await;
    let c_took = started.elapsed();
    let a_done_at_c = issued(a.ns.clone()).await;
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
        (issued(a.ns.clone()).await >= n).then_some(())
    })
    .await;
    let kubelet_a = Kubelet::new(&a, &signer).await;
    futures::stream::iter(0..n)
        .map(|i| {
            let (kubelet_a, stub, signer) = (&kubelet_a, stub.clone(), &signer);
            async move {
                let pod = kubelet_a.pod(&format!("p{i}"), &format!("waiting-{i}"), None).await;
                kubelet_a.request(&format!("r{i}"), signer, &pod, stub, None).await;
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
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

/// B10, scale-out: the same bulk issuance with 1 replica and with 2 sharing it, each
/// limited to one key-generation thread (`--max-concurrent-issuance 1`, the stand-in
/// for a one-core pod limit on this two-core machine), RSA-2048 keys, no ready keys.
async fn b10_scale_out(report: &mut Report) -> Vec<Env> {
    let n = scaled(300);
    let mut rates = Vec::new();
    let mut envs = Vec::new();
    for replicas in [1usize, 2] {
        let env = Env::new(&format!("bench-b10-{replicas}")).await;
        let ops: Vec<Operator> = (0..replicas)
            .map(|i| {
                let identity = format!("r{i}");
                let extra = ["--max-concurrent-issuance", "1", "--key-buffer", "0", "--lease-identity", &identity];
                let args = env.leader_elect_args("5s", &extra);
                Operator::start_with_kubeconfig(&env.name, &args, &env.kubeconfig)
            })
            .collect();
        eventually(Duration::from_secs(60), "every replica sharing", || async {
            for op in &ops {
                let page = op.metrics().await?.1;
                (support::metric(&page, "service_ca_sharing_members") == replicas as f64).then_some(())?;
                op.admin_get("/readyz").await.filter(|(s, _)| *s == 200)?;
            }
            Some(())
        })
        .await;
        let mut processes = control_plane_pids();
        for op in &ops {
            processes.push(("operator", op.pid()));
        }
        settle(&processes).await;
        let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
        let started = Instant::now();
        create_services(&env, "x", n, None).await;
        let managed = ListParams::default().labels("service-ca.operators.openshift.io/managed=true");
        eventually(Duration::from_secs(600), "every B10 Secret", || async {
            let list = env.secrets().list(&managed).await.ok()?;
            (list.items.iter().filter(|s| has_cert(s)).count() >= n).then_some(())
        })
        .await;
        let took = started.elapsed();
        let cpu: Vec<(&str, f64)> = processes
            .iter()
            .zip(cpu_before)
            .map(|((name, pid), before)| (*name, (cpu_seconds(*pid) - before) / took.as_secs_f64() / 2.0 * 100.0))
            .collect();
        let rate = n as f64 / took.as_secs_f64();
        let apiserver = cpu.iter().filter(|(name, _)| *name == "kube-apiserver").map(|(_, p)| p).sum::<f64>();
        let operators = cpu.iter().filter(|(name, _)| *name == "operator").map(|(_, p)| p).sum::<f64>();
        println!("\nB10 scale-out, {replicas} replica(s): {n} Services in {took:.1?}");
        report.row(
            &format!("B10 {replicas} replica(s), 1 key thread each: certificates per second"),
            format!("{rate:.1}/s (operators {operators:.0} %, kube-apiserver {apiserver:.0} % of 2 CPUs)"),
            "",
        );
        rates.push(rate);
        drop(ops);
        envs.push(env);
    }
    let ratio = rates[1] / rates[0];
    report.row("B10 2 replicas vs 1", format!("{ratio:.2}x"), "target >= 1.6x");
    report.json.insert("b10".into(), json!({ "n": n, "rate_1": rates[0], "rate_2": rates[1], "ratio": ratio }));
    envs
}

/// Prints and records the setup the figures were measured with.
fn setup(report: &mut Report, cores: usize) {
    println!(
        "service-ca-operator benchmarks: {cores} CPUs; operator: release build, no selector, controller concurrency 16, \
         key pool {cores}, no client-side rate limit (kube-rs has none); bench client: {CREATE_CONCURRENCY} concurrent creates"
    );
    report.json.insert(
        "setup".into(),
        json!({ "cpus": cores, "controller_concurrency": 16, "key_pool": cores, "client_rate_limit": "none",
                "bench_create_concurrency": CREATE_CONCURRENCY }),
    );
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

/// What one bulk issuance measured: many Services created at once, until every
/// Secret had a certificate.
struct Bulk {
    n: usize,
    total: Duration,
    rate: f64,
    create_took: Duration,
    /// Created -> Secret with a certificate, sorted.
    latencies: Vec<Duration>,
    /// Secrets whose chain does not verify against the bundle for their name.
    invalid: usize,
    /// CPU seconds per process during the run.
    cpu_used: Vec<(&'static str, f64)>,
}

impl Bulk {
    fn cpu_of(&self, process: &str) -> f64 {
        self.cpu_used.iter().find(|(name, _)| *name == process).map_or(f64::NAN, |(_, c)| *c)
    }

    /// The per-Service latency and CPU rows, prefixed with `label`.
    fn report_common(&self, label: &str, cores: usize, report: &mut Report) {
        report.row(
            &format!("{label} per-Service latency p50 / p99"),
            format!(
                "{:.1} s / {:.1} s",
                percentile(&self.latencies, 0.5).as_secs_f64(),
                percentile(&self.latencies, 0.99).as_secs_f64()
            ),
            "",
        );
        let available = self.total.as_secs_f64() * cores as f64;
        for (name, used) in &self.cpu_used {
            report.row(
                &format!("{label} CPU used by {name}"),
                format!("{used:.1} s ({:.0} % of {cores} CPUs)", used / available * 100.0),
                "",
            );
        }
    }

    fn json(&self) -> serde_json::Map<String, Value> {
        json!({ "n": self.n, "seconds": self.total.as_secs_f64(), "certs_per_second": self.rate,
            "invalid": self.invalid, "creation_seconds": self.create_took.as_secs_f64(),
            "p50_seconds": percentile(&self.latencies, 0.5).as_secs_f64(), "p99_seconds": percentile(&self.latencies, 0.99).as_secs_f64(),
            "cpu_seconds": self.cpu_used.iter().map(|(n, c)| (n.to_string(), *c)).collect::<BTreeMap<_, _>>() })
        .as_object()
        .cloned()
        .unwrap()
    }
}

/// Creates `n` Services `<prefix><i>` at once (key algorithm `algorithm`, else the
/// default) and waits until every Secret has a certificate; checks each against
/// `bundle`. CPU is counted for `processes` (the bench client included).
async fn bulk_issue(
    env: &Env,
    bundle: &str,
    secrets_seen: &Seen,
    processes: &[(&'static str, u32)],
    (prefix, n, algorithm): (&str, usize, Option<&str>),
) -> Bulk {
    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let started = Instant::now();
    let created = create_services(env, prefix, n, algorithm).await;
    let create_took = started.elapsed();
    eventually(Duration::from_secs(1800), "every bulk Secret", || {
        let done = created.keys().all(|k| secrets_seen.lock().unwrap().contains_key(k));
        async move { done.then_some(()) }
    })
    .await;
    let last = created.keys().map(|k| secrets_seen.lock().unwrap()[k]).max().unwrap();
    let total = last - started;
    let cpu_used: Vec<(&str, f64)> =
        processes.iter().zip(&cpu_before).map(|((name, pid), before)| (*name, cpu_seconds(*pid) - before)).collect();
    let mut latencies: Vec<Duration> = created.iter().map(|(k, t)| secrets_seen.lock().unwrap()[k] - *t).collect();
    latencies.sort();
    let invalid = invalid_secrets(env, bundle, |name| created.contains_key(name)).await;
    Bulk { n, total, rate: n as f64 / total.as_secs_f64(), create_took, latencies, invalid, cpu_used }
}

/// How many of the managed Secrets whose name `pick` selects do not verify against
/// `bundle` for their Service's name.
async fn invalid_secrets(env: &Env, bundle: &str, pick: impl Fn(&str) -> bool) -> usize {
    let all = env
        .secrets()
        .list(&ListParams::default().labels("service-ca.operators.openshift.io/managed=true"))
        .await
        .unwrap();
    all.items
        .iter()
        .filter(|s| pick(&s.name_any()))
        .filter(|s| {
            let svc = s.name_any().trim_end_matches("-tls").to_string();
            support::tls::rustls_verify_at(
                &support::data(s, "tls.crt"),
                bundle,
                &format!("{svc}.{}.svc", env.ns),
                SystemTime::now(),
            )
            .is_err()
        })
        .count()
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
    let mut processes = control_plane_pids();
    processes.push(("operator", op.pid()));
    settle(&processes).await;
    let limit_before = keygen_limit(cores, Duration::from_secs(15));
    processes.push(("bench client", std::process::id()));

    let b2 = bulk_issue(env, bundle, secrets_seen, &processes, ("bulk", scaled(1000), None)).await;
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
    let mut json = b2.json();
    json.extend([
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

/// B4: injection into many ConfigMaps at once (reported as `label`). Returns how many.
async fn b4_injection(env: &Env, label: &str, report: &mut Report) -> usize {
    let n4 = scaled(1000);
    let cms_seen = first_seen(env.configmaps(), &format!("{}={}", support::RUN_LABEL, env.run), injected);
    let started = Instant::now();
    let cm_created: HashMap<String, Instant> = futures::stream::iter(0..n4)
        .map(|i| async move {
            let mut cm: ConfigMap = serde_json::from_value(json!({})).unwrap();
            cm.metadata = env.meta(&format!("cm{i}"));
            cm.metadata.annotations =
                Some(BTreeMap::from([("service.beta.openshift.io/inject-cabundle".into(), "true".into())]));
            let t = Instant::now();
            env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
            (format!("cm{i}"), t)
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    eventually(Duration::from_secs(300), "every ConfigMap injected", || {
        let done = cm_created.keys().all(|k| cms_seen.lock().unwrap().contains_key(k));
        async move { done.then_some(()) }
    })
    .await;
    let last = cm_created.keys().map(|k| cms_seen.lock().unwrap()[k]).max().unwrap();
    let mut per_object: Vec<Duration> = cm_created.iter().map(|(k, t)| cms_seen.lock().unwrap()[k] - *t).collect();
    per_object.sort();
    println!("\n{label} injection ({n4} annotated ConfigMaps created at once)");
    report.row(&format!("{label} all injected after"), format!("{:.1} s", (last - started).as_secs_f64()), "");
    report.row(
        &format!("{label} per object (created -> injected) p50"),
        format!("{:.0} ms", ms(percentile(&per_object, 0.5))),
        "",
    );
    report.json.insert(
        label.to_lowercase().replace(['-', ' '], "_"),
        json!({ "n": n4, "seconds": (last - started).as_secs_f64(), "p50_ms": ms(percentile(&per_object, 0.5)),
                "p99_ms": ms(percentile(&per_object, 0.99)) }),
    );
    n4
}

/// B3: forced rotation with `n_secrets` serving Secrets and `n4` injected ConfigMaps
/// in place (reported as `label`); the re-issue rate is compared with `compare` (what,
/// rate). Returns the re-issue rate.
async fn b3_rotation(
    env: &Env,
    label: &str,
    (n_secrets, n4): (usize, usize),
    compare: (&str, Option<f64>),
    target: &str,
    report: &mut Report,
) -> f64 {
    let old_ski = certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
    let old_bundle = env.ca_bundle().await;
    let started = Instant::now();
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "bench" } } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let new_ski = eventually(Duration::from_secs(30), "the rotation", || async {
        let ski = certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
        (ski != old_ski).then_some(ski)
    })
    .await;
    // The Secret is written before the bundle ConfigMap: wait for the new bundle itself.
    let new_bundle = eventually(Duration::from_secs(30), "the new bundle", || async {
        let bundle = env.ca_bundle().await;
        (bundle != old_bundle).then_some(bundle)
    })
    .await;
    let mut injected_at = None;
    let mut reissued_at = None;
    while injected_at.is_none() || reissued_at.is_none() {
        if injected_at.is_none() {
            let cms = env
                .configmaps()
                .list(&ListParams::default().labels(&format!("{}={}", support::RUN_LABEL, env.run)))
                .await
                .unwrap();
            if cms
                .items
                .iter()
                .filter(|c| c.data.as_ref().and_then(|d| d.get("service-ca.crt")) == Some(&new_bundle))
                .count()
                == n4
            {
                injected_at = Some(started.elapsed());
            }
        }
        if reissued_at.is_none() && count_issued_by(env, &new_ski).await == n_secrets {
            reissued_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(started.elapsed() < Duration::from_secs(900), "rotation did not finish");
    }
    let (reissued, reinjected) = (reissued_at.unwrap(), injected_at.unwrap());
    let reissue_rate = n_secrets as f64 / reissued.as_secs_f64();
    let invalid = invalid_secrets(env, &new_bundle, |_| true).await;
    println!("\n{label} rotation (forced, {n_secrets} serving Secrets, {n4} injected ConfigMaps)");
    report.row(&format!("{label} every bundle re-injected after"), format!("{:.1} s", reinjected.as_secs_f64()), "");
    report.row(
        &format!("{label} every leaf re-issued after"),
        format!("{:.1} s ({invalid} invalid against the new bundle)", reissued.as_secs_f64()),
        "",
    );
    let (compare_what, compare_rate) = compare;
    report.row(&format!("{label} re-issue rate vs. {compare_what}"), times(reissue_rate, compare_rate), target);
    report.json.insert(
        label.to_lowercase().replace('-', "_"),
        json!({ "secrets": n_secrets, "configmaps": n4, "reissued_seconds": reissued.as_secs_f64(),
                "reinjected_seconds": reinjected.as_secs_f64(), "reissue_rate": reissue_rate, "invalid": invalid,
                "compared_with": compare_what, "compared_rate": compare_rate }),
    );
    reissue_rate
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

/// B5: memory, now (everything above in place), with many unrelated objects, and
/// after a fresh start with all of it present (`op` is stopped and a new operator
/// started with `args`).
/// Creates `n` unrelated 32 KiB Secrets and `n` unrelated ConfigMaps in a new
/// namespace `ns`; returns how long that took.
async fn unrelated_objects(client: &Client, ns: &str, n: usize) -> Duration {
    support::create_namespace(client, ns).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let blob = ByteString(vec![b'x'; 32 * 1024]);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (s, c, blob) = (secrets.clone(), configmaps.clone(), blob.clone());
            async move {
                let secret: Secret = Secret {
                    metadata: kube::api::ObjectMeta { name: Some(format!("noise{i}")), ..Default::default() },
                    data: Some(BTreeMap::from([("blob".to_string(), blob)])),
                    ..Default::default()
                };
                s.create(&PostParams::default(), &secret).await.unwrap();
                let cm: ConfigMap = serde_json::from_value(
                    json!({ "metadata": { "name": format!("noise{i}") }, "data": { "k": "v" } }),
                )
                .unwrap();
                c.create(&PostParams::default(), &cm).await.unwrap();
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    started.elapsed()
}

async fn b5_memory(env: &Env, op: Operator, args: &[String], memory: &MemorySoFar, report: &mut Report) {
    let client = &env.client;
    let (rss_after_all, peak_after_all) = rss_mib(&op);
    let n_unrelated =
        std::env::var("BENCH_UNRELATED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| scaled(10_000));
    // B5 runs five times by default (BENCH_B5_RUNS): each run adds n_unrelated more
    // unrelated objects in a namespace of its own and compares the RSS after with the
    // RSS before it. Watches may expire and relist during any run.
    let runs: usize = std::env::var("BENCH_B5_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let mut growth = Vec::new();
    let (mut rss_noise, mut peak_noise) = (rss_after_all, peak_after_all);
    for run in 1..=runs {
        let before = rss_mib(&op).0;
        let took = unrelated_objects(client, &format!("{}-noise{run}", env.ns), n_unrelated).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        (rss_noise, peak_noise) = rss_mib(&op);
        println!(
            "(B5 run {run}: created {n_unrelated} unrelated 32 KiB Secrets and {n_unrelated} unrelated ConfigMaps in {took:.0?}; RSS {before:.1} -> {rss_noise:.1} MiB)"
        );
        growth.push(rss_noise / before - 1.0);
    }
    // A fresh start with everything present: the initial lists are the peak.
    drop(op);
    let restarted = Instant::now();
    let op2 = Operator::start("bench-restart", args);
    op2.wait_ready(Duration::from_secs(120)).await;
    let ready_after = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (rss_restart, peak_restart) = rss_mib(&op2);
    let MemorySoFar { idle_peak, managed: (rss_managed, peak_managed), managed_count: managed, injected_count: n4 } =
        *memory;
    println!("\nB5 memory (VmHWM = peak RSS of the operator process, VmRSS = current)");
    report.row("B5 idle (CA loaded, nothing managed): peak", format!("{idle_peak:.1} MiB"), "");
    report.row(
        &format!("B5 with {managed} managed Services + Secrets: peak / current"),
        format!("{peak_managed:.1} / {rss_managed:.1} MiB"),
        "target <= 64 MiB",
    );
    report.row(
        &format!("B5 + {n4} injected ConfigMaps, after rotation: peak / current"),
        format!("{peak_after_all:.1} / {rss_after_all:.1} MiB"),
        "",
    );
    let runs_text: Vec<String> = growth.iter().map(|g| format!("{:+.1} %", g * 100.0)).collect();
    report.row(
        &format!("B5 + {n_unrelated} unrelated 32 KiB Secrets + {n_unrelated} ConfigMaps, {runs} runs"),
        format!("{peak_noise:.1} / {rss_noise:.1} MiB; each run: {}", runs_text.join(", ")),
        "target <= +10 % in every run",
    );
    report.row(
        "B5 fresh start with all of the above present: peak / current",
        format!("{peak_restart:.1} / {rss_restart:.1} MiB (ready in {:.1} s)", ready_after.as_secs_f64()),
        "",
    );
    report.json.insert(
        "b5".into(),
        json!({ "idle_peak_mib": idle_peak, "managed": managed, "managed_peak_mib": peak_managed, "managed_rss_mib": rss_managed,
                "all_peak_mib": peak_after_all, "all_rss_mib": rss_after_all, "unrelated": n_unrelated,
                "unrelated_peak_mib": peak_noise, "unrelated_rss_mib": rss_noise,
                "unrelated_growth": rss_noise / rss_after_all - 1.0, "unrelated_growth_per_run": growth,
                "restart_peak_mib": peak_restart, "restart_rss_mib": rss_restart, "restart_ready_seconds": ready_after.as_secs_f64() }),
    );
}
