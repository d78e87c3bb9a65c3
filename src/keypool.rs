//! The bounded pool that does the CPU-heavy work (key generation, signing) off the
//! async reactor: threads at a lower CPU priority, urgent work first, fair across
//! namespaces weighted by key cost, a few keys kept ready per kind in use, and keys
//! parked for a retry after a failed write.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use time::OffsetDateTime;

use crate::pki::{IssuedLeaf, KeyKind, LeafRequest, PkiError, PrivateKey};
use crate::signer::Signer;

mod queue;
use queue::{Job, Queue};
#[cfg(test)]
use queue::{Lane, Waiting};
pub use queue::{Priority, cost};

/// Bounded pool for key generation: at most `concurrency` keys at once, on dedicated
/// threads at a lower CPU priority than the rest of the process: urgent work (new
/// Services) at nice 1, about even with the API server and other processes, so that a
/// burst or a backlog gets the cores they do not need; bulk work at nice 10, so that a
/// rotation that re-issues thousands of certificates is paced by them and the reactor —
/// watches, bundle injection, probes, metrics — gets the CPU first whenever it needs
/// it, even under a container CPU limit.
///
/// It also keeps a few keys ready per key algorithm in use, generated in the background
/// while the operator is idle, so that a new Service does not wait for key generation
/// (~50 ms for RSA-2048, the floor of a fresh certificate otherwise). A kind is in use
/// when it is the cluster default (what a new Service without the annotation gets) or
/// was asked for in the last [`IN_USE_FOR`]; the ready keys of a kind nobody asks for
/// any more are dropped, and none are made for kinds never asked for. Urgent work (a
/// certificate for a new Service) goes before bulk work (re-issues after a CA change),
/// and only urgent work takes ready keys: a Service created during a rotation is served
/// next. Within each priority, namespaces take turns weighted by key cost (see
/// [`Queue`]): one namespace's backlog of RSA-4096 keys does not delay another's key.
/// Under sustained load the buffer is empty and the pool runs at the key-generation
/// rate.
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    jobs: Arc<Queue>,
    /// Keys ready per kind, and when each kind was last asked for (the default kind
    /// is always in use).
    ready: std::sync::Mutex<Ready>,
    default_kind: KeyKind,
    buffer: Buffer,
    refill: tokio::sync::Notify,
    /// Serving keys signed over but not yet known to be written, by owner (the
    /// Service UID), with when each was parked: a retry after a failed write signs over
    /// the same key. A key not used again within [`PARKED_FOR`] is dropped (its Service
    /// went, or stopped asking).
    parked: std::sync::Mutex<HashMap<String, (Arc<PrivateKey>, std::time::Instant)>>,
    /// Counts every key generated (`service_ca_keys_generated_total`).
    generated: Counter,
}

#[derive(Default)]
struct Ready {
    keys: HashMap<KeyKind, Vec<PrivateKey>>,
    asked: HashMap<KeyKind, std::time::Instant>,
}

/// How many keys to keep ready: `base` per kind in use, and `idle` of the default
/// kind once nothing has been asked for within [`IDLE_AFTER`].
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub base: usize,
    pub idle: usize,
}

impl Ready {
    /// Forgets kinds nobody asked for within [`IN_USE_FOR`] (and drops their keys);
    /// then the kind in use with the fewest ready keys, if it has fewer than it should
    /// (see [`Buffer`]).
    fn next_to_fill(&mut self, default_kind: KeyKind, buffer: Buffer) -> Option<KeyKind> {
        self.asked.retain(|kind, at| *kind == default_kind || at.elapsed() < IN_USE_FOR);
        self.asked.entry(default_kind).or_insert_with(std::time::Instant::now);
        let asked = &self.asked;
        self.keys.retain(|kind, _| asked.contains_key(kind));
        let idle = asked.values().all(|at| at.elapsed() >= IDLE_AFTER);
        let want = |kind: &KeyKind| match idle && *kind == default_kind {
            true => buffer.base.max(buffer.idle),
            false => buffer.base,
        };
        let count = |kind: &KeyKind| self.keys.get(kind).map_or(0, Vec::len);
        asked.keys().filter(|kind| count(kind) < want(kind)).min_by_key(|kind| count(kind)).copied()
    }
}

