//! What can fail in a CA lifecycle pass, and the category each failure is counted under.

use crate::controllers::failure::Op;
use crate::controllers::{Categorised, is_conflict, shown};
use crate::names::{SIGNING_CABUNDLE, SIGNING_KEY};
use crate::pki::PkiError;

/// What can fail in a CA lifecycle pass: what was being done, to which object (the
/// shape of every controller's errors, see [`crate::controllers::failure`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Kube { action: Op, object: String, source: kube::Error },
    #[error("{action} {object}: {source}")]
    Pki { action: Op, object: String, source: PkiError },
}

pub const GENERATE_KEY: Op = Op { doing: "generating a CA key for", category: "generate-key" };
pub const BUILD_CA: Op = Op { doing: "building the CA certificates for", category: "build-ca" };
pub const WRITE_SIGNING_KEY: Op = Op { doing: "writing", category: "write-signing-key" };
pub const WRITE_BUNDLE: Op = Op { doing: "writing", category: "write-bundle" };

impl Error {
    /// A failure of key or certificate work for the `signing-key` Secret in `namespace`.
    pub fn pki(action: Op, namespace: &str) -> impl FnOnce(PkiError) -> Error {
        let object = shown("Secret", Some(namespace), SIGNING_KEY);
        move |source| Error::Pki { action, object, source }
    }

    /// A failed write of the `signing-key` Secret in `namespace`.
    pub fn write_signing_key(namespace: &str) -> impl FnOnce(kube::Error) -> Error {
        let object = shown("Secret", Some(namespace), SIGNING_KEY);
        move |source| Error::Kube { action: WRITE_SIGNING_KEY, object, source }
    }

    /// A failed write of the `signing-cabundle` ConfigMap in `namespace`.
    pub fn write_bundle(namespace: &str, source: kube::Error) -> Error {
        Error::Kube { action: WRITE_BUNDLE, object: shown("ConfigMap", Some(namespace), SIGNING_CABUNDLE), source }
    }
}

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube { action, source, .. } if *action == WRITE_SIGNING_KEY && is_conflict(source) => {
                "write-signing-key-conflict"
            }
            Error::Kube { action, .. } | Error::Pki { action, .. } => action.category,
        }
    }
}
