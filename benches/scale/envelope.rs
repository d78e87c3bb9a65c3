//! `BENCH_ONLY=envelope`: the whole envelope in one replica (issue 27), at Kubernetes'
//! documented limits by default (BENCH_SCALE scales every count): 10,000 namespaces,
//! each with its per-namespace bundle; 10,000 Services (80 % ECDSA, 20 % RSA-2048) in
//! 1,000 of them; 2,000 injected ConfigMaps; 100 APIServices, CRDs and webhook
//! configurations. All created before the operator starts (tests/support/envelope
//! makes them and follows every object by watch). Phases: start -> all current; a
//! burst of 5,000 pod certificate requests -> all issued; forced rotation and hard
//! reset -> all current with the new CA; restart -> ready, everything looked at, no
//! write. Each phase: time, operator CPU against the control plane's (RSA key
//! generation estimated on its own line), peak and steady RSS, writes per object,
//! series on `/metrics`. Then a forced rotation with 3 replicas sharing issuance.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use service_ca_operator::pki::PrivateKey;

use super::{Report, apiserver_writes, control_plane_pids, diff, rss_mib, scaled, settle, support};
use support::envelope::{Expected, Sizes, Watches, World, looked_at, series, set_up};
use support::{Env, Operator, cpu_seconds, eventually};

const WAIT: Duration = Duration::from_secs(3600);
/// What the operator writes (the API server's counters, per resource).
const OURS: [&str; 9] = [
    "secrets",
    "services",
    "configmaps",
    "apiservices",
    "customresourcedefinitions",
    "validatingwebhookconfigurations",
    "mutatingwebhookconfigurations",
    "podcertificaterequests",
    "events",
];

fn sizes() -> Sizes {
    let namespaces = scaled(10_000);
    let service_namespaces = (namespaces / 10).max(1);
    Sizes {
        namespaces,
        service_namespaces,
        services: scaled(10_000).max(service_namespaces),
        configmaps: scaled(2_000),
        cluster_objects: scaled(100),
        pod_requests: scaled(5_000),
        pod_namespaces: service_namespaces.min(10),
    }
}

/// Milliseconds per RSA-2048 key on one thread of this machine (12 keys, cluster idle).
fn ms_per_rsa_key() -> f64 {
    let started = Instant::now();
    for _ in 0..12 {
        PrivateKey::generate_rsa(2048).unwrap();
    }
    started.elapsed().as_secs_f64() * 1e3 / 12.0
}

/// Resets the peak RSS (VmHWM) of `pid` (a child of ours), so that the next reading is
/// the peak of what follows.
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Counters at the start of a phase.
struct Mark {
    at: Instant,
    cpu: Vec<f64>,
    watched: Vec<HashMap<String, usize>>,
    apiserver: BTreeMap<(String, String), u64>,
}

