//! Pod certificates (PodCertificateRequest, KEP-4317): the key a request asks for,
//! read from its stub PKCS#10 request, and the leaf the CA issues for it.
//!
//! The kubelet makes the private key and sends only a stub CSR signed with it (the API
//! server has verified that signature); the operator takes the public key from it and
//! nothing else.

use std::time::Duration;

use rcgen::SubjectPublicKeyInfo;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509CertificationRequest};
use x509_parser::public_key::PublicKey as ParsedKey;

use super::PkiError;
use super::ca::CertificateAuthority;
use crate::dates;

/// The key types a pod certificate can be issued for (those the kubelet offers that
/// the CA's signing library can write into a certificate).
pub const SUPPORTED_POD_KEYS: &str = "ECDSA P-256, ECDSA P-384, Ed25519, RSA-3072 or RSA-4096";

/// The public key of a request, ready to be certified.
pub struct RequestedKey {
    spki: SubjectPublicKeyInfo,
    /// e.g. `ECDSA P-256`, for messages.
    pub description: String,
}

impl std::fmt::Debug for RequestedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestedKey({})", self.description)
    }
}

/// Why a request's key cannot be certified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A well-formed key of a type the CA cannot certify: the request is denied
    /// (`UnsupportedKeyType`).
    #[error("{found} keys are not supported; use {SUPPORTED_POD_KEYS}")]
    Unsupported { found: String },
    /// Not a readable PKCS#10 request (the API server should have refused it).
    #[error("stubPKCS10Request is not a readable PKCS#10 request: {0}")]
    Unreadable(String),
}

/// The public key of a stub PKCS#10 request (DER).
pub fn requested_key(stub_pkcs10: &[u8]) -> Result<RequestedKey, KeyError> {
    if stub_pkcs10.is_empty() {
        return Err(KeyError::Unreadable(
            "it is empty (kubelets before 1.36 send the deprecated pkixPublicKey instead, which \
             certificates.k8s.io/v1 does not carry; upgrade the kubelet)"
                .into(),
        ));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(stub_pkcs10).map_err(|e| KeyError::Unreadable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(KeyError::Unreadable("trailing bytes".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let description = describe(spki);
    let supported = match spki.parsed() {
        Ok(ParsedKey::RSA(rsa)) => (2048..=8192).contains(&rsa.key_size()),
        _ => true,
    };
    let parsed = SubjectPublicKeyInfo::from_der(spki.raw).ok().filter(|_| supported);
    match parsed {
        Some(spki) => Ok(RequestedKey { spki, description }),
        None => Err(KeyError::Unsupported { found: description }),
    }
}

/// A short name of the key type in `spki` (never the key itself).
fn describe(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> String {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521, OID_PKCS1_RSAENCRYPTION,
        OID_SIG_ED25519,
    };
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = spki.parsed().map(|k| k.key_size()).unwrap_or(0);
        format!("RSA-{bits}")
    } else if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => "ECDSA P-256".into(),
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".into(),
            Some(c) if c == OID_NIST_EC_P521 => "ECDSA P-521".into(),
            Some(c) => crate::bounded(&format!("ECDSA on curve {c}")).into_owned(),
            None => "ECDSA without a named curve".into(),
        }
    } else if *algorithm == OID_SIG_ED25519 {
        "Ed25519".into()
    } else {
        crate::bounded(&format!("key algorithm {algorithm}")).into_owned()
    }
}

/// An issued pod certificate: the chain and the leaf's validity, as the request's
/// status carries them.
#[derive(Debug)]
pub struct PodLeaf {
    /// The leaf, then every bridge X2 still valid, then the CA (the order of a serving
    /// Secret's `tls.crt`).
    pub chain_pem: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// When the kubelet begins refreshing it ([`begin_refresh_at`]).
    pub begin_refresh_at: OffsetDateTime,
}

/// When a pod certificate starts and when its holder begins refreshing it
/// (`--pod-certificate-backdate`, `--pod-certificate-refresh-at`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodTiming {
    /// How long before issuance NotBefore is (for clocks behind the operator's).
    pub backdate: Duration,
    /// Where in the lifetime refreshing begins: 0 at NotBefore, 1 at NotAfter.
    pub refresh_at: f64,
}

impl Default for PodTiming {
    fn default() -> Self {
        PodTiming { backdate: Duration::from_secs(1), refresh_at: 0.5 }
    }
}

