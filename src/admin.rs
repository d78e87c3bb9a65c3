//! The admin server: `/livez`, `/readyz`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Where this process stands in leader election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the lease: healthy, doing nothing.
    Standby = 0,
    Leader = 1,
}

/// What `/readyz` reports. Written by the controllers, read by the probe.
#[derive(Debug)]
pub struct Health {
    role: AtomicU8,
    signer_loaded: AtomicBool,
    caches_synced: AtomicBool,
    api_reachable: AtomicBool,
    signing_key_usable: AtomicBool,
    rotation_failing: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            role: AtomicU8::new(Role::Standby as u8),
            signer_loaded: AtomicBool::new(false),
            caches_synced: AtomicBool::new(false),
            api_reachable: AtomicBool::new(true),
            signing_key_usable: AtomicBool::new(true),
            rotation_failing: AtomicBool::new(false),
        }
    }
}

impl Health {
    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }
    pub fn set_signer_loaded(&self) {
        self.signer_loaded.store(true, Ordering::Relaxed);
    }
    pub fn set_caches_synced(&self) {
        self.caches_synced.store(true, Ordering::Relaxed);
    }
    /// Fed by the watch streams: an error marks the API unreachable until the next
    /// successful event.
    pub fn observe_api(&self, ok: bool) {
        self.api_reachable.store(ok, Ordering::Relaxed);
    }
    pub fn set_signing_key_usable(&self, usable: bool) {
        self.signing_key_usable.store(usable, Ordering::Relaxed);
    }
    pub fn set_rotation_failing(&self, failing: bool) {
        self.rotation_failing.store(failing, Ordering::Relaxed);
    }

    /// `Ok(note)` when ready, `Err(reasons)` when not.
    pub fn readiness(&self) -> Result<&'static str, Vec<&'static str>> {
        let mut problems = Vec::new();
        if !self.api_reachable.load(Ordering::Relaxed) {
            problems.push("the API server is not reachable");
        }
        if self.role.load(Ordering::Relaxed) == Role::Standby as u8 {
            return if problems.is_empty() { Ok("standby: waiting for the leader lease") } else { Err(problems) };
        }
        if !self.signer_loaded.load(Ordering::Relaxed) {
            problems.push("no usable CA loaded yet");
        }
        if !self.caches_synced.load(Ordering::Relaxed) {
            problems.push("caches not synced yet");
        }
        if problems.is_empty() {
            if !self.signing_key_usable.load(Ordering::Relaxed) {
                Ok("degraded: signing-key cannot be used; signing with the CA loaded earlier")
            } else if self.rotation_failing.load(Ordering::Relaxed) {
                Ok("degraded: the CA is due for rotation but rotating it fails; signing with the current CA")
            } else {
                Ok("ok")
            }
        } else {
            Err(problems)
        }
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(AdminState { health, metrics });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.health.readiness() {
        Ok(note) => (StatusCode::OK, format!("{note}\n")),
        Err(problems) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; "))),
    }
}

async fn metrics_page(State(state): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}
