//! Issuance shared across replicas: every replica signs its share.
//!
//! Membership: each replica keeps a short Lease of its own in the operator namespace
//! (labelled [`MEMBER_LABEL`], renewed every third of `--lease-duration`) and watches
//! the others'; one that stops gracefully deletes its Lease. Liveness is decided by
//! what this replica saw, as client-go decides a leader's: a member is live while this
//! replica has seen its Lease renewed (its `renewTime` change) within the lease
//! duration, whatever the writer's clock says. A Lease with another
//! `leaseDurationSeconds`, a `renewTime` beyond now + the duration, no holder or a
//! holder longer than [`MAX_IDENTITY_LEN`] bytes is ignored with one Warning; at most
//! [`MAX_MEMBERS`] members share issuance. Leases are read untyped, so that no value a
//! Lease can carry (e.g. a `renewTime` at the end of year 9999) breaks the watch. Assignment: each Service (and each
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
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::events::{EventType, Recorder};
use super::watch::WatchBackoff;
use crate::admin::Health;
use crate::metrics::Metrics;
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

/// At most this many members share issuance (the lowest identities, in byte order).
pub const MAX_MEMBERS: usize = 64;
/// A longer holder identity is not a member (and `--lease-identity` refuses it).
pub const MAX_IDENTITY_LEN: usize = 128;
/// A member Lease this replica has not seen change for this long is deleted.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// A longer `renewTime` text is not a timestamp.
const MAX_RENEW_TIME_LEN: usize = 64;

/// What a member Lease says, read leniently from whatever JSON the API server returns.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// `None` when absent or longer than [`MAX_IDENTITY_LEN`] (then `too_long`).
    holder: Option<String>,
    too_long: bool,
    duration: Option<i64>,
    /// The `renewTime` text, as written (at most [`MAX_RENEW_TIME_LEN`] bytes).
    renew: Option<String>,
}

impl Record {
    fn from_spec(spec: &serde_json::Value) -> Record {
        let holder = spec.get("holderIdentity").and_then(|v| v.as_str()).filter(|h| !h.is_empty());
        let too_long = holder.is_some_and(|h| h.len() > MAX_IDENTITY_LEN);
        Record {
            holder: holder.filter(|_| !too_long).map(str::to_string),
            too_long,
            duration: spec.get("leaseDurationSeconds").and_then(|v| v.as_i64()),
            renew: spec
                .get("renewTime")
                .and_then(|v| v.as_str())
                .map(|r| crate::bounded_to(r, MAX_RENEW_TIME_LEN).into_owned()),
        }
    }

    /// Why this Lease cannot be a member at wall-clock time `wall` with lease duration
    /// `ours`, if it cannot.
    fn unusable(&self, wall: time::OffsetDateTime, ours: Duration) -> Option<Ignored> {
        if self.too_long {
            Some(Ignored::IdentityTooLong)
        } else if self.holder.is_none() {
            Some(Ignored::NoHolder)
        } else if self.duration != i64::try_from(ours.as_secs()).ok() {
            Some(Ignored::ForeignDuration)
        } else if let Some(at) = self.renewed_at() {
            (at > crate::dates::after(wall, ours)).then_some(Ignored::FutureRenewal)
        } else {
            Some(Ignored::NoRenewTime)
        }
    }

    fn renewed_at(&self) -> Option<time::OffsetDateTime> {
        time::OffsetDateTime::parse(self.renew.as_deref()?, &time::format_description::well_known::Rfc3339).ok()
    }
}

/// Why a Lease with the member label is not a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ignored {
    NoHolder,
    IdentityTooLong,
    ForeignDuration,
    NoRenewTime,
    FutureRenewal,
}

impl Ignored {
    fn describe(self) -> &'static str {
        match self {
            Ignored::NoHolder => "it has no holderIdentity",
            Ignored::IdentityTooLong => "its holderIdentity is longer than 128 bytes",
            Ignored::ForeignDuration => "its leaseDurationSeconds is not this replica's lease duration",
            Ignored::NoRenewTime => "it has no readable renewTime",
            Ignored::FutureRenewal => "its renewTime is beyond now plus the lease duration",
        }
    }
}

