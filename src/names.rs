//! Every name the operator reads or writes, in one place: the objects it owns, the
//! data keys, annotations and labels, the field manager and the Lease.
//!
//! The Service-facing annotation keys come in two families,
//! `service.beta.openshift.io/` and `service.alpha.openshift.io/`, with the same
//! suffixes.

// --- Objects of the operator's own, in its namespace -------------------------------

/// The Secret holding the CA (docs/spec.md §3.1).
pub const SIGNING_KEY: &str = "signing-key";
/// The ConfigMap publishing the CA bundle.
pub const SIGNING_CABUNDLE: &str = "signing-cabundle";
/// The leader-election Lease.
pub const LEASE_NAME: &str = "service-ca-operator";
/// Label on each replica's membership Lease (issuance shared across replicas).
pub const MEMBER_LABEL: &str = "service-ca.operators.openshift.io/member";
/// Prefix of a replica's membership Lease name.
pub const MEMBER_LEASE_PREFIX: &str = "service-ca-operator-member-";
/// The serving Secret of the operator's own metrics Service (manifests/metrics-service.yaml
/// asks for it by annotation; the metrics server serves its certificate).
pub const METRICS_CERT_SECRET: &str = "service-ca-operator-metrics-tls";

// --- Data keys -----------------------------------------------------------------------

/// `kubernetes.io/tls` Secrets (serving Secrets and `signing-key`): certificate and key.
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// `signing-key` after a rotation: the bundle [new CA, X1] (also the key of
/// `signing-cabundle`) and the bridge X2.
pub const CA_BUNDLE: &str = "ca-bundle.crt";
pub const INTERMEDIATE: &str = "intermediate-ca.crt";
/// The key of an injected ConfigMap.
pub const INJECTED_CONFIGMAP_KEY: &str = "service-ca.crt";
/// The cluster's root CA ConfigMap (published in every namespace) and its key.
pub const KUBE_ROOT_CA: &str = "kube-root-ca.crt";
pub const KUBE_ROOT_CA_KEY: &str = "ca.crt";

/// The Secret type of serving Secrets and `signing-key`.
pub const SECRET_TYPE_TLS: &str = "kubernetes.io/tls";

// --- Annotations -------------------------------------------------------------------

/// One family of keys (beta or alpha).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// On a Service: the name of the serving Secret to create.
    pub serving_cert_secret_name: &'static str,
    /// On a Service: the kind of key its certificate is for (`rsa`, `ecdsa`, ...).
    pub serving_cert_key_algorithm: &'static str,
    /// On the serving Secret: the Service it was made for.
    pub originating_service_name: &'static str,
    pub originating_service_uid: &'static str,
    /// On the serving Secret: the leaf's NotAfter (RFC 3339, UTC, whole seconds).
    pub expiry: &'static str,
    /// On a Service: the CN of the CA that signed its certificate.
    pub signed_by: &'static str,
    /// On a Service: why its Secret could not be made, and how many times in a row.
    pub generation_error: &'static str,
    pub generation_error_num: &'static str,
    /// On ConfigMaps, APIServices, CRDs and webhook configurations: inject the bundle.
    pub inject_cabundle: &'static str,
}

macro_rules! family {
    ($prefix:literal) => {
        Family {
            serving_cert_secret_name: concat!($prefix, "serving-cert-secret-name"),
            serving_cert_key_algorithm: concat!($prefix, "serving-cert-key-algorithm"),
            originating_service_name: concat!($prefix, "originating-service-name"),
            originating_service_uid: concat!($prefix, "originating-service-uid"),
            expiry: concat!($prefix, "expiry"),
            signed_by: concat!($prefix, "serving-cert-signed-by"),
            generation_error: concat!($prefix, "serving-cert-generation-error"),
            generation_error_num: concat!($prefix, "serving-cert-generation-error-num"),
            inject_cabundle: concat!($prefix, "inject-cabundle"),
        }
    };
}

pub const BETA: Family = family!("service.beta.openshift.io/");
pub const ALPHA: Family = family!("service.alpha.openshift.io/");

/// On the ConfigMap `openshift-service-ca.crt` only: inject the bundle followed by the
/// cluster's root CA (legacy service-account CA behaviour).
pub const INJECT_VULNERABLE_LEGACY_CABUNDLE: &str = "service.alpha.openshift.io/inject-vulnerable-legacy-cabundle";
/// The only ConfigMap name the legacy annotation applies to.
pub const LEGACY_CONFIGMAP_NAME: &str = "openshift-service-ca.crt";

