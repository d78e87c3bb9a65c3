//! service-ca-operator: serving certificates for annotated Services and CA bundle
//! injection, compatible with OpenShift's `service.beta.openshift.io/*` annotations.
//!
//! Map of the crate:
//! - [`config`]: flags and environment variables;
//! - [`app`]: wiring, leader election, shutdown;
//! - [`pki`]: pure certificate logic (no Kubernetes);
//! - [`signer`]: the shared in-memory signer and the key-generation pool;
//! - [`controllers`]: serving_cert, cert_refresh, ca_bundle, ca_lifecycle;
//! - [`admin`] and [`metrics`]: probes and Prometheus metrics;
//! - [`annotations`]: every annotation and label key;
//! - [`inspect`]: the `inspect` subcommand (a read-only report, and `--restart`).

pub mod admin;
pub mod annotations;
pub mod app;
pub mod config;
pub mod controllers;
pub mod inspect;
pub mod metrics;
pub mod pki;
pub mod signer;
