//! Replicas (docs/spec.md §5.4): issuance shared through member Leases, leader election.

mod leader_election;
mod sharing;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use crate::support::{Env, Operator, data, eventually, metric};

/// Replicas first agree on who the members are: their steps wait longer.
const T: Duration = Duration::from_secs(60);
const MANAGED_SELECTOR: &str = "service-ca.operators.openshift.io/managed=true";

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
    let list = env.secrets().list(&ListParams::default().labels(MANAGED_SELECTOR)).await.ok()?;
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
