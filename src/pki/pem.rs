//! PEM reading and writing.
//!
//! Reading goes through `rustls-pki-types`; every failure is mapped to a message that
//! describes the input's shape and never echoes its bytes (a private key must not leak
//! into an error, a log line or an Event).

use rustls_pki_types::pem::{PemObject, SectionKind};

use super::PkiError;

/// One decoded PEM block.
#[derive(Clone)]
pub struct Block {
    pub kind: SectionKind,
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes may be a private key: never print them.
        write!(f, "Block({}, {} bytes)", label(self.kind), self.der.len())
    }
}

/// The PEM label of a block kind, as it appears after `-----BEGIN `.
pub fn label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        SectionKind::EchConfigList => "ECHCONFIG",
        _ => "unknown",
    }
}

/// Decodes every recognised PEM block of `field`'s value.
///
/// Errors: `Empty` for no bytes, `NotPem` when no block is found, `MalformedPem` for a
/// broken block. Blocks of labels this crate does not know are skipped.
pub fn decode(field: &'static str, bytes: &[u8]) -> Result<Vec<Block>, PkiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(PkiError::Empty { field });
    }
    let mut blocks = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        match item {
            Ok((kind, der)) => blocks.push(Block { kind, der }),
            Err(err) => {
                return Err(PkiError::MalformedPem { field, problem: describe(&err) });
            }
        }
    }
    if blocks.is_empty() {
        return Err(PkiError::NotPem { field });
    }
    Ok(blocks)
}

/// Decodes `field` as a list of certificates (at least one; only CERTIFICATE blocks).
pub fn decode_certificates(field: &'static str, bytes: &[u8]) -> Result<Vec<Vec<u8>>, PkiError> {
    decode(field, bytes)?
        .into_iter()
        .map(|b| match b.kind {
            SectionKind::Certificate => Ok(b.der),
            other => Err(PkiError::WrongBlockType { field, found: label(other), expected: "CERTIFICATE" }),
        })
        .collect()
}

fn describe(err: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error as E;
    match err {
        E::MissingSectionEnd { .. } => "a BEGIN line has no matching END line",
        E::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        E::Base64Decode(_) => "a block's body is not valid base64",
        E::SectionTooLarge => "a block is larger than 256 MiB",
        _ => "the PEM text cannot be read",
    }
}

/// Encodes one block with LF line endings and 64-column lines (the same bytes for the
/// same input, every time).
pub fn encode(tag: &str, der: &[u8]) -> String {
    let block = ::pem::Pem::new(tag, der.to_vec());
    ::pem::encode_config(&block, ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF))
}

/// Encodes a list of certificates, in order.
pub fn encode_certificates<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter().map(|der| encode("CERTIFICATE", der)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_byte_stable() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x01];
        let text = encode_certificates([der.as_slice(), der.as_slice()]);
        assert_eq!(decode_certificates("tls.crt", text.as_bytes()).unwrap(), vec![der.clone(), der]);
        assert!(!text.contains('\r'));
        assert_eq!(
            text,
            encode_certificates(decode_certificates("x", text.as_bytes()).unwrap().iter().map(Vec::as_slice))
        );
    }

    #[test]
    fn errors_name_the_problem_without_echoing_input() {
        assert_eq!(decode("tls.key", b"  \n").unwrap_err(), PkiError::Empty { field: "tls.key" });
        assert_eq!(decode("tls.key", b"hello").unwrap_err(), PkiError::NotPem { field: "tls.key" });
        let broken = b"-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n";
        let err = decode("tls.key", broken).unwrap_err();
        assert!(matches!(err, PkiError::MalformedPem { .. }));
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        let key = encode("RSA PRIVATE KEY", b"secret");
        let err = decode_certificates("tls.crt", key.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            PkiError::WrongBlockType { field: "tls.crt", found: "RSA PRIVATE KEY", expected: "CERTIFICATE" }
        );
    }
}
