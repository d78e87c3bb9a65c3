//! Prometheus metrics. Labels are bounded: controller names, error categories, kinds
//! and reasons — plus one series per managed Secret for its expiry (docs/spec.md §4), read
//! from the Secret cache at scrape time so deleted Secrets never linger, for at most
//! `--metrics-max-secret-series` Secrets: those expiring first.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::names as ann;

pub mod trust;
use crate::pki::parse_expiry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub resource: &'static str,
    pub verb: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// CA NotAfter, Unix seconds (`service_ca_expiry_time_seconds`).
    pub ca_expiry: Gauge,
    /// 1 when `signing-key` holds a usable CA, 0 when it exists but cannot be used.
    pub signing_key_valid: Gauge,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub certificates_issued: Family<ReasonLabels, Counter>,
    /// Issued certificates that could not be written, per reason (an alert can use it:
    /// `certificates_issued` stays flat while these grow).
    pub issuance_failures: Family<ReasonLabels, Counter>,
    /// PodCertificateRequests answered, per outcome (issued, denied, failed).
    pub pod_certificate_requests: Family<ReasonLabels, Counter>,
    /// Private keys generated (serving keys, buffered or not, and CA keys).
    pub keys_generated: Counter,
    pub injections: Family<KindLabels, Counter>,
    pub rotations: Family<KindLabels, Counter>,
    /// Managed Secrets not yet looked at since the last CA change (0 when none is
    /// under way).
    pub reissue_remaining: Gauge,
    /// Rotation attempts that failed (an alert can use it).
    pub rotation_failures: Counter,
    pub api_writes: Family<WriteLabels, Counter>,
    /// Replicas sharing issuance, as this one sees them (0 when sharing is off).
    pub sharing_members: Gauge,
    /// Annotated Services this replica owns (all of them when sharing is off).
    pub sharing_owned: Gauge,
    /// Bundle certificates, injected objects and per-namespace bundles (see [`trust`]).
    pub trust: trust::TrustMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(serving_secrets: Option<ServingCertExpiry>) -> Self {
        let mut metrics = Metrics {
            registry: Registry::default(),
            ca_expiry: Gauge::default(),
            signing_key_valid: Gauge::default(),
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            certificates_issued: Family::default(),
            issuance_failures: Family::default(),
            pod_certificate_requests: Family::default(),
            keys_generated: Counter::default(),
            injections: Family::default(),
            rotations: Family::default(),
            reissue_remaining: Gauge::default(),
            rotation_failures: Counter::default(),
            api_writes: Family::default(),
            sharing_members: Gauge::default(),
            sharing_owned: Gauge::default(),
            trust: trust::TrustMetrics::default(),
        };
        // Registered in this order, which is the order of the text exposition.
        metrics.register_ca_state();
        metrics.register_reconciles();
        metrics.register_issuance();
        metrics.register_ca_changes();
        metrics.register_writes_and_sharing();
        trust::register(&metrics.trust, &mut metrics.registry);
        if let Some(expiry) = serving_secrets {
            metrics.registry.register_collector(Box::new(expiry));
        }
        metrics
    }

    /// The current CA: its expiry and whether `signing-key` can be used.
    fn register_ca_state(&mut self) {
        let r = &mut self.registry;
        r.register(
            "service_ca_expiry_time_seconds",
            "NotAfter of the current service CA, Unix seconds",
            self.ca_expiry.clone(),
        );
        r.register(
            "service_ca_signing_key_valid",
            "1 when the signing-key Secret holds a usable CA, 0 when it exists but cannot be used",
            self.signing_key_valid.clone(),
        );
    }

    /// Every controller's reconciliations: count, failures, time.
    fn register_reconciles(&mut self) {
        let r = &mut self.registry;
        r.register("service_ca_reconcile", "Reconciliations, per controller", self.reconciles.clone());
        r.register(
            "service_ca_reconcile_errors",
            "Failed reconciliations, per controller and category",
            self.reconcile_errors.clone(),
        );
        r.register(
            "service_ca_reconcile_duration_seconds",
            "Reconciliation time, per controller",
            self.reconcile_duration.clone(),
        );
    }

    /// Certificates and keys made: serving certificates, pod certificates, keys.
    fn register_issuance(&mut self) {
        let r = &mut self.registry;
        r.register(
            "service_ca_certificates_issued",
            "Serving certificates issued, per reason",
            self.certificates_issued.clone(),
        );
        r.register(
            "service_ca_certificate_issuance_failures",
            "Serving certificates issued but not written, per reason (refused, api, pki)",
            self.issuance_failures.clone(),
        );
        r.register(
            "service_ca_pod_certificate_requests",
            "PodCertificateRequests answered, per outcome (issued, denied, failed)",
            self.pod_certificate_requests.clone(),
        );
        r.register("service_ca_keys_generated", "Private keys generated", self.keys_generated.clone());
    }

    /// The bundle handed out and the CA changes that move it: injections, rotations,
    /// the re-issue that follows one.
    fn register_ca_changes(&mut self) {
        let r = &mut self.registry;
        r.register("service_ca_injections", "CA bundle injections written, per kind", self.injections.clone());
        r.register(
            "service_ca_rotations",
            "CA changes, per kind (automatic, forced, reset, created)",
            self.rotations.clone(),
        );
        r.register(
            "service_ca_reissue_remaining",
            "Managed Secrets not yet re-checked (and re-issued where needed) since the last CA change",
            self.reissue_remaining.clone(),
        );
        r.register(
            "service_ca_rotation_failures",
            "CA rotation attempts that failed (the current CA stays in use)",
            self.rotation_failures.clone(),
        );
    }

    /// Writes to the API server, and the replicas sharing issuance.
    fn register_writes_and_sharing(&mut self) {
        let r = &mut self.registry;
        r.register(
            "service_ca_api_writes",
            "Writes sent to the API server, per resource and verb",
            self.api_writes.clone(),
        );
        r.register(
            "service_ca_sharing_members",
            "Replicas sharing issuance, as this one sees them (0: sharing is off)",
            self.sharing_members.clone(),
        );
        r.register(
            "service_ca_sharing_owned_services",
            "Annotated Services this replica issues for (all of them when sharing is off)",
            self.sharing_owned.clone(),
        );
    }

    pub fn write(&self, resource: &'static str, verb: &'static str) {
        self.api_writes.get_or_create(&WriteLabels { resource, verb }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// `service_ca_serving_certificate_expiry_time_seconds{namespace,secret}` for the
/// `max_series` managed Secrets expiring first, and `service_ca_serving_certificates`
/// (how many there are), computed from the managed-Secret cache at scrape time.
#[derive(Debug)]
pub struct ServingCertExpiry {
    pub secrets: Store<PartialObjectMeta<Secret>>,
    pub max_series: usize,
}

impl Collector for ServingCertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let secrets = self.secrets.state();
        let mut expiries: Vec<(i64, &PartialObjectMeta<Secret>)> = secrets
            .iter()
            .filter_map(|s| Some((parse_expiry(s.annotations().get(ann::BETA.expiry)?)?.unix_timestamp(), s.as_ref())))
            .collect();
        let count = expiries.len();
        earliest(&mut expiries, self.max_series);
        let mut metric = encoder.encode_descriptor(
            "service_ca_serving_certificate_expiry_time_seconds",
            "NotAfter of the managed serving certificates expiring first (--metrics-max-secret-series), Unix seconds",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (expiry, secret) in expiries {
            let labels = [("namespace", secret.namespace().unwrap_or_default()), ("secret", secret.name_any())];
            ConstGauge::new(expiry).encode(metric.encode_family(&labels.to_vec())?)?;
        }
        let metric = encoder.encode_descriptor(
            "service_ca_serving_certificates",
            "Managed serving Secrets holding a certificate",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX)).encode(metric)?;
        Ok(())
    }
}

