//! Every replica signs: issuance shared across replicas through membership
//! Leases and rendezvous hashing, while the CA and injection stay with the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::{Env, Operator, certs, data, eventually, metric};

const T: Duration = Duration::from_secs(60);
const MANAGED: &str = "service-ca.operators.openshift.io/managed=true";

/// `n` replicas of this test's operator with leader election and shared issuance
/// (the default), identities r0, r1, …; ECDSA keys keep the machine free for the API
/// server.
fn replicas(env: &Env, n: usize, lease: &str) -> Vec<Operator> {
    replicas_with(env, n, lease, &[])
}

fn replicas_with(env: &Env, n: usize, lease: &str, extra: &[&str]) -> Vec<Operator> {
    (0..n)
        .map(|i| {
            let identity = format!("r{i}");
            let mut args = vec!["--default-key-algorithm", "ecdsa", "--lease-identity", &identity];
            args.extend_from_slice(extra);
            let args = env.leader_elect_args(lease, &args);
            Operator::start_with_kubeconfig(&env.name, &args, &env.kubeconfig)
        })
        .collect()
}

/// Waits until every replica is ready and sees `n` members.
async fn members(ops: &[Operator], n: usize) {
    eventually(T, &format!("every replica ready and sharing with {n} members"), || async {
        for op in ops {
            let page = op.metrics().await?.1;
            (metric(&page, "service_ca_sharing_members") == n as f64).then_some(())?;
            op.admin_get("/readyz").await.filter(|(s, _)| *s == 200)?;
        }
        Some(())
    })
    .await;
}

async fn create_services(env: &Env, prefix: &str, n: usize) {
    futures::stream::iter(0..n)
        .map(
            |i| async move { env.annotated_service(&format!("{prefix}{i}"), &format!("{prefix}{i}-tls"), false).await },
        )
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// The managed Secrets with a certificate, by name.
async fn issued(env: &Env) -> Option<BTreeMap<String, Secret>> {
    let list = env.secrets().list(&ListParams::default().labels(MANAGED)).await.ok()?;
    Some(
        list.items
            .into_iter()
            .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("tls.crt")))
            .map(|s| (s.name_any(), s))
            .collect(),
    )
}

/// What a watch of the namespace's Secrets saw of each: every distinct `tls.crt` it
/// ever had (a Secret issued twice would show two), and when it first had one.
#[derive(Default)]
struct Recorded {
    certificates: BTreeMap<String, BTreeSet<String>>,
    first: BTreeMap<String, Instant>,
}

fn record_certificates(env: &Env) -> Arc<Mutex<Recorded>> {
    let seen: Arc<Mutex<Recorded>> = Arc::default();
    let stream = watcher(env.secrets(), watcher::Config::default()).applied_objects();
    let record = seen.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(Ok(secret)) = stream.next().await {
            let crt = data(&secret, "tls.crt");
            if !crt.is_empty() {
                let mut record = record.lock().unwrap();
                record.first.entry(secret.name_any()).or_insert_with(Instant::now);
                record.certificates.entry(secret.name_any()).or_default().insert(crt);
            }
        }
    });
    seen
}

