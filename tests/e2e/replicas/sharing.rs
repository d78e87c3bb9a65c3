//! Every replica signs: issuance shared across replicas through membership
//! Leases and rendezvous hashing, while the CA and injection stay with the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use super::{MANAGED_SELECTOR, T, create_services, issued, leader, members, record_certificates, rv};
use crate::support::{Env, Operator, certs, data, eventually, metric};

#[tokio::test]
async fn three_replicas_share_issuance_with_one_write_per_certificate() {
    let env = Env::new("sharing").await;
    let ops = env.replicas(3, "5s", &[]);
    members(&ops, 3).await;
    // 300: enough for the shares to show (a third each is 100 ± 8 by chance; a wrong
    // split, one replica doing it all or two doing half each, misses the bounds below),
    // and a third of the API server's work of 1,000 (the shared API server is the
    // suite's bottleneck). The throughput with more is `make bench`'s.
    let n = 300;
    let started = Instant::now();
    create_services(&env, "s", n).await;
    eventually(Duration::from_secs(120), &format!("{n} Secrets"), || async {
        (issued(&env).await?.len() >= n).then_some(())
    })
    .await;
    let took = started.elapsed();
    let bundle = env.ca_bundle().await;
    let secrets = issued(&env).await.unwrap();
    assert_eq!(secrets.len(), n, "exactly one Secret per Service");
    let cas: BTreeSet<Vec<u8>> = certs::skis(&bundle).into_iter().collect();
    for secret in secrets.values() {
        assert!(cas.contains(&certs::leaf_aki(secret)), "{} not signed by a CA in the bundle", secret.name_any());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut shares = Vec::new();
    let mut creates = 0.0;
    for op in &ops {
        let page = op.metrics_page().await;
        shares.push(metric(&page, "service_ca_certificates_issued_total"));
        creates += metric(&page, "service_ca_api_writes_total{resource=\"secrets\",verb=\"create\"");
    }
    println!(
        "3 replicas, {n} Services: all valid after {took:.1?}; issued per replica {shares:?}; Secret creates {creates} \
         incl. signing-key ({:.2} per certificate)",
        (creates - 1.0) / n as f64
    );
    for share in &shares {
        let fraction = share / n as f64;
        // ± 40: five standard deviations of a fair split of 300.
        assert!((0.2..=0.4667).contains(&fraction), "a replica issued {share} of {n} (target 33 % ± 13 %)");
    }
    // The leader also created the CA's own Secret (signing-key).
    assert_eq!(creates - 1.0, n as f64, "one Secret create per certificate across the replicas");
}

#[tokio::test]
async fn a_replica_killed_mid_issuance_leaves_its_share_to_the_others_within_the_lease() {
    let env = Env::new("sharing-kill").await;
    let lease = Duration::from_secs(4);
    let mut ops = env.replicas(3, "4s", &[]);
    members(&ops, 3).await;
    let seen = record_certificates(&env);
    // 150: most are still to come at the kill (106 created after it in one run), a
    // third of them the victim's.
    let n = 150;
    let victim = (leader(&env).await + 1) % 3;
    // Killed while the Services are still being created and issued for.
    let created: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let creating = futures::stream::iter(0..n)
        .map(|i| {
            let created = created.clone();
            let env = &env;
            async move {
                env.annotated_service(&format!("k{i}"), &format!("k{i}-tls"), false).await;
                created.lock().unwrap().insert(format!("k{i}-tls"), Instant::now());
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>();
    let kill = async {
        eventually(T, "the first Secrets", || async { (issued(&env).await?.len() >= 20).then_some(()) }).await;
        ops[victim].kill();
        Instant::now()
    };
    let (_, killed) = tokio::join!(creating, kill);
    eventually(T, &format!("{n} Secrets after the kill"), || async { (issued(&env).await?.len() >= n).then_some(()) })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recorded = seen.lock().unwrap();
    let twice: Vec<&String> =
        recorded.certificates.iter().filter(|(_, crts)| crts.len() > 1).map(|(name, _)| name).collect();
    // How long each Service waited for its Secret, counted from the kill at the
    // earliest (the victim's Services waited for its Lease to expire).
    let created = created.lock().unwrap();
    let waits: Vec<Duration> = recorded
        .first
        .iter()
        .filter_map(|(name, seen)| Some(seen.saturating_duration_since((*created.get(name)?).max(killed))))
        .collect();
    let longest = waits.iter().max().copied().unwrap_or_default();
    println!(
        "replica r{victim} killed (-9) during {n} issuances: longest wait of a Service for its Secret after the kill \
         {longest:.1?} (lease {lease:?}); {} Services created after the kill",
        created.values().filter(|t| **t > killed).count()
    );
    assert_eq!(recorded.first.len(), n, "every Secret seen");
    assert!(twice.is_empty(), "issued twice: {twice:?}");
    // The lease, then the victim's Services issued by the others: 2 s of issuance on an
    // idle machine, scaled by this machine's key speed, doubled (the suite runs 4 tests
    // at once on 2 cores, beside other work: 12.9 s of catch-up was not enough once).
    // Without the takeover they would wait for ever (the wait above).
    let catch_up = Duration::from_secs(4).mul_f64(crate::support::time_scale());
    assert!(
        longest <= lease + catch_up,
        "a Service waited {longest:?} after the kill (lease {lease:?} + {catch_up:?} to catch up)"
    );
    drop((recorded, created));
    for (i, op) in ops.iter_mut().enumerate() {
        if i != victim {
            assert!(op.running(), "replica r{i} must keep running");
        }
    }
}

/// What the API server stored: `signing-cabundle`'s CAs, or a leaf (its Secret, its CA).
#[derive(Debug)]
enum Written {
    Bundle(BTreeSet<Vec<u8>>),
    Leaf(String, Vec<u8>),
}

/// Starts two watches that log, from now on and with its resourceVersion, each
/// `signing-cabundle` written (its CAs) and each leaf written (its Secret, its CA).
fn record_writes(env: &Env) -> Arc<Mutex<Vec<(u64, Written)>>> {
    let log: Arc<Mutex<Vec<(u64, Written)>>> = Arc::default();
    let bundles: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.op_ns);
    let cm_stream =
        watcher(bundles, watcher::Config::default().fields("metadata.name=signing-cabundle")).applied_objects();
    let secret_stream = watcher(env.secrets(), watcher::Config::default().labels(MANAGED_SELECTOR)).applied_objects();
    {
        let log = log.clone();
        tokio::spawn(async move {
            let mut s = std::pin::pin!(cm_stream);
            while let Some(Ok(cm)) = s.next().await {
                let pem = cm.data.clone().unwrap_or_default().remove("ca-bundle.crt").unwrap_or_default();
                let skis = certs::skis(&pem).into_iter().collect();
                log.lock().unwrap().push((rv(&cm.metadata), Written::Bundle(skis)));
            }
        });
    }
    {
        let log = log.clone();
        tokio::spawn(async move {
            let mut s = std::pin::pin!(secret_stream);
            while let Some(Ok(secret)) = s.next().await {
                if let Some(aki) = certs::try_signer_of(&data(&secret, "tls.crt")) {
                    log.lock().unwrap().push((rv(&secret.metadata), Written::Leaf(secret.name_any(), aki)));
                }
            }
        });
    }
    log
}

/// Goes through `log` in the API server's order (resourceVersion) and checks each leaf
/// against the bundle as it stood at that moment; (leaves checked, leaves by `new_ski`).
fn check_leaves_against_the_bundle_of_their_moment(mut log: Vec<(u64, Written)>, new_ski: &[u8]) -> (usize, usize) {
    log.sort_by_key(|(rv, _)| *rv);
    let mut bundle = BTreeSet::new();
    let (mut checked, mut by_new) = (0, 0);
    for (rv, written) in &log {
        match written {
            Written::Bundle(skis) => bundle = skis.clone(),
            Written::Leaf(name, aki) => {
                assert!(bundle.contains(aki), "{name} (resourceVersion {rv}) signed by a CA not yet in the bundle");
                checked += 1;
                by_new += usize::from(*aki == new_ski);
            }
        }
    }
    (checked, by_new)
}

/// How many certificates each of `ops` issued, in `ops` order.
async fn issued_per_replica(ops: &[Operator]) -> Vec<f64> {
    let mut v = Vec::new();
    for op in ops {
        v.push(metric(&op.metrics_page().await, "service_ca_certificates_issued_total"));
    }
    v
}

#[tokio::test]
async fn after_a_forced_rotation_every_replica_signs_only_with_a_ca_already_in_the_bundle() {
    let env = Env::new("sharing-rotation").await;
    let ops = env.replicas(3, "5s", &[]);
    members(&ops, 3).await;
    let n = 90;
    create_services(&env, "r", n).await;
    eventually(T, "the Secrets", || async { (issued(&env).await?.len() >= n).then_some(()) }).await;

    // Everything the API server stores, in its order (resourceVersion): each leaf
    // written is checked against the bundle as it stood at that moment.
    let log = record_writes(&env);
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.force_rotation("shared").await;
    let new_ski = eventually(T, "the rotation", || async {
        let s = env.op_secrets().get("signing-key").await.ok()?;
        let reason = s.annotations().get("service-ca.operators.openshift.io/forced-rotation-reason").cloned();
        (reason.as_deref() == Some("shared")).then(|| certs::ca_ski(&s))
    })
    .await;
    eventually(T, "every leaf re-issued by the new CA", || async {
        let secrets = issued(&env).await?;
        (secrets.len() >= n && secrets.values().all(|s| certs::leaf_aki(s) == new_ski)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let log = std::mem::take(&mut *log.lock().unwrap());
    let (checked, by_new) = check_leaves_against_the_bundle_of_their_moment(log, &new_ski);
    let issued_by = issued_per_replica(&ops).await;
    println!(
        "forced rotation with 3 replicas: {checked} leaves checked against the bundle of their moment ({by_new} by the \
         new CA); issued per replica {issued_by:?}"
    );
    assert!(by_new >= n, "{by_new} leaves by the new CA seen");
    assert!(issued_by.iter().filter(|&&i| i > n as f64 / 10.0).count() == 3, "every replica re-issued: {issued_by:?}");
}

#[tokio::test]
async fn issuance_goes_on_without_a_pause_when_the_leader_is_killed() {
    use service_ca_operator::controllers::sharing::owner;
    let env = Env::new("sharing-leader").await;
    // A long lease: without shared issuance every Service would wait most of it.
    let lease = Duration::from_secs(8);
    let mut ops = env.replicas(3, "8s", &[]);
    members(&ops, 3).await;
    let seen = record_certificates(&env);
    let chief = leader(&env).await;
    // A Service every 100 ms for 8 s; the leader is killed after 3 s. Each create is
    // sent on time, not after the one before returned: one after the other, the 8 s
    // stretch with the shared API server's load.
    let n: u32 = 80;
    let created: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let start = tokio::time::Instant::now();
    let creating = futures::future::join_all((0..n).map(|i: u32| {
        let (created, env) = (created.clone(), &env);
        async move {
            tokio::time::sleep_until(start + Duration::from_millis(100) * i).await;
            env.annotated_service(&format!("c{i}"), &format!("c{i}-tls"), false).await;
            created.lock().unwrap().insert(format!("c{i}"), Instant::now());
        }
    }));
    let kill = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ops[chief].kill();
        Instant::now()
    };
    let (_, killed) = tokio::join!(creating, kill);
    eventually(T, &format!("{n} Secrets"), || async { (issued(&env).await?.len() >= n as usize).then_some(()) }).await;
    // The Services the other two own (the same rendezvous hashing as the operator's)
    // created after the kill: each is served at once, while the leader's wait for its
    // Lease to expire.
    let members: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
    let (others, leaders) = {
        let recorded = seen.lock().unwrap();
        let created = created.lock().unwrap();
        let (mut others, mut leaders) = (Vec::new(), Vec::new());
        for (svc, at) in created.iter().filter(|(_, at)| **at > killed) {
            let Some(first) = recorded.first.get(&format!("{svc}-tls")) else { continue };
            let waited = first.saturating_duration_since(*at);
            if owner(&members, &format!("{}/{svc}", env.ns)) == Some(format!("r{chief}").as_str()) {
                leaders.push(waited);
            } else {
                others.push(waited);
            }
        }
        (others, leaders)
    };
    let longest = others.iter().max().copied().unwrap_or_default();
    let leaders_longest = leaders.iter().max().copied().unwrap_or_default();
    // The leader's work waits for its Lease to expire, as before: a new leader holds it.
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.op_ns);
    let successor = eventually(T, "a new leader", || async {
        let holder = leases.get("service-ca-operator").await.ok()?.spec?.holder_identity?;
        (holder != format!("r{chief}")).then_some(holder)
    })
    .await;
    println!(
        "leader r{chief} killed (-9) during issuance: {} Services of the other members created after the kill, \
         longest wait {longest:.1?}; {} of the leader's, longest wait {leaders_longest:.1?} (lease {lease:?}); new \
         leader {successor}",
        others.len(),
        leaders.len()
    );
    assert!(others.len() > 10, "Services of the other members created after the kill: {}", others.len());
    // A pause would make a Service created just after the kill wait for the lease (8 s);
    // without one it waits for its member's issuance only (2.2 s once on a loaded machine).
    assert!(longest < lease / 2, "a Service of a live member waited {longest:?} after the leader was killed");
}

#[tokio::test]
async fn pod_certificate_requests_are_shared_too() {
    use crate::support::pods::{Kubelet, bundle_name, key_and_stub};
    let env = Env::new("sharing-pods").await;
    let signer = format!("e2e.service-ca.test/{}", env.run);
    let ops = env.replicas(3, "5s", &["--pod-signer-name", &signer]);
    let mut cleanup = crate::support::Cleanup::default();
    cleanup.add::<k8s_openapi::api::certificates::v1::ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
    members(&ops, 3).await;
    let kubelet = Kubelet::new(&env, &signer).await;
    kubelet.service("web", "web", false).await;
    let n = 45;
    for i in 0..n {
        let pod = kubelet.pod(&format!("p{i}"), "web", None).await;
        let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
        kubelet.request(&format!("p{i}"), &signer, &pod, stub, None).await;
    }
    for i in 0..n {
        kubelet.issued(&format!("p{i}")).await;
    }
    let mut answered = Vec::new();
    for op in &ops {
        answered.push(metric(&op.metrics_page().await, "service_ca_pod_certificate_requests_total"));
    }
    println!("3 replicas, {n} pod certificate requests: issued per replica {answered:?}");
    assert_eq!(answered.iter().sum::<f64>(), n as f64, "each request answered once");
    assert!(answered.iter().all(|a| *a > 0.0), "every replica signs its share: {answered:?}");
}

#[tokio::test]
async fn a_replica_that_deferred_work_alone_hands_it_over_when_others_join_and_none_is_left_waiting() {
    use crate::support::Operator;
    // r0 starts alone with 100 Services waiting: it owns them all and, at its share of
    // slots for one namespace, defers most. r1 and r2 join meanwhile: most of what r0
    // deferred is theirs now. Each pass r0 ends starts its next deferred Service; one
    // now another's must be passed over, or r0's turns stop and its own share waits for
    // ever (docs/spec.md §5.4).
    let env = Env::new("sharing-join").await;
    let n = 100;
    create_services(&env, "j", n).await;
    let replica = |i: usize, key: &str| {
        let identity = format!("r{i}");
        let extra = ["--lease-identity", &identity, "--default-key-algorithm", key, "--controller-concurrency", "4"];
        Operator::start_with_kubeconfig(&env.name, &env.leader_elect_args("5s", &extra), &env.kubeconfig)
    };
    // RSA keys, two passes at a time (a namespace holds half of 4 slots): r0 is still
    // at it when the others come.
    let mut ops = vec![replica(0, "rsa")];
    ops[0].wait_ready(T).await;
    eventually(T, "r0's first Secrets", || async { (issued(&env).await?.len() >= 4).then_some(()) }).await;
    let at_join = issued(&env).await.unwrap_or_default().len();
    let joined = Instant::now();
    ops.extend([replica(1, "ecdsa"), replica(2, "ecdsa")]);
    eventually(T, &format!("{n} Secrets after r1 and r2 joined"), || async {
        (issued(&env).await?.len() >= n).then_some(())
    })
    .await;
    let mut shares = Vec::new();
    for op in &ops {
        shares.push(metric(&op.metrics_page().await, "service_ca_certificates_issued_total"));
    }
    println!(
        "r0 alone issued {at_join} of {n}; r1 and r2 joined; all {n} issued {:.1?} later; issued per replica {shares:?}",
        joined.elapsed()
    );
    assert!(shares.iter().all(|s| *s > 0.0), "every replica issued its share: {shares:?}");
}
