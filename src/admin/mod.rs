//! The admin servers: `/livez` and `/readyz` in plain HTTP for the kubelet's probes,
//! and `/metrics` on its own port, by default over TLS for authorised scrapers only
//! (`tls`, `authz`).

pub mod authz;
pub mod serve;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use self::authz::{Authorizer, Verdict};
use crate::metrics::Metrics;

/// Where this process stands in leader election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the lease: healthy, doing nothing.
    Standby = 0,
    Leader = 1,
    /// Not the leader, but issuing its share (issuance shared across replicas).
    Member = 2,
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
    /// Why the CA key's PKCS#11 token cannot be used, if it cannot.
    ca_key_problem: std::sync::Mutex<Option<&'static str>>,
    /// Replicas sharing issuance (0: sharing is off).
    members: std::sync::atomic::AtomicUsize,
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
            ca_key_problem: std::sync::Mutex::new(None),
            members: std::sync::atomic::AtomicUsize::new(0),
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
    /// Told by the CA key's PKCS#11 token: why it cannot be used, or `None`.
    pub fn set_ca_key_problem(&self, problem: Option<&'static str>) {
        if let Ok(mut held) = self.ca_key_problem.lock() {
            *held = problem;
        }
    }
    pub fn set_members(&self, members: usize) {
        self.members.store(members, Ordering::Relaxed);
    }

    /// `Ok(note)` when ready, `Err(reasons)` when not.
    pub fn readiness(&self) -> Result<&'static str, Vec<&'static str>> {
        let mut problems = Vec::new();
        if !self.api_reachable.load(Ordering::Relaxed) {
            problems.push("the API server is not reachable");
        }
        let role = self.role.load(Ordering::Relaxed);
        if role == Role::Standby as u8 {
            return if problems.is_empty() { Ok("standby: waiting for the leader lease") } else { Err(problems) };
        }
        if !self.signer_loaded.load(Ordering::Relaxed) {
            problems.push("no usable CA loaded yet");
        }
        // A key that cannot sign leaves nothing to sign with, whatever CA is loaded.
        if let Some(problem) = self.ca_key_problem.lock().ok().and_then(|held| *held) {
            problems.push(problem);
        }
        if !self.caches_synced.load(Ordering::Relaxed) {
            problems.push("caches not synced yet");
        }
        let members = self.members.load(Ordering::Relaxed);
        if role == Role::Member as u8 && members == 0 {
            problems.push("not yet a member of the replicas sharing issuance");
        }
        if problems.is_empty() {
            if !self.signing_key_usable.load(Ordering::Relaxed) {
                Ok("degraded: signing-key cannot be used; signing with the CA loaded earlier")
            } else if self.rotation_failing.load(Ordering::Relaxed) {
                Ok("degraded: the CA is due for rotation but rotating it fails; signing with the current CA")
            } else if members == 0 {
                Ok("ok")
            } else if role == Role::Leader as u8 {
                Ok("ok: leader, and issuing its share")
            } else {
                Ok("ok: member, issuing its share")
            }
        } else {
            Err(problems)
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The probe server (`/livez`, `/readyz`), until `shutdown` completes.
pub async fn serve_probes(
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route("/livez", get(|| async { "ok\n" })).route("/readyz", get(readyz)).with_state(health);
    serve::serve(listener, None, app, shutdown).await
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match health.readiness() {
        Ok(note) => (StatusCode::OK, format!("{note}\n")),
        Err(problems) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; "))),
    }
}

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    /// `None`: anyone who reaches the port may read (`--metrics-secure=false`).
    authorizer: Option<Arc<Authorizer>>,
}

/// The metrics server on `listener` (over TLS with `tls`), until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Arc<Metrics>,
    authorizer: Option<Arc<Authorizer>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(crate::names::METRICS_PATH, get(metrics_page))
        .with_state(MetricsState { metrics, authorizer });
    serve::serve(listener, tls, app, shutdown).await
}

async fn metrics_page(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    if let Some(authorizer) = &state.authorizer {
        let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match authorizer.check(presented).await {
            Ok(Verdict::Allowed) => {}
            Ok(Verdict::Unauthenticated) => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "Unauthorized: send the bearer token of a user allowed to get /metrics\n",
                )
                    .into_response();
            }
            Ok(Verdict::Busy) => {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, "1")],
                    "Too many tokens to review at once; try again\n",
                )
                    .into_response();
            }
            Ok(Verdict::Forbidden(user)) => {
                return (StatusCode::FORBIDDEN, format!("Forbidden: user \"{user}\" may not get /metrics\n"))
                    .into_response();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot review a scraper's token");
                return (StatusCode::SERVICE_UNAVAILABLE, "cannot review the token now; try again\n").into_response();
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}
