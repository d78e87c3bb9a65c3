//! Command line and environment: every flag has an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pki::{CaPolicy, LeafPolicy};

#[derive(Debug, Parser)]
#[command(name = "service-ca-operator", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller manager (the default).
    Run(Config),
}

impl Cli {
    /// The run configuration, whether `run` was spelled out or not.
    pub fn into_config(self) -> Config {
        match self.command {
            Some(Command::Run(config)) => config,
            None => self.run,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Namespace of the operator: holds the `signing-key` Secret, the
    /// `signing-cabundle` ConfigMap and the leader-election Lease.
    #[arg(long, env = "SERVICE_CA_NAMESPACE", default_value = "openshift-service-ca")]
    pub namespace: String,

    /// Validity of a new CA certificate.
    #[arg(long, env = "SERVICE_CA_CA_LIFETIME", default_value = "790d", value_parser = humantime::parse_duration)]
    pub ca_lifetime: Duration,

    /// Rotate the CA when less than this is left; also the minimum time the previous
    /// CA stays trusted after a rotation.
    #[arg(long, env = "SERVICE_CA_CA_ROTATE_BEFORE", default_value = "395d", value_parser = humantime::parse_duration)]
    pub ca_rotate_before: Duration,

    /// Validity of a serving certificate (capped at the CA's own expiry).
    #[arg(long, env = "SERVICE_CA_CERT_LIFETIME", default_value = "730d", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,

    /// Re-issue a serving certificate when less than this is left. Default: a third of
    /// --cert-lifetime, at least 1h, at most half of --cert-lifetime.
    #[arg(long, env = "SERVICE_CA_CERT_REFRESH_BEFORE", value_parser = humantime::parse_duration)]
    pub cert_refresh_before: Option<Duration>,

    /// DNS domain of the cluster, used in the `<svc>.<ns>.svc.<domain>` name.
    #[arg(long, env = "SERVICE_CA_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Run only while holding the Lease `service-ca-operator` in --namespace.
    #[arg(long, env = "SERVICE_CA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// How long a leader's lease lasts without renewal (handover time after a crash).
    #[arg(long, env = "SERVICE_CA_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// Identity in the Lease (default: $POD_NAME or the host name, plus a random suffix).
    #[arg(long, env = "SERVICE_CA_LEASE_IDENTITY")]
    pub lease_identity: Option<String>,

    /// Address of the admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "SERVICE_CA_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    #[arg(long, env = "SERVICE_CA_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax (e.g. `info`, `debug`,
    /// `service_ca_operator=trace`).
    #[arg(long, env = "SERVICE_CA_LOG", default_value = "info")]
    pub log_level: String,

    /// Manage only objects whose labels match this selector (Services, ConfigMaps,
    /// APIServices, CRDs, webhook configurations). Empty: all. Lets several
    /// instances share a cluster (canary, tests) without touching each other's objects.
    #[arg(long, env = "SERVICE_CA_SELECTOR", default_value = "")]
    pub selector: String,

    /// Serving certificates generated at once (RSA key generation is CPU-bound).
    /// Default: the number of CPUs.
    #[arg(long, env = "SERVICE_CA_MAX_CONCURRENT_ISSUANCE")]
    pub max_concurrent_issuance: Option<usize>,

    /// Objects each controller reconciles at once.
    #[arg(long, env = "SERVICE_CA_CONTROLLER_CONCURRENCY", default_value_t = 16)]
    pub controller_concurrency: u16,
}

impl Config {
    /// Rejects combinations that could never work (they would rotate or re-issue in a
    /// loop).
    pub fn validate(&self) -> Result<(), String> {
        if self.ca_rotate_before >= self.ca_lifetime {
            return Err(format!(
                "--ca-rotate-before ({}) must be shorter than --ca-lifetime ({})",
                humantime::format_duration(self.ca_rotate_before),
                humantime::format_duration(self.ca_lifetime)
            ));
        }
        if self.cert_refresh_before() >= self.cert_lifetime {
            return Err(format!(
                "--cert-refresh-before ({}) must be shorter than --cert-lifetime ({})",
                humantime::format_duration(self.cert_refresh_before()),
                humantime::format_duration(self.cert_lifetime)
            ));
        }
        if self.lease_duration < Duration::from_secs(3) {
            return Err("--lease-duration must be at least 3s".into());
        }
        Ok(())
    }

    pub fn cert_refresh_before(&self) -> Duration {
        self.cert_refresh_before.unwrap_or_else(|| LeafPolicy::default_refresh_before(self.cert_lifetime))
    }

    pub fn ca_policy(&self) -> CaPolicy {
        CaPolicy { lifetime: self.ca_lifetime, rotate_before: self.ca_rotate_before }
    }

    pub fn leaf_policy(&self) -> LeafPolicy {
        LeafPolicy {
            cluster_domain: self.cluster_domain.clone(),
            lifetime: self.cert_lifetime,
            refresh_before: self.cert_refresh_before(),
        }
    }

    pub fn issuance_concurrency(&self) -> usize {
        self.max_concurrent_issuance
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Cli::try_parse_from(args).unwrap().into_config()
    }

    #[test]
    fn defaults_match_the_original_system() {
        let c = parse(&["service-ca-operator"]);
        assert_eq!(c.namespace, "openshift-service-ca");
        assert_eq!(c.ca_lifetime, Duration::from_secs(790 * 86_400));
        assert_eq!(c.ca_rotate_before, Duration::from_secs(395 * 86_400));
        assert_eq!(c.cert_lifetime, Duration::from_secs(730 * 86_400));
        assert_eq!(c.cert_refresh_before(), Duration::from_secs(730 * 86_400 / 3));
        assert_eq!(c.cluster_domain, "cluster.local");
        assert!(c.leader_elect);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn run_subcommand_and_human_durations() {
        let c = parse(&["service-ca-operator", "run", "--cert-lifetime", "90s", "--leader-elect=false"]);
        assert_eq!(c.cert_lifetime, Duration::from_secs(90));
        assert_eq!(c.cert_refresh_before(), Duration::from_secs(45));
        assert!(!c.leader_elect);
        let c = parse(&["service-ca-operator", "--ca-lifetime", "30d", "--ca-rotate-before", "12h 30m"]);
        assert_eq!(c.ca_lifetime, Duration::from_secs(30 * 86_400));
        assert_eq!(c.ca_rotate_before, Duration::from_secs(45_000));
    }

    #[test]
    fn impossible_combinations_are_refused() {
        let c = parse(&["x", "--ca-lifetime", "1h", "--ca-rotate-before", "2h"]);
        assert!(c.validate().unwrap_err().contains("--ca-rotate-before"));
        let c = parse(&["x", "--cert-lifetime", "1h", "--cert-refresh-before", "1h"]);
        assert!(c.validate().unwrap_err().contains("--cert-refresh-before"));
    }
}
