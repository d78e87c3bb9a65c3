//! The trust metrics: when each certificate of the published bundles
//! expires, how many injected objects hold the current bundle, and how many
//! per-namespace bundles are current. Bounded labels only: no namespace or object name
//! (per-object detail is `inspect -o json`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::signer::Signer;

/// The longest subject CN in a label (ours are `openshift-service-serving-signer@<seconds>`).
const MAX_SUBJECT: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleCertLabels {
    /// `signing-cabundle` or `cluster-trust-bundle`.
    pub bundle: &'static str,
    /// `current` (the CA signing now), `previous` (an older self-signed CA still
    /// trusted) or `bridge` (a cross-signed certificate).
    pub role: &'static str,
    pub subject: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

pub struct TrustMetrics {
    pub bundle_expiry: Family<BundleCertLabels, Gauge>,
    /// Per-namespace bundles: `selected` namespaces, and those whose bundle is `current`.
    pub namespace_bundles: Family<StateLabels, Gauge>,
    pub injected: std::sync::Arc<InjectedObjects>,
}

impl Default for TrustMetrics {
    fn default() -> Self {
        TrustMetrics {
            bundle_expiry: Family::default(),
            namespace_bundles: Family::default(),
            injected: std::sync::Arc::new(InjectedObjects::default()),
        }
    }
}

/// Registers the trust metrics.
pub fn register(trust: &TrustMetrics, registry: &mut Registry) {
    registry.register(
        "service_ca_bundle_certificate_expiry_seconds",
        "NotAfter of each certificate in a published bundle, Unix seconds, per bundle, role and subject CN",
        trust.bundle_expiry.clone(),
    );
    registry.register(
        "service_ca_namespace_bundles",
        "Namespaces selected for the per-namespace bundle (state=selected) and those holding the current one (state=current)",
        trust.namespace_bundles.clone(),
    );
    registry.register_collector(Box::new(InjectedCollector(trust.injected.clone())));
}

/// A short digest of a bundle, to tell the current one from others.
pub fn bundle_digest(bundle: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bundle.hash(&mut hasher);
    hasher.finish()
}

impl TrustMetrics {
    /// The certificates of `signer`'s bundle, in `signing-cabundle` and (when
    /// `trust_bundle`) in the ClusterTrustBundle, which holds the same bundle.
    pub fn observe_bundle(&self, signer: &Signer, trust_bundle: bool) {
        self.injected.bundle.store(bundle_digest(&signer.bundle_pem), Ordering::Relaxed);
        self.bundle_expiry.clear();
        let current = &signer.ca.certificate().der;
        let ders = crate::pki::pem::decode_certificates("bundle", signer.bundle_pem.as_bytes()).unwrap_or_default();
        for der in ders {
            let Ok(cert) = crate::pki::CertInfo::parse("bundle", der) else { continue };
            let role = if &cert.der == current {
                "current"
            } else if cert.authority_key_id.is_some() && cert.authority_key_id != cert.subject_key_id {
                "bridge"
            } else {
                "previous"
            };
            let subject = crate::bounded_to(&cert.subject_cn, MAX_SUBJECT).into_owned();
            let bundles: &[&'static str] =
                if trust_bundle { &["signing-cabundle", "cluster-trust-bundle"] } else { &["signing-cabundle"] };
            for bundle in bundles {
                let labels = BundleCertLabels { bundle, role, subject: subject.clone() };
                self.bundle_expiry.get_or_create(&labels).set(cert.not_after.unix_timestamp());
            }
        }
    }
}

/// Per injected object (by `Kind/namespace/name`): its resource and the digest of the
/// bundle last injected (`None`: the last attempt failed).
#[derive(Default)]
pub struct InjectedObjects {
    objects: Mutex<HashMap<String, (&'static str, Option<u64>)>>,
    /// The digest of the current bundle.
    bundle: AtomicU64,
}

impl InjectedObjects {
    /// Records the outcome for `object`: `Some(Some(digest))` injected, `Some(None)`
    /// failed, `None` no longer asking (or gone; a lost race is counted as its next pass).
    pub fn record(&self, object: &str, resource: &'static str, outcome: Option<Option<u64>>) {
        if let Ok(mut objects) = self.objects.lock() {
            match outcome {
                Some(digest) => objects.insert(object.to_string(), (resource, digest)),
                None => objects.remove(object),
            };
        }
    }

    /// Forgets the objects of `resource` that `present` no longer knows (deleted, or no
    /// longer asking for the bundle).
    pub fn retain(&self, resource: &'static str, present: impl Fn(&str) -> bool) {
        if let Ok(mut objects) = self.objects.lock() {
            objects.retain(|object, (r, _)| *r != resource || present(object));
        }
    }

    /// Counts per (resource, status): current, stale, error.
    fn counts(&self) -> HashMap<(&'static str, &'static str), i64> {
        let bundle = self.bundle.load(Ordering::Relaxed);
        let mut counts: HashMap<(&'static str, &'static str), i64> = HashMap::new();
        if let Ok(objects) = self.objects.lock() {
            for (resource, digest) in objects.values() {
                let status = match digest {
                    Some(d) if *d == bundle => "current",
                    Some(_) => "stale",
                    None => "error",
                };
                let n = counts.entry((resource, status)).or_insert(0);
                *n = n.saturating_add(1);
            }
        }
        counts
    }
}

#[derive(Debug)]
struct InjectedCollector(std::sync::Arc<InjectedObjects>);

impl std::fmt::Debug for InjectedObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InjectedObjects")
    }
}

impl Collector for InjectedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "service_ca_injected_objects",
            "Objects asking for the CA bundle, per kind and status (current, stale: an older bundle, error: the last write failed)",
            None,
            MetricType::Gauge,
        )?;
        for ((kind, status), n) in self.0.counts() {
            let labels = [("kind", kind), ("status", status)];
            ConstGauge::new(n).encode(metric.encode_family(&labels.to_vec())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_objects_are_counted_by_kind_and_status() {
        let objects = InjectedObjects::default();
        objects.bundle.store(7, Ordering::Relaxed);
        objects.record("a", "configmaps", Some(Some(7)));
        objects.record("b", "configmaps", Some(Some(6)));
        objects.record("c", "apiservices", Some(None));
        objects.record("d", "configmaps", Some(Some(7)));
        objects.record("d", "configmaps", None);
        let counts = objects.counts();
        assert_eq!(counts.get(&("configmaps", "current")), Some(&1));
        assert_eq!(counts.get(&("configmaps", "stale")), Some(&1));
        assert_eq!(counts.get(&("apiservices", "error")), Some(&1));
        assert_eq!(counts.len(), 3);
    }
}