/// Keeps the `n` entries expiring first (in no particular order).
fn earliest<T>(expiries: &mut Vec<(i64, T)>, n: usize) {
    if expiries.len() > n {
        if let Some(last) = n.checked_sub(1) {
            expiries.select_nth_unstable_by_key(last, |(expiry, _)| *expiry);
        }
        expiries.truncate(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_secrets_expiring_first_get_a_series() {
        let mut all: Vec<(i64, &str)> = vec![(50, "e"), (10, "a"), (40, "d"), (20, "b"), (30, "c")];
        earliest(&mut all, 2);
        all.sort();
        assert_eq!(all, [(10, "a"), (20, "b")]);
        let mut all = vec![(2, "b"), (1, "a")];
        earliest(&mut all, 5);
        assert_eq!(all.len(), 2, "fewer than the cap: every one");
        earliest(&mut all, 0);
        assert!(all.is_empty());
    }

    #[test]
    fn every_family_is_exposed_once_in_registration_order() {
        let m = Metrics::new(None);
        // A family without a series is not shown: give each one a series.
        let controller = ControllerLabels { controller: "c" };
        let reason = ReasonLabels { reason: "r" };
        let kind = KindLabels { kind: "k" };
        m.reconciles.get_or_create(&controller).inc();
        m.reconcile_errors.get_or_create(&ErrorLabels { controller: "c", category: "x" }).inc();
        m.reconcile_duration.get_or_create(&controller).observe(0.1);
        m.certificates_issued.get_or_create(&reason).inc();
        m.issuance_failures.get_or_create(&reason).inc();
        m.pod_certificate_requests.get_or_create(&reason).inc();
        m.keys_generated.inc();
        m.injections.get_or_create(&kind).inc();
        m.rotations.get_or_create(&kind).inc();
        m.rotation_failures.inc();
        m.write("secrets", "create");
        let cert = trust::BundleCertLabels { bundle: "b", role: "current", subject: "s".into() };
        m.trust.bundle_expiry.get_or_create(&cert).set(1);
        m.trust.namespace_bundles.get_or_create(&trust::StateLabels { state: "current" }).set(1);
        let text = m.render();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
            .map(|name| name.strip_suffix("_total").unwrap_or(name))
            .collect();
        assert_eq!(
            types,
            [
                "service_ca_expiry_time_seconds",
                "service_ca_signing_key_valid",
                "service_ca_reconcile",
                "service_ca_reconcile_errors",
                "service_ca_reconcile_duration_seconds",
                "service_ca_certificates_issued",
                "service_ca_certificate_issuance_failures",
                "service_ca_pod_certificate_requests",
                "service_ca_keys_generated",
                "service_ca_injections",
                "service_ca_rotations",
                "service_ca_reissue_remaining",
                "service_ca_rotation_failures",
                "service_ca_api_writes",
                "service_ca_sharing_members",
                "service_ca_sharing_owned_services",
                "service_ca_bundle_certificate_expiry_seconds",
                "service_ca_namespace_bundles",
                "service_ca_injected_objects",
            ]
        );
        assert!(text.contains("service_ca_api_writes_total{resource=\"secrets\",verb=\"create\"} 1"), "{text}");
    }
}
