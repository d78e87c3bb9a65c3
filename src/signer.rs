//! The one in-memory signer all controllers share (the CPU-heavy work is done by the
//! key pool, [`crate::keypool`]).
//!
//! The CA lifecycle controller is the only writer of the signer: it loads it from the
//! `signing-key` Secret (after writing that Secret and the bundle ConfigMap) and
//! publishes it here. Every other controller reads a snapshot and subscribes to
//! changes, so a rotation or reset reaches all of them at once, without a restart.

use std::sync::Arc;

use futures::Stream;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::pki::CertificateAuthority;

/// A loaded CA plus the bundle derived from it at load time.
#[derive(Debug)]
pub struct Signer {
    pub ca: CertificateAuthority,
    /// The trust bundle (docs/spec.md §3.4) as of the moment this snapshot was published.
    pub bundle_pem: String,
}

impl Signer {
    pub fn new(ca: CertificateAuthority, now: OffsetDateTime) -> Self {
        let bundle_pem = ca.bundle_pem(now);
        Signer { ca, bundle_pem }
    }
}

/// Shared handle to the current signer (`None` until the CA is loaded).
#[derive(Clone)]
pub struct SignerHandle {
    tx: Arc<watch::Sender<Option<Arc<Signer>>>>,
}

impl Default for SignerHandle {
    fn default() -> Self {
        SignerHandle { tx: Arc::new(watch::Sender::new(None)) }
    }
}

impl SignerHandle {
    pub fn current(&self) -> Option<Arc<Signer>> {
        self.tx.borrow().clone()
    }

    /// Publishes a new signer to every subscriber.
    pub fn publish(&self, signer: Signer) {
        self.tx.send_replace(Some(Arc::new(signer)));
    }

    /// A stream that yields once per published change (for `reconcile_all_on`).
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.tx.subscribe();
        futures::stream::unfold(rx, |mut rx| async move { rx.changed().await.ok().map(|_| ((), rx)) })
    }
}
