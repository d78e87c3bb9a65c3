//! Wiring: client, caches, signer, leader election, the controllers, the admin
//! server, and a graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::watch;

use crate::admin::{self, Health, Role};
use crate::config::Config;
use crate::controllers::serving::{ServingWatches, cert_refresh, serving_cert};
use crate::controllers::{Context, ca_bundle, ca_lifecycle, pod_certs};
use crate::metrics::Metrics;
use crate::names::{self as ann, LEASE_NAME};
use crate::shutdown::Shutdown;
use crate::signer::{KeyPool, SignerHandle};

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
    let metrics = Arc::new(Metrics::new(Some(serving.secrets.clone())));
    let admin = start_admin(&client, &config, &health, &metrics, &shutdown).await?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "service-ca-operator".into(), instance: Some(identity.clone()) },
    );
    let ctx = Arc::new(Context {
        client,
        keys: KeyPool::new(
            config.issuance_concurrency(),
            config.key_buffer,
            config.default_key_algorithm,
            metrics.keys_generated.clone(),
        ),
        signer: SignerHandle::default(),
        metrics,
        health: health.clone(),
        recorder,
        config,
    });

    // Leader election: only the holder of the Lease runs the controllers.
    let lease = if ctx.config.leader_elect {
        match lead(&ctx, &identity, &shutdown).await? {
            Some(lease) => Some(lease),
            None => return Ok(()), // shut down while waiting
        }
    } else {
        None
    };
    health.set_role(Role::Leader);

    let controllers = run_controllers(ctx.clone(), serving, shutdown.clone());
    match &lease {
        None => controllers.await,
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
    if let Some(lease) = lease {
        release(lease).await;
    }
    let _ = admin.await;
    tracing::info!("stopped");
    Ok(())
}

/// The probe and metrics servers, until shutdown.
async fn start_admin(
    client: &Client,
    config: &Config,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let bind = |addr| async move { admin::bind(addr).await.with_context(|| format!("cannot listen on {addr}")) };
    let probes = bind(config.admin_addr).await?;
    tracing::info!(addr = %probes.local_addr()?, "admin server listening (/livez, /readyz)");
    let probes = tokio::spawn(admin::serve_probes(probes, health.clone(), shutdown.signal()));

    let listener = bind(config.metrics_addr).await?;
    let addr = listener.local_addr()?;
    let metrics = metrics.clone();
    let served = if config.metrics_secure {
        let cert = Arc::new(admin::tls::ServedCert::default());
        tokio::spawn(admin::tls::follow_secret(
            client.clone(),
            config.namespace.clone(),
            config.metrics_cert_secret.clone(),
            cert.clone(),
        ));
        let tls = admin::tls::server_config(cert).context("cannot set up TLS for the metrics server")?;
        let authorizer = Arc::new(admin::authz::Authorizer::new(client.clone(), admin::METRICS_PATH));
        tracing::info!(%addr, secure = true, secret = %config.metrics_cert_secret, "metrics server listening (/metrics)");
        let listener = admin::tls::TlsListener::new(listener, tls)?;
        tokio::spawn(admin::serve_metrics(listener, metrics, Some(authorizer), shutdown.signal()))
    } else {
        tracing::info!(%addr, secure = false, "metrics server listening (/metrics)");
        tokio::spawn(admin::serve_metrics(listener, metrics, None, shutdown.signal()))
    };
    Ok(tokio::spawn(async move {
        let (probes, served) = tokio::join!(probes, served);
        probes.map_err(std::io::Error::other)??;
        served.map_err(std::io::Error::other)?
    }))
}

/// The controllers, until shutdown; readiness learns when the caches are synced.
async fn run_controllers(ctx: Arc<Context>, serving: ServingWatches, shutdown: Shutdown) {
    let (services, secrets) = (serving.services.clone(), serving.secrets.clone());
    let synced = {
        let (services, secrets, health) = (services.clone(), secrets.clone(), ctx.health.clone());
        async move {
            if services.wait_until_ready().await.is_ok() && secrets.wait_until_ready().await.is_ok() {
                health.set_caches_synced();
                tracing::info!("caches synced");
            }
        }
    };
    tokio::join!(
        ca_lifecycle::run(ctx.clone(), shutdown.clone()),
        serving_cert::run(
            ctx.clone(),
            services.clone(),
            serving.service_events,
            serving.secret_changes,
            shutdown.clone()
        ),
        cert_refresh::run(
            ctx.clone(),
            secrets,
            serving.secret_events,
            services,
            serving.service_changes,
            shutdown.clone()
        ),
        ca_bundle::run(ctx.clone(), shutdown.clone()),
        async {
            if ctx.config.pod_certificates {
                pod_certs::run(ctx.clone(), shutdown).await;
            }
        },
        synced,
    );
}

/// Whether we lead, and the task that keeps the lease.
type Lease =
    (watch::Receiver<bool>, tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>);

/// Waits for the leader lease; `None` when shutdown came first.
async fn lead(ctx: &Context, identity: &str, shutdown: &Shutdown) -> anyhow::Result<Option<Lease>> {
    let (leader, task) = acquire_lease(ctx, identity).await?;
    let mut waiting = leader.clone();
    let elected = tokio::select! {
        _ = shutdown.signal() => false,
        result = waiting.wait_for(|is_leader| *is_leader) => { result.context("leader election stopped")?; true }
    };
    drop(waiting);
    if !elected {
        drop(leader);
        let _ = task.await;
        return Ok(None);
    }
    tracing::info!(%identity, "acquired the leader lease");
    Ok(Some((leader, task)))
}

/// Hands the lease back (so a successor need not wait for it to expire).
async fn release((leader, task): Lease) {
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => tracing::info!("released the leader lease"),
        other => tracing::warn!(?other, "could not release the leader lease; it expires by itself"),
    }
}

async fn acquire_lease(ctx: &Context, identity: &str) -> anyhow::Result<Lease> {
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
