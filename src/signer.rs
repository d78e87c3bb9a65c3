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

/// Bounded pool for key generation. `permits` keys are generated at once, each on a
/// blocking thread, so a rotation that re-issues thousands of certificates is paced
/// and the reactor keeps serving watches, probes and metrics.
///
/// It also keeps a few RSA-2048 keys ready, generated in the background while the
/// operator is idle, so that a new Service does not wait for key generation (~50 ms,
/// the floor of a fresh certificate otherwise). Under sustained load the buffer is
/// empty and the pool runs at the key-generation rate.
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    permits: Semaphore,
    ready: std::sync::Mutex<Vec<PrivateKey>>,
    buffer: usize,
    refill: tokio::sync::Notify,
}

impl KeyPool {
    /// A pool of `concurrency` generators keeping `buffer` keys ready. Must be called
    /// inside the async runtime (the refill runs as a task).
    pub fn new(concurrency: usize, buffer: usize) -> Self {
        let pool = KeyPool {
            inner: Arc::new(PoolInner {
                permits: Semaphore::new(concurrency.max(1)),
                ready: std::sync::Mutex::new(Vec::with_capacity(buffer)),
                buffer,
                refill: tokio::sync::Notify::new(),
            }),
        };
        if buffer > 0 {
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    let have = pool.inner.ready.lock().map(|r| r.len()).unwrap_or(usize::MAX);
                    if have >= pool.inner.buffer {
                        pool.inner.refill.notified().await;
                        continue;
                    }
                    match pool.run(|| PrivateKey::generate_rsa(2048)).await {
                        Ok(Ok(key)) => {
                            if let Ok(mut ready) = pool.inner.ready.lock() {
                                ready.push(key);
                            }
                        }
                        _ => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                    }
                }
            });
        }
        pool
    }

    /// Runs `job` on a blocking thread once a permit is free.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, PkiError> {
        let _permit =
            self.inner.permits.acquire().await.map_err(|_| PkiError::KeyGeneration("key pool closed".into()))?;
        tokio::task::spawn_blocking(job).await.map_err(|e| PkiError::KeyGeneration(format!("worker failed: {e}")))
    }

    /// Generates a key of `kind` (CA keys: never from the buffer).
    pub async fn generate(&self, kind: KeyKind) -> Result<PrivateKey, PkiError> {
        self.run(move || PrivateKey::generate(kind)).await?
    }

    /// An RSA-2048 serving key: a ready one if there is one, else a fresh one.
    async fn serving_key(&self) -> Result<PrivateKey, PkiError> {
        let ready = self.inner.ready.lock().ok().and_then(|mut r| r.pop());
        self.inner.refill.notify_one();
        match ready {
            Some(key) => Ok(key),
            None => self.run(|| PrivateKey::generate_rsa(2048)).await?,
        }
    }

    /// An RSA-2048 key and a serving certificate signed for it.
    pub async fn issue(
        &self,
        signer: Arc<Signer>,
        request: OwnedLeafRequest,
        lifetime: std::time::Duration,
    ) -> Result<IssuedLeaf, PkiError> {
        let key = self.serving_key().await?;
        // Signing (~1 ms with ring) also stays off the reactor.
        tokio::task::spawn_blocking(move || {
            signer.ca.issue(&request.as_request(), &key, OffsetDateTime::now_utc(), lifetime)
        })
        .await
        .map_err(|e| PkiError::Signing(format!("worker failed: {e}")))?
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
