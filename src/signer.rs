//! The one in-memory signer all controllers share, and the bounded pool that does the
//! CPU-heavy work (RSA key generation) off the async reactor.
//!
//! The CA lifecycle controller is the only writer of the signer: it loads it from the
//! `signing-key` Secret (after writing that Secret and the bundle ConfigMap) and
//! publishes it here. Every other controller reads a snapshot and subscribes to
//! changes, so a rotation or reset reaches all of them at once, without a restart.

use std::sync::Arc;

use futures::Stream;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, watch};

use crate::pki::{CertificateAuthority, IssuedLeaf, KeyKind, LeafRequest, PkiError, PrivateKey};

/// A loaded CA plus the bundle derived from it at load time.
#[derive(Debug)]
pub struct Signer {
    pub ca: CertificateAuthority,
    /// The trust bundle (SPEC §3.4) as of the moment this snapshot was published.
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

/// Bounded pool for key generation and signing. `permits` jobs run at once, each on a
/// blocking thread, so a rotation that re-issues thousands of certificates is paced
/// and the reactor keeps serving watches, probes and metrics.
#[derive(Clone)]
pub struct KeyPool {
    permits: Arc<Semaphore>,
}

impl KeyPool {
    pub fn new(concurrency: usize) -> Self {
        KeyPool { permits: Arc::new(Semaphore::new(concurrency.max(1))) }
    }

    /// Runs `job` on a blocking thread once a permit is free.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, PkiError> {
        let _permit = self.permits.acquire().await.map_err(|_| PkiError::KeyGeneration("key pool closed".into()))?;
        tokio::task::spawn_blocking(job).await.map_err(|e| PkiError::KeyGeneration(format!("worker failed: {e}")))
    }

    /// Generates a key of `kind`.
    pub async fn generate(&self, kind: KeyKind) -> Result<PrivateKey, PkiError> {
        self.run(move || PrivateKey::generate(kind)).await?
    }

    /// Generates an RSA-2048 key and signs a serving certificate for it.
    pub async fn issue(
        &self,
        signer: Arc<Signer>,
        request: OwnedLeafRequest,
        lifetime: std::time::Duration,
    ) -> Result<IssuedLeaf, PkiError> {
        self.run(move || {
            let key = PrivateKey::generate_rsa(2048)?;
            signer.ca.issue(&request.as_request(), &key, OffsetDateTime::now_utc(), lifetime)
        })
        .await?
    }
}

/// A [`LeafRequest`] that owns its strings, to cross into a blocking thread.
#[derive(Clone, Debug)]
pub struct OwnedLeafRequest {
    pub service: String,
    pub namespace: String,
    pub uid: String,
    pub headless: bool,
    pub cluster_domain: String,
}

impl OwnedLeafRequest {
    pub fn as_request(&self) -> LeafRequest<'_> {
        LeafRequest {
            service: &self.service,
            namespace: &self.namespace,
            uid: &self.uid,
            headless: self.headless,
            cluster_domain: &self.cluster_domain,
        }
    }
}
