//! Progress of the bulk re-issue after the CA changes (a rotation or a hard reset):
//! every managed Secret is looked at again and most are re-issued, paced by the key
//! pool. The cert-refresh controller records the CA it last looked at each Secret
//! with; a reporter logs "N of M" with an ETA at a steady cadence and keeps
//! `service_ca_reissue_remaining` current, until every Secret has been looked at.
//! The first CA loaded counts as a change too once a Secret signed by another CA is
//! found: a rotation forced before start-up, or a CA changed while no operator ran.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;

use super::request::originating_service;
use crate::controllers::Context;
use crate::shutdown::Shutdown;

/// The last look at each managed Secret: with which CA (its subject key id) and what was
/// done. A round counts the looks made with its CA, so a look made before the reporter
/// noticed the change still counts. Looks of Secrets no longer cached are pruned at the
/// end of each round and every [`PRUNE_EVERY`] between rounds.
#[derive(Default)]
pub struct Progress(Mutex<HashMap<String, (Vec<u8>, Looked)>>);

/// What the cert-refresh controller did with a Secret it looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Looked {
    /// Left as it was (or only tidied), or not ours to write.
    Left,
    /// Re-issued for another reason (e.g. due, names changed).
    Reissued,
    /// Re-issued because another CA signed it.
    ReissuedForTheCa,
}

const PRUNE_EVERY: Duration = Duration::from_secs(600);

impl Progress {
    /// The cert-refresh controller looked at `secret` with the CA whose subject key id
    /// is `ca` (the first look with a CA counts). Looks at one Secret never overlap (the
    /// controller runs one pass per object at a time), so the last CA recorded is the
    /// newest.
    pub fn looked_at(&self, secret: String, looked: Looked, ca: &[u8]) {
        if let Ok(mut seen) = self.0.lock() {
            match seen.get(&secret) {
                Some((seen_with, _)) if seen_with.as_slice() == ca => {}
                _ => {
                    seen.insert(secret, (ca.to_vec(), looked));
                }
            }
        }
    }

    /// Forgets the looks of Secrets not in `current`.
    fn retain(&self, current: &[String]) {
        let current: std::collections::HashSet<&String> = current.iter().collect();
        if let Ok(mut seen) = self.0.lock() {
            seen.retain(|secret, _| current.contains(secret));
        }
    }

    /// Of the Secrets `current`ly to be looked at: how many were looked at with `ca`, how
    /// many of those were re-issued, and how many because another CA signed them.
    /// Secrets deleted meanwhile no longer count (the round would otherwise never end).
    fn counts(&self, current: &[String], ca: &[u8]) -> Counts {
        let mut counts = Counts::default();
        if let Ok(seen) = self.0.lock() {
            let looks = current.iter().filter_map(|secret| seen.get(secret)).filter(|(with, _)| with.as_slice() == ca);
            for (_, looked) in looks {
                counts.done = counts.done.saturating_add(1);
                if *looked != Looked::Left {
                    counts.reissued = counts.reissued.saturating_add(1);
                }
                if *looked == Looked::ReissuedForTheCa {
                    counts.for_the_ca = counts.for_the_ca.saturating_add(1);
                }
            }
        }
        counts
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    done: u64,
    reissued: u64,
    for_the_ca: u64,
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
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = prune.tick() => {
                progress.retain(&owned_secrets(&ctx, &secrets, &services));
                continue;
            }
            change = changes.next() => if change.is_none() { return },
        }
        // Only a new CA means a bulk re-issue (not a bundle change).
        let current = ctx.signer.current().map(|s| s.ca.subject_key_id().to_vec());
        let previous = std::mem::replace(&mut held, current.clone());
        let Some(ca) = current.filter(|_| previous != held) else {
            continue;
        };
        // The first CA loaded may be new too: rotated before it was loaded (a forced
        // rotation waiting at start-up), or changed while no operator ran. That round is
        // shown only once a Secret signed by another CA is found.
        let quiet = previous.is_none();
        // Counting needs both caches listed: before that every round would look done
        // (the first CA is often loaded, or rotated, before the Secrets are listed).
        let listed = async {
            let _ = secrets.wait_until_ready().await;
            let _ = services.wait_until_ready().await;
        };
        tokio::select! {
            _ = &mut stop => return,
            () = listed => {}
        }
        let started = Instant::now();
        loop {
            let owned = owned_secrets(&ctx, &secrets, &services);
            let total = owned.len() as u64;
            let counts = progress.counts(&owned, &ca);
            let shown = !quiet || counts.for_the_ca > 0;
            let line = describe(counts.done, counts.reissued, total, started.elapsed());
            if shown {
                ctx.metrics.reissue_remaining.set(total.saturating_sub(counts.done) as i64);
            }
            if counts.done >= total {
                if shown {
                    tracing::info!("{line} in {:.1}s", started.elapsed().as_secs_f64());
                }
                progress.retain(&owned);
                break;
            }
            if shown {
                tracing::info!("{line}");
            }
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

/// The managed Secrets whose Service we serve (and, when issuance is shared, own): each
/// is looked at again after a CA change.
fn owned_secrets(ctx: &Context, secrets: &Store<PartialObjectMeta<Secret>>, services: &Store<Service>) -> Vec<String> {
    secrets
        .state()
        .iter()
        .filter(|s| originating_service(s.as_ref()).is_some_and(|svc| services.get(&svc).is_some()))
        .filter(|s| ctx.sharing.owns(&super::request::secret_key(s)))
        .map(|s| super::secret_ref(&s.namespace().unwrap_or_default(), &s.name_any()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_secret_once_per_ca_and_words_an_eta() {
        use Looked::*;
        let (old, new) = (b"old".as_slice(), b"new".as_slice());
        let p = Progress::default();
        let current: Vec<String> = ["a/x", "a/y", "a/z"].map(String::from).to_vec();
        let counts = |done, reissued, for_the_ca| Counts { done, reissued, for_the_ca };
        p.looked_at("a/x".into(), Left, old);
        assert_eq!(p.counts(&current, new), counts(0, 0, 0), "a look with another CA does not count");
        // Looks with the new CA made before the reporter noticed the change count too.
        p.looked_at("a/x".into(), ReissuedForTheCa, new);
        p.looked_at("a/x".into(), Left, new);
        p.looked_at("a/y".into(), Left, new);
        p.looked_at("a/z".into(), Reissued, new);
        p.looked_at("a/gone".into(), ReissuedForTheCa, new);
        assert_eq!(p.counts(&current, new), counts(3, 2, 1), "the first look counts; a Secret deleted since does not");
        assert_eq!(p.counts(&current[..2], new), counts(2, 1, 1));
        assert_eq!(p.counts(&current, old), counts(0, 0, 0));
        assert_eq!(
            describe(400, 380, 1200, Duration::from_secs(15)),
            "re-issue after the CA change: 400 of 1200 Secrets done (380 re-issued), ETA 30s"
        );
        assert!(!describe(1200, 1200, 1200, Duration::from_secs(45)).contains("ETA"));
        p.retain(&current[..1]);
        assert_eq!(p.counts(&current, new), counts(1, 1, 1), "pruned to the Secrets still cached");
        assert_eq!(p.0.lock().unwrap().len(), 1);
    }
}
