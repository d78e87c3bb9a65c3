//! The key-generation threads' work queue: urgent jobs before bulk ones, fair across
//! namespaces weighted by key cost.

use std::collections::HashMap;

use crate::pki::{KeyKind, PkiError};

pub(super) type Job = Box<dyn FnOnce() + Send>;

/// Which jobs the key-generation threads take first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Somebody is waiting for it: a certificate for a new Service (or a deleted
    /// Secret), a CA key. Also the only work that may take a ready key.
    Urgent,
    /// Bulk work: re-issues after a CA change or refresh, refilling the ready keys.
    Bulk,
}

/// The work queue of the key-generation threads: urgent jobs before bulk ones, and
/// within each, fair across namespaces, weighted by key cost (start-time fair
/// queueing): each namespace with work waiting has a virtual start tag, the job of the
/// namespace with the lowest tag goes next (ties: arrival order), and its tag grows by
/// the job's [`cost`]. A namespace that had nothing waiting joins at the current
/// virtual time, so it neither banks credit while idle nor waits behind another
/// namespace's backlog: while one namespace has 300 RSA-4096 keys queued, a key for
/// another namespace is the next one started. Within a namespace, jobs run in arrival
/// order.
///
/// Each priority has threads of its own (urgent ones at a higher CPU priority than
/// bulk ones), and at most `slots` jobs run at once across them: a thread for urgent
/// work takes only urgent jobs; one for bulk work takes a bulk job only when no urgent
/// job waits.
pub(super) struct Queue {
    state: std::sync::Mutex<QueueState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct QueueState {
    urgent: Lane,
    bulk: Lane,
    /// Jobs running, and at most how many may.
    running: usize,
    /// Of those, urgent ones.
    urgent_running: usize,
    slots: usize,
    closed: bool,
    /// Arrival counter (ties between namespaces go to the earlier job).
    arrivals: u64,
}

/// One priority's jobs, fair across namespaces.
#[derive(Default)]
pub(super) struct Lane {
    /// Namespaces with jobs waiting: their virtual start tag and jobs in arrival order.
    pub(super) waiting: HashMap<String, Tenant>,
    /// The tags of namespaces with nothing waiting that are ahead of the clock (they
    /// were served recently); dropped once the clock passes them, and all of them
    /// when nothing waits.
    pub(super) idle: HashMap<String, u64>,
    /// Virtual time: the tag of the job started last.
    pub(super) clock: u64,
}

pub(super) struct Tenant {
    pub(super) tag: u64,
    jobs: std::collections::VecDeque<Waiting>,
}

pub(super) struct Waiting {
    pub(super) job: Job,
    pub(super) cost: u64,
    pub(super) arrival: u64,
}

/// The relative cost of generating a key of `kind`, in units of about 1/10 of an
/// RSA-2048 key. Measured on the 2-core test machine (debug build with optimised
/// dependencies, loaded): P-256 0.1 ms, P-384 3–4 ms, RSA-2048 180–220 ms, RSA-3072
/// 1.0–1.1 s, RSA-4096 2.2–2.6 s (RSA key generation is random; its mean grows about
/// as bits^4). ECDSA is rounded up to one unit so that it is never free.
pub fn cost(kind: KeyKind) -> u64 {
    match kind {
        KeyKind::EcdsaP256 | KeyKind::EcdsaP384 => 1,
        KeyKind::Rsa { bits } if bits <= 2048 => 10,
        KeyKind::Rsa { bits } if bits <= 3072 => 50,
        KeyKind::Rsa { bits } if bits <= 4096 => 120,
        KeyKind::Rsa { .. } => 1000,
    }
}

impl Lane {
    pub(super) fn push(&mut self, namespace: &str, waiting: Waiting) {
        if let Some(tenant) = self.waiting.get_mut(namespace) {
            tenant.jobs.push_back(waiting);
            return;
        }
        let tag = self.idle.remove(namespace).unwrap_or(0).max(self.clock);
        let jobs = std::collections::VecDeque::from([waiting]);
        self.waiting.insert(namespace.to_string(), Tenant { tag, jobs });
    }

