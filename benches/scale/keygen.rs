//! RSA-2048 key generation, ours (`PrivateKey::generate_rsa`) against Go's `crypto/rsa`
//! (benches/gokeys, built by scripts/bench.sh), side by side in one run: one thread,
//! then all cores. The two are interleaved, several rounds, each round Go first then
//! ours, and each figure is a median over the rounds; the ratio is taken within a round,
//! so that load from elsewhere on the machine hits both alike. Wall-clock time per key is
//! what issuance sees; CPU time per key is the library's own cost and is far steadier on
//! a loaded machine. (One key takes a random number of prime candidates: a round makes
//! several keys per side.)

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use service_ca_operator::pki::PrivateKey;

use super::{Report, scaled, support};

const ROUNDS: usize = 5;

/// (wall ms per key, CPU ms per key).
type PerKey = (f64, f64);

fn gokeys() -> String {
    std::env::var("SERVICE_CA_BENCH_GOKEYS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench/gokeys").to_string())
}

pub fn go(keys: usize, threads: usize) -> PerKey {
    let out = Command::new(gokeys())
        .args([keys.to_string(), threads.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/bench.sh builds it from benches/gokeys)", gokeys()));
    assert!(out.status.success(), "gokeys failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Vec<f64> = text.split_whitespace().map(|s| s.parse().unwrap()).collect();
    (v[0], v[1])
}

fn ours(keys: usize, threads: usize) -> PerKey {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let cpu = support::cpu_seconds(std::process::id());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < keys {
                    PrivateKey::generate_rsa(2048).unwrap();
                }
            });
        }
    });
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let cpu = (support::cpu_seconds(std::process::id()) - cpu) * 1000.0;
    (wall / keys as f64, cpu / keys as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// RSA-2048 ms per key, ours vs Go, with `threads` threads; the JSON of it.
fn compare(threads: usize, report: &mut Report) -> Value {
    // 16 keys per side and round with one thread, 8 per thread with more.
    let keys = scaled(16).max(threads * 8);
    let mut rounds: Vec<(PerKey, PerKey)> = Vec::new();
    for _ in 0..ROUNDS {
        let g = go(keys, threads);
        let o = ours(keys, threads);
        println!("    round: Go {:.1} ms/key (CPU {:.1}), ours {:.1} ms/key (CPU {:.1})", g.0, g.1, o.0, o.1);
        rounds.push((g, o));
    }
    let pick = |f: &dyn Fn(&(PerKey, PerKey)) -> f64| median(rounds.iter().map(f).collect());
    let (go_wall, go_cpu) = (pick(&|r| r.0.0), pick(&|r| r.0.1));
    let (our_wall, our_cpu) = (pick(&|r| r.1.0), pick(&|r| r.1.1));
    let (ratio_wall, ratio_cpu) = (pick(&|r| r.1.0 / r.0.0), pick(&|r| r.1.1 / r.0.1));
    report.row(
        &format!("RSA-2048 ms per key, {threads} thread(s), ours vs Go"),
        format!("{our_wall:.1} vs {go_wall:.1} ({ratio_wall:.2}x)"),
        "target <= 1.0x",
    );
    report.row(
        &format!("RSA-2048 CPU ms per key, {threads} thread(s), ours vs Go"),
        format!("{our_cpu:.1} vs {go_cpu:.1} ({ratio_cpu:.2}x)"),
        "",
    );
    json!({ "threads": threads, "keys_per_round": keys, "rounds": ROUNDS,
            "ours_ms_per_key": our_wall, "go_ms_per_key": go_wall, "ratio": ratio_wall,
            "ours_cpu_ms_per_key": our_cpu, "go_cpu_ms_per_key": go_cpu, "cpu_ratio": ratio_cpu })
}

/// Key generation, ours vs Go's `crypto/rsa`, one thread and `cores` threads; into
/// results.json as `rsa_keygen`.
pub fn rsa_vs_go(cores: usize, report: &mut Report) {
    println!("\nRSA-2048 key generation, ours vs Go's crypto/rsa ({ROUNDS} interleaved rounds, medians)");
    let one = compare(1, report);
    let all = compare(cores, report);
    report.json.insert("rsa_keygen".into(), json!({ "one_thread": one, "all_cores": all }));
}
