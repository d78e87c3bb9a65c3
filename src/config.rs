//! Command line and environment: every flag of `run` has an environment variable
//! (`inspect` reads the policy ones too).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::names;
use crate::pki::{CaPolicy, KeyKind, LeafPolicy, pkcs11::Pkcs11Flags};
use crate::selector::parse_selector;

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
    Run(Box<Config>),
    /// Report the CA, serving certificates, injected bundles and workloads that need a
    /// restart; exit status 0 healthy, 3 untrusted or broken, 4 restart needed, 1 error.
    Inspect(Box<InspectArgs>),
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Mode {
    Run(Box<Config>),
    Inspect(Box<InspectArgs>),
}

/// `inspect`'s output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// The flags of `inspect`.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// Only this namespace (cluster-scoped objects are then left out). Default: all namespaces.
    #[arg(short = 'n', long = "namespace", conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,

    /// All namespaces (the default; accepted for kubectl habits).
    #[arg(short = 'A', long = "all-namespaces")]
    pub all_namespaces: bool,

    /// Label selector for Services and injected objects (kubectl syntax).
    #[arg(short = 'l', long = "selector", default_value = "")]
    pub selector: String,

    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,

    /// The operator's namespace (where `signing-key` and `signing-cabundle` live).
    #[arg(long, env = "SERVICE_CA_NAMESPACE", default_value = "openshift-service-ca")]
    pub operator_namespace: String,

    /// The operator's certificate policy (the same flags and variables), to judge when
    /// rotations and refreshes are due.
    #[command(flatten)]
    pub policy: PolicyFlags,

    /// Roll the listed Deployments, StatefulSets and DaemonSets like `kubectl rollout
    /// restart`. A dry run unless --yes is given (or confirmed at the prompt when stdin
    /// is a terminal).
    #[arg(long)]
    pub restart: bool,

    /// With --restart: act without asking.
    #[arg(long, short = 'y', requires = "restart")]
    pub yes: bool,

    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context (default: the current one).
    #[arg(long)]
    pub context: Option<String>,

    /// The operator's PKCS#11 flags (the same variables): a CA key in a token is then
    /// checked there; without them it is reported as not checked.
    #[command(flatten, next_help_heading = "The operator's CA key token (checked when given)")]
    pub pkcs11: Pkcs11Flags,
}

/// The file name under which kubectl finds the binary as a plugin (`kubectl service-ca`).
pub const KUBECTL_PLUGIN_NAME: &str = "kubectl-service_ca";