/// One member Lease as this replica saw it.
#[derive(Debug, Clone)]
struct Seen {
    record: Record,
    resource_version: Option<String>,
    /// When this replica last saw it renewed (`None`: not since it first saw it stale).
    renewed: Option<std::time::Instant>,
    /// When this replica last saw it change at all (or tried to clear it).
    changed: std::time::Instant,
    /// Why it was last ignored (a Warning is given once per reason).
    ignored: Option<Ignored>,
}

/// The new state of a Lease seen as `record` at `now` (local) and `wall`; the reason to
/// warn about, when it newly became unusable.
fn observe(
    previous: Option<&Seen>,
    record: Record,
    resource_version: Option<String>,
    now: std::time::Instant,
    wall: time::OffsetDateTime,
    ours: Duration,
) -> (Seen, Option<Ignored>) {
    let unusable = record.unusable(wall, ours);
    let warn = unusable.filter(|reason| previous.and_then(|p| p.ignored) != Some(*reason));
    let seen = match previous {
        Some(p) if p.record == record => Seen { resource_version, ignored: unusable, ..p.clone() },
        // A change: renewed now (client-go's rule), whatever the writer's clock says.
        Some(_) => Seen { record, resource_version, renewed: Some(now), changed: now, ignored: unusable },
        // First sight: renewed now only if the writer's own renewTime is recent;
        // otherwise live from its next renewal.
        None => {
            let recent = record
                .renewed_at()
                .is_some_and(|at| at >= crate::dates::before(wall, ours) && at <= crate::dates::after(wall, ours));
            Seen { record, resource_version, renewed: recent.then_some(now), changed: now, ignored: unusable }
        }
    };
    (seen, warn)
}

/// The identities of the live members at `now`, sorted, at most [`MAX_MEMBERS`]; and
/// how many live members were left out.
fn live_members<'a>(
    seen: impl Iterator<Item = &'a Seen>,
    now: std::time::Instant,
    wall: time::OffsetDateTime,
    ours: Duration,
) -> (Vec<String>, usize) {
    let live: std::collections::BTreeSet<&str> = seen
        .filter(|s| s.renewed.is_some_and(|at| now.saturating_duration_since(at) < ours))
        .filter(|s| s.record.unusable(wall, ours).is_none())
        .filter_map(|s| s.record.holder.as_deref())
        .collect();
    let left_out = live.len().saturating_sub(MAX_MEMBERS);
    (live.into_iter().take(MAX_MEMBERS).map(str::to_string).collect(), left_out)
}

/// The member Leases this replica follows, by name, from the watch's events.
#[derive(Default)]
struct Members {
    seen: std::collections::BTreeMap<String, Seen>,
    /// Names listed since the last `Init` (a relist drops the others at `InitDone`).
    relisted: Option<std::collections::BTreeSet<String>>,
    warned_cap: bool,
}

impl Members {
    /// Applies one watch event; returns the Lease to warn about, with the reason.
    fn apply(
        &mut self,
        event: watcher::Event<DynamicObject>,
        now: std::time::Instant,
        wall: time::OffsetDateTime,
        ours: Duration,
    ) -> Option<(DynamicObject, Ignored)> {
        let lease = match event {
            watcher::Event::Init => {
                self.relisted = Some(Default::default());
                return None;
            }
            watcher::Event::InitDone => {
                if let Some(relisted) = self.relisted.take() {
                    self.seen.retain(|name, _| relisted.contains(name));
                }
                return None;
            }
            watcher::Event::Delete(lease) => {
                self.seen.remove(&lease.name_any());
                return None;
            }
            watcher::Event::Apply(lease) => lease,
            watcher::Event::InitApply(lease) => {
                if let Some(relisted) = &mut self.relisted {
                    relisted.insert(lease.name_any());
                }
                lease
            }
        };
        let name = lease.name_any();
        if !name.starts_with(MEMBER_LEASE_PREFIX) {
            return None;
        }
        let record = Record::from_spec(lease.data.get("spec").unwrap_or(&serde_json::Value::Null));
        let (seen, warn) = observe(self.seen.get(&name), record, lease.resource_version(), now, wall, ours);
        self.seen.insert(name, seen);
        warn.map(|reason| (lease, reason))
    }
}

/// What the member loop uses: where the Leases live, for how long one holds, and
/// where it reports (metrics, readiness, Events).
pub struct Member<'a> {
    pub client: kube::Client,
    pub namespace: &'a str,
    pub lease_duration: Duration,
    pub metrics: &'a Metrics,
    pub health: &'a Health,
    pub recorder: &'a Recorder,
}

