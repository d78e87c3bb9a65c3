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
//! (benches/scale/namespaces.rs; NS_COUNT sets how many), and the whole envelope in one
//! replica (benches/scale/envelope.rs). Prints a table and writes
//! target/bench/results.json. Sizes scale with BENCH_SCALE (default 1.0);
//! BENCH_ONLY=rsa,ec,b8,b9,b10,fairness,namespaces,envelope (any of them) runs only those parts
//! (rsa includes the backlog drain, benches/scale/backlog.rs; BENCH_ONLY=backlog runs it alone);
//! BENCH_ONLY=keygen only the key-generation comparison (no cluster); BENCH_ONLY=hsm
//! only the CA key in SoftHSM2 vs in memory (benches/scale/hsm.rs; no cluster).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "scale/b10.rs"]
mod b10;
#[path = "scale/b5.rs"]
mod b5;
#[path = "scale/b8.rs"]
mod b8;
#[path = "scale/b9.rs"]
mod b9;
#[path = "scale/backlog.rs"]
mod backlog;
#[path = "scale/common.rs"]
mod common;
#[path = "scale/ec.rs"]
mod ec;
#[path = "scale/envelope.rs"]
mod envelope;
#[path = "scale/fairness.rs"]
mod fairness;
#[path = "scale/hsm.rs"]
mod hsm;
#[path = "scale/keygen.rs"]
mod keygen;
#[path = "scale/namespaces.rs"]
mod namespaces;
#[path = "scale/rotation.rs"]
mod rotation;
#[path = "scale/rsa.rs"]
mod rsa;

// The parts reach what they share as `super::…`.
use common::*;
use serde_json::Value;

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
    if part("rsa") || part("backlog") {
        backlog::backlog(cores, &mut report).await;
    }
    if part("hsm") {
        hsm::hsm_vs_memory(&mut report);
    }
    if part("rsa") {
        let (env, rates) = rsa::rsa_benchmarks(cores, &mut report).await;
        envs.push(env);
        rsa = Some(rates);
    }
    if part("ec") {
        envs.push(ec::ec_benchmarks(rsa.as_ref(), cores, &mut report).await);
    }
    if part("b8") {
        envs.push(b8::b8_scale(cores, &mut report).await);
    }
    if part("b9") {
        envs.push(b9::b9_tenant_annotations(&mut report).await);
    }
    if part("b10") {
        envs.extend(b10::b10_scale_out(&mut report).await);
    }
    if part("fairness") {
        envs.extend(fairness::fairness(&mut report).await);
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
