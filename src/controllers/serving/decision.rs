//! The re-issue decision of docs/spec.md §1 as a pure function:
//! (the existing Secret, what the Service asks for, the CA, now) → what to do.

use std::collections::{BTreeMap, BTreeSet};

use time::OffsetDateTime;

use crate::names::{self as ann, SECRET_TYPE_TLS, TLS_CERT, TLS_KEY};
use crate::pki::{
    CertificateAuthority, KeyKind, LeafInfo, LeafPolicy, LeafRequest, format_expiry, key_matches, parse_expiry,
};

/// What the decision needs to know about the existing Secret.
#[derive(Clone, Debug)]
pub struct SecretFacts<'a> {
    pub secret_type: &'a str,
    pub data: BTreeMap<&'a str, &'a [u8]>,
    pub annotations: &'a BTreeMap<String, String>,
    /// UIDs of the Secret's ownerReferences of kind Service.
    pub owner_service_uids: Vec<&'a str>,
    /// Whether it carries the operator's managed label.
    pub labeled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A Secret of that name exists and is not ours: it is never modified.
    Foreign(String),
    /// Generate a new key and certificate.
    Issue(IssueReason),
    /// Certificate and key are right; other data keys or our metadata need fixing,
    /// without re-issuing.
    Tidy { extra_keys: Vec<String>, expiry: OffsetDateTime, refresh_at: Option<OffsetDateTime> },
    /// Nothing to do until `refresh_at` (`None`: until something changes, e.g. the CA
    /// rotates, because the leaf is already capped at the CA's own expiry).
    Keep { refresh_at: Option<OffsetDateTime> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueReason {
    Absent,
    MissingData(&'static str),
    Unparseable(String),
    KeyMismatch,
    OtherCa,
    NamesChanged,
    /// The key is of another kind than the Service (or the default) asks for.
    KeyAlgorithm {
        have: KeyKind,
        want: KeyKind,
    },
    NoOwnerReference,
    NoExpiry,
    BadExpiry,
    DueForRefresh,
}

impl IssueReason {
    /// A short, bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            IssueReason::Absent => "absent",
            IssueReason::MissingData(_) => "missing-data",
            IssueReason::Unparseable(_) => "unparseable",
            IssueReason::KeyMismatch => "key-mismatch",
            IssueReason::OtherCa => "ca-changed",
            IssueReason::NamesChanged => "names-changed",
            IssueReason::KeyAlgorithm { .. } => "key-algorithm",
            IssueReason::NoOwnerReference => "no-owner-reference",
            IssueReason::NoExpiry | IssueReason::BadExpiry => "bad-expiry-annotation",
            IssueReason::DueForRefresh => "refresh",
        }
    }
}

impl std::fmt::Display for IssueReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IssueReason::Absent => f.write_str("the Secret does not exist"),
            IssueReason::MissingData(key) => write!(f, "{key} is missing"),
            IssueReason::Unparseable(why) => write!(f, "tls.crt cannot be read: {why}"),
            IssueReason::KeyMismatch => f.write_str("tls.key does not belong to tls.crt"),
            IssueReason::OtherCa => f.write_str("the certificate was not signed by the current CA"),
            IssueReason::NamesChanged => f.write_str("the certificate's DNS names differ from the Service's"),
            IssueReason::KeyAlgorithm { have, want } => write!(f, "the key is {have} and {want} is asked for"),
            IssueReason::NoOwnerReference => f.write_str("the ownerReference to the Service is missing"),
            IssueReason::NoExpiry => f.write_str("the expiry annotation is missing"),
            IssueReason::BadExpiry => f.write_str("the expiry annotation cannot be parsed"),
            IssueReason::DueForRefresh => f.write_str("the certificate is due for refresh"),
        }
    }
}

