//! Every annotation and label key the operator reads or writes, in one place.
//!
//! The Service-facing keys come in two families, `service.beta.openshift.io/` and
//! `service.alpha.openshift.io/`, with the same suffixes.

/// One family of keys (beta or alpha).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// On a Service: the name of the serving Secret to create.
    pub serving_cert_secret_name: &'static str,
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

/// On `signing-key`: a person asks for a graceful rotation, once per distinct value.
pub const FORCE_ROTATION: &str = "service-ca.operators.openshift.io/force-rotation";
/// On `signing-key`: the force-rotation value last acted on.
pub const FORCED_ROTATION_REASON: &str = "service-ca.operators.openshift.io/forced-rotation-reason";

/// Label on every serving Secret the operator manages; the operator watches only
/// Secrets that carry it.
pub const MANAGED_LABEL: &str = "service-ca.operators.openshift.io/managed";
pub const MANAGED_LABEL_VALUE: &str = "true";

/// Field manager name for every write (server-side apply and patches).
pub const FIELD_MANAGER: &str = "service-ca-operator";

/// Whether an inject annotation value turns injection on (`"true"`, any case).
pub fn is_true(value: Option<&String>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}
