//! Issuance shared across replicas: every replica signs its share.
//!
//! Membership: each replica keeps a short Lease of its own in the operator namespace
//! (labelled [`MEMBER_LABEL`], renewed every third of `--lease-duration`) and watches
//! the others'; a member whose Lease was not renewed within its duration is gone, and
//! one that stops gracefully deletes its Lease. Assignment: each Service (and each
//! PodCertificateRequest) belongs to one live member by rendezvous (highest random
//! weight) hashing of its `namespace/name` over the members, so a membership change
//! moves only the departed member's share. A replica reconciles only what it owns
//! ([`super::drive`] skips the rest); every write is create-only or guarded by
//! resourceVersion, so two replicas that briefly both own an object make one write and
//! one conflict. The CA, `signing-key`, `signing-cabundle`, injection and the
//! ClusterTrustBundle stay with the leader Lease.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::{Context, WatchBackoff};
use crate::names::{FIELD_MANAGER, MEMBER_LABEL, MEMBER_LEASE_PREFIX};
use crate::shutdown::Shutdown;

/// Who this replica is and which replicas are alive.
pub struct Sharing {
    me: String,
    enabled: bool,
    /// Live members' identities, sorted; empty until this replica's own Lease is seen.
    members: watch::Sender<Vec<String>>,
}

impl Sharing {
    /// One active replica: it owns everything.
    pub fn off() -> Arc<Self> {
        Arc::new(Sharing { me: String::new(), enabled: false, members: watch::Sender::new(Vec::new()) })
    }

    /// A member that owns its share once its own Lease is seen.
    pub fn new(identity: &str) -> Arc<Self> {
        Arc::new(Sharing { me: identity.to_string(), enabled: true, members: watch::Sender::new(Vec::new()) })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether this replica reconciles the object with this key (`namespace/name`).
    pub fn owns(&self, key: &str) -> bool {
        !self.enabled || owner(&self.members.borrow(), key) == Some(self.me.as_str())
    }

    /// How many members are alive (this one included once its Lease is seen).
    pub fn members(&self) -> usize {
        self.members.borrow().len()
    }

    /// Yields once per membership change (for `reconcile_all_on`).
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.members.subscribe();
        futures::stream::unfold(rx, |mut rx| async move { rx.changed().await.ok().map(|_| ((), rx)) })
    }
}

/// The member that owns `key`: the one with the highest score for it.
pub fn owner<'a>(members: &'a [String], key: &str) -> Option<&'a str> {
    members.iter().max_by_key(|m| (score(m, key), m.as_str())).map(String::as_str)
}

/// A stable 64-bit score of (member, key): FNV-1a over both, then a SplitMix64
/// finaliser so that close inputs spread over the whole range. The same on every
/// replica and every build.
fn score(member: &str, key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in member.bytes().chain(std::iter::once(0)).chain(key.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The name of a replica's membership Lease (a DNS subdomain).
pub fn lease_name(identity: &str) -> String {
    let cleaned: String = identity
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .collect();
    let mut name = format!("{MEMBER_LEASE_PREFIX}{cleaned}");
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_string()
}

/// Keeps this replica's Lease and follows the others' until `shutdown`; then deletes
/// its Lease so that the others take its share at once.
pub async fn run(ctx: Arc<Context>, sharing: Arc<Sharing>, shutdown: Shutdown) {
    if !sharing.enabled {
        return;
    }
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let name = lease_name(&sharing.me);
    let duration = ctx.config.lease_duration.max(Duration::from_secs(3));
    let (store, writer) = kube::runtime::reflector::store();
    let config = watcher::Config::default().labels(&format!("{MEMBER_LABEL}=true"));
    let mut events = watcher(api.clone(), config).backoff(WatchBackoff::default()).reflect(writer).boxed();
    let mut renew = tokio::time::interval(duration.checked_div(3).unwrap_or(duration));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shutdown = std::pin::pin!(shutdown.signal());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = renew.tick() => keep(&api, &name, &sharing.me, duration).await,
            event = events.next() => {
                if let Some(Err(error)) = event {
                    tracing::warn!(%error, "watching the member Leases failed; retrying");
                }
            }
            _ = tick.tick() => {}
        }
        let now = time::OffsetDateTime::now_utc();
        let leases = store.state();
        for gone in leases.iter().filter(|l| expired_for(l, now) > FORGET_AFTER) {
            // A member killed long ago (its Lease was never deleted): cleared by whoever
            // sees it first; a second attempt finds it gone.
            let _ = api.delete(&gone.name_any(), &DeleteParams::default()).await;
            tracing::info!(lease = %gone.name_any(), "cleared the Lease of a member gone for over an hour");
        }
        let live = live_members(leases.iter().map(|l| l.as_ref()), now);
        let live = if live.contains(&sharing.me) { live } else { Vec::new() };
        if *sharing.members.borrow() != live {
            tracing::info!(members = ?live, "issuance shared by {} replica(s)", live.len());
            ctx.metrics.sharing_members.set(live.len() as i64);
            ctx.health.set_members(live.len());
            sharing.members.send_replace(live);
        }
    }
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(lease = %name, "left the members"),
        Err(error) => tracing::warn!(%error, lease = %name, "could not delete the member Lease; it expires by itself"),
    }
}