/// Decides what to do with the serving Secret that `wanted` describes.
pub fn decide(
    secret: Option<&SecretFacts<'_>>,
    wanted: &LeafRequest,
    ca: &CertificateAuthority,
    policy: &LeafPolicy,
    now: OffsetDateTime,
) -> Decision {
    let Some(secret) = secret else {
        return Decision::Issue(IssueReason::Absent);
    };
    if let Err(why) = ownership(secret, &wanted.uid) {
        return Decision::Foreign(why);
    }
    let leaf = match check_certificate(secret, wanted, ca) {
        Ok(leaf) => leaf,
        Err(reason) => return Decision::Issue(reason),
    };
    if let Err(reason) = check_metadata(secret, &wanted.uid) {
        return Decision::Issue(reason);
    }

    let refresh_at = policy.refresh_at(leaf.not_after, ca.not_after());
    if now > leaf.not_after || refresh_at.is_some_and(|at| now >= at) {
        return Decision::Issue(IssueReason::DueForRefresh);
    }

    let extra_keys: Vec<String> =
        secret.data.keys().filter(|k| **k != TLS_CERT && **k != TLS_KEY).map(|k| k.to_string()).collect();
    let expiry_text = format_expiry(leaf.not_after);
    let annotations_right =
        [ann::BETA.expiry, ann::ALPHA.expiry].iter().all(|k| secret.annotations.get(*k) == Some(&expiry_text));
    if !extra_keys.is_empty() || !secret.labeled || !annotations_right {
        return Decision::Tidy { extra_keys, expiry: leaf.not_after, refresh_at };
    }
    Decision::Keep { refresh_at }
}

/// A Secret is ours when it names this Service's UID and has our type; anything else
/// is never modified (the reason says why).
fn ownership(secret: &SecretFacts<'_>, uid: &str) -> Result<(), String> {
    let recorded = secret
        .annotations
        .get(ann::BETA.originating_service_uid)
        .or_else(|| secret.annotations.get(ann::ALPHA.originating_service_uid));
    if recorded.map(String::as_str) != Some(uid) {
        return Err(match recorded {
            None => "it was not created by this operator for this Service".to_string(),
            Some(other) => format!("it belongs to another Service (uid {})", crate::bounded(other)),
        });
    }
    if secret.secret_type != SECRET_TYPE_TLS {
        return Err(format!(
            "it has type {:?}, not {SECRET_TYPE_TLS}, and a type cannot be changed; delete it to get a new one",
            crate::bounded(secret.secret_type)
        ));
    }
    Ok(())
}

/// The certificate and key: present, readable, a pair, from the current CA, for the
/// Service's names, of the kind of key it asks for.
fn check_certificate(
    secret: &SecretFacts<'_>,
    wanted: &LeafRequest,
    ca: &CertificateAuthority,
) -> Result<LeafInfo, IssueReason> {
    let field = |key: &'static str| match secret.data.get(key) {
        Some(value) if !value.is_empty() => Ok(*value),
        _ => Err(IssueReason::MissingData(key)),
    };
    let (tls_crt, tls_key) = (field(TLS_CERT)?, field(TLS_KEY)?);
    let leaf = LeafInfo::parse(tls_crt).map_err(IssueReason::Unparseable)?;
    if !leaf.public_key.as_ref().is_some_and(|pk| key_matches(tls_key, pk)) {
        return Err(IssueReason::KeyMismatch);
    }
    if leaf.authority_key_id.as_deref() != Some(ca.subject_key_id()) {
        return Err(IssueReason::OtherCa);
    }
    if leaf.dns_names != wanted.dns_names().into_iter().collect::<BTreeSet<_>>() {
        return Err(IssueReason::NamesChanged);
    }
    match leaf.public_key.as_ref().and_then(|pk| pk.kind()) {
        Some(have) if have == wanted.key => {}
        // An RSA modulus that cannot be read would not have matched tls.key above.
        have => return Err(IssueReason::KeyAlgorithm { have: have.unwrap_or(wanted.key), want: wanted.key }),
    }
    Ok(leaf)
}

/// Our ownerReference and a readable expiry annotation.
fn check_metadata(secret: &SecretFacts<'_>, uid: &str) -> Result<(), IssueReason> {
    if !secret.owner_service_uids.contains(&uid) {
        return Err(IssueReason::NoOwnerReference);
    }
    let expiry = secret.annotations.get(ann::BETA.expiry).or_else(|| secret.annotations.get(ann::ALPHA.expiry));
    match expiry {
        None => Err(IssueReason::NoExpiry),
        Some(expiry) if parse_expiry(expiry).is_none() => Err(IssueReason::BadExpiry),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
