//! Certificate inspection for the end-to-end tests and the bench: the first
//! certificate of a PEM chain (a Secret's `tls.crt`, a CA bundle) and the fields the
//! tests compare (SKI of a CA, AKI / CN / SANs / NotAfter / serial of a leaf).
//!
//! The functions that take a Secret read its `tls.crt`. They panic when the
//! certificate is missing or does not parse, except where they say otherwise.

use k8s_openapi::api::core::v1::Secret;
use service_ca_operator::pki::{self, CertInfo};
use x509_parser::prelude::*;

use super::data;

/// The certificates (DER) of a PEM text, in order; empty if it does not parse.
pub fn ders(pem: &str) -> Vec<Vec<u8>> {
    pki::pem::decode_certificates("pem", pem.as_bytes()).unwrap_or_default()
}

/// The subject key ids of every certificate of a PEM bundle (which CAs it trusts).
pub fn skis(pem: &str) -> Vec<Vec<u8>> {
    ders(pem).into_iter().filter_map(|der| CertInfo::parse("bundle", der).ok()?.subject_key_id).collect()
}

/// The first certificate of a PEM chain, or `None` if there is none or it does not
/// parse.
pub fn try_first(pem: &str) -> Option<CertInfo> {
    let der = ders(pem).into_iter().next()?;
    CertInfo::parse("tls.crt", der).ok()
}

/// The first certificate of a PEM chain.
pub fn first(pem: &str) -> CertInfo {
    let der = ders(pem).into_iter().next().unwrap_or_else(|| panic!("no certificate in:\n{pem}"));
    CertInfo::parse("tls.crt", der).unwrap()
}

/// The first certificate of a Secret's `tls.crt`.
pub fn of_secret(secret: &Secret) -> CertInfo {
    first(&data(secret, "tls.crt"))
}

/// Subject key id of the CA certificate in a Secret (`signing-key`): which CA it is.
pub fn ca_ski(secret: &Secret) -> Vec<u8> {
    of_secret(secret).subject_key_id.unwrap()
}

/// Authority key id of the leaf in a serving Secret: which CA signed it.
pub fn leaf_aki(secret: &Secret) -> Vec<u8> {
    of_secret(secret).authority_key_id.unwrap()
}

/// Authority key id of the first certificate of a chain (which CA signed the leaf);
/// empty if it has none.
pub fn signer_of(chain: &str) -> Vec<u8> {
    first(chain).authority_key_id.unwrap_or_default()
}

/// Authority key id of the first certificate of a chain; `None` (never a panic) if
/// there is no certificate, it does not parse, or it has no AKI.
pub fn try_signer_of(chain: &str) -> Option<Vec<u8>> {
    try_first(chain)?.authority_key_id
}

/// Runs `f` on the first certificate of a Secret's `tls.crt`, parsed by x509-parser.
fn with_x509<T>(secret: &Secret, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
    with_x509_pem(&data(secret, "tls.crt"), f)
}

/// Runs `f` on the first certificate of a PEM chain, parsed by x509-parser.
fn with_x509_pem<T>(pem: &str, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
    let ders = pki::pem::decode_certificates("tls.crt", pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&ders[0]).unwrap();
    f(&cert)
}

/// Subject common name of the first certificate in a Secret (the CA's name in
/// `signing-key`).
pub fn cn(secret: &Secret) -> String {
    with_x509(secret, |cert| cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_string())
}

/// Subject alternative names of the leaf in a serving Secret, in certificate order
/// (DNS names as text, other kinds in their debug form).
pub fn sans(secret: &Secret) -> Vec<String> {
    sans_of(&data(secret, "tls.crt"))
}

/// Subject alternative names of the first certificate of a PEM chain, in certificate
/// order.
pub fn sans_of(chain: &str) -> Vec<String> {
    with_x509_pem(chain, |cert| {
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    })
}

/// NotAfter of the leaf in a serving Secret, as a Unix timestamp.
pub fn not_after(secret: &Secret) -> i64 {
    with_x509(secret, |cert| cert.validity().not_after.timestamp())
}

/// Serial number (raw bytes) of the leaf in a serving Secret.
pub fn serial(secret: &Secret) -> Vec<u8> {
    with_x509(secret, |cert| cert.raw_serial().to_vec())
}
