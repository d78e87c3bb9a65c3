//! Leader election: one writer, a fast handover, a paused leader, SIGTERM releasing
//! the lease, replicas started together.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{create_services, issued, leader, members};
use crate::support::{self, Env, Operator, T, eventually, metric};

#[tokio::test]
async fn replicas_started_together_elect_one_leader_each_under_its_own_field_manager() {
    // Three replicas race for a Lease nobody holds. The server-side apply that takes it
    // must conflict for all but the first: each replica writes under a field manager
    // of its own (with one shared manager, two could both apply and both lead until
    // the earlier one's next renewal — seen once under full-suite load).
    let env = Env::new("sharing-race").await;
    let ops = env.replicas(3, "8s", &[]);
    members(&ops, 3).await;
    let chief = leader(&env).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.op_ns);
    let lease = leases.get("service-ca-operator").await.unwrap();
    let holder_manager: Vec<String> = lease
        .managed_fields()
        .iter()
        .filter(|m| m.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:spec/f:holderIdentity").is_some()))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        holder_manager,
        [format!("service-ca-operator-lease-r{chief}")],
        "the holder field is the holder's own: {:?}",
        lease.managed_fields()
    );
    // For a lease period, exactly one replica says it leads.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let mut leading = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if op.admin_get("/readyz").await.is_some_and(|(_, body)| body.contains("ok: leader")) {
                leading.push(i);
            }
        }
        assert_eq!(leading, [chief], "replicas saying they lead");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Membership is decided by what this replica saw. Member Leases
/// "renewed" far in the future — one at the last instant a Lease can carry (which
/// k8s-openapi's timestamp type cannot even decode), one on 9999-01-01 — never change,
/// so they are not members: 20 new Services all get their Secret within 30 s, and no
/// replica restarts. Before the fix: the first Lease broke the member watch (no
/// replica ever became a member), the second would have taken a third of the Services.
#[tokio::test]
async fn phantom_member_leases_renewed_until_9999_take_no_share() {
    let env = Env::new("phantom-members").await;
    // Created untyped: k8s-openapi's Lease cannot hold the first renewTime.
    let resource = kube::core::ApiResource::erase::<Lease>(&());
    let leases: Api<kube::core::DynamicObject> = Api::namespaced_with(env.client.clone(), &env.op_ns, &resource);
    for (holder, renewed) in
        [("phantom-end", "9999-12-31T23:59:59.999999Z"), ("phantom-9999", "9999-01-01T00:00:00.000000Z")]
    {
        let lease: kube::core::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": format!("service-ca-operator-member-{holder}"),
                          "labels": { "service-ca.operators.openshift.io/member": "true" } },
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": 5, "renewTime": renewed }
        }))
        .unwrap();
        leases.create(&Default::default(), &lease).await.unwrap();
    }
    let mut ops = env.replicas(2, "5s", &[]);
    let started = Instant::now();
    let ready = eventually(super::T, "both replicas ready", || async {
        for op in &ops {
            op.admin_get("/readyz").await.filter(|(s, _)| *s == 200)?;
        }
        Some(started.elapsed())
    });
    // Before the fix the replicas never became ready: measure on, to show what was served.
    let ready = tokio::time::timeout(super::T, ready).await.ok();
    let created = Instant::now();
    create_services(&env, "svc", 20).await;
    let mut served = 0;
    while created.elapsed() < Duration::from_secs(30) {
        served = issued(&env).await.map(|m| m.len()).unwrap_or(0);
        if served == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut members = Vec::new();
    for op in &ops {
        members.push(op.metrics().await.map(|(_, page)| metric(&page, "service_ca_sharing_members")));
    }
    eprintln!(
        "ready after {ready:?}; {served} of 20 Secrets within {:?}; members seen by each replica: {members:?}",
        created.elapsed()
    );
    for op in &mut ops {
        assert!(op.running(), "a replica exited:\n{}", op.logs());
        assert!(!op.logs().contains("panicked"), "a replica panicked:\n{}", op.logs());
    }
    assert_eq!(served, 20, "Services left unserved with phantom members present");
    assert_eq!(members, vec![Some(2.0), Some(2.0)], "the phantoms must not count as members");
}