/// Keeps this replica's Lease and follows the others' until `shutdown`; then deletes
/// its Lease so that the others take its share at once.
pub async fn run(member: Member<'_>, sharing: Arc<Sharing>, shutdown: Shutdown) {
    if !sharing.enabled {
        return;
    }
    let resource = ApiResource::erase::<Lease>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(member.client.clone(), member.namespace, &resource);
    let name = lease_name(&sharing.me);
    let duration = member.lease_duration.max(Duration::from_secs(3));
    let config = watcher::Config::default().labels(&format!("{MEMBER_LABEL}=true"));
    let mut events = watcher(api.clone(), config).backoff(WatchBackoff::default()).boxed();
    let mut members = Members::default();
    let mut renew = tokio::time::interval(duration.checked_div(3).unwrap_or(duration));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shutdown = std::pin::pin!(shutdown.signal());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = renew.tick() => keep(&api, &name, &sharing.me, duration).await,
            event = events.next() => match event {
                Some(Ok(event)) => {
                    let (now, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
                    if let Some((lease, reason)) = members.apply(event, now, wall, duration) {
                        ignored(&member, &resource, &lease, reason).await;
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, "watching the member Leases failed; retrying"),
                None => {}
            },
            _ = tick.tick() => {}
        }
        let (now, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
        clear_forgotten(&api, &mut members, &name, now).await;
        let (live, left_out) = live_members(members.seen.values(), now, wall, duration);
        if left_out > 0 && !members.warned_cap {
            tracing::warn!(left_out, "more than {MAX_MEMBERS} live members: the others do not share issuance");
        }
        members.warned_cap = left_out > 0;
        let live = if live.contains(&sharing.me) { live } else { Vec::new() };
        if *sharing.members.borrow() != live {
            tracing::info!(members = ?live, "issuance shared by {} replica(s)", live.len());
            member.metrics.sharing_members.set(i64::try_from(live.len()).unwrap_or(i64::MAX));
            member.health.set_members(live.len());
            sharing.members.send_replace(live);
        }
    }
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(lease = %name, "left the members"),
        Err(error) => tracing::warn!(%error, lease = %name, "could not delete the member Lease; it expires by itself"),
    }
}

/// One Warning (log and Event) for a Lease that newly became unusable as a member.
async fn ignored(member: &Member<'_>, resource: &ApiResource, lease: &DynamicObject, reason: Ignored) {
    let name = lease.name_any();
    tracing::warn!(lease = %crate::bounded(&name), reason = reason.describe(), "a member Lease is ignored");
    let note = format!("This Lease is not counted as a member sharing issuance: {}.", reason.describe());
    let regarding = lease.object_ref(resource);
    member.recorder.note(member.metrics, &regarding, EventType::Warning, "MemberLeaseIgnored", note).await;
}

/// Deletes the Leases this replica has not seen change for [`FORGET_AFTER`] (a member
/// killed long ago, or a Lease nobody renews), each only in the version it saw, and
/// logs what happened. Another attempt comes only after as long again.
async fn clear_forgotten(api: &Api<DynamicObject>, members: &mut Members, own: &str, now: std::time::Instant) {
    for (name, seen) in members.seen.iter_mut() {
        if name == own || now.saturating_duration_since(seen.changed) <= FORGET_AFTER {
            continue;
        }
        seen.changed = now;
        let params = DeleteParams {
            preconditions: Some(Preconditions { resource_version: seen.resource_version.clone(), uid: None }),
            ..DeleteParams::default()
        };
        let lease = crate::bounded(name);
        match api.delete(name, &params).await {
            Ok(_) => tracing::info!(%lease, "deleted a member Lease not renewed for over an hour"),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::info!(%lease, "a member Lease not renewed for over an hour was already gone")
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::info!(%lease, "a member Lease not renewed for over an hour changed meanwhile: kept")
            }
            Err(error) => {
                tracing::warn!(%error, %lease, "could not delete a member Lease not renewed for over an hour")
            }
        }
    }
}

/// Creates or renews this replica's Lease (server-side apply).
async fn keep(api: &Api<DynamicObject>, name: &str, identity: &str, duration: Duration) {
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

#[cfg(test)]
mod tests;
