//! The certificate-policy flags `run` and `inspect` share, and the pod-certificate
//! timing flags of `run`.

use std::time::Duration;

use clap::Args;

use crate::pki::{LeafPolicy, PodTiming};

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

/// At most 4 min: the API server wants a pod certificate's NotBefore within 5 min of its
/// own clock, and the operator's clock may lag it a little.
const POD_CERTIFICATE_BACKDATE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(240));

/// When a pod certificate starts and when pods begin refreshing it.
#[derive(Debug, Clone, Args)]
pub struct PodTimingFlags {
    /// When the kubelet begins refreshing a pod certificate (its beginRefreshAt), as a
    /// fraction of the certificate's lifetime: 0.5 at half-life, 0 as early as allowed,
    /// 1 as late. Always kept 10 min or more from NotBefore and from NotAfter (the API
    /// server's rule).
    #[arg(long, env = "SERVICE_CA_POD_CERTIFICATE_REFRESH_AT", default_value_t = 0.5)]
    pub pod_certificate_refresh_at: f64,

    /// How long before issuance a pod certificate's NotBefore is set, so that clients
    /// whose clocks lag the operator's accept a fresh one (0s to 4m; the lifetime counts
    /// from NotBefore).
    #[arg(long, env = "SERVICE_CA_POD_CERTIFICATE_BACKDATE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub pod_certificate_backdate: Duration,
}

impl PodTimingFlags {
    /// Refuses a fraction outside 0..=1 and a backdate outside its range.
    pub fn validate(&self) -> Result<(), String> {
        let (min, max) = POD_CERTIFICATE_BACKDATE;
        super::check_duration("--pod-certificate-backdate", self.pod_certificate_backdate, min, max)?;
        if !(0.0..=1.0).contains(&self.pod_certificate_refresh_at) {
            return Err(format!(
                "--pod-certificate-refresh-at ({}) must be a fraction of the lifetime between 0 and 1",
                self.pod_certificate_refresh_at
            ));
        }
        Ok(())
    }

    pub fn timing(&self) -> PodTiming {
        PodTiming { backdate: self.pod_certificate_backdate, refresh_at: self.pod_certificate_refresh_at }
    }
}
