//! Serving certificates for Services (docs/spec.md §1): the two controllers and what they
//! share.
//!
//! - [`serving_cert`] (keyed by Service): the Secret exists; conflicts and bad input
//!   are reported on the Service.
//! - [`cert_refresh`] (keyed by managed Secret): the Secret stays right; re-issued on
//!   time, on CA change, on tampering.
//! - [`decision`]: the pure decision both make from (Secret, Service, CA, now).
//! - [`precondition`]: the pure checks both make around it (is a Secret asked for,
//!   the failure cap, the key algorithm, a Secret being deleted, whose it is to fix).
//!
//! The rest they share has one room per concern (this module keeps [`Error`],
//! [`MAX_FAILURES`] and [`secret_ref`]):
//!
//! - [`watches`]: the caches and the streams that drive them ([`watches::ServingWatches`]);
//! - [`request`]: what a Service asks for ([`request::wanted`], [`request::leaf_request`])
//!   and its failure count;
//! - [`secret`]: the Secret as it should be ([`secret::desired`]) and the writes;
//! - [`report`]: what is reported on the Service (success, failure, a certificate issued);
//! - [`written`]: what was just written (Secrets, Services marked), so that the passes
//!   our own writes set off need not read it back.

pub mod cert_refresh;
pub mod decision;
pub mod precondition;
pub mod progress;
pub mod report;
pub mod request;
pub mod secret;
pub mod serving_cert;
pub mod watches;
pub mod written;

use crate::controllers::failure::{Op, no_answer};
use crate::controllers::{Categorised, is_conflict, shown};
use crate::pki::PkiError;

/// What can fail in the serving controllers: what was being done, to which object
/// (the shape of every controller's errors, see [`crate::controllers::failure`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Kube { action: Op, object: String, source: kube::Error },
    #[error("{action} {object}: {source}")]
    Pki { action: Op, object: String, source: PkiError },
}

pub const READ_SECRET: Op = Op { doing: "reading", category: "read-secret" };
pub const WRITE_SECRET: Op = Op { doing: "writing", category: "write-secret" };
pub const ISSUE: Op = Op { doing: "issuing a certificate for", category: "issue" };
pub const READ_SERVICE: Op = Op { doing: "reading", category: "read-service" };
pub const PATCH_SERVICE: Op = Op { doing: "annotating", category: "patch-service" };

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube { action, source, .. } if *action == WRITE_SECRET && is_conflict(source) => {
                "write-secret-conflict"
            }
            Error::Kube { action, .. } | Error::Pki { action, .. } => action.category,
        }
    }

    fn unreachable(&self) -> bool {
        match self {
            Error::Kube { source, .. } => no_answer(source),
            Error::Pki { .. } => false,
        }
    }
}

/// After this many consecutive failures the Service is left alone until a person
/// edits (or removes) its error annotations.
pub const MAX_FAILURES: u32 = 10;

/// `Secret namespace/name`, as logs, Events and errors print it (see [`shown`]).
pub fn secret_ref(namespace: &str, name: &str) -> String {
    shown("Secret", Some(namespace), name)
}

#[cfg(test)]
mod write_tests;

/// What the tests of the serving rooms share.
#[cfg(test)]
mod fixtures {
    use k8s_openapi::api::core::v1::Service;

    pub fn svc(annotations: &[(&str, &str)], cluster_ip: Option<&str>) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("shop".into());
        svc.metadata.uid = Some("uid-1".into());
        svc.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: cluster_ip.map(Into::into),
            ..Default::default()
        });
        svc
    }
}
