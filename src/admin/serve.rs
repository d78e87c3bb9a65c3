//! One admin listener, bounded: it holds at most [`MAX_CONNECTIONS`] connections (one
//! beyond that is accepted and closed at once), a TLS client has
//! [`HANDSHAKE_TIMEOUT`] to finish its handshake, every client [`HEADER_TIMEOUT`] to
//! send a request head and [`IDLE_TIMEOUT`] of silence before its connection is
//! closed. An idle or slow client therefore holds one slot (a few KiB) for seconds,
//! and no number of them grows the process.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// Connections held at once per listener (Prometheus and the kubelet need a few).
pub const MAX_CONNECTIONS: usize = 128;
/// A client gets this long to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client gets this long to send a whole request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that neither reads nor writes for this long is closed (longer than
/// a usual scrape interval, so that a scraper keeps its connection).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` completes; then
/// stops accepting (connections already open finish on their own, bounded as above).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut full = false;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken.
                    tracing::debug!(error = %e, "admin server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !full {
                tracing::warn!(%peer, "admin server: {MAX_CONNECTIONS} connections open; closing new ones until one ends");
            }
            full = true;
            drop(stream);
            continue;
        };
        full = false;
        let (app, tls) = (app.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(stream, app).await,
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => connection(tls, app).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin server: TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "admin server: TLS handshake timed out"),
                },
            }
        });
    }
}

/// HTTP/1.1 on one connection, until the client closes it, a request head takes too
/// long, or it stays silent for [`IDLE_TIMEOUT`].
async fn connection<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: I, app: Router) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked { inner: io, activity: activity.clone() });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(true);
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::select! {
        served = conn => if let Err(e) = served {
            tracing::debug!(error = %e, "admin server: connection ended");
        },
        _ = activity.silent_for(IDLE_TIMEOUT) => tracing::debug!("admin server: closed an idle connection"),
    }
}

/// When a connection last read or wrote anything.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    /// Completes once nothing was read or written for `limit`.
    async fn silent_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let Some(deadline) = last.checked_add(limit).and_then(|d| self.start.checked_add(d)) else {
                return std::future::pending().await;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that records its activity.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            this.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, None, app, std::future::pending()));
        addr
    }

    async fn get(addr: std::net::SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_slots_come_back() {
        let addr = server().await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server take them all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(get(addr).await, "", "a connection beyond the limit is closed without an answer");
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(get(addr).await.starts_with("HTTP/1.1 200"), "slots come back when connections end");
    }

    #[tokio::test]
    async fn silence_ends_a_connection() {
        let activity = Activity::new();
        let started = Instant::now();
        activity.silent_for(Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(100)).await;
        activity.touch();
        let touched = Instant::now();
        activity.silent_for(Duration::from_millis(300)).await;
        assert!(touched.elapsed() >= Duration::from_millis(290), "the clock restarts at the last activity");
    }
}