#[tokio::test]
async fn leader_election_one_writer_fast_handover_no_duplicate_issuance() {
    let env = Env::new("leader").await;
    let args = env.leader_elect_args("4s", &["--share-issuance=false"]);
    let mut a = Operator::start("leader-a", &args);
    a.wait_ready(T).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut b = Operator::start("leader-b", &args);
    b.wait_ready(T).await;
    let n = 20;
    for i in 0..n {
        env.annotated_service(&format!("s{i}"), &format!("s{i}-tls"), false).await;
    }
    for i in 0..n {
        env.serving_secret(&format!("s{i}-tls"), T).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = |metrics: &str, resource: &str, verb: &str| -> u64 {
        let key = format!("service_ca_api_writes_total{{resource=\"{resource}\",verb=\"{verb}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    let metrics_a = a.metrics().await.unwrap().1;
    let metrics_b = b.metrics().await.unwrap().1;
    let (leader, follower, leader_metrics, follower_metrics) = if writes(&metrics_a, "secrets", "create") > 0 {
        (&mut a, &mut b, metrics_a, metrics_b)
    } else {
        (&mut b, &mut a, metrics_b, metrics_a)
    };
    assert_eq!(
        writes(&leader_metrics, "secrets", "create"),
        n as u64 + 1,
        "the leader created the CA and one Secret per Service"
    );
    assert!(
        !follower_metrics.contains("service_ca_api_writes_total"),
        "the standby wrote nothing:\n{follower_metrics}"
    );
    assert!(follower.admin_get("/readyz").await.unwrap().1.contains("standby"));

    // Kill the leader (no chance to release the lease); measure the handover.
    let killed = Instant::now();
    leader.kill();
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.op_ns);
    eventually(Duration::from_secs(30), "the standby to take the lease", || async {
        let (_, body) = follower.admin_get("/readyz").await?;
        (!body.contains("standby")).then_some(())
    })
    .await;
    let handover = killed.elapsed();
    env.annotated_service("after", "after-tls", false).await;
    env.serving_secret("after-tls", T).await;
    let served = killed.elapsed();
    println!(
        "leader killed: standby took over after {handover:?}; a new Service was served {served:?} after the kill (lease 4 s)"
    );
    assert!(handover < Duration::from_secs(12), "handover took {handover:?}");
    let holder = leases.get("service-ca-operator").await.unwrap().spec.unwrap().holder_identity.unwrap();
    assert!(!holder.is_empty());

    // No duplicate issuance: the new leader issued only for the new Service.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = follower.metrics().await.unwrap().1;
    assert_eq!(writes(&m, "secrets", "create"), 1, "{m}");
    assert_eq!(writes(&m, "secrets", "update"), 0, "existing Secrets were not re-issued");
    let managed = env
        .secrets()
        .list(&ListParams::default().labels("service-ca.operators.openshift.io/managed=true"))
        .await
        .unwrap();
    assert_eq!(managed.items.len(), n + 1);
}

#[tokio::test]
async fn sigterm_finishes_work_and_releases_the_lease() {
    let env = Env::new("shutdown").await;
    let args = env.leader_elect_args("15s", &["--share-issuance=false"]);
    let mut first = Operator::start("shutdown-a", &args);
    first.wait_ready(T).await;
    env.annotated_service("s", "s-tls", false).await;
    env.serving_secret("s-tls", T).await;
    let status = first.stop().expect("exit status");
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let logs = first.logs();
    assert!(logs.contains("released the leader lease"), "{logs}");
    // A successor does not wait out the 15 s lease.
    let started = Instant::now();
    let second = Operator::start("shutdown-b", &args);
    second.wait_ready(T).await;
    let took = started.elapsed();
    println!("successor ready {took:?} after the previous leader exited on SIGTERM (lease 15 s)");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn a_paused_leader_that_lost_its_lease_signs_nothing_when_it_resumes() {
    let env = Env::new("paused").await;
    let args = env.leader_elect_args("4s", &["--share-issuance=false"]);
    let mut a = Operator::start("paused-a", &args);
    a.wait_ready(T).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut b = Operator::start("paused-b", &args);
    b.wait_ready(T).await;
    let n = 10;
    for i in 0..n {
        env.annotated_service(&format!("s{i}"), &format!("s{i}-tls"), false).await;
    }
    for i in 0..n {
        env.serving_secret(&format!("s{i}-tls"), T).await;
    }
    let (leader, follower) = if standby(&b).await { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let old_ca = support::certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());

    // The leader stops (SIGSTOP: no chance to release anything) ...
    crate::support::unsafe_free_signal(leader.pid(), "STOP");
    eventually(Duration::from_secs(30), "the standby to take over", || async {
        (!standby(follower).await).then_some(())
    })
    .await;
    // ... the new leader hard-resets the CA and re-issues everything ...
    env.hard_reset().await;
    let new_ca = eventually(T, "a new CA", || async {
        let s = env.op_secrets().get_opt("signing-key").await.ok()??;
        let ski = support::certs::ca_ski(&s);
        (ski != old_ca).then_some(ski)
    })
    .await;
    for i in 0..n {
        let name = format!("s{i}-tls");
        eventually(T, &format!("{name} from the new CA"), || async {
            (support::certs::leaf_aki(&env.secrets().get(&name).await.ok()?) == new_ca).then_some(())
        })
        .await;
    }
    // ... and a Service appears that the old leader would also like to serve.
    env.annotated_service("late", "late-tls", false).await;
    env.serving_secret("late-tls", T).await;

    // The old leader resumes: it exits without writing, and nothing from the old CA appears.
    crate::support::unsafe_free_signal(leader.pid(), "CONT");
    let resumed = Instant::now();
    while leader.running() {
        assert!(resumed.elapsed() < T, "the old leader did not exit after it resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("the paused leader exited {:?} after it resumed", resumed.elapsed());
    assert!(leader.logs().contains("lost the leader lease"), "{}", leader.logs());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(support::certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap()), new_ca, "still the new CA");
    for name in (0..n).map(|i| format!("s{i}-tls")).chain(["late-tls".to_string()]) {
        let secret = env.secrets().get(&name).await.unwrap();
        assert_eq!(support::certs::leaf_aki(&secret), new_ca, "{name}: signed by the new CA only");
    }
    let bundle = env.ca_bundle().await;
    assert_eq!(
        support::certs::ders(&bundle).len(),
        1,
        "the bundle holds the new CA alone (a hard reset has no bridge)"
    );
}

async fn standby(op: &Operator) -> bool {
    op.admin_get("/readyz").await.is_some_and(|(_, body)| body.contains("standby"))
}
