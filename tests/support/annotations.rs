//! The annotation and label names the tests use, spelled out here once (not taken from
//! the crate, so that a renamed constant there fails the tests): docs/spec.md §1–§3.

/// Asks for a serving certificate in the Secret it names.
pub const BETA_NAME: &str = "service.beta.openshift.io/serving-cert-secret-name";
pub const ALPHA_NAME: &str = "service.alpha.openshift.io/serving-cert-secret-name";
/// The key algorithm a Service asks for.
pub const BETA_ALG: &str = "service.beta.openshift.io/serving-cert-key-algorithm";
pub const ALPHA_ALG: &str = "service.alpha.openshift.io/serving-cert-key-algorithm";
/// Why the Service has no certificate, and how many times it failed.
pub const BETA_ERR: &str = "service.beta.openshift.io/serving-cert-generation-error";
pub const BETA_ERR_NUM: &str = "service.beta.openshift.io/serving-cert-generation-error-num";
pub const ALPHA_ERR_NUM: &str = "service.alpha.openshift.io/serving-cert-generation-error-num";
/// Asks for the CA bundle.
pub const INJECT: &str = "service.beta.openshift.io/inject-cabundle";
pub const INJECT_ALPHA: &str = "service.alpha.openshift.io/inject-cabundle";
pub const INJECT_LEGACY: &str = "service.alpha.openshift.io/inject-vulnerable-legacy-cabundle";
/// On `signing-key`: asks for a forced rotation; the reason of the last one done.
pub const FORCE_ROTATION: &str = "service-ca.operators.openshift.io/force-rotation";
pub const FORCED_ROTATION_REASON: &str = "service-ca.operators.openshift.io/forced-rotation-reason";
/// On a serving Secret: its certificate's NotAfter (RFC 3339).
pub const EXPIRY: &str = "service.beta.openshift.io/expiry";
/// The label on the Secrets the operator manages.
pub const MANAGED: &str = "service-ca.operators.openshift.io/managed";
