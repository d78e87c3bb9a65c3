//! `BENCH_ONLY=namespaces`: the per-namespace bundle (docs/spec.md §5.5) at scale.
//!
//! N namespaces (`NS_COUNT`, default 10,000 × BENCH_SCALE), created before the operator
//! starts and labelled for it (`--namespace-bundle-selector`, so that namespaces of other
//! parts and of the system do not count). Measured: start -> every namespace holds the
//! bundle; forced rotation -> every namespace holds the new one; the ConfigMap writes
//! of each phase (per namespace from a watch of the bundle ConfigMaps' resourceVersions,
//! in all from the API server's and the operator's own counters); CPU per phase of the
//! operator against the control plane's; RSS after a fresh start with the feature and
//! with `--namespace-bundles=false` over the same namespaces.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use service_ca_operator::controllers::namespace_bundle::plan::digest;
use service_ca_operator::names::{BUNDLE_DIGEST, INJECTED_CONFIGMAP_KEY, NAMESPACE_BUNDLE_LABEL};

use super::{CREATE_CONCURRENCY, Report, apiserver_writes, control_plane_pids, diff, rss_mib, scaled, settle, support};
use support::{Env, Operator, cpu_seconds, eventually};

/// The label that selects the benchmark's namespaces (value: the run).
const SELECTED: &str = "bench.service-ca/namespace-bundle";
const ONE_EACH: &str = "target <= 1 per namespace";

fn namespace_count() -> usize {
    std::env::var("NS_COUNT").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| scaled(10_000))
}

/// Creates namespaces `<run>-<i>`, labelled for the operator, `CREATE_CONCURRENCY` at a time.
async fn create_namespaces(client: &Client, run: &str, n: usize) -> Duration {
    let api: Api<Namespace> = Api::all(client.clone());
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let ns = Namespace {
                    metadata: ObjectMeta {
                        name: Some(format!("{run}-{i}")),
                        labels: Some(BTreeMap::from([(SELECTED.to_string(), run.to_string())])),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                api.create(&PostParams::default(), &ns).await.unwrap();
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

/// Waits until kube-controller-manager has published kube-root-ca.crt in all `n`.
async fn root_ca_everywhere(client: &Client, run: &str, n: usize) {
    let api: Api<ConfigMap> = Api::all(client.clone());
    let params = ListParams::default().fields("metadata.name=kube-root-ca.crt");
    let prefix = format!("{run}-");
    eventually(Duration::from_secs(1800), "kube-root-ca.crt in every namespace", || async {
        let list = api.list_metadata(&params).await.ok()?;
        let ours = list
            .items
            .iter()
            .filter(|cm| cm.namespace().and_then(|ns| ns.strip_prefix(&prefix)?.parse::<usize>().ok()).is_some())
            .count();
        (ours >= n).then_some(())
    })
    .await;
}

/// What a watch of the bundle ConfigMaps (metadata only) saw, per namespace: every
/// resourceVersion (each one a write), and when each bundle digest first appeared.
#[derive(Default)]
struct Seen {
    versions: HashMap<String, HashSet<String>>,
    first: HashMap<(String, String), Instant>,
}

impl Seen {
    /// When each namespace first held `digest`.
    fn holding(&self, digest: &str) -> Vec<Instant> {
        self.first.iter().filter(|((_, d), _)| d == digest).map(|(_, t)| *t).collect()
    }

    fn writes(&self) -> HashMap<String, usize> {
        self.versions.iter().map(|(ns, v)| (ns.clone(), v.len())).collect()
    }
}

fn watch_bundles(client: &Client, op_ns: &str) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    let api: Api<PartialObjectMeta<ConfigMap>> = Api::all(client.clone());
    let config = watcher::Config::default().labels(&format!("{NAMESPACE_BUNDLE_LABEL}={op_ns}"));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(Ok(cm)) = stream.next().await {
            let (Some(ns), Some(version)) = (cm.namespace(), cm.resource_version()) else { continue };
            let digest = cm.annotations().get(BUNDLE_DIGEST).cloned().unwrap_or_default();
            let mut seen = out.lock().unwrap();
            seen.versions.entry(ns.clone()).or_default().insert(version);
            seen.first.entry((ns, digest)).or_insert_with(Instant::now);
        }
    });
    seen
}

