//! What this replica has just written, so that the passes our own writes set off do
//! not read it back: the serving Secrets ([`Written`]) and the Services marked signed
//! ([`Marked`]).
//!
//! Every Secret write is followed by two passes that would read the Secret whole from
//! the API server: serving-cert's (the Secret changed: is its Service served?) and
//! cert-refresh's (a managed Secret changed: is it right?). When the cache shows the
//! Secret at the very resourceVersion our write produced, the API server holds exactly
//! the object it returned to us, and that copy is used instead of a GET. Any later
//! change, by anyone, moves the resourceVersion and the Secret is read again.
//!
//! Only for a moment, and only a bounded number: a copy is dropped after [`KEEP_FOR`]
//! ([`Written::drop_expired_until`]) and at most [`MAX_KEPT`] are kept (past that a
//! write is simply not remembered). So the private keys of certificates issued in a
//! burst do not stay in memory, as the metadata-only Secret cache promises.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

/// How long a written Secret (or a mark) is kept for the passes that follow the write.
pub const KEEP_FOR: Duration = Duration::from_secs(15);

/// At most this many are kept of each (an RSA-2048 Secret is about 5 KiB).
pub const MAX_KEPT: usize = 1024;

/// Entries that count for [`KEEP_FOR`]; at most [`MAX_KEPT`] (past that, a new one is
/// not kept: the pass reads the API server as before).
struct Kept<K, V>(Mutex<HashMap<K, (Instant, V)>>);

impl<K, V> Default for Kept<K, V> {
    fn default() -> Self {
        Kept(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + Hash, V> Kept<K, V> {
    fn insert(&self, key: K, value: V) {
        let Ok(mut kept) = self.0.lock() else { return };
        if kept.len() >= MAX_KEPT {
            kept.retain(|_, (at, _)| at.elapsed() < KEEP_FOR);
        }
        if kept.len() < MAX_KEPT {
            kept.insert(key, (Instant::now(), value));
        }
    }

    /// What `pick` makes of the entry for `key`, if it is still recent.
    fn get<R>(&self, key: &K, pick: impl FnOnce(&V) -> Option<R>) -> Option<R> {
        let kept = self.0.lock().ok()?;
        kept.get(key).filter(|(at, _)| at.elapsed() < KEEP_FOR).and_then(|(_, value)| pick(value))
    }

    fn drop_expired(&self) {
        if let Ok(mut kept) = self.0.lock() {
            kept.retain(|_, (at, _)| at.elapsed() < KEEP_FOR);
        }
    }
}

/// The Secrets just written, by (namespace, name).
#[derive(Default)]
pub struct Written(Kept<(String, String), Secret>);

impl Written {
    /// Keeps `secret`, as the API server returned it from a write.
    pub fn remember(&self, secret: Secret) {
        self.0.insert((secret.namespace().unwrap_or_default(), secret.name_any()), secret);
    }

    /// The Secret `namespace/name` as we wrote it, if that write is still the one the
    /// cache shows (`cached`: the resourceVersion there) and recent. A write of ours
    /// that failed changes nothing here: the cache shows the version there is, and a
    /// copy is used only when it is that version.
    pub fn current(&self, namespace: &str, name: &str, cached: Option<&str>) -> Option<Secret> {
        let cached = cached?;
        self.0.get(&(namespace.to_string(), name.to_string()), |secret| {
            (secret.metadata.resource_version.as_deref() == Some(cached)).then(|| secret.clone())
        })
    }

    /// Drops the copies older than [`KEEP_FOR`] every [`KEEP_FOR`] until shutdown, so
    /// that no private key stays in memory after a burst.
    pub async fn drop_expired_until(&self, shutdown: crate::shutdown::Shutdown) {
        let mut stop = std::pin::pin!(shutdown.signal());
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(KEEP_FOR) => self.0.drop_expired(),
            }
        }
    }
}

/// The Services just marked `serving-cert-signed-by`, by UID: the resourceVersion the
/// mark was made over and the CA's CN. The cache shows a mark of ours only a moment
/// later; a pass in that moment (the one our own Secret write sets off) would otherwise
/// read the Service again to learn it is marked.
#[derive(Default)]
pub struct Marked(Kept<String, (String, String)>);

impl Marked {
    /// Remembers that the Service with `uid`, cached at `version`, was marked for `ca`.
    pub fn remember(&self, uid: &str, version: &str, ca: &str) {
        self.0.insert(uid.to_string(), (version.to_string(), ca.to_string()));
    }

    /// Whether the Service with `uid`, cached at `version`, is one we just marked for
    /// `ca` (the cache has not caught up with the mark; anything since moved the version).
    pub fn lagging(&self, uid: &str, version: &str, ca: &str) -> bool {
        self.0.get(&uid.to_string(), |(v, c)| (v == version && c == ca).then_some(())).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, version: &str) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.namespace = Some("shop".into());
        secret.metadata.name = Some(name.into());
        secret.metadata.resource_version = Some(version.into());
        secret
    }

    #[test]
    fn a_written_secret_stands_in_for_a_read_only_at_the_version_the_cache_shows() {
        let written = Written::default();
        written.remember(secret("tls", "7"));
        assert!(written.current("shop", "tls", Some("7")).is_some());
        assert!(written.current("shop", "tls", Some("8")).is_none(), "changed since our write");
        assert!(written.current("shop", "tls", None).is_none(), "not in the cache yet");
        assert!(written.current("shop", "other", Some("7")).is_none());
    }

    #[test]
    fn a_mark_counts_only_over_the_version_it_was_made_on_and_for_its_ca() {
        let marked = Marked::default();
        marked.remember("uid-1", "7", "ca-1");
        assert!(marked.lagging("uid-1", "7", "ca-1"));
        assert!(!marked.lagging("uid-1", "8", "ca-1"), "the Service changed since");
        assert!(!marked.lagging("uid-1", "7", "ca-2"), "another CA");
        assert!(!marked.lagging("uid-2", "7", "ca-1"));
    }

    #[test]
    fn at_most_max_kept_are_kept() {
        let written = Written::default();
        for i in 0..MAX_KEPT + 10 {
            written.remember(secret(&format!("s{i}"), "1"));
        }
        assert_eq!(written.0.0.lock().unwrap().len(), MAX_KEPT);
        assert!(written.current("shop", &format!("s{}", MAX_KEPT + 5), Some("1")).is_none());
    }
}
