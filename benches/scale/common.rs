//! What the parts share: the report, sizes, watches of first-seen objects, write and CPU
//! counters, bulk issuance (many Services at once until every Secret is valid).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::support;
use support::{Env, Operator, certs, cpu_seconds, eventually, proc_status_kib};

pub const CREATE_CONCURRENCY: usize = 32;

pub fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale).round() as usize).max(10)
}

pub struct Report {
    pub rows: Vec<(String, String, String)>,
    pub json: serde_json::Map<String, Value>,
}

impl Report {
    pub fn row(&mut self, what: &str, figure: String, target: &str) {
        println!("  {what:<58} {figure:<34} {target}");
        self.rows.push((what.into(), figure, target.into()));
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// First time each object of `api` (selected by `labels`) satisfied `ready`.
pub fn first_seen<K>(api: Api<K>, labels: &str, ready: fn(&K) -> bool) -> Arc<Mutex<HashMap<String, Instant>>>
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

pub fn has_cert(s: &Secret) -> bool {
    s.data.as_ref().is_some_and(|d| d.get("tls.crt").is_some_and(|v| !v.0.is_empty()))
}

pub fn injected(cm: &ConfigMap) -> bool {
    cm.data.as_ref().is_some_and(|d| d.contains_key("service-ca.crt"))
}

/// Write requests the API server has served, per (resource, verb), from its metrics.
pub async fn apiserver_writes(client: &Client) -> BTreeMap<(String, String), u64> {
    apiserver_requests(client, &["POST", "PUT", "PATCH", "APPLY", "DELETE"]).await
}

/// Requests with one of `verbs` the API server has served (subresources aside), per
/// (resource, verb), from its metrics.
pub async fn apiserver_requests(client: &Client, verbs: &[&str]) -> BTreeMap<(String, String), u64> {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let label = |name: &str| {
            let key = format!("{name}=\"");
            line.split(&key).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string()
        };
        let verb = label("verb");
        if !verbs.contains(&verb.as_str()) || !label("subresource").is_empty() {
            continue;
        }
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry((label("resource"), verb)).or_insert(0) += value as u64;
    }
    out
}

pub fn diff(
    after: &BTreeMap<(String, String), u64>,
    before: &BTreeMap<(String, String), u64>,
) -> BTreeMap<(String, String), u64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).filter(|(_, v)| *v > 0).collect()
}

