//! service-ca-operator: serving certificates for annotated Services and CA bundle
//! injection, compatible with OpenShift's `service.beta.openshift.io/*` annotations.

pub mod annotations;
pub mod pki;
