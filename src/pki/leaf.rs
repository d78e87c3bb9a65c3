//! Serving (leaf) certificates per SPEC §1.

use std::time::Duration;

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::PkiError;
use super::ca::{CertInfo, CertificateAuthority};
use super::keys::{PrivateKey, random_serial};

/// OID of the non-critical extension that carries the Service UID.
pub const SERVICE_UID_OID: [u64; 11] = [1, 3, 6, 1, 4, 1, 2312, 17, 100, 2, 1];

/// What a serving certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafRequest<'a> {
    pub service: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    /// `spec.clusterIP: None`: the certificate also covers `*.<svc>.<ns>.svc[.<domain>]`.
    pub headless: bool,
    pub cluster_domain: &'a str,
}

impl LeafRequest<'_> {
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

/// A freshly issued serving certificate, ready for a `kubernetes.io/tls` Secret.
pub struct IssuedLeaf {
    /// `tls.crt`: the leaf, then the bridge X2 (after a rotation), then the CA.
    pub chain_pem: String,
    /// `tls.key`: PKCS#1 for RSA.
    pub key_pem: Zeroizing<String>,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuedLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedLeaf").field("not_after", &self.not_after).field("key_pem", &"<redacted>").finish()
    }
}

impl CertificateAuthority {
    /// Signs a serving certificate for `req` over `key` (a fresh RSA-2048 key).
    /// NotAfter is `now + lifetime`, capped at the CA's own NotAfter.
    pub fn issue(
        &self,
        req: &LeafRequest<'_>,
        key: &PrivateKey,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<IssuedLeaf, PkiError> {
        self.check_unexpired(now)?;
        let names = req.dns_names();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0].clone());

        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName))
            .collect::<Result<_, _>>()
            .map_err(|e: rcgen::Error| PkiError::Signing(format!("invalid DNS name: {e}")))?;
        params.serial_number = Some(random_serial());
        params.not_before = now - Duration::from_secs(1);
        params.not_after = (now + lifetime).min(self.not_after());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.custom_extensions =
            vec![CustomExtension::from_oid_content(&SERVICE_UID_OID, printable_string(req.uid)?)];

        let cert = params.signed_by(key.public_key(), self.issuer()).map_err(|e| PkiError::Signing(e.to_string()))?;
        let leaf = CertInfo::parse("tls.crt", cert.der().to_vec())?;
        let mut chain_pem = leaf.pem();
        if let Some(x2) = self.intermediate() {
            chain_pem.push_str(&x2.pem());
        }
        chain_pem.push_str(&self.certificate().pem());
        Ok(IssuedLeaf { chain_pem, key_pem: Zeroizing::new(key.to_pem().to_owned()), not_after: leaf.not_after })
    }
}

/// DER of an ASN.1 PrintableString.
fn printable_string(value: &str) -> Result<Vec<u8>, PkiError> {
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
