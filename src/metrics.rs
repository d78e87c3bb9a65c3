//! Prometheus metrics. Labels are bounded: controller names, error categories, kinds
//! and reasons — plus one series per managed Secret for its expiry (docs/spec.md §4), read
//! from the Secret cache at scrape time so deleted Secrets never linger.

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
    pub fn new(serving_secrets: Option<Store<PartialObjectMeta<Secret>>>) -> Self {
        let mut registry = Registry::default();
        let ca_expiry = Gauge::default();
        registry.register(
            "service_ca_expiry_time_seconds",
            "NotAfter of the current service CA, Unix seconds",
            ca_expiry.clone(),
        );
        let signing_key_valid = Gauge::default();
        registry.register(
            "service_ca_signing_key_valid",
            "1 when the signing-key Secret holds a usable CA, 0 when it exists but cannot be used",
            signing_key_valid.clone(),
        );
        let reconciles = Family::default();
        registry.register("service_ca_reconcile", "Reconciliations, per controller", reconciles.clone());
        let reconcile_errors = Family::default();
        registry.register(
            "service_ca_reconcile_errors",
            "Failed reconciliations, per controller and category",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        registry.register(
            "service_ca_reconcile_duration_seconds",
            "Reconciliation time, per controller",
            reconcile_duration.clone(),
        );
        let certificates_issued = Family::default();
        registry.register(
            "service_ca_certificates_issued",
            "Serving certificates issued, per reason",
            certificates_issued.clone(),
        );
        let issuance_failures = Family::default();
        registry.register(
            "service_ca_certificate_issuance_failures",
            "Serving certificates issued but not written, per reason (refused, api, pki)",
            issuance_failures.clone(),
        );
        let pod_certificate_requests = Family::default();
        registry.register(
            "service_ca_pod_certificate_requests",
            "PodCertificateRequests answered, per outcome (issued, denied, failed)",
            pod_certificate_requests.clone(),
        );
        let keys_generated = Counter::default();
        registry.register("service_ca_keys_generated", "Private keys generated", keys_generated.clone());
        let injections = Family::default();
        registry.register("service_ca_injections", "CA bundle injections written, per kind", injections.clone());
        let rotations = Family::default();
        registry.register(
            "service_ca_rotations",
            "CA changes, per kind (automatic, forced, reset, created)",
            rotations.clone(),
        );
        let reissue_remaining = Gauge::default();
        registry.register(
            "service_ca_reissue_remaining",
            "Managed Secrets not yet re-checked (and re-issued where needed) since the last CA change",
            reissue_remaining.clone(),
        );
        let rotation_failures = Counter::default();
        registry.register(
            "service_ca_rotation_failures",
            "CA rotation attempts that failed (the current CA stays in use)",
            rotation_failures.clone(),
        );
        let api_writes = Family::default();
        registry.register(
            "service_ca_api_writes",
            "Writes sent to the API server, per resource and verb",
            api_writes.clone(),
        );
        let sharing_members = Gauge::default();
        registry.register(
            "service_ca_sharing_members",
            "Replicas sharing issuance, as this one sees them (0: sharing is off)",
            sharing_members.clone(),
        );
        let sharing_owned = Gauge::default();
        registry.register(
            "service_ca_sharing_owned_services",
            "Annotated Services this replica issues for (all of them when sharing is off)",
            sharing_owned.clone(),
        );
        let trust = trust::register(&mut registry);
        if let Some(store) = serving_secrets {
            registry.register_collector(Box::new(ServingCertExpiry(store)));
        }
        Metrics {
            registry,
            ca_expiry,
            signing_key_valid,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            certificates_issued,
            issuance_failures,
            pod_certificate_requests,
            keys_generated,
            injections,
            rotations,
            reissue_remaining,
            rotation_failures,
            api_writes,
            sharing_members,
            sharing_owned,
            trust,
        }
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

/// `service_ca_serving_certificate_expiry_time_seconds{namespace,secret}`, computed
/// from the managed-Secret cache at scrape time.
#[derive(Debug)]
struct ServingCertExpiry(Store<PartialObjectMeta<Secret>>);

impl Collector for ServingCertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "service_ca_serving_certificate_expiry_time_seconds",
            "NotAfter of each managed serving certificate, Unix seconds",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for secret in self.0.state() {
            let Some(expiry) = secret.annotations().get(ann::BETA.expiry).and_then(|v| parse_expiry(v)) else {
                continue;
            };
            let labels = [("namespace", secret.namespace().unwrap_or_default()), ("secret", secret.name_any())];
            ConstGauge::new(expiry.unix_timestamp()).encode(metric.encode_family(&labels.to_vec())?)?;
        }
        Ok(())
    }
}
