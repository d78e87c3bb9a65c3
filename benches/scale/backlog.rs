//! Backlog drain (`BENCH_ONLY=rsa`, or `backlog` alone): 300 RSA-2048 Services created
//! while the operator is stopped (its CA already made); the time from its start until
//! every Secret holds a valid certificate, against the time Go's `crypto/rsa` takes to
//! make as many keys on all cores (benches/gokeys), measured just before and just after
//! on the same idle cluster (their mean). Also the CPU of the operator's key threads
//! (`keygen-*`) against the control plane's during the drain.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use serde_json::json;

use super::{
    Report, apiserver_requests, control_plane_pids, create_services, diff, first_seen, has_cert, invalid_secrets,
    keygen, sample_waiting, scaled, settle, support, threads_cpu_seconds,
};
use support::{Env, cpu_seconds, eventually};

/// Go's wall-clock time for `n` RSA-2048 keys on `cores` goroutines.
fn go_time(n: usize, cores: usize) -> Duration {
    let (ms_per_key, _) = keygen::go(n, cores);
    Duration::from_secs_f64(ms_per_key * n as f64 / 1000.0)
}

/// Runs the drain, then deletes its namespaces and waits until they are gone: the RSA
/// part's operator watches every namespace and would otherwise re-issue these 300
/// Secrets (signed by this part's CA) under B1 and B2.
pub async fn backlog(cores: usize, report: &mut Report) {
    let n = scaled(300);
    let env = Env::new("bench-backlog").await;
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(60)).await;
    let bundle = env.ca_bundle().await;
    drop(op);
    let created = create_services(&env, "b", n, None).await;
    let secrets_seen = first_seen(env.secrets(), "service-ca.operators.openshift.io/managed=true", has_cert);
    let processes = control_plane_pids();
    settle(&processes).await;
    let go_before = go_time(n, cores);
    settle(&processes).await;

    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let requests_before = apiserver_requests(&env.client, VERBS).await;
    let started = Instant::now();
    let op = env.start_operator(&[]);
    let (stop, waiting) = sample_waiting(op.pid(), "keygen-");
    let took = eventually(Duration::from_secs(1800), "every backlog Secret", || {
        let seen = secrets_seen.lock().unwrap();
        let last = created.keys().map(|k| seen.get(k).copied()).collect::<Option<Vec<_>>>();
        async move { Some(last?.into_iter().max()? - started) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let requests = diff(&apiserver_requests(&env.client, VERBS).await, &requests_before);
    let waiting = waiting.join().unwrap();
    let keys_cpu = threads_cpu_seconds(op.pid(), "keygen-");
    let operator_cpu = cpu_seconds(op.pid());
    let mut cpu: Vec<(&str, f64)> =
        processes.iter().zip(&cpu_before).map(|((name, pid), before)| (*name, cpu_seconds(*pid) - before)).collect();
    cpu.extend([("operator", operator_cpu), ("operator key threads", keys_cpu)]);
    let invalid = invalid_secrets(&env, &bundle, |name| created.contains_key(name)).await;
    drop(op);
    settle(&processes).await;
    let go_after = go_time(n, cores);
    let go = (go_before + go_after) / 2;
    let ratio = took.as_secs_f64() / go.as_secs_f64();

    println!("\nBacklog drain ({n} RSA-2048 Services created while the operator was stopped)");
    report.row(
        "Backlog: operator start -> every Secret valid",
        format!("{:.1} s ({invalid} invalid)", took.as_secs_f64()),
        "",
    );
    report.row(
        &format!("Backlog: Go crypto/rsa, {n} keys on {cores} cores (before / after)"),
        format!("{:.1} s ({:.1} / {:.1})", go.as_secs_f64(), go_before.as_secs_f64(), go_after.as_secs_f64()),
        "",
    );
    report.row("Backlog: ratio to Go's time", format!("{ratio:.2}x"), "target <= 1.33x");
    report.row(
        "Backlog: key threads waiting for work (share of 10 ms samples)",
        format!("{:.0} %", waiting * 100.0),
        "",
    );
    let available = took.as_secs_f64() * cores as f64;
    for (name, used) in &cpu {
        report.row(
            &format!("Backlog CPU used by {name}"),
            format!("{used:.1} s ({:.0} % of {cores} CPUs)", used / available * 100.0),
            "",
        );
    }
    report_requests(report, &requests, n);
    report.json.insert(
        "backlog".into(),
        json!({ "n": n, "seconds": took.as_secs_f64(), "invalid": invalid, "go_seconds": go.as_secs_f64(),
                "go_before_seconds": go_before.as_secs_f64(), "go_after_seconds": go_after.as_secs_f64(),
                "ratio": ratio, "key_threads_waiting": waiting, "cpu_seconds": cpu.iter().map(|(n, c)| (n.to_string(), json!(c))).collect::<serde_json::Map<_, _>>(),
                "apiserver_requests": requests.iter().map(|((r, v), c)| (format!("{r} {v}"), json!(c))).collect::<serde_json::Map<_, _>>() }),
    );
    delete_and_wait(env).await;
    settle(&processes).await;
}

/// Every verb the API server counts.
const VERBS: &[&str] = &["GET", "LIST", "WATCH", "POST", "PUT", "PATCH", "APPLY", "DELETE"];

/// The requests counted during the drain (the operator's, and the one watch that
/// times it): per certificate, and the six most frequent kinds.
fn report_requests(report: &mut Report, requests: &BTreeMap<(String, String), u64>, n: usize) {
    let total: u64 = requests.values().sum();
    let mut most: Vec<_> = requests.iter().collect();
    most.sort_by_key(|(_, count)| std::cmp::Reverse(**count));
    let most: Vec<String> = most.iter().take(6).map(|((r, v), c)| format!("{v} {r} {c}")).collect();
    report.row(
        "Backlog: API requests during the drain (per certificate)",
        format!("{total} ({:.1}): {}", total as f64 / n as f64, most.join(", ")),
        "",
    );
}

/// Deletes the part's namespaces (dropping its `Env`) and waits until they are gone.
async fn delete_and_wait(env: Env) {
    let (client, names) = (env.client.clone(), [env.ns.clone(), env.op_ns.clone()]);
    drop(env);
    let namespaces: Api<Namespace> = Api::all(client);
    eventually(Duration::from_secs(600), "the backlog's namespaces deleted", || {
        let (namespaces, names) = (namespaces.clone(), names.clone());
        async move {
            for name in &names {
                if namespaces.get_opt(name).await.ok()?.is_some() {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}
