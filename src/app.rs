//! Wiring: client, caches, signer, leader election, the controllers, the admin
//! server, and a graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use tokio::sync::watch;

use crate::admin::{self, Health, Role};
use crate::config::Config;
use crate::controllers::events::Recorder;
use crate::controllers::pod_certs::{self, trust_bundle};
use crate::controllers::serving::request::service_key;
use crate::controllers::serving::watches::ServingWatches;
use crate::controllers::serving::{cert_refresh, serving_cert};
use crate::controllers::sharing::{self, Sharing};
use crate::controllers::{Context, ca_bundle, ca_lifecycle, namespace_bundle};
use crate::keypool::{Buffer, KeyPool};
use crate::metrics::{Metrics, ServingCertExpiry};
use crate::names::{self as ann, LEASE_NAME};
use crate::shutdown::Shutdown;
use crate::signer::SignerHandle;

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
    let expiry = ServingCertExpiry { secrets: serving.secrets.clone(), max_series: config.metrics_max_secret_series };
    let metrics = Arc::new(Metrics::new(Some(expiry)));
    let admin = start_admin(&client, &config, &health, &metrics, &shutdown).await?;
    let recorder = Recorder::new(client.clone(), "service-ca-operator", &identity);
    let sharing = if config.leader_elect && config.share_issuance { Sharing::new(&identity) } else { Sharing::off() };
    let reporter = health.clone();
    let ca_token = config
        .pkcs11
        .open(
            config.ca_key_algorithm,
            Box::new(move |problem| reporter.set_ca_key_problem(problem.map(|p| p.readiness()))),
        )
        .map_err(anyhow::Error::msg)?;
    let ctx = Arc::new(Context {
        client,
        keys: KeyPool::with_buffer(
            config.issuance_concurrency(),
            Buffer { base: config.key_buffer, idle: config.key_buffer_idle },
            config.default_key_algorithm,
            metrics.keys_generated.clone(),
        ),
        signer: SignerHandle::default(),
        metrics,
        health: health.clone(),
        recorder,
        sharing,
        ca_token,
        config,
        written: Default::default(),
    });
    let pods = pod_certs::enabled(&ctx).await;
    let published = pod_certs::unpublished();

    if !ctx.config.leader_elect {
        health.set_role(Role::Leader);
        tokio::join!(
            issue(ctx.clone(), serving, pods, published.clone(), shutdown.clone()),
            lead(ctx.clone(), pods, published, shutdown.clone()),
        );
    } else {
        let lease = acquire_lease(&ctx, &identity).await?;
        let result = tokio::select! {
            result = with_lease(ctx.clone(), serving, pods, published, lease.0.clone(), shutdown.clone()) => result,
            // Exit at once: only the holder of the lease may do the leader's writes.
            _ = lost(lease.0.clone()) => Err(anyhow::anyhow!(
                "lost the leader lease; exiting so that only the leader writes the CA and the bundles"
            )),
        };
        release(lease).await;
        result?;
    }
    let _ = admin.await;
    tracing::info!("stopped");
    Ok(())
}

/// With leader election. Issuance shared (`--share-issuance`): this replica issues its
/// share from the start, follows the CA and the trust bundle as the leader publishes
/// them, and does the leader's work once it holds the lease. Not shared: it stands by,
/// then does everything once elected.
async fn with_lease(
    ctx: Arc<Context>,
    serving: ServingWatches,
    pods: bool,
    published: pod_certs::Published,
    leader: watch::Receiver<bool>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let shared = ctx.sharing.enabled();
    ctx.health.set_role(if shared { Role::Member } else { Role::Standby });
    let (now, once_elected) = if shared { (Some(serving), None) } else { (None, Some(serving)) };
    let issuing = async {
        if let Some(serving) = now {
            tokio::join!(
                sharing::run(member(&ctx), ctx.sharing.clone(), shutdown.clone()),
                issue(ctx.clone(), serving, pods, published.clone(), shutdown.clone()),
            );
        }
    };
    let leading = async {
        if !elected(&ctx, pods, &published, leader, &shutdown).await? {
            return Ok(());
        }
        tracing::info!("acquired the leader lease");
        ctx.health.set_role(Role::Leader);
        let late = async {
            if let Some(serving) = once_elected {
                issue(ctx.clone(), serving, pods, published.clone(), shutdown.clone()).await;
            }
        };
        tokio::join!(lead(ctx.clone(), pods, published.clone(), shutdown.clone()), late);
        Ok::<_, anyhow::Error>(())
    };
    tokio::join!(issuing, leading).1
}