/// After this long with no serving key asked for, the default kind's ready keys grow
/// to [`Buffer::idle`] (what a burst of new Services takes at once).
pub const IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// A key algorithm asked for within this long keeps ready keys.
pub const IN_USE_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// At most this many keys stay parked (owners whose writes keep failing); past it new
/// keys are not parked, and their retries generate fresh keys.
const MAX_PARKED: usize = 10_000;

/// How long a parked key waits for its owner's next attempt (a failing write is
/// retried within 5 minutes).
pub const PARKED_FOR: std::time::Duration = std::time::Duration::from_secs(900);

/// The nice value of the key-generation threads for bulk work (relative to the
/// process): under a rotation's re-issues, the reactor (bundle injection, watches,
/// probes) and everything else on the machine go first.
const BULK_NICENESS: i32 = 10;

/// The nice value of the threads for urgent work (new Services, a backlog after a
/// start): still below the reactor, but about even with the API server and the rest of
/// the machine (at 10 they got 0.57 of 2 CPUs during a burst while the API server used
/// 0.06 and the key threads were idle 1 % of the time: the CPU went to unrelated work).
const URGENT_NICENESS: i32 = 1;

impl KeyPool {
    /// A pool of `concurrency` generators keeping `buffer` keys ready per kind in use
    /// (`default_kind` always). Must be called inside the async runtime (the refill
    /// runs as a task).
    pub fn new(concurrency: usize, buffer: usize, default_kind: KeyKind, generated: Counter) -> Self {
        Self::with_buffer(concurrency, Buffer { base: buffer, idle: buffer }, default_kind, generated)
    }

    /// As [`KeyPool::new`], with more keys of `default_kind` ready when idle (none at
    /// all if `buffer.base` is 0).
    pub fn with_buffer(concurrency: usize, buffer: Buffer, default_kind: KeyKind, generated: Counter) -> Self {
        let pool = KeyPool {
            inner: Arc::new(PoolInner {
                jobs: spawn_workers(concurrency.max(1)),
                ready: std::sync::Mutex::new(Ready::default()),
                default_kind,
                buffer,
                refill: tokio::sync::Notify::new(),
                parked: std::sync::Mutex::new(HashMap::new()),
                generated,
            }),
        };
        if buffer.base > 0 {
            let pool = pool.clone();
            // Woken by a request, or at the latest when a kind may have gone out of use
            // (or the pool become idle).
            let wait = if buffer.idle > buffer.base { IDLE_AFTER } else { IN_USE_FOR };
            tokio::spawn(async move {
                loop {
                    let (default_kind, buffer) = (pool.inner.default_kind, pool.inner.buffer);
                    let kind = pool.inner.ready.lock().ok().and_then(|mut r| r.next_to_fill(default_kind, buffer));
                    let Some(kind) = kind else {
                        let _ = tokio::time::timeout(wait, pool.inner.refill.notified()).await;
                        continue;
                    };
                    match pool.fresh(kind, Priority::Bulk, "").await {
                        Ok(key) => {
                            if let Ok(mut ready) = pool.inner.ready.lock() {
                                ready.keys.entry(kind).or_default().push(key);
                            }
                        }
                        _ => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                    }
                }
            });
        }
        pool
    }

