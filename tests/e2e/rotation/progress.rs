//! The progress of the bulk re-issue after a CA change (docs/operations.md, "Progress of
//! a bulk re-issue"): logged with an ETA while it runs, `service_ca_reissue_remaining`
//! back to 0 at the end — also when the rotation was forced before the operator
//! started, so that the first CA it loads is already the new one.

use std::time::{Duration, Instant};

use kube::api::ListParams;

use crate::support::{Env, Operator, eventually, time_scale};

const LINE: &str = "re-issue after the CA change";

/// `n` Services and their Secrets, issued by an operator started with `args` and
/// stopped again (with every core and ready keys: the first issuance is not what is
/// tested).
async fn issue_then_stop(env: &Env, n: usize, args: &[&str]) {
    let started = Instant::now();
    let mut op = env.start_operator(args);
    futures::future::join_all(
        (0..n).map(|i| async move { env.annotated_service(&format!("p{i}"), &format!("p{i}-tls"), false).await }),
    )
    .await;
    let managed = ListParams::default().labels("service-ca.operators.openshift.io/managed=true");
    eventually(Duration::from_secs(60).mul_f64(time_scale()), "every Secret", || async {
        (env.secrets().list_metadata(&managed).await.ok()?.items.len() >= n).then_some(())
    })
    .await;
    op.stop();
    println!("first issuance of {n} Secrets in {:.1} s", started.elapsed().as_secs_f64());
}

/// Waits for the line that ends the re-issue of `n` Secrets, prints every progress
/// line, and checks the gauge is back to 0; returns the lines.
async fn finished(op: &Operator, n: usize) -> Vec<String> {
    let started = Instant::now();
    let last = format!("{LINE}: {n} of {n} Secrets done ({n} re-issued) in ");
    eventually(Duration::from_secs(60).mul_f64(time_scale()), "the re-issue to finish", || async {
        op.logs().contains(&last).then_some(())
    })
    .await;
    let lines: Vec<String> = op.logs().lines().filter(|l| l.contains(LINE)).map(str::to_string).collect();
    for line in &lines {
        println!("{}", line.split("INFO").last().unwrap_or(line));
    }
    println!("re-issue of {n} seen finished {:.1} s after the wait began", started.elapsed().as_secs_f64());
    let page = op.metrics().await.unwrap().1;
    assert!(page.contains("service_ca_reissue_remaining 0"), "nothing left");
    lines
}

#[tokio::test]
async fn bulk_reissue_after_a_rotation_reports_progress_with_an_eta() {
    let env = Env::new("progress").await;
    let n = 24;
    issue_then_stop(&env, n, &[]).await;
    // One key at a time, no ready keys: the re-issue takes a few seconds.
    let op = env.start_operator(&["--progress-interval", "1s", "--max-concurrent-issuance", "1", "--key-buffer", "0"]);
    op.wait_ready(Duration::from_secs(60)).await;
    env.force_rotation("progress").await;
    let lines = finished(&op, n).await;
    assert!(lines.iter().any(|l| l.contains(&format!(" of {n} Secrets done")) && l.contains("ETA")), "{lines:?}");
}

#[tokio::test]
async fn a_rotation_forced_before_start_up_reports_its_re_issue_progress() {
    let env = Env::new("progress-at-start").await;
    // ECDSA keys: the pacing is not the point here, whether the re-issue is seen is.
    let ecdsa = ["--default-key-algorithm", "ecdsa", "--progress-interval", "1s"];
    let n = 20;
    issue_then_stop(&env, n, &ecdsa).await;
    // Asked for while no operator runs: the next one rotates before it loads any CA.
    env.force_rotation("before-start").await;
    let op = env.start_operator(&ecdsa);
    let lines = finished(&op, n).await;
    assert!(op.logs().contains("forced rotation (reason \"before-start\")"), "rotated at start-up");
    assert_eq!(lines.iter().filter(|l| l.contains(" in ")).count(), 1, "one re-issue, ended once: {lines:?}");
}