impl Cli {
    /// Parses the process's arguments. Installed as `kubectl-service_ca`, the binary is
    /// the kubectl plugin `kubectl service-ca`: help names it so, and no arguments at all
    /// means `inspect` (a plugin should not start an operator by default).
    pub fn parse_args() -> Cli {
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let plugin = args
            .first()
            .and_then(|a| std::path::Path::new(a).file_name())
            .is_some_and(|name| name == KUBECTL_PLUGIN_NAME);
        if plugin {
            if args.len() == 1 {
                args.push("inspect".into());
            }
            let matches = <Cli as clap::CommandFactory>::command()
                .name("kubectl service-ca")
                .bin_name("kubectl service-ca")
                .get_matches_from(args);
            return match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
                Ok(cli) => cli,
                Err(e) => e.exit(),
            };
        }
        Cli::parse()
    }

    /// What to do: run (whether `run` was spelled out or not) or inspect.
    pub fn into_mode(self) -> Mode {
        match self.command {
            Some(Command::Run(config)) => Mode::Run(config),
            Some(Command::Inspect(args)) => Mode::Inspect(args),
            None => Mode::Run(Box::new(self.run)),
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

    #[command(flatten)]
    pub policy: PolicyFlags,
    #[command(flatten)]
    pub pkcs11: Pkcs11Flags,
    #[command(flatten)]
    pub trust: trust::TrustFlags,

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

    /// Share issuance across the replicas: each signs the Services and pod certificate
    /// requests it owns (membership Leases, rendezvous hashing), while creating and
    /// rotating the CA and injecting bundles stay with the leader. Needs --leader-elect.
    /// `false`: the leader alone works, the other replicas stand by.
    #[arg(long, env = "SERVICE_CA_SHARE_ISSUANCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub share_issuance: bool,

    /// Address of the probe server (/livez, /readyz), plain HTTP for the kubelet.
    #[arg(long, env = "SERVICE_CA_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Address of the metrics server (/metrics).
    #[arg(long, env = "SERVICE_CA_METRICS_ADDR", default_value = "0.0.0.0:8443")]
    pub metrics_addr: SocketAddr,

    /// Serve /metrics over TLS, to scrapers whose bearer token is allowed `get` on the
    /// non-resource URL /metrics (TokenReview + SubjectAccessReview). `false`: plain
    /// HTTP, open to anyone who reaches the port.
    #[arg(long, env = "SERVICE_CA_METRICS_SECURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics_secure: bool,

    /// The Secret in --namespace with the metrics server's certificate: the serving
    /// Secret this operator issues for its own metrics Service.
    #[arg(long, env = "SERVICE_CA_METRICS_CERT_SECRET", default_value = names::METRICS_CERT_SECRET)]
    pub metrics_cert_secret: String,

    /// At most this many `service_ca_serving_certificate_expiry_time_seconds` series: the
    /// Secrets expiring first (an expiry alert still sees every Secret near its end).
    #[arg(long, env = "SERVICE_CA_METRICS_MAX_SECRET_SERIES", default_value_t = 1000)]
    pub metrics_max_secret_series: usize,

    #[arg(long, env = "SERVICE_CA_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax (e.g. `info`, `debug`, `service_ca_operator=trace`).
    #[arg(long, env = "SERVICE_CA_LOG", default_value = "info")]
    pub log_level: String,

    /// Manage only objects whose labels match this selector (Services, ConfigMaps,
    /// APIServices, CRDs, webhook configurations). Empty: all. Lets several
    /// instances share a cluster (canary, tests) without touching each other's objects.
    #[arg(long, env = "SERVICE_CA_SELECTOR", default_value = "")]
    pub selector: String,

    /// The serving key of a Service without the serving-cert-key-algorithm
    /// annotation: rsa (RSA-2048), ecdsa (P-256), rsa-3072, rsa-4096, ecdsa-p384.
    /// Changing it re-issues those Services' certificates.
    #[arg(long, env = "SERVICE_CA_DEFAULT_KEY_ALGORITHM", default_value = "rsa")]
    pub default_key_algorithm: KeyKind,

    /// The key algorithms Services may ask for with the serving-cert-key-algorithm
    /// annotation, as a comma list of its values (e.g. `rsa,ecdsa`). A Service asking
    /// for another is reported as for an unknown value, and no key is generated. Unset:
    /// all. Must include --default-key-algorithm.
    #[arg(long, env = "SERVICE_CA_ALLOWED_KEY_ALGORITHMS", value_delimiter = ',')]
    pub allowed_key_algorithms: Vec<KeyKind>,

    /// The key of a new CA (default RSA-2048). Unset, a rotation keeps the CA's key
    /// type; set to another type, the next rotation (forced or scheduled) moves to it.
    #[arg(long, env = "SERVICE_CA_CA_KEY_ALGORITHM")]
    pub ca_key_algorithm: Option<KeyKind>,

    /// Serving certificates generated at once (RSA key generation is CPU-bound).
    /// Default: the number of CPUs.
    #[arg(long, env = "SERVICE_CA_MAX_CONCURRENT_ISSUANCE")]
    pub max_concurrent_issuance: Option<usize>,

    /// Serving keys kept ready per key algorithm in use (generated in the background
    /// when idle), so a new Service does not wait for key generation. 0 disables.
    #[arg(long, env = "SERVICE_CA_KEY_BUFFER", default_value_t = 4)]
    pub key_buffer: usize,

    /// Serving keys of the default algorithm kept ready once no key has been asked for
    /// in a minute (made in the background at a low priority, kept until used), so a
    /// burst of new Services does not wait for key generation. Ignored with
    /// --key-buffer 0.
    #[arg(long, env = "SERVICE_CA_KEY_BUFFER_IDLE", default_value_t = 32)]
    pub key_buffer_idle: usize,

    /// Objects each controller reconciles at once.
    #[arg(long, env = "SERVICE_CA_CONTROLLER_CONCURRENCY", default_value_t = 16)]
    pub controller_concurrency: u16,

    /// How often the progress of a bulk re-issue (after a CA change) is logged.
    #[arg(long, env = "SERVICE_CA_PROGRESS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,

    /// Sign PodCertificateRequests addressed to --pod-signer-name and publish the CA
    /// bundle as a ClusterTrustBundle for it (certificates.k8s.io/v1, Kubernetes 1.37+;
    /// where the cluster does not serve it, this stays off by itself with a warning).
    #[arg(long, env = "SERVICE_CA_POD_CERTIFICATES", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_certificates: bool,

    /// The signer name pods ask for in a `podCertificate` projected volume, and the
    /// `signerName` of the published ClusterTrustBundle.
    #[arg(long, env = "SERVICE_CA_POD_SIGNER_NAME", default_value = crate::names::POD_SIGNER_NAME)]
    pub pod_signer_name: String,

    /// The longest pod certificate issued (a request's maxExpirationSeconds may ask for
    /// less; the CA's expiry caps it too).
    #[arg(long, env = "SERVICE_CA_POD_CERTIFICATE_MAX_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub pod_certificate_max_lifetime: Duration,

    /// How long a request whose pod no Service selects stays pending (a Service often
    /// comes after its pods) before it is denied.
    #[arg(long, env = "SERVICE_CA_POD_CERTIFICATE_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub pod_certificate_grace: Duration,

    #[command(flatten)]
    pub pod_timing: PodTimingFlags,
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
/// X.509 dates end in 9999; a century is more than any certificate needs, and keeps
/// every date the operator computes far from that end.
const CENTURY: Duration = Duration::from_secs(36_525 * 86_400); // humantime's `100y`

/// The bounds (inclusive) of each duration flag.
const CA_LIFETIME: (Duration, Duration) = (MINUTE, CENTURY);
const CA_ROTATE_BEFORE: (Duration, Duration) = (Duration::from_secs(1), CENTURY);
const CERT_LIFETIME: (Duration, Duration) = (MINUTE, CENTURY);
const CERT_REFRESH_BEFORE: (Duration, Duration) = (Duration::from_secs(1), CENTURY);
/// At least 3 s (renewed every third of it); at most an hour of handover after a crash.
const LEASE_DURATION: (Duration, Duration) = (Duration::from_secs(3), HOUR);
const PROGRESS_INTERVAL: (Duration, Duration) = (Duration::from_secs(1), DAY);
/// The API server accepts pod certificates of 1 h to 91 days.
const POD_CERTIFICATE_MAX_LIFETIME: (Duration, Duration) = (HOUR, Duration::from_secs(91 * 86_400));
/// 0: deny at once; at most a day, as long as a pod may wait for its volume.
const POD_CERTIFICATE_GRACE: (Duration, Duration) = (Duration::ZERO, DAY);

/// Refuses `value` of `flag` outside `min..=max`, naming the flag, the value and the range.
fn check_duration(flag: &str, value: Duration, min: Duration, max: Duration) -> Result<(), String> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(format!("{flag} ({}) must be between {} and {}", show(value), show(min), show(max)))
}

/// A duration as flags are written: `100 years` for the century, whole days as `91d`
/// (humantime would say `2months 29days 17h 16m 48s`), anything else as humantime.
fn show(d: Duration) -> String {
    let secs = d.as_secs();
    if d == CENTURY {
        "100 years".into()
    } else if secs >= DAY.as_secs() && secs.is_multiple_of(DAY.as_secs()) && d.subsec_nanos() == 0 {
        format!("{}d", secs.checked_div(DAY.as_secs()).unwrap_or_default())
    } else {
        humantime::format_duration(d).to_string()
    }
}

impl Config {
    /// Rejects combinations that could never work (they would rotate or re-issue in a
    /// loop).
    pub fn validate(&self) -> Result<(), String> {
        for (flag, value, (min, max)) in [
            ("--ca-lifetime", self.ca_lifetime, CA_LIFETIME),
            ("--ca-rotate-before", self.policy.ca_rotate_before, CA_ROTATE_BEFORE),
            ("--cert-lifetime", self.policy.cert_lifetime, CERT_LIFETIME),
            ("--cert-refresh-before", self.cert_refresh_before(), CERT_REFRESH_BEFORE),
            ("--lease-duration", self.lease_duration, LEASE_DURATION),
            ("--progress-interval", self.progress_interval, PROGRESS_INTERVAL),
            ("--pod-certificate-max-lifetime", self.pod_certificate_max_lifetime, POD_CERTIFICATE_MAX_LIFETIME),
            ("--pod-certificate-grace", self.pod_certificate_grace, POD_CERTIFICATE_GRACE),
        ] {
            check_duration(flag, value, min, max)?;
        }
        if self.policy.ca_rotate_before >= self.ca_lifetime {
            return Err(format!(
                "--ca-rotate-before ({}) must be shorter than --ca-lifetime ({})",
                humantime::format_duration(self.policy.ca_rotate_before),
                humantime::format_duration(self.ca_lifetime)
            ));
        }
        if self.cert_refresh_before() >= self.policy.cert_lifetime {
            return Err(format!(
                "--cert-refresh-before ({}) must be shorter than --cert-lifetime ({})",
                humantime::format_duration(self.cert_refresh_before()),
                humantime::format_duration(self.policy.cert_lifetime)
            ));
        }
        parse_selector(&self.selector).map_err(|e| format!("--selector {:?}: {e}", self.selector))?;
        self.trust.validate()?;
        self.pod_timing.validate()?;
        if self.lease_identity.as_ref().is_some_and(|i| i.len() > crate::controllers::sharing::MAX_IDENTITY_LEN) {
            return Err(format!(
                "--lease-identity must be at most {} bytes (longer ones cannot be members)",
                crate::controllers::sharing::MAX_IDENTITY_LEN
            ));
        }
        if self.controller_concurrency == 0 {
            return Err("--controller-concurrency must be at least 1 (0 would reconcile nothing)".into());
        }
        if self.max_concurrent_issuance == Some(0) {
            return Err("--max-concurrent-issuance must be at least 1 (0 would issue nothing)".into());
        }
        if !self.allowed_key_algorithms.is_empty() && !self.allowed_key_algorithms.contains(&self.default_key_algorithm)
        {
            return Err(format!(
                "--default-key-algorithm ({}) must be one of --allowed-key-algorithms ({})",
                self.default_key_algorithm.value(),
                crate::pki::key_values(&self.allowed_key_algorithms)
            ));
        }
        if self.key_buffer > MAX_KEY_BUFFER {
            return Err(format!("--key-buffer ({}) must be at most {MAX_KEY_BUFFER}", self.key_buffer));
        }
        if self.key_buffer_idle > MAX_KEY_BUFFER {
            return Err(format!("--key-buffer-idle ({}) must be at most {MAX_KEY_BUFFER}", self.key_buffer_idle));
        }
        check_dns_domain(&self.cluster_domain).map_err(|why| {
            format!("--cluster-domain {:?} is not a DNS domain: {why}", crate::bounded(&self.cluster_domain))
        })?;
        check_signer_name(&self.pod_signer_name).map_err(|why| {
            format!("--pod-signer-name {:?} is not a signer name: {why}", crate::bounded(&self.pod_signer_name))
        })?;
        Ok(())
    }

    pub fn cert_refresh_before(&self) -> Duration {
        self.policy.cert_refresh_before()
    }

    pub fn ca_policy(&self) -> CaPolicy {
        CaPolicy { lifetime: self.ca_lifetime, rotate_before: self.policy.ca_rotate_before }
    }

    pub fn leaf_policy(&self) -> LeafPolicy {
        self.policy.leaf_policy(self.cluster_domain.clone())
    }

    pub fn issuance_concurrency(&self) -> usize {
        self.max_concurrent_issuance
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
            .max(1)
    }
}

/// The most serving keys worth keeping ready (a ready RSA-2048 key holds ~4.7 KiB).
pub const MAX_KEY_BUFFER: usize = 1024;

/// A DNS domain as it appears in certificate names: a DNS-1123 subdomain whose labels
/// are at most 63 characters.
pub fn check_dns_domain(domain: &str) -> Result<(), &'static str> {
    crate::names::check_subdomain(domain)?;
    if domain.split('.').any(|label| label.len() > 63) {
        return Err("a label is longer than 63 characters");
    }
    Ok(())
}

/// A signer name as the API server accepts it: `<domain>/<path>`, the domain a DNS
/// subdomain outside `kubernetes.io`, and a ClusterTrustBundle name can be made of it.
pub fn check_signer_name(name: &str) -> Result<(), &'static str> {
    let (domain, path) = name.split_once('/').ok_or("expected <domain>/<path>")?;
    check_dns_domain(domain)?;
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        return Err("kubernetes.io signer names are reserved for Kubernetes");
    }
    if path.is_empty() || path.len() > 200 || path.contains(['/', ':']) {
        return Err("the path must be non-empty, at most 200 characters, without '/' or ':'");
    }
    crate::names::check_subdomain(path)
}

mod policy;
#[cfg(test)]
mod tests;
pub mod trust;

pub use policy::{PodTimingFlags, PolicyFlags};