/// Waits until `n` namespaces hold `digest`; when the last one first did.
async fn all_holding(seen: &Arc<Mutex<Seen>>, digest: &str, n: usize) -> Instant {
    eventually(Duration::from_secs(3600), &format!("{n} namespaces with the bundle"), || {
        let times = seen.lock().unwrap().holding(digest);
        async move { (times.len() >= n).then(|| times.into_iter().max().unwrap()) }
    })
    .await
}

/// ConfigMap writes of one phase: per namespace (from the watch), the API server's
/// count of configmaps POST/PUT/PATCH, and the operator's own count.
struct Writes {
    total: usize,
    max_per_namespace: usize,
    namespaces_written: usize,
    apiserver: u64,
    operator: u64,
}

impl Writes {
    fn row(&self, label: &str, target: &str, report: &mut Report) -> Value {
        report.row(
            &format!("{label} ConfigMap writes: watched / API server / operator"),
            format!(
                "{} / {} / {} (max {} in one namespace, {} namespaces written)",
                self.total, self.apiserver, self.operator, self.max_per_namespace, self.namespaces_written
            ),
            target,
        );
        json!({ "watched": self.total, "apiserver": self.apiserver, "operator": self.operator,
                "max_per_namespace": self.max_per_namespace, "namespaces_written": self.namespaces_written })
    }
}

/// Counters at the start of a phase.
struct Mark {
    versions: HashMap<String, usize>,
    apiserver: BTreeMap<(String, String), u64>,
    operator: u64,
    cpu: Vec<f64>,
    at: Instant,
}

