//! B10, scale-out: bulk issuance with 1 replica and with 2 sharing it.

use std::time::{Duration, Instant};

use kube::api::ListParams;
use serde_json::json;

use super::{Report, control_plane_pids, create_services, has_cert, scaled, settle, support};
use support::{Env, Operator, cpu_seconds, eventually};

/// B10, scale-out: the same bulk issuance with 1 replica and with 2 sharing it, each
/// limited to one key-generation thread (`--max-concurrent-issuance 1`, the stand-in
/// for a one-core pod limit on this two-core machine), RSA-2048 keys, no ready keys.
pub async fn b10_scale_out(report: &mut Report) -> Vec<Env> {
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
