//! Progress of the bulk re-issue after the CA changes (a rotation or a hard reset):
//! every managed Secret is looked at again and most are re-issued, paced by the key
//! pool. The cert-refresh controller records each Secret it has looked at since the
//! change; a reporter logs "N of M" with an ETA at a steady cadence and keeps
//! `service_ca_reissue_remaining` current, until every Secret has been looked at.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;

use super::request::originating_service;
use crate::controllers::Context;
use crate::shutdown::Shutdown;

/// What has happened since the last CA change: the bulk re-issue under way, if any.
/// Between two (most of the time) nothing is recorded: the Secrets looked at for their
/// own refresh would otherwise pile up until the next CA change.
#[derive(Default)]
pub struct Progress(Mutex<Option<Round>>);

/// One bulk re-issue.
#[derive(Default)]
struct Round {
    /// Secrets looked at since the change (by `namespace/name`).
    seen: HashSet<String>,
    /// Of those, re-issued.
    reissued: u64,
}

impl Progress {
    /// The cert-refresh controller looked at `secret` (and re-issued it or not).
    pub fn looked_at(&self, secret: String, reissued: bool) {
        if let Ok(mut guard) = self.0.lock()
            && let Some(round) = guard.as_mut()
            && round.seen.insert(secret)
            && reissued
        {
            round.reissued = round.reissued.saturating_add(1);
        }
    }

    /// A re-issue begins: counting starts from nothing.
    fn restart(&self) {
        if let Ok(mut round) = self.0.lock() {
            *round = Some(Round::default());
        }
    }

    /// The re-issue is over: what it recorded is dropped and nothing more is recorded.
    fn finish(&self) {
        if let Ok(mut round) = self.0.lock() {
            *round = None;
        }
    }

    fn counts(&self) -> (u64, u64) {
        match self.0.lock().as_deref() {
            Ok(Some(round)) => (round.seen.len() as u64, round.reissued),
            _ => (0, 0),
        }
    }
}

/// "N of M" as the reporter words it, with the ETA from the rate so far.
pub fn describe(done: u64, reissued: u64, total: u64, elapsed: Duration) -> String {
    let eta = if done == 0 || done >= total {
        String::new()
    } else {
        let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
        format!(", ETA {}s", (total.saturating_sub(done) as f64 / rate).ceil())
    };
    format!("re-issue after the CA change: {done} of {total} Secrets done ({reissued} re-issued){eta}")
}

/// Logs and exports the progress of each bulk re-issue, every `every`, until shutdown.
pub async fn report(
    ctx: std::sync::Arc<Context>,
    secrets: Store<PartialObjectMeta<Secret>>,
    services: Store<Service>,
    progress: std::sync::Arc<Progress>,
    every: Duration,
    shutdown: Shutdown,
) {
    let mut changes = ctx.signer.changes().boxed();
    let mut held = ctx.signer.current().map(|s| s.ca.subject_key_id().to_vec());
    let stop = shutdown.signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            change = changes.next() => if change.is_none() { return },
        }
        // Only a new CA means a bulk re-issue (not the first load, nor a bundle change).
        let current = ctx.signer.current().map(|s| s.ca.subject_key_id().to_vec());
        let previous = std::mem::replace(&mut held, current.clone());
        if previous.is_none() || previous == current {
            continue;
        }
        progress.restart();
        // The managed Secrets whose Service we serve (and, when issuance is shared,
        // own): each will be looked at again.
        let total = secrets
            .state()
            .iter()
            .filter(|s| originating_service(s.as_ref()).is_some_and(|svc| services.get(&svc).is_some()))
            .filter(|s| ctx.sharing.owns(&super::request::secret_key(s)))
            .count() as u64;
        let started = Instant::now();
        loop {
            let (done, reissued) = progress.counts();
            ctx.metrics.reissue_remaining.set(total.saturating_sub(done) as i64);
            if done >= total {
                tracing::info!(
                    "{} in {:.1}s",
                    describe(done, reissued, total, started.elapsed()),
                    started.elapsed().as_secs_f64()
                );
                progress.finish();
                break;
            }
            tracing::info!("{}", describe(done, reissued, total, started.elapsed()));
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(every) => {}
            }
            // Another CA change restarts the count (the next round begins at once).
            if ctx.signer.current().map(|s| s.ca.subject_key_id().to_vec()) != held {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_secret_once_and_words_an_eta() {
        let p = Progress::default();
        p.looked_at("a/before".into(), true);
        assert_eq!(p.counts(), (0, 0), "no re-issue under way: nothing recorded");
        p.restart();
        p.looked_at("a/x".into(), true);
        p.looked_at("a/x".into(), true);
        p.looked_at("a/y".into(), false);
        assert_eq!(p.counts(), (2, 1));
        assert_eq!(
            describe(400, 380, 1200, Duration::from_secs(15)),
            "re-issue after the CA change: 400 of 1200 Secrets done (380 re-issued), ETA 30s"
        );
        assert!(!describe(1200, 1200, 1200, Duration::from_secs(45)).contains("ETA"));
        p.restart();
        assert_eq!(p.counts(), (0, 0));
        p.looked_at("a/x".into(), true);
        p.finish();
        p.looked_at("a/after".into(), true);
        assert_eq!(p.counts(), (0, 0), "the finished round is dropped, and nothing recorded after it");
    }
}