#[tokio::test]
async fn three_replicas_share_issuance_with_one_write_per_certificate() {
    let env = Env::new("sharing").await;
    let ops = replicas(&env, 3, "5s");
    members(&ops, 3).await;
    let n = 1000;
    let started = Instant::now();
    create_services(&env, "s", n).await;
    eventually(Duration::from_secs(300), &format!("{n} Secrets"), || async {
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
        assert!((0.2333..=0.4333).contains(&fraction), "a replica issued {share} of {n} (target 33 % ± 10 %)");
    }
    // The leader also created the CA's own Secret (signing-key).
    assert_eq!(creates - 1.0, n as f64, "one Secret create per certificate across the replicas");
}

/// resourceVersion as a number (etcd's revision: the API server's order of writes).
fn rv(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The replica identities (r0, r1, r2) in `ops` order; the leader's index.
async fn leader(env: &Env) -> usize {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.op_ns);
    let holder =
        eventually(T, "a leader", || async { leases.get("service-ca-operator").await.ok()?.spec?.holder_identity })
            .await;
    holder.trim_start_matches('r').parse().unwrap()
}

#[tokio::test]
async fn a_replica_killed_mid_issuance_leaves_its_share_to_the_others_within_the_lease() {
    let env = Env::new("sharing-kill").await;
    let lease = Duration::from_secs(4);
    let mut ops = replicas(&env, 3, "4s");
    members(&ops, 3).await;
    let seen = record_certificates(&env);
    let n = 300;
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
    // idle machine, scaled by this machine's key speed (the suite runs 4 tests at once
    // on 2 cores). Without the takeover they would wait for ever (the wait above).
    let catch_up = Duration::from_secs(2).mul_f64(crate::support::time_scale());
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

#[tokio::test]
async fn after_a_forced_rotation_every_replica_signs_only_with_a_ca_already_in_the_bundle() {
    let env = Env::new("sharing-rotation").await;
    let ops = replicas(&env, 3, "5s");
    members(&ops, 3).await;
    let n = 90;
    create_services(&env, "r", n).await;
    eventually(T, "the Secrets", || async { (issued(&env).await?.len() >= n).then_some(()) }).await;

    // Everything the API server stores, in its order (resourceVersion): each leaf
    // written is checked against the bundle as it stood at that moment.
    #[derive(Debug)]
    enum Written {
        Bundle(BTreeSet<Vec<u8>>),
        Leaf(String, Vec<u8>),
    }
    let log: Arc<Mutex<Vec<(u64, Written)>>> = Arc::default();
    let bundles: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.op_ns);
    let cm_stream =
        watcher(bundles, watcher::Config::default().fields("metadata.name=signing-cabundle")).applied_objects();
    let secret_stream = watcher(env.secrets(), watcher::Config::default().labels(MANAGED)).applied_objects();
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "shared" } } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
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

    let mut log = std::mem::take(&mut *log.lock().unwrap());
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
    let issued_by: Vec<f64> = {
        let mut v = Vec::new();
        for op in &ops {
            v.push(metric(&op.metrics_page().await, "service_ca_certificates_issued_total"));
        }
        v
    };
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
    let mut ops = replicas(&env, 3, "8s");
    members(&ops, 3).await;
    let seen = record_certificates(&env);
    let chief = leader(&env).await;
    // A Service every 100 ms for 8 s; the leader is killed after 3 s.
    let n = 80;
    let created: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let creating = async {
        for i in 0..n {
            env.annotated_service(&format!("c{i}"), &format!("c{i}-tls"), false).await;
            created.lock().unwrap().insert(format!("c{i}"), Instant::now());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let kill = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ops[chief].kill();
        Instant::now()
    };
    let ((), killed) = tokio::join!(creating, kill);
    eventually(T, &format!("{n} Secrets"), || async { (issued(&env).await?.len() >= n).then_some(()) }).await;
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
    assert!(longest < lease / 4, "a Service of a live member waited {longest:?} after the leader was killed");
}

#[tokio::test]
async fn pod_certificate_requests_are_shared_too() {
    use crate::support::pods::{Kubelet, bundle_name, key_and_stub};
    let env = Env::new("sharing-pods").await;
    let signer = format!("e2e.service-ca.test/{}", env.run);
    let ops = replicas_with(&env, 3, "5s", &["--pod-signer-name", &signer]);
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
async fn replicas_started_together_elect_one_leader_each_under_its_own_field_manager() {
    // Three replicas race for a Lease nobody holds. The server-side apply that takes it
    // must conflict for all but the first: each replica writes under a field manager
    // of its own (with one shared manager, two could both apply and both lead until
    // the earlier one's next renewal — seen once under full-suite load).
    let env = Env::new("sharing-race").await;
    let ops = replicas(&env, 3, "8s");
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
    let mut ops = replicas(&env, 2, "5s");
    let started = Instant::now();
    let ready = eventually(T, "both replicas ready", || async {
        for op in &ops {
            op.admin_get("/readyz").await.filter(|(s, _)| *s == 200)?;
        }
        Some(started.elapsed())
    });
    // Before the fix the replicas never became ready: measure on, to show what was served.
    let ready = tokio::time::timeout(T, ready).await.ok();
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
