//! The service CA: creation (docs/spec.md §3.2), loading from and saving to the `signing-key`
//! Secret's data (§3.1), rotation with a cross-signed trust bridge (§3.3) and the
//! bundle (§3.4).

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, Issuer, KeyIdMethod,
    KeyUsagePurpose, SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::ca_key::{CaKey, CaSigner, PKCS11_KEY_URI};
use super::keys::{KeyKind, PublicKey, certificate_public_key, random_serial};
use super::pkcs11::Token;
use super::{PkiError, pem};
use crate::dates;
use crate::names::{CA_BUNDLE, INTERMEDIATE, TLS_CERT, TLS_KEY};

/// The most bridges of each kind (X1 in the bundle, X2 in leaf chains) kept through
/// rotations in quick succession.
pub const MAX_BRIDGES: usize = 8;

/// The prefix of the CA's common name; the suffix is the creation time in Unix seconds.
pub const CA_NAME_PREFIX: &str = "openshift-service-serving-signer@";

/// A parsed certificate we keep around: its DER and the fields we act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub subject_cn: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub subject_key_id: Option<Vec<u8>>,
    pub authority_key_id: Option<Vec<u8>>,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn parse(field: &'static str, der: Vec<u8>) -> Result<Self, PkiError> {
        let (rest, cert) =
            X509Certificate::from_der(&der).map_err(|e| PkiError::BadCertificate { field, reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(PkiError::BadCertificate { field, reason: "trailing bytes after the certificate".into() });
        }
        let mut info = CertInfo {
            subject_cn: common_name(&cert).unwrap_or_default(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            subject_key_id: None,
            authority_key_id: None,
            is_ca: false,
            der: Vec::new(),
        };
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => info.subject_key_id = Some(id.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    info.authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                ParsedExtension::BasicConstraints(bc) => info.is_ca = bc.ca,
                _ => {}
            }
        }
        info.der = der;
        Ok(info)
    }

    pub fn pem(&self) -> String {
        pem::encode("CERTIFICATE", &self.der)
    }
}

pub fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned)
}

/// Lifetimes that govern the CA.
#[derive(Clone, Copy, Debug)]
pub struct CaPolicy {
    /// Validity of a new CA certificate (default 790 days).
    pub lifetime: Duration,
    /// Rotate when less than this is left (default 395 days); also the minimum time
    /// the previous CA stays trusted after a rotation.
    pub rotate_before: Duration,
}

/// What loading checks before the key: the CA certificate, its public key, the bundle
/// and the bridges.
type Parts = (CertInfo, PublicKey, Option<Vec<CertInfo>>, Vec<CertInfo>);

/// The service CA: its certificate and key, plus what a rotation left behind (the
/// bundle `[new CA, X1]` and the bridge `X2`).
pub struct CertificateAuthority {
    cert: CertInfo,
    key: CaKey,
    issuer: Issuer<'static, CaSigner>,
    /// `ca-bundle.crt` as stored (after a rotation); `None` means "just tls.crt".
    bundle: Option<Vec<CertInfo>>,
    /// `intermediate-ca.crt`: the bridges X2, newest first: this CA's certificate
    /// signed by the previous CA's key, then earlier rotations' bridges still valid.
    intermediates: Vec<CertInfo>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject_cn", &self.cert.subject_cn)
            .field("not_after", &self.cert.not_after)
            .field("key", &self.key)
            .field("bridges", &self.intermediates.len())
            .finish()
    }
}

impl CertificateAuthority {
    /// A brand-new self-signed CA per docs/spec.md §3.2 (`key` is normally a fresh RSA-2048).
    pub fn create(key: impl Into<CaKey>, now: OffsetDateTime, policy: &CaPolicy) -> Result<Self, PkiError> {
        let key = key.into();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{CA_NAME_PREFIX}{}", now.unix_timestamp()));
        let params = ca_params(dn, now, dates::after(now, policy.lifetime), KeyIdMethod::Sha256, key.kind());
        let signing = key.signer()?;
        let cert = params.self_signed(&signing).map_err(signing_error)?;
        Self::assemble(CertInfo::parse(TLS_CERT, cert.der().to_vec())?, key, signing, None, Vec::new())
    }

