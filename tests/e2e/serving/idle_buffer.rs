//! Ready keys when idle (`--key-buffer-idle`): once no key has been asked for in a
//! minute, the default kind's ready keys grow from `--key-buffer` to the idle buffer,
//! and a burst of new Services then takes them instead of waiting for key generation.

use std::time::{Duration, Instant};

use crate::support::{Env, T, eventually, metric};

const GENERATED: &str = "service_ca_keys_generated_total";

#[tokio::test]
async fn a_burst_after_an_idle_minute_is_served_from_ready_keys() {
    let env = Env::new("idle-buffer").await;
    let started = Instant::now();
    let op = env.start_operator(&["--key-buffer", "1", "--key-buffer-idle", "8", "--max-concurrent-issuance", "1"]);
    env.ca_bundle().await;
    let generated = || async { Some(metric(&op.metrics().await?.1, GENERATED)) };

    // The CA's key and the base buffer's one; the idle buffer after the idle minute.
    eventually(T, "the CA key and one ready key", || async { (generated().await? == 2.0).then_some(()) }).await;
    eventually(Duration::from_secs(120), "the idle buffer filled", || async {
        (generated().await? >= 9.0).then_some(())
    })
    .await;
    let filled = started.elapsed();
    println!("idle buffer of 8 filled {:.1} s after the operator started", filled.as_secs_f64());
    assert!(filled >= Duration::from_secs(55), "grown before the pool was idle for a minute: {filled:?}");

    let before = generated().await.unwrap();
    let burst = Instant::now();
    env.annotated_services(8).await;
    for i in 0..8 {
        env.serving_secret(&format!("s{i}-tls"), T).await;
    }
    let took = burst.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let made = generated().await.unwrap() - before;
    println!("8 Services served in {:.2} s; keys generated meanwhile: {made}", took.as_secs_f64());
    // Only the base buffer's refill (1 key) once the ready keys are gone: without the
    // idle buffer, 7 of the 8 would have waited for a key of their own.
    assert!(made <= 1.0, "{made} keys generated for a burst of 8 with 8 ready");
}
