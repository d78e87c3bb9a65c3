//! Pure certificate logic, with no Kubernetes dependency: the service CA (creation,
//! loading, rotation with a trust bridge, bundle), serving-certificate issuance (for
//! Services, and for pods over the key of their request), and
//! the inspection of an issued certificate. (Whether a serving Secret must be
//! re-issued is the serving controllers' decision: `controllers::serving::decision`.)
//!
//! Everything here takes `now` as an argument, so every rule is testable at any
//! instant without waiting.

mod ca;
mod ca_key;
mod keys;
mod leaf;
pub mod pem;
pub mod pkcs11;
mod pod;

pub use ca::{CA_NAME_PREFIX, CaPolicy, CertInfo, CertificateAuthority, MAX_BRIDGES};
pub use ca_key::{CaKey, PKCS11_KEY_URI};
pub use keys::{KEY_ALGORITHMS, KeyKind, PrivateKey, PublicKey, key_matches, key_values};
pub use leaf::{IssuedLeaf, LeafInfo, LeafPolicy, LeafRequest, SERVICE_UID_OID, format_expiry, parse_expiry};
pub use pod::{KeyError, PodLeaf, PodTiming, RequestedKey, SUPPORTED_POD_KEYS, begin_refresh_at, requested_key};

/// `signing-key` data with a CA of one's own, valid exactly from and until the dates given.
#[cfg(test)]
pub(crate) use ca::tests::own_ca;

use time::OffsetDateTime;

/// Every way certificate material can be unusable. Messages name the field and the
/// problem and never include key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    #[error("{field} is missing")]
    Missing { field: &'static str },
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is not PEM: no \"-----BEGIN ...-----\" block found")]
    NotPem { field: &'static str },
    #[error("{field} is not valid PEM: {problem}")]
    MalformedPem { field: &'static str, problem: &'static str },
    #[error("{field} holds a {found} block where a {expected} block is expected")]
    WrongBlockType { field: &'static str, found: &'static str, expected: &'static str },
    #[error("{field} holds {count} certificates where exactly one is expected")]
    SeveralCertificates { field: &'static str, count: usize },
    #[error("{field} does not hold a valid X.509 certificate: {reason}")]
    BadCertificate { field: &'static str, reason: String },
    #[error("{field} does not hold a usable private key: {reason}")]
    BadKey { field: &'static str, reason: String },
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("tls.key does not belong to the certificate in tls.crt (their public keys differ)")]
    KeyMismatch,
    #[error(
        "the certificate in tls.crt is not a CA (it needs BasicConstraints CA:TRUE and, if KeyUsage is present, keyCertSign)"
    )]
    NotCa,
    #[error("the CA certificate expired at {}; delete the Secret to create a new CA (hard reset)", format_expiry(*not_after))]
    Expired { not_after: OffsetDateTime },
    #[error("the CA certificate is not valid before {}", format_expiry(*not_before))]
    NotYetValid { not_before: OffsetDateTime },
    #[error("the CA certificate has no SubjectKeyIdentifier extension, which chaining across rotations needs")]
    MissingSubjectKeyId,
    #[error(
        "{field} {problem}: it is left over from an earlier CA; remove it (or restore the matching tls.crt and tls.key)"
    )]
    Stale { field: &'static str, problem: &'static str },
    #[error(
        "the CA could never be rotated ({0}); give it a subject of single-valued PrintableString, IA5String or UTF8String attributes, or delete the Secret for a new CA"
    )]
    CannotRotate(String),
    #[error("the Service UID {0:?} cannot be written as an ASN.1 PrintableString")]
    BadServiceUid(String),
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("{0}")]
    Token(pkcs11::TokenError),
}