    /// Loads and validates the CA from a `signing-key` Secret's data (its key in `tls.key`).
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>, now: OffsetDateTime) -> Result<Self, PkiError> {
        Self::load(data, now, None)
    }

    /// Loads and validates the CA, its key in `token` when one is configured.
    pub fn load(
        data: &BTreeMap<String, Vec<u8>>,
        now: OffsetDateTime,
        token: Option<&std::sync::Arc<Token>>,
    ) -> Result<Self, PkiError> {
        let (cert, public, bundle, intermediates) = Self::check_parts(data, now, token.is_some())?;
        let key = CaKey::load(data, &public, token)?;
        let signing = key.signer()?;
        Self::assemble(cert, key, signing, bundle, intermediates)
    }

    /// Validates everything of a `signing-key` whose key is in a PKCS#11 token except
    /// the key itself (`inspect` without the token's flags).
    pub fn check_without_token(data: &BTreeMap<String, Vec<u8>>, now: OffsetDateTime) -> Result<(), PkiError> {
        Self::check_parts(data, now, false).map(|_| ())
    }

    /// Every check of [`Self::load`] but the key's.
    fn check_parts(data: &BTreeMap<String, Vec<u8>>, now: OffsetDateTime, token: bool) -> Result<Parts, PkiError> {
        let field = |name: &'static str| data.get(name).map(Vec::as_slice);
        let cert_pem = field(TLS_CERT).ok_or(PkiError::Missing { field: TLS_CERT })?;
        if !token && !data.contains_key(PKCS11_KEY_URI) {
            field(TLS_KEY).ok_or(PkiError::Missing { field: TLS_KEY })?;
        }
        let cert = single_certificate(TLS_CERT, cert_pem)?;
        if !cert.is_ca {
            return Err(PkiError::NotCa);
        }
        if now > cert.not_after {
            return Err(PkiError::Expired { not_after: cert.not_after });
        }
        if cert.not_before > dates::after(now, Duration::from_secs(300)) {
            return Err(PkiError::NotYetValid { not_before: cert.not_before });
        }
        if cert.subject_key_id.is_none() {
            return Err(PkiError::MissingSubjectKeyId);
        }
        let (_, parsed) = X509Certificate::from_der(&cert.der)
            .map_err(|e| PkiError::BadCertificate { field: TLS_CERT, reason: e.to_string() })?;
        if let Ok(Some(ku)) = parsed.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(PkiError::NotCa);
        }
        // A CA that can sign but could never be rotated is refused now, not when its
        // rotation falls due.
        if let Err(error) = distinguished_name(&parsed) {
            return Err(PkiError::CannotRotate(error.to_string()));
        }
        let public = certificate_public_key(&parsed).ok_or_else(|| {
            PkiError::UnsupportedKey(format!("the CA certificate's key: {}", super::keys::SUPPORTED_KEYS))
        })?;
        let bundle = field(CA_BUNDLE).map(|pem| certificates(CA_BUNDLE, pem)).transpose()?;
        let intermediates =
            field(INTERMEDIATE).map(|pem| certificates(INTERMEDIATE, pem)).transpose()?.unwrap_or_default();
        // What a rotation left behind must belong to this CA: a tls.crt/tls.key replaced
        // by hand next to an old bundle would otherwise publish a bundle that does not
        // trust the CA that signs.
        if let Some(bundle) = &bundle
            && !bundle.iter().any(|member| member.der == cert.der)
        {
            return Err(PkiError::Stale {
                field: CA_BUNDLE,
                problem: "does not contain the CA certificate of tls.crt",
            });
        }
        // The newest bridge certifies this CA's key; older ones follow it.
        if let Some(x2) = intermediates.first() {
            let (_, parsed) = X509Certificate::from_der(&x2.der)
                .map_err(|e| PkiError::BadCertificate { field: INTERMEDIATE, reason: e.to_string() })?;
            if certificate_public_key(&parsed).as_ref() != Some(&public) {
                return Err(PkiError::Stale {
                    field: INTERMEDIATE,
                    problem: "is not a certificate for the key in tls.key",
                });
            }
        }
        Ok((cert, public, bundle, intermediates))
    }

    fn assemble(
        cert: CertInfo,
        key: CaKey,
        signing: CaSigner,
        bundle: Option<Vec<CertInfo>>,
        intermediates: Vec<CertInfo>,
    ) -> Result<Self, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&cert.der.as_slice().into(), signing)
            .map_err(|e| PkiError::BadCertificate { field: TLS_CERT, reason: e.to_string() })?;
        Ok(CertificateAuthority { cert, key, issuer, bundle, intermediates })
    }

    /// The Secret data that persists this CA (`tls.crt`, `tls.key`, and after a
    /// rotation `ca-bundle.crt` and `intermediate-ca.crt`).
    pub fn to_secret_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut data = BTreeMap::new();
        data.insert(TLS_CERT.to_string(), self.cert.pem().into_bytes());
        self.key.secret_data(&mut data);
        if let Some(bundle) = &self.bundle {
            data.insert(
                CA_BUNDLE.to_string(),
                pem::encode_certificates(bundle.iter().map(|c| c.der.as_slice())).into_bytes(),
            );
        }
        if !self.intermediates.is_empty() {
            data.insert(
                INTERMEDIATE.to_string(),
                pem::encode_certificates(self.intermediates.iter().map(|c| c.der.as_slice())).into_bytes(),
            );
        }
        data
    }

    /// Rotation per docs/spec.md §3.3: a new CA with the same subject, signed by `new_key`;
    /// `X1` (this CA re-signed by the new key) joins the bundle, `X2` (the new CA
    /// signed by this CA's key) becomes the newest bridge that new leaves carry.
    ///
    /// Bridges of earlier rotations that are still valid stay (docs/spec.md §5.3): the older
    /// `X1`s in the bundle, so leaves not re-issued since an earlier CA stay trusted, and
    /// the older `X2`s after the new one in every leaf chain, so a client holding a
    /// bundle from before several rotations still reaches the CA it trusts. All CAs
    /// share one subject; path building follows the key identifiers. At most
    /// [`MAX_BRIDGES`] of each are kept.
    pub fn rotate(&self, new_key: impl Into<CaKey>, now: OffsetDateTime, policy: &CaPolicy) -> Result<Self, PkiError> {
        let new_key = new_key.into();
        let (_, current) = X509Certificate::from_der(&self.cert.der)
            .map_err(|e| PkiError::BadCertificate { field: TLS_CERT, reason: e.to_string() })?;
        let subject = distinguished_name(&current)?;
        let current_ski = self.cert.subject_key_id.clone().ok_or(PkiError::MissingSubjectKeyId)?;
        let new_signing = new_key.signer()?;

        // The new self-signed CA.
        let new_kind = new_key.kind();
        let new_params =
            ca_params(subject.clone(), now, dates::after(now, policy.lifetime), KeyIdMethod::Sha256, new_kind);
        let new_cert =
            CertInfo::parse(TLS_CERT, new_params.self_signed(&new_signing).map_err(signing_error)?.der().to_vec())?;
        let new_ski = new_cert.subject_key_id.clone().ok_or(PkiError::MissingSubjectKeyId)?;
        let new_issuer_params =
            ca_params(subject.clone(), now, now, KeyIdMethod::PreSpecified(new_ski.clone()), new_kind);
        let new_issuer = Issuer::from_params(&new_issuer_params, &new_signing);

        // X1: the current CA's certificate re-signed by the new key, so holders of the
        // new bundle trust leaves of the current CA. It stays valid at least for the
        // rotation threshold from now.
        let x1_not_after = self.cert.not_after.max(dates::after(now, policy.rotate_before));
        let mut x1 = ca_params(
            subject.clone(),
            self.cert.not_before,
            x1_not_after,
            KeyIdMethod::PreSpecified(current_ski),
            self.key_kind(),
        );
        x1.use_authority_key_identifier_extension = true;
        let current_public = SubjectPublicKeyInfo::from_der(current.tbs_certificate.subject_pki.raw)
            .map_err(|e| PkiError::BadCertificate { field: TLS_CERT, reason: e.to_string() })?;
        let x1 = CertInfo::parse(
            CA_BUNDLE,
            x1.signed_by(&current_public, &new_issuer).map_err(signing_error)?.der().to_vec(),
        )?;

        // X2: the new CA's certificate signed by the current key, so holders of the
        // current bundle trust leaves of the new CA.
        let mut x2 =
            ca_params(subject, new_cert.not_before, new_cert.not_after, KeyIdMethod::PreSpecified(new_ski), new_kind);
        x2.use_authority_key_identifier_extension = true;
        let x2 = CertInfo::parse(
            INTERMEDIATE,
            x2.signed_by(&new_signing, &self.issuer).map_err(signing_error)?.der().to_vec(),
        )?;

        let older_x1 = self.bundle_certs().filter(|c| c.der != self.cert.der && now <= c.not_after).cloned();
        let bundle = [new_cert.clone(), x1].into_iter().chain(older_x1.take(MAX_BRIDGES.saturating_sub(1))).collect();
        let older_x2 = self.intermediates.iter().filter(|c| now <= c.not_after).cloned();
        let intermediates = std::iter::once(x2).chain(older_x2.take(MAX_BRIDGES.saturating_sub(1))).collect();
        Self::assemble(new_cert, new_key, new_signing, Some(bundle), intermediates)
    }

    /// The trust bundle (docs/spec.md §3.4): `ca-bundle.crt` when present, else `tls.crt`,
    /// without certificates that have expired at `now`, in stored order.
    pub fn bundle_pem(&self, now: OffsetDateTime) -> String {
        pem::encode_certificates(self.bundle_certs().filter(|c| now <= c.not_after).map(|c| c.der.as_slice()))
    }

    /// When the bundle next changes by itself (the earliest expiry of a member that is
    /// still in it), if ever.
    pub fn next_bundle_change(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.bundle_certs().map(|c| c.not_after).filter(|t| *t >= now).min()
    }

    /// An expired CA signs nothing (a leaf would expire before it starts). It can only
    /// be held that long when `signing-key` stayed unusable through its whole rotation
    /// window.
    pub fn check_unexpired(&self, now: OffsetDateTime) -> Result<(), PkiError> {
        if now >= self.cert.not_after {
            return Err(PkiError::Expired { not_after: self.cert.not_after });
        }
        Ok(())
    }

    fn bundle_certs(&self) -> impl Iterator<Item = &CertInfo> {
        self.bundle.as_deref().unwrap_or(std::slice::from_ref(&self.cert)).iter()
    }

    pub fn certificate(&self) -> &CertInfo {
        &self.cert
    }

    /// The bridge certificates X2, newest first (empty before the first rotation).
    pub fn intermediates(&self) -> &[CertInfo] {
        &self.intermediates
    }

    pub fn key_kind(&self) -> KeyKind {
        self.key.kind()
    }

    pub fn subject_cn(&self) -> &str {
        &self.cert.subject_cn
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.cert.not_after
    }

    pub fn subject_key_id(&self) -> &[u8] {
        self.cert.subject_key_id.as_deref().unwrap_or_default()
    }

    /// When this CA is due for rotation.
    pub fn rotation_due(&self, policy: &CaPolicy) -> OffsetDateTime {
        dates::before(self.cert.not_after, policy.rotate_before)
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, CaSigner> {
        &self.issuer
    }
}

