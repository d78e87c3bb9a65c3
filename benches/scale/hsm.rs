//! BENCH_ONLY=hsm (no cluster): the CA key in SoftHSM2 against the CA key in memory,
//! both ECDSA P-256 as a token CA is by default. Signing latency: one ECDSA P-256 leaf
//! issued by the CA (`CertificateAuthority::issue`, the leaf key made beforehand), one at
//! a time. Bulk issuance: leaves issued by one thread, then by one thread per core. The
//! token side goes through the operator's own code (one logged-in session per process,
//! as each replica has), so its signatures are serialised by that session, as they are
//! in the operator.
//!
//! SoftHSM2 reads SOFTHSM2_CONF when the module loads, and a process may not set its own
//! environment safely once threads run: the part runs this bench binary again as a
//! child with a scratch token of its own, and reads its figures back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use service_ca_operator::pki::pkcs11::{Token, TokenKey};
use service_ca_operator::pki::{CaPolicy, CertificateAuthority, KeyKind, LeafRequest, PrivateKey};
use time::OffsetDateTime;

use super::{Report, percentile, scaled};

/// Set for the child: where it writes its figures.
const CHILD: &str = "SERVICE_CA_BENCH_HSM_OUT";
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "bench-hsm";
const PIN: &str = "4711-bench";

/// The child's work, when this process is the child; `false` otherwise.
pub fn run_child_if_asked(cores: usize) -> bool {
    let Some(out) = std::env::var_os(CHILD) else { return false };
    let pin_file = Path::new(&out).with_file_name("pin");
    let figures = measure(&pin_file, cores);
    std::fs::write(&out, serde_json::to_string(&figures).unwrap()).unwrap();
    true
}

/// Makes a scratch token, runs the child on it, and records its figures as `hsm`.
pub fn hsm_vs_memory(report: &mut Report) {
    println!("\nCA key in SoftHSM2 vs in memory (ECDSA P-256 CA and leaves; no cluster)");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench/softhsm-{}", std::process::id()));
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    let config =
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display());
    std::fs::write(&conf, config).unwrap();
    std::fs::write(dir.join("pin"), format!("{PIN}\n")).unwrap();
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", "0815-so"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util (Debian package softhsm2)");
    assert!(init.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&init.stderr));
    let out = dir.join("figures.json");
    let status =
        Command::new(std::env::current_exe().unwrap()).env("SOFTHSM2_CONF", &conf).env(CHILD, &out).status().unwrap();
    assert!(status.success(), "the SoftHSM2 bench child failed");
    let figures: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for row in figures["rows"].as_array().unwrap() {
        let cell = |i: usize| row[i].as_str().unwrap_or_default().to_string();
        report.rows.push((cell(0), cell(1), cell(2)));
    }
    report.json.insert("hsm".into(), figures["hsm"].clone());
    let _ = std::fs::remove_dir_all(&dir);
}

fn request(i: usize) -> LeafRequest {
    LeafRequest {
        service: format!("svc{i}"),
        namespace: "bench".into(),
        uid: format!("uid-{i}"),
        headless: false,
        cluster_domain: "cluster.local".into(),
        key: KeyKind::EcdsaP256,
    }
}

/// Per-leaf issue latencies (ms) of `n` leaves issued one at a time.
fn latency(ca: &CertificateAuthority, keys: &[PrivateKey], n: usize) -> Value {
    let now = OffsetDateTime::now_utc();
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            let started = Instant::now();
            ca.issue(&request(i), &keys[i % keys.len()], now, Duration::from_secs(86_400)).unwrap();
            started.elapsed()
        })
        .collect();
    times.sort();
    let ms = |p: f64| percentile(&times, p).as_secs_f64() * 1e3;
    json!({ "leaves": n, "p50_ms": ms(0.5), "p99_ms": ms(0.99) })
}

/// Leaves per second issued by `threads` threads, `n` leaves in all.
fn bulk(ca: &CertificateAuthority, keys: &[PrivateKey], n: usize, threads: usize) -> f64 {
    let now = OffsetDateTime::now_utc();
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    ca.issue(&request(i), &keys[i % keys.len()], now, Duration::from_secs(86_400)).unwrap();
                }
            });
        }
    });
    n as f64 / started.elapsed().as_secs_f64()
}

/// The child: both CAs, their latencies and bulk rates; rows and JSON.
fn measure(pin_file: &Path, cores: usize) -> Value {
    let policy =
        CaPolicy { lifetime: Duration::from_secs(790 * 86_400), rotate_before: Duration::from_secs(395 * 86_400) };
    let now = OffsetDateTime::now_utc();
    let uri = format!("pkcs11:token={LABEL};object=bench-ca");
    let token = Token::open(Path::new(MODULE), &uri, PathBuf::from(pin_file), Box::new(|_| {})).unwrap();
    let token = Arc::new(token);
    let key = TokenKey::generate(&token, KeyKind::EcdsaP256).unwrap();
    let in_token = CertificateAuthority::create(key, now, &policy).unwrap();
    let in_memory =
        CertificateAuthority::create(PrivateKey::generate(KeyKind::EcdsaP256).unwrap(), now, &policy).unwrap();
    let n = scaled(1000);
    let keys: Vec<PrivateKey> = (0..n.min(256)).map(|_| PrivateKey::generate(KeyKind::EcdsaP256).unwrap()).collect();
    let mut rows: Vec<[String; 3]> = Vec::new();
    let mut row = |what: String, figure: String| {
        println!("  {what:<58} {figure}");
        rows.push([what, figure, String::new()]);
    };
    let mut sides = serde_json::Map::new();
    for (name, ca) in [("memory", &in_memory), ("softhsm2", &in_token)] {
        // Warm up: the token's key handle is found, code paths are paged in.
        latency(ca, &keys, 10);
        let lat = latency(ca, &keys, scaled(200));
        row(
            format!("issue one ECDSA leaf, CA key in {name}: p50 / p99"),
            format!("{:.2} / {:.2} ms", lat["p50_ms"].as_f64().unwrap(), lat["p99_ms"].as_f64().unwrap()),
        );
        let one = bulk(ca, &keys, n, 1);
        row(format!("bulk issuance, CA key in {name}, 1 thread ({n} leaves)"), format!("{one:.0} leaves/s"));
        let all = bulk(ca, &keys, n, cores);
        row(format!("bulk issuance, CA key in {name}, {cores} threads ({n} leaves)"), format!("{all:.0} leaves/s"));
        sides.insert(
            name.into(),
            json!({ "latency": lat, "leaves": n, "one_thread_per_s": one, "all_cores_per_s": all }),
        );
    }
    let ratio = |field: &str| sides["memory"][field].as_f64().unwrap() / sides["softhsm2"][field].as_f64().unwrap();
    let (one_ratio, all_ratio) = (ratio("one_thread_per_s"), ratio("all_cores_per_s"));
    row(
        "bulk issuance, memory / SoftHSM2".into(),
        format!("{one_ratio:.1}x (1 thread), {all_ratio:.1}x ({cores} threads)"),
    );
    sides.insert("cores".into(), json!(cores));
    json!({ "rows": rows, "hsm": sides })
}
