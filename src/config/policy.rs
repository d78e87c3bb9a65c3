//! The certificate-policy flags `run` and `inspect` share.

use std::time::Duration;

use clap::Args;

use crate::pki::LeafPolicy;

/// The certificate-policy flags.
#[derive(Debug, Clone, Args)]
pub struct PolicyFlags {
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
}

impl PolicyFlags {
    /// `--cert-refresh-before`, or its default for `--cert-lifetime`.
    pub fn cert_refresh_before(&self) -> Duration {
        self.cert_refresh_before.unwrap_or_else(|| LeafPolicy::default_refresh_before(self.cert_lifetime))
    }

    /// The serving-certificate policy these flags set, for `cluster_domain`.
    pub fn leaf_policy(&self, cluster_domain: String) -> LeafPolicy {
        LeafPolicy { cluster_domain, lifetime: self.cert_lifetime, refresh_before: self.cert_refresh_before() }
    }
}