/// What the member loop of [`sharing`] uses of the context.
fn member(ctx: &Context) -> sharing::Member<'_> {
    sharing::Member {
        client: ctx.client.clone(),
        namespace: &ctx.config.namespace,
        lease_duration: ctx.config.lease_duration,
        metrics: &ctx.metrics,
        health: &ctx.health,
        recorder: &ctx.recorder,
    }
}

/// Waits for the leader lease (`false`: shutdown came first). Meanwhile a member
/// loads the CA, and learns the published trust bundle, as the leader writes them.
async fn elected(
    ctx: &Arc<Context>,
    pods: bool,
    published: &pod_certs::Published,
    mut leader: watch::Receiver<bool>,
    shutdown: &Shutdown,
) -> anyhow::Result<bool> {
    let follow = async {
        if !ctx.sharing.enabled() {
            return std::future::pending().await;
        }
        let observe = async {
            if pods {
                trust_bundle::observe(ctx.clone(), published.clone()).await;
            }
        };
        tokio::join!(ca_lifecycle::follow(ctx.clone()), observe);
    };
    tokio::select! {
        _ = shutdown.signal() => Ok(false),
        // The watches end only with the process.
        _ = follow => Ok(false),
        result = leader.wait_for(|is_leader| *is_leader) => {
            result.context("leader election stopped")?;
            Ok(true)
        }
    }
}

/// Resolves when a lease once held is lost.
async fn lost(mut leader: watch::Receiver<bool>) {
    if leader.wait_for(|is_leader| *is_leader).await.is_err() {
        return std::future::pending().await;
    }
    let _ = leader.wait_for(|is_leader| !*is_leader).await;
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
        let authorizer = Arc::new(admin::authz::Authorizer::new(client.clone()));
        tracing::info!(%addr, secure = true, secret = %config.metrics_cert_secret, "metrics server listening (/metrics)");
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        tokio::spawn(admin::serve_metrics(listener, Some(tls), metrics, Some(authorizer), shutdown.signal()))
    } else {
        tracing::info!(%addr, secure = false, "metrics server listening (/metrics)");
        tokio::spawn(admin::serve_metrics(listener, None, metrics, None, shutdown.signal()))
    };
    Ok(tokio::spawn(async move {
        let (probes, served) = tokio::join!(probes, served);
        probes.map_err(std::io::Error::other)??;
        served.map_err(std::io::Error::other)?
    }))
}

/// Issuance, shared or not: serving certificates and pod certificates (for the
/// objects this replica owns), until shutdown; readiness learns when the caches are
/// synced.
async fn issue(
    ctx: Arc<Context>,
    serving: ServingWatches,
    pods: bool,
    published: pod_certs::Published,
    shutdown: Shutdown,
) {
    let (services, secrets) = (serving.services.clone(), serving.secrets.clone());
    let synced = {
        let (services, secrets, health, stop) =
            (services.clone(), secrets.clone(), ctx.health.clone(), shutdown.clone());
        async move {
            let ready = async { services.wait_until_ready().await.is_ok() && secrets.wait_until_ready().await.is_ok() };
            // A stop before the first lists completed ends the watches: they never will.
            tokio::select! {
                _ = stop.signal() => {}
                true = ready => {
                    health.set_caches_synced();
                    tracing::info!("caches synced");
                }
            }
        }
    };
    tokio::join!(
        serving_cert::run(
            ctx.clone(),
            services.clone(),
            secrets.clone(),
            serving.service_events,
            serving.secret_changes,
            shutdown.clone()
        ),
        cert_refresh::run(
            ctx.clone(),
            secrets,
            serving.secret_events,
            services.clone(),
            serving.service_changes,
            shutdown.clone()
        ),
        async {
            if pods {
                pod_certs::sign_requests(ctx.clone(), published, shutdown.clone()).await;
            }
        },
        count_owned(ctx.clone(), services, shutdown.clone()),
        ctx.recorder.write_deferred(&ctx.metrics, || ctx.keys.urgent_pending(), shutdown.clone()),
        ctx.written.drop_expired_until(shutdown.clone()),
        synced,
    );
}