fn ca_params(
    dn: DistinguishedName,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_id: KeyIdMethod,
    key: KeyKind,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial());
    params.not_before = dates::before(not_before, Duration::from_secs(1));
    params.not_after = not_after;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // keyEncipherment only where the certified key can encipher (RSA).
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    if matches!(key, KeyKind::Rsa { .. }) {
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params.key_identifier_method = key_id;
    params
}

/// Every certificate of a PEM field, parsed.
fn certificates(field: &'static str, pem: &[u8]) -> Result<Vec<CertInfo>, PkiError> {
    pem::decode_certificates(field, pem)?.into_iter().map(|der| CertInfo::parse(field, der)).collect()
}

fn single_certificate(field: &'static str, bytes: &[u8]) -> Result<CertInfo, PkiError> {
    let mut ders = pem::decode_certificates(field, bytes)?;
    if ders.len() != 1 {
        return Err(PkiError::SeveralCertificates { field, count: ders.len() });
    }
    CertInfo::parse(field, ders.remove(0))
}

fn signing_error(e: rcgen::Error) -> PkiError {
    PkiError::Signing(e.to_string())
}

/// The subject of `cert` as an rcgen name, keeping each attribute's string type so the
/// issuer names we write are byte-identical to the subject (webpki compares bytes).
fn distinguished_name(cert: &X509Certificate<'_>) -> Result<DistinguishedName, PkiError> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let unsupported =
        |why: &str| PkiError::BadCertificate { field: TLS_CERT, reason: format!("unsupported subject: {why}") };
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(unsupported("multi-valued or empty RDN"));
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or_else(|| unsupported("attribute OID"))?.collect();
        let data = attr.attr_value().data;
        let text = || std::str::from_utf8(data).map_err(|_| unsupported("attribute is not text"));
        let value = match attr.attr_value().header.tag() {
            Tag::PrintableString => {
                DnValue::PrintableString(text()?.try_into().map_err(|_| unsupported("bad PrintableString"))?)
            }
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(|_| unsupported("bad IA5String"))?),
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            other => return Err(unsupported(&format!("attribute string type {other}"))),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

#[cfg(test)]
pub(super) mod tests;
