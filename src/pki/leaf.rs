//! Serving (leaf) certificates per docs/spec.md §1.

use std::time::Duration;

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::ca::{CertInfo, CertificateAuthority};
use super::keys::{KeyKind, PrivateKey, PublicKey, certificate_public_key, random_serial};
use super::{PkiError, pem};
use crate::dates;
use crate::names::TLS_CERT;

/// OID of the non-critical extension that carries the Service UID.
pub const SERVICE_UID_OID: [u64; 11] = [1, 3, 6, 1, 4, 1, 2312, 17, 100, 2, 1];

/// What a serving certificate is for: the one description of a Service's identity
/// (name, namespace, UID, headless) that issuance and the re-issue decision share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafRequest {
    pub service: String,
    pub namespace: String,
    pub uid: String,
    /// `spec.clusterIP: None`: the certificate also covers `*.<svc>.<ns>.svc[.<domain>]`.
    pub headless: bool,
    pub cluster_domain: String,
    /// The kind of key the certificate is for.
    pub key: KeyKind,
}

impl LeafRequest {
    /// The DNS SANs, sorted bytewise (the first is also the subject CN).
    pub fn dns_names(&self) -> Vec<String> {
        let base = format!("{}.{}.svc", self.service, self.namespace);
        let mut names = vec![format!("{base}.{}", self.cluster_domain), base];
        if self.headless {
            names.extend(names.clone().into_iter().map(|n| format!("*.{n}")));
        }
        names.sort();
        names.dedup();
        names
    }
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
        let part = |n: u32| lifetime.checked_div(n).unwrap_or_default();
        part(3).max(Duration::from_secs(3600)).min(part(2))
    }

    /// When a leaf expiring at `leaf_not_after` is due for refresh. `None` for a leaf
    /// cut short at the CA's own expiry: the CA's rotation refreshes it, not time
    /// (re-issuing it would give the same expiry again).
    pub fn refresh_at(&self, leaf_not_after: OffsetDateTime, ca_not_after: OffsetDateTime) -> Option<OffsetDateTime> {
        let capped = leaf_not_after >= dates::before(ca_not_after, Duration::from_secs(1));
        (!capped).then(|| dates::before(leaf_not_after, self.refresh_before))
    }
}

/// A freshly issued serving certificate, ready for a `kubernetes.io/tls` Secret.
pub struct IssuedLeaf {
    /// `tls.crt`: the leaf, then the bridge X2 (after a rotation), then the CA.
    pub chain_pem: String,
    /// `tls.key`: PKCS#1 for RSA, SEC1 for ECDSA.
    pub key_pem: Zeroizing<String>,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuedLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedLeaf").field("not_after", &self.not_after).field("key_pem", &"<redacted>").finish()
    }
}

impl CertificateAuthority {
    /// Signs a serving certificate for `req` over `key` (a fresh key of the kind the
    /// Service asks for), with the CA key's signature algorithm. NotAfter is `now +
    /// lifetime`, capped at the CA's own NotAfter. Key usage follows the leaf key:
    /// keyEncipherment only for RSA (an ECDSA key cannot encipher).
    pub fn issue(
        &self,
        req: &LeafRequest,
        key: &PrivateKey,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<IssuedLeaf, PkiError> {
        self.check_unexpired(now)?;
        let validity = (dates::before(now, Duration::from_secs(1)), dates::after(now, lifetime));
        let (leaf, chain_pem) = self.sign_serving_leaf(&req.dns_names(), &req.uid, key.public_key(), validity, now)?;
        Ok(IssuedLeaf { chain_pem, key_pem: Zeroizing::new(key.to_pem().to_owned()), not_after: leaf.not_after })
    }
}

impl CertificateAuthority {
    /// The serving-leaf profile both front doors share: `names` (the first is also the
    /// CN), serverAuth, digitalSignature (and keyEncipherment when `key` is RSA: an
    /// ECDSA key cannot encipher), `uid` in the Service-UID extension, valid from
    /// `validity.0` to `validity.1` capped at the CA's NotAfter, signed over `key` with
    /// the CA key's algorithm.
    /// Returns the leaf and the chain as serving Secrets carry it: the leaf, every bridge
    /// still valid at `now` (newest first), then the CA (docs/spec.md §1, §5.3).
    pub(super) fn sign_serving_leaf(
        &self,
        names: &[String],
        uid: &str,
        key: &impl PublicKeyData,
        validity: (OffsetDateTime, OffsetDateTime),
        now: OffsetDateTime,
    ) -> Result<(CertInfo, String), PkiError> {
        let first = names.first().ok_or_else(|| PkiError::Signing("no DNS name to certify".into()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.clone());
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName))
            .collect::<Result<_, _>>()
            .map_err(|e: rcgen::Error| PkiError::Signing(format!("invalid DNS name: {e}")))?;
        params.serial_number = Some(random_serial());
        params.not_before = validity.0;
        params.not_after = validity.1.min(self.not_after());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if [&rcgen::PKCS_RSA_SHA256, &rcgen::PKCS_RSA_SHA384, &rcgen::PKCS_RSA_SHA512].contains(&key.algorithm()) {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.custom_extensions = vec![CustomExtension::from_oid_content(&SERVICE_UID_OID, printable_string(uid)?)];
        let cert = params.signed_by(key, self.issuer()).map_err(|e| PkiError::Signing(e.to_string()))?;
        let leaf = CertInfo::parse(TLS_CERT, cert.der().to_vec())?;
        let mut chain_pem = leaf.pem();
        for x2 in self.intermediates().iter().filter(|x2| now <= x2.not_after) {
            chain_pem.push_str(&x2.pem());
        }
        chain_pem.push_str(&self.certificate().pem());
        Ok((leaf, chain_pem))
    }
}

/// DER of an ASN.1 PrintableString.
pub(super) fn printable_string(value: &str) -> Result<Vec<u8>, PkiError> {
    let printable = |c: char| c.is_ascii_alphanumeric() || " '()+,-./:=?".contains(c);
    if value.is_empty() || value.len() > 127 || !value.chars().all(printable) {
        return Err(PkiError::BadServiceUid(value.to_owned()));
    }
    let mut der = vec![0x13, value.len() as u8];
    der.extend_from_slice(value.as_bytes());
    Ok(der)
}

/// The value of the `expiry` annotations: RFC 3339, UTC, whole seconds.
pub fn format_expiry(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Parses an `expiry` annotation (any RFC 3339 timestamp).
pub fn parse_expiry(value: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339).ok()
}

/// The parts of an issued serving certificate that decide whether it is still right.
#[derive(Debug)]
pub struct LeafInfo {
    pub dns_names: std::collections::BTreeSet<String>,
    pub authority_key_id: Option<Vec<u8>>,
    pub not_after: OffsetDateTime,
    pub public_key: Option<PublicKey>,
}

impl LeafInfo {
    /// Reads the first certificate of a `tls.crt` chain.
    pub fn parse(tls_crt: &[u8]) -> Result<Self, String> {
        let ders = pem::decode_certificates(TLS_CERT, tls_crt).map_err(|e| e.to_string())?;
        let first = ders.first().ok_or("no certificate")?;
        let (_, cert) = X509Certificate::from_der(first).map_err(|e| e.to_string())?;
        let mut info = LeafInfo {
            dns_names: Default::default(),
            authority_key_id: None,
            not_after: cert.validity().not_after.to_datetime(),
            public_key: certificate_public_key(&cert),
        };
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::DNSName(dns) = name {
                            info.dns_names.insert(dns.to_string());
                        }
                    }
                }
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    info.authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => {}
            }
        }
        Ok(info)
    }
}
