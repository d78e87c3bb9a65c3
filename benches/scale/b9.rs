//! B9: what tenants put in annotations does not stay in memory.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::ListParams;
use serde_json::json;

use super::{CREATE_CONCURRENCY, Report, rss_mib, scaled, support};
use support::{Env, eventually};

/// B9: what tenants put in annotations does not stay in memory: 500 annotated Services
/// each carrying an unrelated 200 KB annotation, created while the operator runs; then
/// a fresh start with all of them present.
pub async fn b9_tenant_annotations(report: &mut Report) -> Env {
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