    /// Runs `job`, costing `cost` (see [`cost`]), on a worker thread: urgent jobs first,
    /// then fair across namespaces (see [`Queue`]); `namespace` is whom it is for (""
    /// for the operator's own work: CA keys, ready keys).
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
        priority: Priority,
        namespace: &str,
        cost: u64,
    ) -> Result<T, PkiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        self.inner.jobs.push(job, priority, namespace, cost)?;
        rx.await.map_err(|_| PkiError::KeyGeneration("key generation worker failed".into()))
    }

    /// A freshly generated key of `kind`, on a worker thread.
    async fn fresh(&self, kind: KeyKind, priority: Priority, namespace: &str) -> Result<PrivateKey, PkiError> {
        let key = self.run(move || PrivateKey::generate(kind), priority, namespace, cost(kind)).await??;
        self.inner.generated.inc();
        tracing::debug!(%kind, "key generated");
        Ok(key)
    }

    /// Whether urgent work (a key somebody is waiting for) is queued or running: what
    /// can wait, such as Normal Events, waits then (see `Context::event_after_urgent_work`).
    pub fn urgent_pending(&self) -> bool {
        self.inner.jobs.urgent_pending()
    }

    /// Generates a key of `kind` (CA keys: never from the buffer).
    pub async fn generate(&self, kind: KeyKind) -> Result<PrivateKey, PkiError> {
        self.fresh(kind, Priority::Urgent, "").await
    }

    /// A serving key of `kind` for `owner` (in `namespace`): the one parked for it by
    /// an earlier attempt whose write failed (if of that kind), else (urgent work
    /// only) a ready one, else a fresh one.
    async fn serving_key(
        &self,
        owner: &str,
        namespace: &str,
        kind: KeyKind,
        priority: Priority,
    ) -> Result<Arc<PrivateKey>, PkiError> {
        if let Ok(mut parked) = self.inner.parked.lock()
            && let Some((key, _)) = parked.get(owner).cloned()
        {
            if key.kind() == kind {
                tracing::debug!(owner, "signing over the key parked by a failed attempt");
                return Ok(key);
            }
            // The Service now asks for another kind of key.
            parked.remove(owner);
        }
        let ready = self.inner.ready.lock().ok().and_then(|mut r| {
            r.asked.insert(kind, std::time::Instant::now());
            match priority {
                Priority::Urgent => r.keys.get_mut(&kind).and_then(Vec::pop),
                Priority::Bulk => None,
            }
        });
        self.inner.refill.notify_one();
        let key = Arc::new(match ready {
            Some(key) => key,
            None => self.fresh(kind, priority, namespace).await?,
        });
        if let Ok(mut parked) = self.inner.parked.lock() {
            // Keys of owners that went are dropped here, the only place the map grows.
            parked.retain(|_, (_, at)| at.elapsed() < PARKED_FOR);
            if parked.len() < MAX_PARKED {
                parked.insert(owner.to_string(), (key.clone(), std::time::Instant::now()));
            }
        }
        Ok(key)
    }

    /// A serving certificate for `request`, signed over a key of the kind it asks
    /// for. The key stays
    /// parked for the request's Service until [`KeyPool::written`]: a write that fails
    /// (and is retried later) costs no new key.
    pub async fn issue(
        &self,
        signer: Arc<Signer>,
        request: LeafRequest,
        lifetime: std::time::Duration,
        priority: Priority,
    ) -> Result<IssuedLeaf, PkiError> {
        // Checked before a key is spent on it.
        signer.ca.check_unexpired(OffsetDateTime::now_utc())?;
        let key = self.serving_key(&request.uid, &request.namespace, request.key, priority).await?;
        // Signing (~1 ms with ring) also stays off the reactor.
        tokio::task::spawn_blocking(move || signer.ca.issue(&request, &key, OffsetDateTime::now_utc(), lifetime))
            .await
            .map_err(|e| PkiError::Signing(format!("worker failed: {e}")))?
    }

    /// The certificate issued for the Service with UID `owner` was written: its key is
    /// no longer needed here.
    pub fn written(&self, owner: &str) {
        if let Ok(mut parked) = self.inner.parked.lock() {
            parked.remove(owner);
        }
    }
}

/// Starts the worker threads: `n` for urgent work and `n` for bulk work, at most `n`
/// of them running a job at once (see [`Queue`]). They stop when the queue closes,
/// that is when the last handle to the pool is dropped; the refill task holds one, so
/// in the operator they live as long as the process.
fn spawn_workers(n: usize) -> Arc<Queue> {
    let queue = Arc::new(Queue::new(n));
    for (class, niceness, name) in
        [(Priority::Urgent, URGENT_NICENESS, "keygen"), (Priority::Bulk, BULK_NICENESS, "keygen-bulk")]
    {
        for i in 0..n {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
                lower_priority(niceness);
                while let Some(job) = queue.next(class) {
                    // A panicking job drops its reply channel (the caller sees an
                    // error); the worker carries on.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    queue.done(class);
                }
            });
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start a key-generation thread");
            }
        }
    }
    queue
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.jobs.close();
    }
}

/// Lowers the calling thread's CPU priority (on Linux the nice value is per thread).
#[allow(unsafe_code)] // one of the two documented exceptions: setpriority
fn lower_priority(by: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments; `who = 0` is the
        // calling thread.
        let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, current_niceness().saturating_add(by)) } != 0;
        if failed {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the key-generation priority");
        }
    }
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one of the two documented exceptions: getpriority
fn current_niceness() -> i32 {
    // SAFETY: getpriority only reads its integer arguments. (-1 is also a valid nice
    // value, so errors are not told apart; for the calling thread it cannot fail.)
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[cfg(test)]
mod tests;