    /// The next job: the head of the namespace with the lowest tag.
    pub(super) fn pop(&mut self) -> Option<Job> {
        let namespace = self
            .waiting
            .iter()
            .filter_map(|(ns, t)| Some(((t.tag, t.jobs.front()?.arrival), ns)))
            .min_by_key(|(order, _)| *order)
            .map(|(_, ns)| ns.clone())?;
        let tenant = self.waiting.get_mut(&namespace)?;
        let next = tenant.jobs.pop_front()?;
        self.clock = self.clock.max(tenant.tag);
        tenant.tag = tenant.tag.saturating_add(next.cost);
        if tenant.jobs.is_empty() {
            let tag = tenant.tag;
            self.waiting.remove(&namespace);
            self.idle.insert(namespace, tag);
        }
        // Behind the clock a tag no longer matters; when nothing waits, nobody is
        // owed anything.
        let clock = self.clock;
        self.idle.retain(|_, tag| *tag > clock);
        if self.waiting.is_empty() {
            self.idle.clear();
        }
        Some(next.job)
    }
}

impl QueueState {
    /// The job a thread for `class` work may start now, if any (see [`Queue`]).
    fn take(&mut self, class: Priority) -> Option<Job> {
        if self.running >= self.slots {
            return None;
        }
        let job = match class {
            Priority::Urgent => self.urgent.pop(),
            Priority::Bulk if self.urgent.waiting.is_empty() => self.bulk.pop(),
            Priority::Bulk => None,
        }?;
        self.running = self.running.saturating_add(1);
        if class == Priority::Urgent {
            self.urgent_running = self.urgent_running.saturating_add(1);
        }
        Some(job)
    }
}

impl Queue {
    /// A queue running at most `slots` jobs at once.
    pub(super) fn new(slots: usize) -> Self {
        let state = QueueState { slots, ..QueueState::default() };
        Queue { state: std::sync::Mutex::new(state), wake: std::sync::Condvar::new() }
    }

    pub(super) fn push(&self, job: Job, priority: Priority, namespace: &str, cost: u64) -> Result<(), PkiError> {
        let mut state = self.state.lock().map_err(|_| PkiError::KeyGeneration("key pool broken".into()))?;
        if state.closed {
            return Err(PkiError::KeyGeneration("key pool closed".into()));
        }
        let arrival = state.arrivals;
        state.arrivals = arrival.wrapping_add(1);
        let waiting = Waiting { job, cost, arrival };
        match priority {
            Priority::Urgent => state.urgent.push(namespace, waiting),
            Priority::Bulk => state.bulk.push(namespace, waiting),
        }
        // Threads of either class wait on the same condition.
        self.wake.notify_all();
        Ok(())
    }

    /// The next job for a thread for `class` work, once it may start; `None` once the
    /// pool is closed. The thread calls [`Queue::done`] when it has run it.
    pub(super) fn next(&self, class: Priority) -> Option<Job> {
        let mut state = self.state.lock().ok()?;
        loop {
            if let Some(job) = state.take(class) {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.wake.wait(state).ok()?;
        }
    }

    /// The job for `class` that may start now, if any (without waiting).
    #[cfg(test)]
    pub(super) fn try_next(&self, class: Priority) -> Option<Job> {
        self.state.lock().ok()?.take(class)
    }

    /// Whether urgent jobs wait to start or run.
    pub(super) fn urgent_pending(&self) -> bool {
        self.state.lock().is_ok_and(|state| state.urgent_running > 0 || !state.urgent.waiting.is_empty())
    }

    /// A job taken with [`Queue::next`] for `class` work has run: its slot is free.
    pub(super) fn done(&self, class: Priority) {
        if let Ok(mut state) = self.state.lock() {
            state.running = state.running.saturating_sub(1);
            if class == Priority::Urgent {
                state.urgent_running = state.urgent_running.saturating_sub(1);
            }
        }
        self.wake.notify_all();
    }

    pub(super) fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
        }
        self.wake.notify_all();
    }
}