/// `service_ca_sharing_owned_services`, after every membership change and every 30 s.
async fn count_owned(ctx: Arc<Context>, services: kube::runtime::reflector::Store<Service>, shutdown: Shutdown) {
    let mut changes = std::pin::pin!(ctx.sharing.changes());
    let mut every = tokio::time::interval(Duration::from_secs(30));
    let mut shutdown = std::pin::pin!(shutdown.signal());
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = changes.next() => {}
            _ = every.tick() => {}
        }
        let owned = services.state().iter().filter(|svc| ctx.sharing.owns(&service_key(svc))).count();
        ctx.metrics.sharing_owned.set(owned as i64);
    }
}

/// The leader's work: the CA, injection, the per-namespace bundles, the ClusterTrustBundle, until shutdown.
async fn lead(ctx: Arc<Context>, pods: bool, published: pod_certs::Published, shutdown: Shutdown) {
    tokio::join!(
        ca_lifecycle::run(ctx.clone(), shutdown.clone()),
        ca_bundle::run(ctx.clone(), shutdown.clone()),
        namespace_bundle::run(ctx.clone(), shutdown.clone()),
        observe_bundle(ctx.clone(), pods, shutdown.clone()),
        async {
            if pods {
                trust_bundle::run(ctx.clone(), published, shutdown).await;
            }
        },
    );
}

/// `service_ca_bundle_certificate_expiry_seconds` after every change of the signer.
async fn observe_bundle(ctx: Arc<Context>, pods: bool, shutdown: Shutdown) {
    let mut changes = std::pin::pin!(ctx.signer.changes());
    let mut stop = std::pin::pin!(shutdown.signal());
    loop {
        if let Some(signer) = ctx.signer.current() {
            ctx.metrics.trust.observe_bundle(&signer, pods);
        }
        tokio::select! {
            _ = &mut stop => return,
            changed = changes.next() => if changed.is_none() { return },
        }
    }
}

/// Whether we lead, and the task that keeps the lease.
type Lease =
    (watch::Receiver<bool>, tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>);

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
        .with_field_manager(lease_field_manager(identity))
        .build()
        .await
        .context("cannot set up leader election")?;
    tracing::info!(%identity, lease = LEASE_NAME, namespace = %ctx.config.namespace, "waiting for the leader lease");
    Ok(manager.watch().await)
}

/// The field manager of one replica's writes to the leader Lease: its own, so that the
/// server-side apply that takes an unheld Lease conflicts (409) when another replica
/// took it first. With one manager for all replicas, two replicas starting together
/// could both apply, both read themselves as holder, and lead together until the
/// earlier one's next renewal. At most 128 bytes (the API server's limit).
fn lease_field_manager(identity: &str) -> String {
    let manager = format!("{}-lease-{identity}", ann::FIELD_MANAGER);
    crate::prefix_within(&manager, 128).to_string()
}

fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "service-ca-operator".into());
    let suffix: u32 = rand::random();
    format!("{host}-{suffix:08x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_replica_writes_the_lease_under_its_own_bounded_field_manager() {
        assert_eq!(super::lease_field_manager("r1"), "service-ca-operator-lease-r1");
        assert_ne!(super::lease_field_manager("pod-a"), super::lease_field_manager("pod-b"));
        let long = super::lease_field_manager(&"é".repeat(200));
        assert!(long.len() <= 128 && long.starts_with("service-ca-operator-lease-é"), "{long}");
    }
}
