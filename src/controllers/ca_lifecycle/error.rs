//! What can fail in a CA lifecycle pass, and the category each failure is counted under.

use crate::controllers::{Categorised, api_category};
use crate::names::{SIGNING_CABUNDLE, SIGNING_KEY};
use crate::pki::PkiError;

/// What can fail in a CA lifecycle pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a CA key: {0}")]
    GenerateKey(PkiError),
    #[error("building the CA certificates: {0}")]
    BuildCa(PkiError),
    #[error("writing Secret {SIGNING_KEY}: {0}")]
    WriteSigningKey(kube::Error),
    #[error("writing ConfigMap {SIGNING_CABUNDLE}: {0}")]
    WriteBundle(kube::Error),
}

impl Categorised for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::GenerateKey(_) => "generate-key",
            Error::BuildCa(_) => "build-ca",
            Error::WriteSigningKey(e) if api_category(e) == "conflict" => "write-signing-key-conflict",
            Error::WriteSigningKey(_) => "write-signing-key",
            Error::WriteBundle(_) => "write-bundle",
        }
    }
}
