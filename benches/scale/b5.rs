//! B5: the operator's memory with everything managed, with many unrelated objects, and
//! after a fresh start.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use super::{CREATE_CONCURRENCY, Report, rss_mib, scaled, support};
use support::{Env, Operator};

/// Memory of the operator process (current, peak) in MiB at the points B5 reports.
pub struct MemorySoFar {
    pub idle_peak: f64,
    /// After B2, with every managed Service and Secret: (current, peak).
    pub managed: (f64, f64),
    pub managed_count: usize,
    pub injected_count: usize,
}

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

/// B5: memory, now (everything above in place), with many unrelated objects, and
/// after a fresh start with all of it present (`op` is stopped and a new operator
/// started with `args`).
pub async fn b5_memory(env: &Env, op: Operator, args: &[String], memory: &MemorySoFar, report: &mut Report) {
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