/// The API server's rule for `beginRefreshAt`: at least this long after NotBefore and
/// before NotAfter.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// `beginRefreshAt` of a leaf valid from `not_before` to `not_after` (whole seconds):
/// `fraction` (0 to 1) of the way through its life, kept inside the window the API
/// server accepts ([`REFRESH_MARGIN`] from either end). A leaf too short for that
/// window (which the API server refuses anyway: it wants an hour) gets its half-life.
pub fn begin_refresh_at(not_before: OffsetDateTime, not_after: OffsetDateTime, fraction: f64) -> OffsetDateTime {
    let lifetime = dates::between(not_before, not_after);
    let earliest = dates::after(not_before, REFRESH_MARGIN);
    let latest = dates::before(not_after, REFRESH_MARGIN);
    let at = if earliest > latest {
        dates::after(not_before, lifetime.checked_div(2).unwrap_or_default())
    } else {
        let offset = Duration::try_from_secs_f64(lifetime.as_secs_f64() * fraction.clamp(0.0, 1.0)).unwrap_or_default();
        dates::after(not_before, offset).clamp(earliest, latest)
    };
    at.replace_nanosecond(0).unwrap_or(at)
}

impl CertificateAuthority {
    /// Signs a serving certificate for a pod: `names` (the first is also the CN) over
    /// the request's key, valid for exactly `lifetime` from `timing.backdate` ago —
    /// capped at the CA's NotAfter — with the pod's UID where a Service's certificate
    /// carries the Service's.
    pub fn issue_pod_leaf(
        &self,
        names: &[String],
        pod_uid: &str,
        key: &RequestedKey,
        now: OffsetDateTime,
        lifetime: Duration,
        timing: PodTiming,
    ) -> Result<PodLeaf, PkiError> {
        self.check_unexpired(now)?;
        // Whole seconds: the request's status repeats these times exactly.
        let not_before = dates::before(now, timing.backdate).replace_nanosecond(0).unwrap_or(now);
        let (leaf, chain_pem) =
            self.sign_serving_leaf(names, pod_uid, &key.spki, (not_before, dates::after(not_before, lifetime)), now)?;
        let begin_refresh_at = begin_refresh_at(leaf.not_before, leaf.not_after, timing.refresh_at);
        Ok(PodLeaf { chain_pem, not_before: leaf.not_before, not_after: leaf.not_after, begin_refresh_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::TLS_CERT;
    use crate::pki::{CaPolicy, PrivateKey, pem};
    use rcgen::{CertificateParams, PublicKeyData};

    /// The SubjectPublicKeyInfo (DER) of a PEM chain's leaf.
    fn leaf_spki(chain_pem: &str) -> Option<Vec<u8>> {
        let ders = pem::decode_certificates(TLS_CERT, chain_pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::prelude::X509Certificate::from_der(ders.first()?).ok()?;
        Some(cert.tbs_certificate.subject_pki.raw.to_vec())
    }

    fn csr(alg: &'static rcgen::SignatureAlgorithm) -> (Vec<u8>, Vec<u8>) {
        let pair = rcgen::KeyPair::generate_for(alg).unwrap();
        let der = CertificateParams::default().serialize_request(&pair).unwrap().der().to_vec();
        (der, pair.subject_public_key_info())
    }

    fn ca() -> CertificateAuthority {
        let policy =
            CaPolicy { lifetime: Duration::from_secs(86_400 * 30), rotate_before: Duration::from_secs(86_400) };
        CertificateAuthority::create(PrivateKey::generate_rsa(2048).unwrap(), OffsetDateTime::now_utc(), &policy)
            .unwrap()
    }

    #[test]
    fn pod_leaves_certify_the_requested_key_for_exactly_the_lifetime() {
        let ca = ca();
        let now = OffsetDateTime::now_utc();
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let (der, spki) = csr(alg);
            let key = requested_key(&der).unwrap();
            let names = vec!["web.shop.svc".to_string(), "web.shop.svc.cluster.local".to_string()];
            let leaf =
                ca.issue_pod_leaf(&names, "uid-1", &key, now, Duration::from_secs(3600), PodTiming::default()).unwrap();
            assert_eq!(leaf_spki(&leaf.chain_pem).unwrap(), spki, "{}", key.description);
            assert_eq!(leaf.not_after - leaf.not_before, time::Duration::hours(1));
            assert_eq!(leaf.not_before.nanosecond(), 0);
            assert_eq!(pem::decode_certificates(TLS_CERT, leaf.chain_pem.as_bytes()).unwrap().len(), 2, "leaf, CA");
        }
    }

    #[test]
    fn rsa_requests_are_read_and_other_keys_named_in_the_refusal() {
        let rsa = PrivateKey::generate_rsa(3072).unwrap();
        let der = CertificateParams::default().serialize_request(&rsa.signing_key().unwrap()).unwrap().der().to_vec();
        assert_eq!(requested_key(&der).unwrap().description, "RSA-3072");
        assert!(matches!(requested_key(b"junk"), Err(KeyError::Unreadable(_))));
        let empty = requested_key(b"").unwrap_err().to_string();
        assert!(empty.contains("empty") && empty.contains("kubelet"), "{empty}");
    }

    #[test]
    fn a_leaf_is_capped_at_the_ca_expiry() {
        let ca = ca();
        let (der, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let key = requested_key(&der).unwrap();
        let leaf = ca
            .issue_pod_leaf(
                &["a.b.svc".into()],
                "u",
                &key,
                OffsetDateTime::now_utc(),
                Duration::from_secs(86_400 * 90),
                PodTiming::default(),
            )
            .unwrap();
        assert_eq!(leaf.not_after, ca.not_after());
    }

    #[test]
    fn pod_leaves_from_a_ca_until_9999_are_capped_not_overflowing() {
        use crate::dates::{EARLIEST, LATEST};
        let now = OffsetDateTime::now_utc();
        let ca = CertificateAuthority::from_secret_data(&crate::pki::own_ca(EARLIEST, LATEST), now).unwrap();
        let (der, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let key = requested_key(&der).unwrap();
        let names = ["a.b.svc".to_string()];
        let leaf =
            ca.issue_pod_leaf(&names, "u", &key, now, Duration::from_secs(86_400), PodTiming::default()).unwrap();
        assert_eq!(leaf.not_after - leaf.not_before, time::Duration::days(1));
        let late = crate::dates::before(LATEST, Duration::from_secs(60));
        let leaf =
            ca.issue_pod_leaf(&names, "u", &key, late, Duration::from_secs(86_400), PodTiming::default()).unwrap();
        assert_eq!(leaf.not_after, LATEST);
        let leaf = ca.issue_pod_leaf(&names, "u", &key, now, Duration::MAX, PodTiming::default()).unwrap();
        assert_eq!(leaf.not_after, LATEST);
    }
    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    #[test]
    fn refreshing_begins_at_the_fraction_of_the_lifetime_kept_inside_the_api_servers_window() {
        let (nb, hour, day) = (1_800_000_000, 3600, 86_400);
        // The default: half-life.
        assert_eq!(begin_refresh_at(at(nb), at(nb + day), 0.5), at(nb + day / 2));
        assert_eq!(begin_refresh_at(at(nb), at(nb + day), 0.75), at(nb + 64_800));
        // 0 and 1: as early and as late as the API server accepts (10 min from either end).
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour), 0.0), at(nb + 600));
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour), 1.0), at(nb + hour - 600));
        // A fraction landing inside the margins is moved out of them.
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour), 0.1), at(nb + 600));
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour), 0.9), at(nb + hour - 600));
        // Out of range or not a number (the flag refuses them): kept inside the window.
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour), -3.0), at(nb + 600));
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour), 7.0), at(nb + hour - 600));
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour), f64::NAN), at(nb + 600));
        // Whole seconds, as the status carries them.
        assert_eq!(begin_refresh_at(at(nb), at(nb + hour + 1), 0.5), at(nb + 1800));
        // Shorter than the two margins (the API server refuses it anyway): half-life.
        assert_eq!(begin_refresh_at(at(nb), at(nb + 900), 0.0), at(nb + 450));
        // The ends of time neither overflow nor panic.
        let (earliest, latest) = (crate::dates::EARLIEST, crate::dates::LATEST);
        let mid = begin_refresh_at(earliest, latest, 1.0);
        assert_eq!(mid, crate::dates::before(latest, REFRESH_MARGIN).replace_nanosecond(0).unwrap());
    }

    #[test]
    fn pod_leaves_are_backdated_and_carry_their_refresh_time() {
        let ca = ca();
        let (der, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let key = requested_key(&der).unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let names = ["a.b.svc".to_string()];
        let hour = Duration::from_secs(3600);
        let leaf = ca.issue_pod_leaf(&names, "u", &key, now, hour, PodTiming::default()).unwrap();
        assert_eq!(
            (leaf.not_before, leaf.not_after),
            (now - time::Duration::SECOND, now + time::Duration::seconds(3599))
        );
        assert_eq!(leaf.begin_refresh_at, leaf.not_before + time::Duration::minutes(30));
        let timing = PodTiming { backdate: Duration::from_secs(240), refresh_at: 0.0 };
        let leaf = ca.issue_pod_leaf(&names, "u", &key, now, hour, timing).unwrap();
        assert_eq!(leaf.not_before, now - time::Duration::minutes(4));
        assert_eq!(leaf.not_after - leaf.not_before, time::Duration::hours(1), "the lifetime counts from NotBefore");
        assert_eq!(leaf.begin_refresh_at, now + time::Duration::minutes(6), "NotBefore + 10 min");
    }
}
