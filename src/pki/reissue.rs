//! The re-issue decision of SPEC §1 as a pure function:
//! (Secret data and annotations, Service, CA, now) → what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::keys::certificate_public_key;
use super::{CertificateAuthority, LeafRequest, TLS_CERT, TLS_KEY, key_matches, parse_expiry, pem};
use crate::annotations as ann;

/// What the decision needs to know about the Service.
#[derive(Clone, Copy, Debug)]
pub struct ServiceFacts<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub headless: bool,
}

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

/// Leaf issuance settings.
#[derive(Clone, Debug)]
pub struct LeafPolicy {
    pub cluster_domain: String,
    pub lifetime: Duration,
    /// Re-issue when less than this is left before the leaf expires.
    pub refresh_before: Duration,
}

impl LeafPolicy {
    /// The default refresh threshold: a third of the lifetime, and never less than one
    /// hour — except that it never exceeds half the lifetime, so that short lifetimes
    /// (tests, demos) do not re-issue in a loop.
    pub fn default_refresh_before(lifetime: Duration) -> Duration {
        (lifetime / 3).max(Duration::from_secs(3600)).min(lifetime / 2)
    }

    /// When a leaf expiring at `leaf_not_after` is due for refresh. `None` for a leaf
    /// cut short at the CA's own expiry: the CA's rotation refreshes it, not time
    /// (re-issuing it would give the same expiry again).
    pub fn refresh_at(&self, leaf_not_after: OffsetDateTime, ca_not_after: OffsetDateTime) -> Option<OffsetDateTime> {
        let capped = leaf_not_after >= ca_not_after - Duration::from_secs(1);
        (!capped).then(|| leaf_not_after - self.refresh_before)
    }
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
            IssueReason::NoOwnerReference => f.write_str("the ownerReference to the Service is missing"),
            IssueReason::NoExpiry => f.write_str("the expiry annotation is missing"),
            IssueReason::BadExpiry => f.write_str("the expiry annotation cannot be parsed"),
            IssueReason::DueForRefresh => f.write_str("the certificate is due for refresh"),
        }
    }
}

/// Decides what to do with the serving Secret of `svc`.
pub fn decide(
    secret: Option<&SecretFacts<'_>>,
    svc: &ServiceFacts<'_>,
    ca: &CertificateAuthority,
    policy: &LeafPolicy,
    now: OffsetDateTime,
) -> Decision {
    let Some(secret) = secret else {
        return Decision::Issue(IssueReason::Absent);
    };
    let uid = secret
        .annotations
        .get(ann::BETA.originating_service_uid)
        .or_else(|| secret.annotations.get(ann::ALPHA.originating_service_uid));
    if uid.map(String::as_str) != Some(svc.uid) {
        return Decision::Foreign(match uid {
            None => "it was not created by this operator for this Service".to_string(),
            Some(other) => format!("it belongs to another Service (uid {other})"),
        });
    }
    if secret.secret_type != "kubernetes.io/tls" {
        return Decision::Foreign(format!(
            "it has type {:?}, not kubernetes.io/tls, and a type cannot be changed; delete it to get a new one",
            secret.secret_type
        ));
    }

    for key in [TLS_CERT, TLS_KEY] {
        if secret.data.get(key).is_none_or(|v| v.is_empty()) {
            return Decision::Issue(IssueReason::MissingData(key));
        }
    }
    let leaf = match LeafFacts::parse(secret.data[TLS_CERT]) {
        Ok(leaf) => leaf,
        Err(why) => return Decision::Issue(IssueReason::Unparseable(why)),
    };
    if !leaf.public_key.as_ref().is_some_and(|pk| key_matches(secret.data[TLS_KEY], pk)) {
        return Decision::Issue(IssueReason::KeyMismatch);
    }
    if leaf.authority_key_id.as_deref() != Some(ca.subject_key_id()) {
        return Decision::Issue(IssueReason::OtherCa);
    }
    let expected = LeafRequest {
        service: svc.name,
        namespace: svc.namespace,
        uid: svc.uid,
        headless: svc.headless,
        cluster_domain: &policy.cluster_domain,
    }
    .dns_names();
    if leaf.dns_names != expected.into_iter().collect::<BTreeSet<_>>() {
        return Decision::Issue(IssueReason::NamesChanged);
    }
    if !secret.owner_service_uids.contains(&svc.uid) {
        return Decision::Issue(IssueReason::NoOwnerReference);
    }
    let expiry = secret.annotations.get(ann::BETA.expiry).or_else(|| secret.annotations.get(ann::ALPHA.expiry));
    let Some(expiry) = expiry else {
        return Decision::Issue(IssueReason::NoExpiry);
    };
    if parse_expiry(expiry).is_none() {
        return Decision::Issue(IssueReason::BadExpiry);
    }

    let refresh_at = policy.refresh_at(leaf.not_after, ca.not_after());
    if now > leaf.not_after || refresh_at.is_some_and(|at| now >= at) {
        return Decision::Issue(IssueReason::DueForRefresh);
    }

    let extra_keys: Vec<String> =
        secret.data.keys().filter(|k| **k != TLS_CERT && **k != TLS_KEY).map(|k| k.to_string()).collect();
    let expiry_text = super::format_expiry(leaf.not_after);
    let annotations_right =
        [ann::BETA.expiry, ann::ALPHA.expiry].iter().all(|k| secret.annotations.get(*k) == Some(&expiry_text));
    if !extra_keys.is_empty() || !secret.labeled || !annotations_right {
        return Decision::Tidy { extra_keys, expiry: leaf.not_after, refresh_at };
    }
    Decision::Keep { refresh_at }
}

/// The parts of a serving certificate the decision looks at.
struct LeafFacts {
    dns_names: BTreeSet<String>,
    authority_key_id: Option<Vec<u8>>,
    not_after: OffsetDateTime,
    public_key: Option<super::PublicKey>,
}

impl LeafFacts {
    fn parse(tls_crt: &[u8]) -> Result<Self, String> {
        let ders = pem::decode_certificates(TLS_CERT, tls_crt).map_err(|e| e.to_string())?;
        let (_, cert) = X509Certificate::from_der(&ders[0]).map_err(|e| e.to_string())?;
        let mut facts = LeafFacts {
            dns_names: BTreeSet::new(),
            authority_key_id: None,
            not_after: cert.validity().not_after.to_datetime(),
            public_key: certificate_public_key(&cert),
        };
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::DNSName(dns) = name {
                            facts.dns_names.insert(dns.to_string());
                        }
                    }
                }
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    facts.authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => {}
            }
        }
        Ok(facts)
    }
}
