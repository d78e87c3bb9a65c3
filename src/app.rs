//! Wiring: client, caches, signer, leader election, the four controllers, the admin
//! server, and a graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::watch;

use crate::admin::{self, Health, Role};
use crate::annotations as ann;
use crate::config::Config;
use crate::controllers::{Context, ServingWatches, ca_bundle, ca_lifecycle, cert_refresh, serving_cert};
use crate::metrics::Metrics;
use crate::signer::{KeyPool, SignerHandle};

pub const LEASE_NAME: &str = "service-ca-operator";

/// A cloneable shutdown signal, raised by SIGTERM or SIGINT.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn on_signals() -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let terminate = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate => {}
            }
            tracing::info!("shutdown requested: finishing in-flight work");
            let _ = tx.send(true);
        });
        Shutdown(rx)
    }

    /// Resolves once shutdown was requested.
    pub fn signal(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let shutdown = Shutdown::on_signals();
    let client =
        Client::try_default().await.context("no usable Kubernetes client configuration (kubeconfig or in-cluster)")?;
    let health = Arc::new(Health::default());
    let identity = config.lease_identity.clone().unwrap_or_else(default_identity);

    // Caches of annotated Services (those the selector picks) and our own serving
    // Secrets (by label), shared by the serving-cert and cert-refresh controllers.
    let serving = ServingWatches::new(&client, &config.selector, health.clone());
    let (services, secrets) = (serving.services.clone(), serving.secrets.clone());
    let metrics = Arc::new(Metrics::new(Some(secrets.clone())));

    let listener =
        admin::bind(config.admin_addr).await.with_context(|| format!("cannot listen on {}", config.admin_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "admin server listening (/livez, /readyz, /metrics)");
    let admin = tokio::spawn(admin::serve(listener, health.clone(), metrics.clone(), shutdown.signal()));

    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "service-ca-operator".into(), instance: Some(identity.clone()) },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        keys: KeyPool::new(config.issuance_concurrency(), config.key_buffer),
        signer: SignerHandle::default(),
        metrics,
        health: health.clone(),
        recorder,
        config,
    });

    // Leader election: only the holder of the Lease runs the controllers.
    let mut lease = None;
    if ctx.config.leader_elect {
        let (leader, task) = acquire_lease(&ctx, &identity).await?;
        let mut waiting = leader.clone();
        let elected = tokio::select! {
            _ = shutdown.signal() => false,
            result = waiting.wait_for(|is_leader| *is_leader) => { result.context("leader election stopped")?; true }
        };
        drop(waiting);
        if !elected {
            drop(leader);
            let _ = task.await;
            return Ok(());
        }
        tracing::info!(%identity, "acquired the leader lease");
        lease = Some((leader, task));
    }
    health.set_role(Role::Leader);

    let synced = {
        let (services, secrets, health) = (services.clone(), secrets.clone(), health.clone());
        async move {
            if services.wait_until_ready().await.is_ok() && secrets.wait_until_ready().await.is_ok() {
                health.set_caches_synced();
                tracing::info!("caches synced");
            }
        }
    };
    let controllers = async {
        tokio::join!(
            ca_lifecycle::run(ctx.clone(), shutdown.signal()),
            serving_cert::run(
                ctx.clone(),
                services.clone(),
                serving.service_events,
                serving.secret_changes,
                shutdown.signal()
            ),
            cert_refresh::run(
                ctx.clone(),
                secrets.clone(),
                serving.secret_events,
                services.clone(),
                serving.service_changes,
                shutdown.signal()
            ),
            ca_bundle::run(ctx.clone(), shutdown.clone()),
            synced,
        )
    };

    match &mut lease {
        None => {
            controllers.await;
        }
        Some((leader, _)) => {
            let mut lost = leader.clone();
            tokio::select! {
                _ = controllers => {}
                _ = lost.wait_for(|is_leader| !*is_leader) => {
                    // Exit at once: only the holder of the lease may write.
                    anyhow::bail!("lost the leader lease; exiting so that only the leader writes");
                }
            }
        }
    }
    if let Some((leader, task)) = lease {
        drop(leader);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the leader lease"),
            other => tracing::warn!(?other, "could not release the leader lease; it expires by itself"),
        }
    }
    let _ = admin.await;
    tracing::info!("stopped");
    Ok(())
}

async fn acquire_lease(
    ctx: &Context,
    identity: &str,
) -> anyhow::Result<(
    watch::Receiver<bool>,
    tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
)> {
    let duration = ctx.config.lease_duration.as_secs().max(3);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(ctx.client.clone(), LEASE_NAME)
        .with_namespace(&ctx.config.namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .with_field_manager(format!("{}-lease", ann::FIELD_MANAGER))
        .build()
        .await
        .context("cannot set up leader election")?;
    tracing::info!(%identity, lease = LEASE_NAME, namespace = %ctx.config.namespace, "waiting for the leader lease");
    Ok(manager.watch().await)
}

fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "service-ca-operator".into());
    let suffix: u32 = rand::random();
    format!("{host}-{suffix:08x}")
}