pub fn operator_writes(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("service_ca_api_writes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub fn rss_mib(op: &Operator) -> (f64, f64) {
    (proc_status_kib(op.pid(), "VmRSS") as f64 / 1024.0, proc_status_kib(op.pid(), "VmHWM") as f64 / 1024.0)
}

/// Waits (at most 60 s) until `processes` together use less than 10 % of one CPU over a
/// second, so that a measurement on the same cores starts from an idle cluster.
pub async fn settle(processes: &[(&str, u32)]) {
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
/// The control plane's processes and `op`'s, once they are idle (see [`settle`]): what a
/// part measures the CPU of, with the bench client added after the settling.
pub async fn settled_with(op: &Operator) -> Vec<(&'static str, u32)> {
    let mut processes = control_plane_pids();
    processes.push(("operator", op.pid()));
    settle(&processes).await;
    processes
}

pub fn control_plane_pids() -> Vec<(&'static str, u32)> {
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

/// Creates `n` annotated Services `<prefix><i>` (Secret `<prefix><i>-tls`), with the
/// key-algorithm annotation `algorithm` if given; when each was created.
pub async fn create_services(env: &Env, prefix: &str, n: usize, algorithm: Option<&str>) -> HashMap<String, Instant> {
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

pub async fn count_issued_by(env: &Env, ski: &[u8]) -> usize {
    let list = env
        .secrets()
        .list(&ListParams::default().labels("service-ca.operators.openshift.io/managed=true"))
        .await
        .unwrap();
    list.items.iter().filter(|s| certs::try_signer_of(&support::data(s, "tls.crt")).as_deref() == Some(ski)).count()
}

/// When each serving Secret (by name) first had a certificate.
pub type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// Write counters at one moment: the API server's, per (resource, verb), and the
/// operator's own total.
pub struct WriteCounters {
    pub apiserver: BTreeMap<(String, String), u64>,
    pub operator: u64,
}

impl WriteCounters {
    pub async fn now(client: &Client, op: &Operator) -> WriteCounters {
        let apiserver = apiserver_writes(client).await;
        let operator = operator_writes(&op.metrics().await.unwrap().1);
        WriteCounters { apiserver, operator }
    }
}

/// A rate with its ratio to the rate it is compared with (when that part ran).
pub fn times(figure: f64, other: Option<f64>) -> String {
    match other {
        Some(other) => format!("{figure:.1}/s vs {other:.1}/s ({:.1}x)", figure / other),
        None => format!("{figure:.1}/s (the RSA part did not run)"),
    }
}

/// Prints and records the setup the figures were measured with.
pub fn setup(report: &mut Report, cores: usize) {
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

/// What one bulk issuance measured: many Services created at once, until every
/// Secret had a certificate.
pub struct Bulk {
    pub n: usize,
    pub total: Duration,
    pub rate: f64,
    pub create_took: Duration,
    /// Created -> Secret with a certificate, sorted.
    pub latencies: Vec<Duration>,
    /// Secrets whose chain does not verify against the bundle for their name.
    pub invalid: usize,
    /// CPU seconds per process during the run.
    pub cpu_used: Vec<(&'static str, f64)>,
}

impl Bulk {
    pub fn cpu_of(&self, process: &str) -> f64 {
        self.cpu_used.iter().find(|(name, _)| *name == process).map_or(f64::NAN, |(_, c)| *c)
    }

    /// The per-Service latency and CPU rows, prefixed with `label`.
    pub fn report_common(&self, label: &str, cores: usize, report: &mut Report) {
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

    pub fn json(&self) -> serde_json::Map<String, Value> {
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
pub async fn bulk_issue(
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
pub async fn invalid_secrets(env: &Env, bundle: &str, pick: impl Fn(&str) -> bool) -> usize {
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

/// CPU seconds used so far by the threads of process `pid` whose name starts with
/// `prefix` (the key-generation threads are `keygen-<i>`).
pub fn threads_cpu_seconds(pid: u32, prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (Some((head, rest)), Some(open)) = (stat.rsplit_once(')'), stat.find('(')) else { continue };
        if !head[open + 1..].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (ticks(11) + ticks(12)) / 100.0;
    }
    total
}

/// How many threads of process `pid` whose name starts with `prefix` (those for bulk
/// work left out) are running or runnable (state R) and how many are not (sleeping: a
/// key thread waiting for work).
pub fn threads_running(pid: u32, prefix: &str) -> (usize, usize) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (0, 0) };
    let (mut running, mut other) = (0, 0);
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (Some((head, rest)), Some(open)) = (stat.rsplit_once(')'), stat.find('(')) else { continue };
        let name = &head[open + 1..];
        // Threads for bulk work (`keygen-bulk-<i>`) wait whenever only urgent work runs.
        if name.starts_with(prefix) && !name.contains("-bulk-") {
            if rest.split_whitespace().next() == Some("R") { running += 1 } else { other += 1 }
        }
    }
    (running, other)
}

/// Samples [`threads_running`] every 10 ms until the returned flag is set; the thread's
/// result is the share of samples (thread by thread) in which the threads were not
/// running: waiting for work.
pub fn sample_waiting(
    pid: u32,
    prefix: &'static str,
) -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<f64>) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let (mut running, mut waiting) = (0usize, 0usize);
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let (r, w) = threads_running(pid, prefix);
            (running, waiting) = (running + r, waiting + w);
            std::thread::sleep(Duration::from_millis(10));
        }
        waiting as f64 / (running + waiting).max(1) as f64
    });
    (stop, handle)
}
