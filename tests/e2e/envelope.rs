//! The whole envelope at a tiny scale (issue 27; `BENCH_ONLY=envelope` runs it at
//! Kubernetes' limits): namespaces with their per-namespace bundles, Services with
//! ECDSA and RSA serving certificates, injected ConfigMaps, APIServices, CRDs and
//! webhook configurations, then a burst of pod certificate requests, a forced rotation,
//! a hard reset and a restart, on one operator. Asserts correctness and gross bounds
//! only: everything current after each phase, at most one write per object per event,
//! none after the restart.

use std::time::{Duration, Instant};

use crate::support::envelope::{Expected, Sizes, Watches, World, Writes, looked_at, series, set_up};
use crate::support::steps::metric_with;
use crate::support::{Env, Operator, eventually, metric, time_scale};

const SIZES: Sizes = Sizes {
    namespaces: 50,
    service_namespaces: 10,
    services: 50,
    configmaps: 20,
    cluster_objects: 5,
    pod_requests: 50,
    pod_namespaces: 2,
};
const T: Duration = Duration::from_secs(120);
/// An APIService or CRD takes two writes per bundle (measured, by design): the
/// injection (server-side apply), then the removal of the operator's managedFields
/// entry so that it blocks no other manager (ca_bundle's `Write::Disown`).
const CLUSTER: (&str, usize) = ("APIServices, CRDs, webhooks", 2);

/// [`SIZES`], times `SERVICE_CA_ENVELOPE_SCALE` if set (e.g. 20 for a heap profile of
/// the operator at a size between this smoke and the bench's).
fn sizes() -> Sizes {
    let k: f64 = std::env::var("SERVICE_CA_ENVELOPE_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let times = |n: usize| ((n as f64 * k).round() as usize).max(1);
    Sizes {
        namespaces: times(SIZES.namespaces),
        service_namespaces: times(SIZES.service_namespaces),
        services: times(SIZES.services),
        configmaps: times(SIZES.configmaps),
        // Not scaled: unavailable APIServices stall namespace deletion cluster-wide.
        cluster_objects: SIZES.cluster_objects,
        pod_requests: times(SIZES.pod_requests),
        pod_namespaces: SIZES.pod_namespaces,
    }
}

/// Prints the writes of a phase; asserts at most `most` on any object of each kind.
fn at_most(phase: &str, writes: &[(&str, Writes)], most: &[(&str, usize)]) {
    println!("{phase}: writes {writes:?}");
    for (kind, w) in writes {
        let limit = most.iter().find(|(k, _)| k == kind).map_or(1, |(_, n)| *n);
        assert!(
            w.max_per_object <= limit,
            "{phase}: {} writes on one of the {kind} (at most {limit}): {w:?}",
            w.max_per_object
        );
    }
}

/// Waits for every object to be current with `expected`; checks every Secret verifies.
async fn all_current(env: &Env, world: &World, watches: &Watches, expected: &Expected, since: Instant) -> Duration {
    let (took, checked, invalid) = watches.all_current_checked(world, &env.client, expected, T, since).await;
    assert_eq!((checked, invalid), (world.sizes.services, 0), "serving Secrets (checked, invalid)");
    took
}

#[tokio::test]
async fn envelope_start_burst_rotation_reset_restart_all_current_one_write_each() {
    let env = Env::new("envelope").await;
    let sizes = sizes();
    let (world, watches, created, pods) = set_up(&env, sizes, true).await;
    println!("created {sizes:?} in {created:.1?}, pods in {pods:.1?}; time scale {:.1}", time_scale());

    // Start -> everything current: one write per Secret, Service, bundle, injected object.
    let mark = watches.mark();
    let started = Instant::now();
    let op = Operator::start_with_kubeconfig(&env.name, &world.operator_args(&env, &[]), &env.kubeconfig);
    op.wait_ready(T).await;
    let first = Expected::now(&env).await;
    let took = all_current(&env, &world, &watches, &first, started).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    at_most("start", &watches.writes(&mark), &[CLUSTER]);
    println!("start -> all current {took:.1?}");

    // Burst of pod requests -> every one issued, one status write each (+ its creation).
    let mark = watches.mark();
    let started = Instant::now();
    world.burst().await;
    let (issued, last) = watches.requests_answered(sizes.pod_requests, T).await;
    assert_eq!(issued, sizes.pod_requests, "every pod request issued");
    tokio::time::sleep(Duration::from_secs(3)).await;
    at_most("burst", &watches.writes(&mark), &[("pod requests", 2)]);
    println!("burst -> all issued {:.1?}", last - started);

    // Forced rotation, then a hard reset: everything current with the new CA, one
    // write per Secret and per bundle.
    let mut expected = first;
    for phase in ["rotation", "reset"] {
        let mark = watches.mark();
        let started = Instant::now();
        if phase == "rotation" {
            env.force_rotation("envelope").await;
        } else {
            env.hard_reset().await;
        }
        expected = Expected::changed_from(&env, &expected).await;
        let took = all_current(&env, &world, &watches, &expected, started).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        at_most(phase, &watches.writes(&mark), &[CLUSTER]);
        println!("{phase} -> all current {took:.1?}");
    }

    // Restart: ready, every object looked at, no write.
    drop(op);
    let mark = watches.mark();
    let started = Instant::now();
    let op = Operator::start_with_kubeconfig(&env.name, &world.operator_args(&env, &[]), &env.kubeconfig);
    op.wait_ready(T).await;
    let ready = started.elapsed();
    eventually(T, "every object looked at after the restart", || async {
        looked_at(&op.metrics().await?.1, &sizes).then_some(())
    })
    .await;
    let looked = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = watches.writes(&mark);
    // The operator's own count also sees a write the API server found changed nothing.
    let page = op.metrics_page().await;
    let counted = metric(&page, "service_ca_api_writes_total")
        - metric_with(&page, "service_ca_api_writes_total", &[("resource", "leases")]);
    println!("restart: ready {ready:.1?}, all looked at {looked:.1?}; {} series on /metrics", series(&page));
    at_most("restart", &writes, &[]);
    assert!(writes.iter().all(|(_, w)| w.total == 0), "writes after a restart with everything current: {writes:?}");
    assert_eq!(counted, 0.0, "writes the restarted operator counted");
    assert!(ready < Duration::from_secs(30).mul_f64(time_scale()), "ready after {ready:?}");
}