/// Creates or renews this replica's Lease (server-side apply).
async fn keep(api: &Api<Lease>, name: &str, identity: &str, duration: Duration) {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": name, "labels": { MEMBER_LABEL: "true" } },
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": duration.as_secs(),
            "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
        }
    });
    let params = PatchParams::apply(&format!("{FIELD_MANAGER}-member")).force();
    if let Err(error) = api.patch(name, &params, &Patch::Apply(&lease)).await {
        tracing::warn!(%error, lease = %name, "could not renew the member Lease");
    }
}

/// A member Lease expired this long ago is deleted.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// When a member Lease expires: its last renewal plus its duration.
fn expiry(lease: &Lease) -> Option<time::OffsetDateTime> {
    let spec = lease.spec.as_ref()?;
    let renewed = time::OffsetDateTime::from_unix_timestamp_nanos(spec.renew_time.as_ref()?.0.as_nanosecond()).ok()?;
    let seconds = u64::try_from(spec.lease_duration_seconds?).unwrap_or(0);
    Some(crate::dates::after(renewed, Duration::from_secs(seconds)))
}

/// How long ago a member Lease expired (zero if it has not, or cannot be read).
fn expired_for(lease: &Lease, now: time::OffsetDateTime) -> Duration {
    expiry(lease).map_or(Duration::ZERO, |at| crate::dates::between(at, now))
}

/// The identities of the members whose Lease is still valid at `now`, sorted.
fn live_members<'a>(leases: impl Iterator<Item = &'a Lease>, now: time::OffsetDateTime) -> Vec<String> {
    let live: std::collections::BTreeSet<String> = leases
        .filter(|lease| lease.name_any().starts_with(MEMBER_LEASE_PREFIX))
        .filter(|lease| expiry(lease).is_some_and(|at| at > now))
        .filter_map(|lease| lease.spec.as_ref()?.holder_identity.clone())
        .collect();
    live.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("replica-{i}")).collect()
    }

    #[test]
    fn rendezvous_spreads_keys_evenly_and_a_departure_moves_only_its_share() {
        let three = members(3);
        let keys: Vec<String> = (0..3000).map(|i| format!("ns{}/svc{i}", i % 7)).collect();
        let mut counts = std::collections::BTreeMap::new();
        for key in &keys {
            *counts.entry(owner(&three, key).unwrap()).or_insert(0) += 1;
        }
        for (member, n) in &counts {
            assert!((800..=1200).contains(n), "{member} owns {n} of 3000");
        }
        let two: Vec<String> = three[..2].to_vec();
        for key in &keys {
            let before = owner(&three, key).unwrap();
            let after = owner(&two, key).unwrap();
            if before != "replica-2" {
                assert_eq!(before, after, "{key} moved although its owner stayed");
            }
        }
        assert_eq!(owner(&[], "a/b"), None);
    }

    #[test]
    fn lease_names_are_dns_subdomains() {
        assert_eq!(lease_name("Pod_A-1234"), "service-ca-operator-member-pod-a-1234");
        assert!(lease_name(&"x".repeat(400)).len() <= 253);
    }

    #[test]
    fn only_leases_renewed_within_their_duration_are_members() {
        let now = time::OffsetDateTime::now_utc();
        let lease = |holder: &str, age: i64| -> Lease {
            let renewed = k8s_openapi::jiff::Timestamp::from_second((now.unix_timestamp() - age).max(0)).unwrap();
            serde_json::from_value(json!({
                "metadata": { "name": lease_name(holder) },
                "spec": { "holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": MicroTime(renewed) }
            }))
            .unwrap()
        };
        let leases = [lease("b", 1), lease("a", 5), lease("gone", 30), lease("long-gone", 7200)];
        assert_eq!(live_members(leases.iter(), now), vec!["a".to_string(), "b".to_string()]);
        let cleared: Vec<String> =
            leases.iter().filter(|l| expired_for(l, now) > FORGET_AFTER).map(|l| l.name_any()).collect();
        assert_eq!(cleared, vec![lease_name("long-gone")], "only a Lease expired for over an hour is cleared");
    }

    #[test]
    fn a_lease_renewed_at_either_end_of_time_is_read_without_overflow() {
        let now = time::OffsetDateTime::now_utc();
        let lease = |renewed: &str, seconds: i32| -> Lease {
            serde_json::from_value(json!({
                "metadata": { "name": lease_name("far") },
                "spec": { "holderIdentity": "far", "leaseDurationSeconds": seconds, "renewTime": renewed }
            }))
            .unwrap()
        };
        let future = lease("9999-12-30T21:59:59.999999Z", i32::MAX); // the latest jiff reads
        assert_eq!(expiry(&future), Some(crate::dates::LATEST), "clamped at the latest date, no panic");
        assert_eq!(expired_for(&future, now), Duration::ZERO);
        let ancient = lease("0000-01-01T00:00:00Z", 15);
        assert!(expiry(&ancient).is_some_and(|at| at.year() == 0));
        assert!(expired_for(&ancient, now) > FORGET_AFTER, "long gone");
        assert_eq!(live_members([&ancient].into_iter(), now), Vec::<String>::new());
    }
}
