//! B8: scale with cheap keys (10,000 ECDSA Services), then a restart with all of it present.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{
    Report, apiserver_writes, bulk_issue, diff, first_seen, has_cert, operator_writes, rss_mib, scaled, settled_with,
    support,
};
use support::{Env, Operator, eventually};

/// B8: scale with cheap keys: 10,000 ECDSA Services on a fresh operator instance (its
/// own CA): time until every Secret is valid, peak RSS and RSS per managed Service,
/// then a restart with all of it present: time to ready, and writes (none expected).
pub async fn b8_scale(cores: usize, report: &mut Report) -> Env {
    let env = Env::new("bench-b8").await;
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(60)).await;
    let bundle = env.ca_bundle().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle_rss, _) = rss_mib(&op);
    let secrets_seen = first_seen(env.secrets(), "service-ca.operators.openshift.io/managed=true", has_cert);
    let mut processes = settled_with(&op).await;
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
    let (restart, _op) = Restart::measure(&env, op, b8.n).await;
    restart.report(report);
    let mut json = b8.json();
    json.extend([
        ("idle_rss_mib".to_string(), json!(idle_rss)),
        ("rss_mib".to_string(), json!(rss)),
        ("peak_mib".to_string(), json!(peak)),
        ("rss_per_service_kib".to_string(), json!(per_service_kib)),
    ]);
    json.extend(restart.json());
    report.json.insert("b8".into(), Value::Object(json));
    env
}

/// What B8's restart with everything present measured.
struct Restart {
    ready: Duration,
    /// Until cert-refresh had looked at every Secret once.
    looked: Duration,
    op_writes: u64,
    /// API server writes to Secrets, Services, ConfigMaps and Events.
    api_writes: u64,
    rss: f64,
    peak: f64,
}

impl Restart {
    /// Stops `op` and starts the operator again with the `n` Services present; returns
    /// the figures and the restarted operator.
    async fn measure(env: &Env, op: Operator, n: usize) -> (Restart, Operator) {
        let before = apiserver_writes(&env.client).await;
        drop(op);
        let restarted = Instant::now();
        let op = env.start_operator(&[]);
        op.wait_ready(Duration::from_secs(120)).await;
        let ready = restarted.elapsed();
        // Until cert-refresh has looked at every Secret once (what a restart costs).
        let looked = eventually(Duration::from_secs(600), "cert-refresh to look at every Secret", || async {
            let page = op.metrics().await?.1;
            let done = support::metric(&page, "service_ca_reconcile_total{controller=\"cert-refresh\"") >= n as f64;
            done.then(|| restarted.elapsed())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let op_writes = operator_writes(&op.metrics().await.unwrap().1);
        let ours = ["secrets", "services", "configmaps", "events"];
        let api_writes: u64 = diff(&apiserver_writes(&env.client).await, &before)
            .iter()
            .filter(|((r, _), _)| ours.contains(&r.as_str()))
            .map(|(_, n)| n)
            .sum();
        let (rss, peak) = rss_mib(&op);
        (Restart { ready, looked, op_writes, api_writes, rss, peak }, op)
    }

    fn report(&self, report: &mut Report) {
        report.row(
            "B8 restart with everything present: ready after",
            format!("{:.1} s", self.ready.as_secs_f64()),
            "target <= 5 s",
        );
        report.row("B8 restart: every Secret looked at after", format!("{:.1} s", self.looked.as_secs_f64()), "");
        report.row(
            "B8 restart: writes by the operator / API server writes to Secrets, Services, ConfigMaps, Events",
            format!("{} / {}", self.op_writes, self.api_writes),
            "target 0",
        );
        report.row("B8 restart: RSS peak / current", format!("{:.1} / {:.1} MiB", self.peak, self.rss), "");
    }

    fn json(&self) -> [(String, Value); 6] {
        [
            ("restart_ready_seconds".to_string(), json!(self.ready.as_secs_f64())),
            ("restart_looked_at_all_seconds".to_string(), json!(self.looked.as_secs_f64())),
            ("restart_operator_writes".to_string(), json!(self.op_writes)),
            ("restart_apiserver_writes".to_string(), json!(self.api_writes)),
            ("restart_peak_mib".to_string(), json!(self.peak)),
            ("restart_rss_mib".to_string(), json!(self.rss)),
        ]
    }
}