/// The per-namespace bundle ConfigMap (OpenShift's name; docs/spec.md §5.5), holding
/// [`INJECTED_CONFIGMAP_KEY`]. The same name as the legacy ConfigMap: one of that name
/// without [`NAMESPACE_BUNDLE_LABEL`] is not ours and is left alone.
pub const NAMESPACE_BUNDLE: &str = LEGACY_CONFIGMAP_NAME;
/// Label on the per-namespace bundles the operator makes; its value is the operator's
/// namespace, so that two instances tell theirs apart.
pub const NAMESPACE_BUNDLE_LABEL: &str = "service-ca.operators.openshift.io/namespace-bundle";
/// On a per-namespace bundle: a digest of the bundle it holds, so that the operator
/// knows from metadata alone (its watch caches no ConfigMap bodies) whether it is current.
pub const BUNDLE_DIGEST: &str = "service-ca.operators.openshift.io/bundle-digest";

/// On a ConfigMap with inject-cabundle: the one data key to write the bundle under
/// (e.g. `ca.crt`); every other key stays (docs/spec.md §5.5).
pub const INJECT_CABUNDLE_KEY: &str = "service-ca.operators.openshift.io/inject-cabundle-key";

/// A ConfigMap data key as the API server accepts it: at most 253 characters of
/// letters, digits, '-', '_' and '.', and not `.`, `..` or starting with `..`.
pub fn check_configmap_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > MAX_NAME {
        return Err("a key has 1 to 253 characters");
    }
    if !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    if key == "." || key.starts_with("..") {
        return Err("a key may not be '.' or start with '..'");
    }
    Ok(())
}

/// On `signing-key`: a person asks for a graceful rotation, once per distinct value.
pub const FORCE_ROTATION: &str = "service-ca.operators.openshift.io/force-rotation";
/// On `signing-key`: the force-rotation value last acted on.
pub const FORCED_ROTATION_REASON: &str = "service-ca.operators.openshift.io/forced-rotation-reason";

/// Label on every serving Secret the operator manages; the operator watches only
/// Secrets that carry it.
pub const MANAGED_LABEL: &str = "service-ca.operators.openshift.io/managed";
pub const MANAGED_LABEL_VALUE: &str = "true";

/// The default signer name of PodCertificateRequests the operator signs (and of the
/// ClusterTrustBundle it publishes).
pub const POD_SIGNER_NAME: &str = "service-ca.operators.openshift.io/serving";
/// Labels on the published ClusterTrustBundle: [`MANAGED_LABEL`], and this one with
/// the operator's namespace, telling instances (and their bundles) apart.
pub const TRUST_BUNDLE_INSTANCE_LABEL: &str = "service-ca.operators.openshift.io/instance";

/// The ClusterTrustBundle of `signer` published by the instance in `namespace`:
/// `<signer with '/' as ':'>:<namespace>` (the API server requires the prefix).
pub fn trust_bundle_name(signer: &str, namespace: &str) -> String {
    format!("{}:{namespace}", signer.replace('/', ":"))
}

/// Field manager name for every write (server-side apply and patches).
pub const FIELD_MANAGER: &str = "service-ca-operator";

/// The path scrapers ask for, and the non-resource URL they need `get` on.
pub const METRICS_PATH: &str = "/metrics";

/// Whether an inject annotation value turns injection on (`"true"`, any case).
pub fn is_true(value: Option<&String>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The longest object name the API server accepts (a DNS-1123 subdomain).
pub const MAX_NAME: usize = 253;

/// A DNS-1123 subdomain: what Kubernetes accepts as a Secret name (and the shape of a
/// DNS domain): dot-separated non-empty parts of lowercase letters, digits and '-',
/// each starting and ending with a letter or digit, at most [`MAX_NAME`] characters.
pub fn check_subdomain(value: &str) -> Result<(), &'static str> {
    if value.len() > MAX_NAME {
        return Err("longer than 253 characters");
    }
    for label in value.split('.') {
        let bytes = label.as_bytes();
        if bytes.is_empty() {
            return Err("empty part between dots");
        }
        if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
            return Err("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if bytes.first() == Some(&b'-') || bytes.last() == Some(&b'-') {
            return Err("each part must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn secret_names_follow_dns_1123_subdomain_rules() {
        for ok in ["tls", "web-tls", "a.b.c", "0x1"] {
            assert!(super::check_subdomain(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "under_score", "-lead", "trail-", "a..b", "spa ce", &"x".repeat(254)] {
            assert!(super::check_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configmap_keys_follow_the_api_servers_rules() {
        for ok in ["ca.crt", "service-ca.crt", "CA_bundle", ".hidden", "a..b", &"x".repeat(253)] {
            assert!(super::check_configmap_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "..x", "a/b", "spa ce", "ü", &"x".repeat(254)] {
            assert!(super::check_configmap_key(bad).is_err(), "{bad}");
        }
    }
}