impl Mark {
    async fn now(env: &Env, watches: &Watches, processes: &[(&'static str, u32)]) -> Mark {
        for (name, pid) in processes {
            if *name == "operator" {
                reset_peak(*pid);
            }
        }
        Mark {
            at: Instant::now(),
            cpu: processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect(),
            watched: watches.mark(),
            apiserver: apiserver_writes(&env.client).await,
        }
    }
}

/// Everything the bench needs across phases.
struct Bench<'a> {
    env: &'a Env,
    world: &'a World,
    watches: &'a Watches,
    control_plane: Vec<(&'static str, u32)>,
    ms_per_key: f64,
    json: serde_json::Map<String, Value>,
}

impl Bench<'_> {
    fn processes(&self, ops: &[&Operator]) -> Vec<(&'static str, u32)> {
        let mut out = self.control_plane.clone();
        out.extend(ops.iter().map(|op| ("operator", op.pid())));
        out
    }

    /// Reports a phase that took `took` since `mark`: CPU per process (RSA keys `rsa`
    /// of it estimated), RSS (peak since the mark, then steady once the cluster settled),
    /// writes per object and in all, series on `/metrics`.
    async fn phase(
        &mut self,
        label: &str,
        took: Duration,
        mark: &Mark,
        op: &Operator,
        rsa: usize,
        report: &mut Report,
    ) {
        let processes = self.processes(&[op]);
        let used: Vec<(&str, f64)> = processes
            .iter()
            .zip(&mark.cpu)
            .map(|((name, pid), before)| (*name, (cpu_seconds(*pid) - before).max(0.0)))
            .collect();
        let of = |name: &str| used.iter().filter(|(n, _)| *n == name).map(|(_, s)| s).sum::<f64>();
        let keygen = rsa as f64 * self.ms_per_key / 1e3;
        let (operator, apiserver) = (of("operator"), of("kube-apiserver"));
        let window = mark.at.elapsed().as_secs_f64();
        let (_, peak) = rss_mib(op);
        let watched = self.watches.writes(&mark.watched);
        let api = diff(&apiserver_writes(&self.env.client).await, &mark.apiserver);
        let api: BTreeMap<String, u64> = api
            .iter()
            .filter(|((r, _), _)| OURS.contains(&r.as_str()))
            .map(|((r, v), n)| (format!("{r} {v}"), *n))
            .collect();
        settle(&processes).await;
        let (steady, _) = rss_mib(op);
        let page = op.metrics().await.map(|(_, p)| p).unwrap_or_default();
        let n_series = series(&page);
        report.row(&format!("Envelope {label}: time"), format!("{:.1} s", took.as_secs_f64()), "");
        report.row(
            &format!("Envelope {label}: CPU-s operator / kube-apiserver / etcd"),
            format!("{operator:.1} / {apiserver:.1} / {:.1} ({window:.0} s window)", of("etcd + harness")),
            "target operator < kube-apiserver",
        );
        report.row(
            &format!("Envelope {label}: operator CPU-s without RSA keys / RSA keys (est.)"),
            format!("{:.1} / {keygen:.1} ({rsa} keys x {:.0} ms)", (operator - keygen).max(0.0), self.ms_per_key),
            "target < kube-apiserver",
        );
        report.row(
            &format!("Envelope {label}: RSS peak / steady"),
            format!("{peak:.1} / {steady:.1} MiB"),
            "target <= 192 / <= 128 MiB",
        );
        let text: Vec<String> = watched
            .iter()
            .filter(|(_, w)| w.total > 0)
            .map(|(k, w)| format!("{k} {} (max {})", w.total, w.max_per_object))
            .collect();
        let text = if text.is_empty() { "none".to_string() } else { text.join(", ") };
        let target = match label {
            "restart" => "target 0",
            "burst" => "target 2 per request (its creation, its answer)",
            _ => "target max 1 per object",
        };
        report.row(&format!("Envelope {label}: writes watched (max on one object)"), text, target);
        let total: u64 = api.values().sum();
        report.row(&format!("Envelope {label}: API server writes"), format!("{total}: {api:?}"), "");
        report.row(&format!("Envelope {label}: series on /metrics"), n_series.to_string(), "target <= 2,000");
        let cpu: BTreeMap<&str, f64> = used.iter().copied().collect();
        self.json.insert(
            label.replace(' ', "_"),
            json!({ "seconds": took.as_secs_f64(), "cpu_seconds": cpu, "rsa_keys": rsa, "rsa_keygen_cpu_seconds_est": keygen,
                    "peak_rss_mib": peak, "steady_rss_mib": steady, "series": n_series, "apiserver_writes": api,
                    "watched_writes": watched.iter().map(|(k, w)| (k.to_string(), *w)).collect::<BTreeMap<_, _>>() }),
        );
    }

    /// Waits until everything holds `expected`; checks every Secret against its bundle.
    async fn all_current(&self, expected: &Expected, since: Instant, report: &mut Report, label: &str) -> Duration {
        let (took, checked, invalid) =
            self.watches.all_current_checked(self.world, &self.env.client, expected, WAIT, since).await;
        report.row(
            &format!("Envelope {label}: serving Secrets checked / invalid"),
            format!("{checked} / {invalid}"),
            "target n / 0",
        );
        took
    }
}

/// The part: see the module's comment.
pub async fn envelope(report: &mut Report) -> Env {
    let sizes = sizes();
    let env = Env::new("bench-envelope").await;
    let ms_per_key = ms_per_rsa_key();
    let (world, watches, created, pods) = set_up(&env, sizes, false).await;
    let control_plane = control_plane_pids();
    settle(&control_plane).await;
    println!("\nEnvelope: {sizes:?} created in {created:.1?}, pods in {pods:.1?}; {ms_per_key:.0} ms per RSA-2048 key");
    let mut bench =
        Bench { env: &env, world: &world, watches: &watches, control_plane, ms_per_key, json: Default::default() };
    let op = one_replica(&mut bench, report).await;
    drop(op);
    let shares = three_replicas(&mut bench, report).await;
    let mut json = std::mem::take(&mut bench.json);
    json.insert("sizes".into(), json!(format!("{sizes:?}")));
    json.insert("create_seconds".into(), json!(created.as_secs_f64()));
    json.insert("ms_per_rsa_key".into(), json!(ms_per_key));
    json.insert("three_replicas".into(), shares);
    report.json.insert("envelope".into(), Value::Object(json));
    drop(world);
    env
}

/// Start, burst, rotation, reset, restart on one replica; returns the operator.
async fn one_replica(bench: &mut Bench<'_>, report: &mut Report) -> Operator {
    let (env, world, sizes) = (bench.env, bench.world, bench.world.sizes);
    let args = world.operator_args(env, &[]);
    let mark = Mark::now(env, bench.watches, &bench.control_plane).await;
    let op = Operator::start_with_kubeconfig(&env.name, &args, &env.kubeconfig);
    let mut mark = mark;
    mark.cpu.push(cpu_seconds(op.pid()));
    op.wait_ready(Duration::from_secs(300)).await;
    let ready = mark.at.elapsed();
    let mut expected = Expected::now(env).await;
    let took = bench.all_current(&expected, mark.at, report, "start").await;
    report.row("Envelope start: ready after", format!("{:.1} s", ready.as_secs_f64()), "");
    bench.phase("start", took, &mark, &op, sizes.rsa_services(), report).await;

    let mark = Mark::now(env, bench.watches, &bench.processes(&[&op])).await;
    let burst = world.burst().await;
    let (issued, last) = bench.watches.requests_answered(sizes.pod_requests, WAIT).await;
    report.row(
        "Envelope burst: requests issued / created in",
        format!("{issued} of {} / {:.1} s", sizes.pod_requests, burst.as_secs_f64()),
        "target all",
    );
    bench.phase("burst", last - mark.at, &mark, &op, 0, report).await;

    for phase in ["rotation", "reset"] {
        let mark = Mark::now(env, bench.watches, &bench.processes(&[&op])).await;
        if phase == "rotation" {
            env.force_rotation("bench").await;
        } else {
            env.hard_reset().await;
        }
        expected = Expected::changed_from(env, &expected).await;
        let took = bench.all_current(&expected, mark.at, report, phase).await;
        bench.phase(phase, took, &mark, &op, sizes.rsa_services(), report).await;
    }
    drop(op);
    restart(bench, &args, report).await
}

/// A restart with everything current: ready, every object looked at, writes (none).
async fn restart(bench: &mut Bench<'_>, args: &[String], report: &mut Report) -> Operator {
    let (env, sizes) = (bench.env, bench.world.sizes);
    let mut mark = Mark::now(env, bench.watches, &bench.control_plane).await;
    let op = Operator::start_with_kubeconfig(&env.name, args, &env.kubeconfig);
    mark.cpu.push(cpu_seconds(op.pid()));
    op.wait_ready(Duration::from_secs(300)).await;
    let ready = mark.at.elapsed();
    let looked = eventually(Duration::from_secs(600), "every object looked at", || async {
        let page = op.metrics().await?.1;
        looked_at(&page, &sizes).then(|| mark.at.elapsed())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    report.row("Envelope restart: ready after", format!("{:.1} s", ready.as_secs_f64()), "target <= 5 s");
    report.row(
        "Envelope restart: every object looked at after",
        format!("{:.1} s", looked.as_secs_f64()),
        "target <= 30 s",
    );
    bench.phase("restart", looked, &mark, &op, 0, report).await;
    if let Some(Value::Object(restart)) = bench.json.get_mut("restart") {
        restart.insert("ready_seconds".into(), json!(ready.as_secs_f64()));
    }
    op
}

/// A forced rotation with 3 replicas sharing issuance: time to all current, each
/// replica's share of the certificates issued, and its RSS.
async fn three_replicas(bench: &mut Bench<'_>, report: &mut Report) -> Value {
    let (env, world, sizes) = (bench.env, bench.world, bench.world.sizes);
    let ops: Vec<Operator> = (0..3)
        .map(|i| {
            let identity = format!("r{i}");
            let mut args = world.operator_args(env, &["--lease-identity", &identity, "--lease-duration", "15s"]);
            args.retain(|a| a != "--leader-elect=false");
            args.push("--leader-elect=true".into());
            Operator::start_with_kubeconfig(&env.name, &args, &env.kubeconfig)
        })
        .collect();
    eventually(Duration::from_secs(300), "3 replicas sharing", || async {
        for op in &ops {
            let page = op.metrics().await?.1;
            (support::metric(&page, "service_ca_sharing_members") == 3.0).then_some(())?;
            op.admin_get("/readyz").await.filter(|(s, _)| *s == 200)?;
        }
        Some(())
    })
    .await;
    let issued = |page: &str| support::metric(page, "service_ca_certificates_issued_total");
    let mut before = Vec::new();
    for op in &ops {
        before.push(issued(&op.metrics_page().await));
    }
    let old = Expected::now(env).await;
    let refs: Vec<&Operator> = ops.iter().collect();
    let processes = bench.processes(&refs);
    settle(&processes).await;
    let mark = Mark::now(env, bench.watches, &processes).await;
    env.force_rotation("bench-3").await;
    let expected = Expected::changed_from(env, &old).await;
    let took = bench.all_current(&expected, mark.at, report, "3 replicas rotation").await;
    let mut shares = Vec::new();
    for (op, before) in ops.iter().zip(&before) {
        shares.push(issued(&op.metrics_page().await) - before);
    }
    let total: f64 = shares.iter().sum::<f64>().max(1.0);
    let rss: Vec<(f64, f64)> = ops.iter().map(rss_mib).collect();
    let text: Vec<String> = shares.iter().map(|s| format!("{:.0} %", s / total * 100.0)).collect();
    report.row(
        "Envelope 3 replicas, forced rotation: all current after",
        format!("{:.1} s ({} Services)", took.as_secs_f64(), sizes.services),
        "",
    );
    report.row("Envelope 3 replicas: share of certificates issued", text.join(", "), "target 33 % +- 10 %");
    let text: Vec<String> = rss.iter().map(|(c, p)| format!("{c:.0}/{p:.0}")).collect();
    report.row("Envelope 3 replicas: RSS current/peak per replica (MiB)", text.join(", "), "");
    json!({ "seconds": took.as_secs_f64(), "issued": shares, "rss_mib": rss })
}
