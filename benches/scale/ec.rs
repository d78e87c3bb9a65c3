//! B2-EC and B3-EC: bulk issuance and rotation with ECDSA P-256 serving keys.

use std::time::Duration;

use serde_json::Value;

use super::rotation::{b3_rotation, b4_injection};
use super::rsa::RsaRates;
use super::{Report, bulk_issue, first_seen, has_cert, scaled, settled_with, support, times};
use support::Env;

/// B2-EC and B3-EC: B2 and B3 with ECDSA P-256 serving keys (the annotation `ecdsa`),
/// on a second operator instance with its own CA and a selector, so that nothing of the
/// RSA part is re-issued.
pub async fn ec_benchmarks(rsa: Option<&RsaRates>, cores: usize, report: &mut Report) -> Env {
    let env = Env::new("bench-ec").await;
    let op = env.start_operator(&[]);
    op.wait_ready(Duration::from_secs(60)).await;
    let bundle = env.ca_bundle().await;
    let secrets_seen = first_seen(env.secrets(), "service-ca.operators.openshift.io/managed=true", has_cert);
    let mut processes = settled_with(&op).await;
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