async fn configmap_writes(op: Option<&Operator>) -> u64 {
    let Some(op) = op else { return 0 };
    let page = op.metrics().await.map(|(_, p)| p).unwrap_or_default();
    page.lines()
        .filter(|l| l.starts_with("service_ca_api_writes_total{") && l.contains("resource=\"configmaps\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

impl Mark {
    async fn now(client: &Client, seen: &Arc<Mutex<Seen>>, op: Option<&Operator>, processes: &[(&str, u32)]) -> Mark {
        let versions = seen.lock().unwrap().writes();
        Mark {
            versions,
            apiserver: apiserver_writes(client).await,
            operator: configmap_writes(op).await,
            cpu: processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect(),
            at: Instant::now(),
        }
    }

    async fn writes(&self, client: &Client, seen: &Arc<Mutex<Seen>>, op: &Operator) -> Writes {
        let now = seen.lock().unwrap().writes();
        let per: Vec<usize> =
            now.iter().map(|(ns, n)| n - self.versions.get(ns).copied().unwrap_or(0)).filter(|n| *n > 0).collect();
        let apiserver = diff(&apiserver_writes(client).await, &self.apiserver)
            .iter()
            .filter(|((r, _), _)| r == "configmaps")
            .map(|(_, n)| n)
            .sum();
        Writes {
            total: per.iter().sum(),
            max_per_namespace: per.iter().copied().max().unwrap_or(0),
            namespaces_written: per.len(),
            apiserver,
            operator: configmap_writes(Some(op)).await - self.operator,
        }
    }

    /// CPU seconds of each process since the mark, as a row; the JSON of it.
    fn cpu_row(&self, label: &str, processes: &[(&'static str, u32)], report: &mut Report) -> Value {
        let used: Vec<(&str, f64)> = processes
            .iter()
            .zip(&self.cpu)
            .map(|((name, pid), before)| (*name, (cpu_seconds(*pid) - before).max(0.0)))
            .collect();
        let text: Vec<String> = used.iter().map(|(name, s)| format!("{name} {s:.1}")).collect();
        let window = self.at.elapsed().as_secs_f64();
        report.row(&format!("{label} CPU-s ({window:.0} s window)"), text.join(", "), "");
        json!(used.iter().map(|(n, s)| (n.to_string(), *s)).collect::<BTreeMap<_, _>>())
    }
}

/// How many of the selected namespaces hold `bundle` (a paged list; outside the timings).
async fn holding_bundle(client: &Client, op_ns: &str, bundle: &str) -> usize {
    let api: Api<ConfigMap> = Api::all(client.clone());
    let mut params = ListParams::default().labels(&format!("{NAMESPACE_BUNDLE_LABEL}={op_ns}")).limit(500);
    let mut count = 0;
    loop {
        let page = api.list(&params).await.unwrap();
        count += page
            .items
            .iter()
            .filter(|cm| cm.data.as_ref().and_then(|d| d.get(INJECTED_CONFIGMAP_KEY)) == Some(&bundle.to_string()))
            .count();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return count,
        }
    }
}

/// The operator's `service_ca_namespace_bundles{state}` once `current` reached `n`
/// (the gauge is refreshed every 10 s), or what it showed after 60 s.
async fn gauge(op: &Operator, n: usize) -> (f64, f64) {
    let read = || async {
        let page = op.metrics().await.map(|(_, p)| p).unwrap_or_default();
        let of = |state: &str| support::metric(&page, &format!("service_ca_namespace_bundles{{state=\"{state}\"}}"));
        (of("selected"), of("current"))
    };
    for _ in 0..60 {
        let (selected, current) = read().await;
        if current >= n as f64 {
            return (selected, current);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    read().await
}

fn operator_args(env: &Env, feature: bool) -> Vec<String> {
    let mut args = env.operator_args();
    if feature {
        args.retain(|a| a != "--namespace-bundles=false");
        args.extend(["--namespace-bundle-selector".into(), format!("{SELECTED}={}", env.run)]);
    }
    args
}

/// A fresh start over everything present: ready after, RSS (current, peak) 20 s later.
async fn fresh_start(env: &Env, feature: bool) -> (Operator, Duration, (f64, f64)) {
    let started = Instant::now();
    let op = Operator::start_with_kubeconfig(&env.name, &operator_args(env, feature), &env.kubeconfig);
    op.wait_ready(Duration::from_secs(300)).await;
    let ready = started.elapsed();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let rss = rss_mib(&op);
    (op, ready, rss)
}

/// The part: see the module's comment. Returns the Env (its namespaces stay until the
/// end; the N namespaces stay with the bench's control plane, which is thrown away).
pub async fn namespace_bundles(report: &mut Report) -> Env {
    let n = namespace_count();
    let env = Env::new("bench-ns").await;
    let client = env.client.clone();
    let control_plane = control_plane_pids();
    let took = create_namespaces(&client, &env.run, n).await;
    // kube-controller-manager gives each new namespace a ServiceAccount and
    // kube-root-ca.crt: done before the operator starts, so that the API server's count
    // of ConfigMap writes is the operator's.
    root_ca_everywhere(&client, &env.run, n).await;
    settle(&control_plane).await;
    println!("\nNamespaces: {n} labelled namespaces created in {took:.1?} ({CREATE_CONCURRENCY} at a time)");
    let seen = watch_bundles(&client, &env.op_ns);

    // Start -> every namespace holds the bundle.
    let mut mark = Mark::now(&client, &seen, None, &control_plane).await;
    let op = Operator::start_with_kubeconfig(&env.name, &operator_args(&env, true), &env.kubeconfig);
    let processes = [control_plane.as_slice(), &[("operator", op.pid())]].concat();
    mark.cpu.push(cpu_seconds(op.pid()));
    op.wait_ready(Duration::from_secs(300)).await;
    let ready = mark.at.elapsed();
    let bundle = env.ca_bundle().await;
    let published = all_holding(&seen, &digest(&bundle), n).await - mark.at;
    tokio::time::sleep(Duration::from_secs(5)).await;
    report.row(
        &format!("Namespaces: start -> all {n} bundles published"),
        format!(
            "{:.1} s ({:.0}/s; ready after {:.1} s)",
            published.as_secs_f64(),
            rate(n, published),
            ready.as_secs_f64()
        ),
        "",
    );
    let publish_writes = mark.writes(&client, &seen, &op).await.row("Namespaces: publish", ONE_EACH, report);
    let publish_cpu = mark.cpu_row("Namespaces: publish", &processes, report);
    let (selected, current) = gauge(&op, n).await;
    let holding = holding_bundle(&client, &env.op_ns, &bundle).await;
    report.row(
        "Namespaces: holding the bundle (list) / gauge selected, current",
        format!("{holding} / {selected}, {current}"),
        &format!("{n}"),
    );
    settle(&processes).await;
    let running = rss_mib(&op);

    // Forced rotation -> every namespace holds the new bundle.
    let mark = Mark::now(&client, &seen, Some(&op), &processes).await;
    env.force_rotation("bench").await;
    let rotated = eventually(Duration::from_secs(120), "the new bundle", || async {
        let b = env.ca_bundle().await;
        (b != bundle).then_some(b)
    })
    .await;
    let updated = all_holding(&seen, &digest(&rotated), n).await - mark.at;
    tokio::time::sleep(Duration::from_secs(5)).await;
    report.row(
        &format!("Namespaces: forced rotation -> all {n} bundles updated"),
        format!("{:.1} s ({:.0}/s)", updated.as_secs_f64(), rate(n, updated)),
        "",
    );
    let rotation_writes = mark.writes(&client, &seen, &op).await.row("Namespaces: rotation", ONE_EACH, report);
    let rotation_cpu = mark.cpu_row("Namespaces: rotation", &processes, report);
    let holding_rotated = holding_bundle(&client, &env.op_ns, &rotated).await;
    report.row("Namespaces: holding the new bundle (list)", format!("{holding_rotated}"), &format!("{n}"));
    settle(&processes).await;
    let after_rotation = rss_mib(&op);
    drop(op);

    let memory = memory(&env, &client, &seen, n, (running, after_rotation), report).await;
    report.json.insert(
        "namespaces".into(),
        json!({ "n": n, "create_seconds": took.as_secs_f64(), "ready_seconds": ready.as_secs_f64(),
                "publish_seconds": published.as_secs_f64(), "publish_writes": publish_writes, "publish_cpu_seconds": publish_cpu,
                "gauge_selected": selected, "gauge_current": current, "holding": holding,
                "rotation_seconds": updated.as_secs_f64(), "rotation_writes": rotation_writes,
                "rotation_cpu_seconds": rotation_cpu, "holding_rotated": holding_rotated, "memory": memory }),
    );
    env
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-3)
}

/// RSS: while running (after publishing, after the rotation), then a fresh start with
/// the feature (and its writes: none expected) and one with `--namespace-bundles=false`.
async fn memory(
    env: &Env,
    client: &Client,
    seen: &Arc<Mutex<Seen>>,
    n: usize,
    (running, after_rotation): ((f64, f64), (f64, f64)),
    report: &mut Report,
) -> Value {
    let mark = Mark::now(client, seen, None, &[]).await;
    let (op, ready_on, on) = fresh_start(env, true).await;
    let restart_writes =
        mark.writes(client, seen, &op).await.row("Namespaces: fresh start (all current)", "target 0", report);
    drop(op);
    let (op, ready_off, off) = fresh_start(env, false).await;
    drop(op);
    report.row(
        "Namespaces: RSS while running, after publish / after rotation (current, peak)",
        format!("{:.1}, {:.1} / {:.1}, {:.1} MiB", running.0, running.1, after_rotation.0, after_rotation.1),
        "",
    );
    report.row(
        &format!("Namespaces: RSS fresh start, {n} namespaces, with / without the feature"),
        format!(
            "{:.1} / {:.1} MiB (peak {:.1} / {:.1}; ready {:.1} / {:.1} s)",
            on.0,
            off.0,
            on.1,
            off.1,
            ready_on.as_secs_f64(),
            ready_off.as_secs_f64()
        ),
        "",
    );
    report.row(
        "Namespaces: RSS cost of the feature (current; peak)",
        format!("{:+.1}; {:+.1} MiB", on.0 - off.0, on.1 - off.1),
        "target <= +16 MiB",
    );
    json!({ "running_rss_mib": running.0, "running_peak_mib": running.1, "rotated_rss_mib": after_rotation.0,
            "rotated_peak_mib": after_rotation.1, "with_rss_mib": on.0, "with_peak_mib": on.1, "without_rss_mib": off.0,
            "without_peak_mib": off.1, "with_ready_seconds": ready_on.as_secs_f64(),
            "without_ready_seconds": ready_off.as_secs_f64(), "restart_writes": restart_writes })
}
