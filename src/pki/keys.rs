//! Private keys: generation, PEM decoding, and the bridge to `rcgen`/`ring` for signing.
//!
//! The `rsa` crate is used for exactly two things: generating RSA keys and encoding
//! them (PKCS#1/PKCS#8). It never performs a private-key operation (no decryption, no
//! signing), which is what its timing advisory (RUSTSEC-2023-0071) is about. All
//! signatures are made by `ring` through `rcgen`. RSA keys read from PEM are decoded
//! structurally (`pkcs1`/`pkcs8`), not loaded into the `rsa` crate.

use rand::Rng;
use rcgen::{
    KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, PublicKeyData, SignatureAlgorithm,
};
use rsa::pkcs1::der::Encode;
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::EncodePrivateKey;
use rustls_pki_types::pem::SectionKind;
use zeroize::Zeroizing;

use super::{PkiError, pem};

/// The kinds of key the operator can sign with. Serving keys are what the Service's
/// key-algorithm annotation (or `--default-key-algorithm`) asks for, RSA-2048 unless
/// told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    Rsa { bits: usize },
    EcdsaP256,
    EcdsaP384,
}

impl KeyKind {
    /// The signature algorithm a key of this kind signs with.
    pub fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::Rsa { .. } => &PKCS_RSA_SHA256,
            KeyKind::EcdsaP256 => &PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &PKCS_ECDSA_P384_SHA384,
        }
    }

    /// The canonical value of the key-algorithm annotation and flags for this kind.
    pub fn value(self) -> String {
        match self {
            KeyKind::Rsa { bits } => format!("rsa-{bits}"),
            KeyKind::EcdsaP256 => "ecdsa-p256".into(),
            KeyKind::EcdsaP384 => "ecdsa-p384".into(),
        }
    }
}

/// `kinds` as a comma list of their canonical values.
pub fn key_values(kinds: &[KeyKind]) -> String {
    kinds.iter().map(|k| k.value()).collect::<Vec<_>>().join(", ")
}

/// The values the key-algorithm annotation and flags accept (any case).
pub const KEY_ALGORITHMS: &str = "rsa (RSA-2048), ecdsa (P-256), rsa-2048, rsa-3072, rsa-4096, ecdsa-p256, ecdsa-p384";

impl std::str::FromStr for KeyKind {
    type Err = String;

    /// Reads a key-algorithm value: `rsa`, `ecdsa`, or an explicit size or curve, in
    /// any case, surrounding whitespace ignored. The error does not echo the value.
    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "rsa" | "rsa-2048" => Ok(KeyKind::Rsa { bits: 2048 }),
            "rsa-3072" => Ok(KeyKind::Rsa { bits: 3072 }),
            "rsa-4096" => Ok(KeyKind::Rsa { bits: 4096 }),
            "ecdsa" | "ecdsa-p256" => Ok(KeyKind::EcdsaP256),
            "ecdsa-p384" => Ok(KeyKind::EcdsaP384),
            _ => Err(format!("not a key algorithm; use one of {KEY_ALGORITHMS}")),
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA-{bits}"),
            KeyKind::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcdsaP384 => f.write_str("ECDSA P-384"),
        }
    }
}

/// A public key as it appears in a certificate's SubjectPublicKeyInfo.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    alg: &'static SignatureAlgorithm,
    /// The subjectPublicKey BIT STRING content (RSA: PKCS#1 RSAPublicKey; EC: point).
    raw: Vec<u8>,
}

impl PublicKey {
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The kind of key (`None`: an RSA key whose modulus cannot be read).
    pub fn kind(&self) -> Option<KeyKind> {
        if self.alg == &PKCS_ECDSA_P256_SHA256 {
            Some(KeyKind::EcdsaP256)
        } else if self.alg == &PKCS_ECDSA_P384_SHA384 {
            Some(KeyKind::EcdsaP384)
        } else {
            let rsa = rsa::pkcs1::RsaPublicKeyRef::try_from(self.raw.as_slice()).ok()?;
            Some(KeyKind::Rsa { bits: bit_length(rsa.modulus.as_bytes()) })
        }
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({} bytes)", self.raw.len())
    }
}

impl PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// A private key. Its `Debug` never shows the key; its buffers are zeroed on drop.
pub struct PrivateKey {
    kind: KeyKind,
    /// PKCS#8 DER, the form `ring` signs with.
    pkcs8: Zeroizing<Vec<u8>>,
    /// The PEM written to Secrets: RSA as PKCS#1 (`RSA PRIVATE KEY`, what existing
    /// consumers of the original system expect), EC as SEC1 (`EC PRIVATE KEY`, with
    /// its named curve, what Go's `x509.MarshalECPrivateKey` and OpenSSL write).
    pem: Zeroizing<String>,
    public: PublicKey,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({}, <redacted>)", self.kind)
    }
}

/// What a CA key may be.
pub const SUPPORTED_KEYS: &str = "only RSA keys of 2048 to 8192 bits and ECDSA keys on P-256 or P-384 are supported";

const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

impl PrivateKey {
    /// Generates an RSA key. CPU-bound (~50 ms for 2048 bits): call it from a blocking
    /// thread, never on the async reactor (see `crate::keypool::KeyPool`).
    pub fn generate_rsa(bits: usize) -> Result<Self, PkiError> {
        // rand::rng() is a CSPRNG (ChaCha, seeded and reseeded from the OS).
        let mut rng = rand::rng();
        let key = rsa::PrivateKey::new(&mut rng, bits).map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
        let pkcs1 = key.to_pkcs1_der().map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
        let pkcs8 = key.to_pkcs8_der().map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
        let public = key.to_public_key().to_pkcs1_der().map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
        Ok(PrivateKey {
            kind: KeyKind::Rsa { bits },
            pkcs8: Zeroizing::new(pkcs8.as_bytes().to_vec()),
            pem: Zeroizing::new(pem::encode("RSA PRIVATE KEY", pkcs1.as_bytes())),
            public: PublicKey { alg: &PKCS_RSA_SHA256, raw: public.as_bytes().to_vec() },
        })
    }

    /// Generates a key of the given kind (RSA through [`Self::generate_rsa`], ECDSA
    /// through `ring`).
    pub fn generate(kind: KeyKind) -> Result<Self, PkiError> {
        match kind {
            KeyKind::Rsa { bits } => Self::generate_rsa(bits),
            KeyKind::EcdsaP256 | KeyKind::EcdsaP384 => {
                let pair = KeyPair::generate_for(kind.signature_algorithm())
                    .map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
                let pkcs8 = Zeroizing::new(pair.serialize_der());
                Self::from_pkcs8(pkcs8).map_err(|e| PkiError::KeyGeneration(e.to_string()))
            }
        }
    }

    /// Decodes `field` (e.g. `tls.key`): exactly one private-key block, PKCS#1 RSA,
    /// PKCS#8 (RSA or ECDSA P-256/P-384) or SEC1 EC.
    pub fn from_pem(field: &'static str, bytes: &[u8]) -> Result<Self, PkiError> {
        let blocks = pem::decode(field, bytes)?;
        let mut keys = blocks.into_iter().filter(|b| {
            matches!(b.kind, SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey)
        });
        let Some(block) = keys.next() else {
            let found = pem::decode(field, bytes)?.first().map(|b| pem::label(b.kind)).unwrap_or("unknown");
            return Err(PkiError::WrongBlockType { field, found, expected: "PRIVATE KEY" });
        };
        if keys.next().is_some() {
            return Err(PkiError::BadKey { field, reason: "several private keys where one is expected".into() });
        }
        let der = Zeroizing::new(block.der);
        let bad = |reason: &str| PkiError::BadKey { field, reason: reason.to_string() };
        match block.kind {
            SectionKind::RsaPrivateKey => {
                let pkcs8 = Zeroizing::new(wrap_pkcs8(&rsa_algorithm_identifier(), &der));
                Self::from_pkcs8(pkcs8).map_err(|_| bad("not a valid PKCS#1 RSA private key"))
            }
            SectionKind::PrivateKey => Self::from_pkcs8(der).map_err(|e| match e {
                PkiError::UnsupportedKey(_) => e,
                _ => bad("not a valid PKCS#8 private key"),
            }),
            _ => {
                // SEC1 carries its curve inside; ring checks it, so try both curves.
                for curve in [P256, P384] {
                    let pkcs8 = Zeroizing::new(wrap_pkcs8(&ec_algorithm_identifier(curve), &der));
                    if let Ok(key) = Self::from_pkcs8(pkcs8) {
                        return Ok(key);
                    }
                }
                Err(bad("not a valid SEC1 EC private key on P-256 or P-384"))
            }
        }
    }

    fn from_pkcs8(pkcs8: Zeroizing<Vec<u8>>) -> Result<Self, PkiError> {
        let info = rsa::pkcs8::PrivateKeyInfoRef::try_from(pkcs8.as_slice())
            .map_err(|_| PkiError::BadKey { field: "key", reason: "not a PKCS#8 structure".into() })?;
        let oid = info.algorithm.oid.as_bytes();
        if oid == RSA_ENCRYPTION {
            let rsa = rsa::pkcs1::RsaPrivateKeyRef::try_from(info.private_key.as_bytes())
                .map_err(|_| PkiError::BadKey { field: "key", reason: "not an RSA key".into() })?;
            let public = rsa::pkcs1::RsaPublicKey { modulus: rsa.modulus, public_exponent: rsa.public_exponent }
                .to_der()
                .map_err(|_| PkiError::BadKey { field: "key", reason: "RSA public part cannot be encoded".into() })?;
            let bits = bit_length(rsa.modulus.as_bytes());
            if !(2048..=8192).contains(&bits) {
                return Err(PkiError::UnsupportedKey(format!("RSA-{bits}: {SUPPORTED_KEYS}")));
            }
            let pkcs1 = Zeroizing::new(
                rsa.to_der()
                    .map_err(|_| PkiError::BadKey { field: "key", reason: "RSA key cannot be re-encoded".into() })?,
            );
            return Ok(PrivateKey {
                kind: KeyKind::Rsa { bits },
                pem: Zeroizing::new(pem::encode("RSA PRIVATE KEY", &pkcs1)),
                public: PublicKey { alg: &PKCS_RSA_SHA256, raw: public },
                pkcs8,
            });
        }
        if oid == EC_PUBLIC_KEY {
            let curve = info.algorithm.parameters.map(|p| p.value().to_vec()).unwrap_or_default();
            let kind = match curve.as_slice() {
                c if c == P256 => KeyKind::EcdsaP256,
                c if c == P384 => KeyKind::EcdsaP384,
                _ => return Err(PkiError::UnsupportedKey(format!("ECDSA on another curve: {SUPPORTED_KEYS}"))),
            };
            let pair = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8.as_slice().into(), kind.signature_algorithm())
                .map_err(|_| PkiError::BadKey { field: "key", reason: "EC key rejected".into() })?;
            let public = PublicKey { alg: kind.signature_algorithm(), raw: pair.public_key_raw().to_vec() };
            let inner = info.private_key.as_bytes();
            let sec1 = sec1_with_curve(inner, &curve)
                .ok_or_else(|| PkiError::BadKey { field: "key", reason: "EC key cannot be re-encoded".into() })?;
            return Ok(PrivateKey { kind, pem: Zeroizing::new(pem::encode("EC PRIVATE KEY", &sec1)), public, pkcs8 });
        }
        Err(PkiError::UnsupportedKey(SUPPORTED_KEYS.into()))
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The PEM to store in a Secret's `tls.key`.
    pub fn to_pem(&self) -> &str {
        &self.pem
    }

    /// Bytes this key holds on the heap (what a ready key costs in memory).
    pub fn heap_bytes(&self) -> usize {
        self.pkcs8.capacity().saturating_add(self.pem.capacity()).saturating_add(self.public.raw.capacity())
    }

    /// A `ring`-backed signing key (validates the key; a few milliseconds for RSA).
    pub fn signing_key(&self) -> Result<KeyPair, PkiError> {
        KeyPair::from_pkcs8_der_and_sign_algo(&self.pkcs8.as_slice().into(), self.kind.signature_algorithm())
            .map_err(|e| PkiError::BadKey { field: "key", reason: format!("rejected by the signer: {e}") })
    }
}

/// The public key inside a certificate's SubjectPublicKeyInfo.
pub fn certificate_public_key(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<PublicKey> {
    let spki = &cert.tbs_certificate.subject_pki;
    let oid = spki.algorithm.algorithm.as_bytes();
    let alg: &'static SignatureAlgorithm = if oid == RSA_ENCRYPTION {
        &PKCS_RSA_SHA256
    } else if oid == EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().map(|p| p.data.to_vec()).unwrap_or_default();
        if curve == P256 {
            &PKCS_ECDSA_P256_SHA256
        } else if curve == P384 {
            &PKCS_ECDSA_P384_SHA384
        } else {
            return None;
        }
    } else {
        return None;
    };
    Some(PublicKey { alg, raw: spki.subject_public_key.data.to_vec() })
}

/// Whether the private key in `pem_bytes` belongs to `public`, decided by decoding
/// the key's structure only (no private-key arithmetic).
pub fn key_matches(pem_bytes: &[u8], public: &PublicKey) -> bool {
    PrivateKey::from_pem("tls.key", pem_bytes).is_ok_and(|k| k.public.raw == public.raw)
}

/// A fresh certificate serial: 16 random bytes from a CSPRNG (rand's ChaCha thread
/// generator, seeded from the OS), positive, non-zero.
pub fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    loop {
        rand::rng().fill_bytes(&mut bytes);
        bytes[0] &= 0x7f;
        if bytes[0] != 0 {
            return rcgen::SerialNumber::from_slice(&bytes);
        }
    }
}

fn bit_length(be: &[u8]) -> usize {
    let trimmed: Vec<u8> = be.iter().copied().skip_while(|b| *b == 0).collect();
    match trimmed.first() {
        Some(first) => trimmed.len().saturating_mul(8).saturating_sub(first.leading_zeros() as usize),
        None => 0,
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn rsa_algorithm_identifier() -> Vec<u8> {
    der(0x30, &[der(0x06, RSA_ENCRYPTION), vec![0x05, 0x00]].concat())
}

fn ec_algorithm_identifier(curve: &[u8]) -> Vec<u8> {
    der(0x30, &[der(0x06, EC_PUBLIC_KEY), der(0x06, curve)].concat())
}

/// One DER element at the front of `input`: (tag, its content, the whole element, the
/// rest of `input`).
type DerElement<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

fn der_element(input: &[u8]) -> Option<DerElement<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize), n.saturating_add(2))
    };
    let end = header.checked_add(len)?;
    (input.len() >= end).then(|| (tag, &input[header..end], &input[..end], &input[end..]))
}

/// The SEC1 ECPrivateKey inside a PKCS#8 structure (which leaves the curve to the
/// AlgorithmIdentifier) with the named curve put back as `parameters [0]`, so that
/// it stands alone as an `EC PRIVATE KEY`.
fn sec1_with_curve(inner: &[u8], curve: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let (0x30, mut body, _, _) = der_element(inner)? else { return None };
    let mut out = Zeroizing::new(Vec::with_capacity(inner.len().saturating_add(16)));
    // version, privateKey, then [0] parameters (ours), then [1] publicKey.
    for _ in 0..2 {
        let (_, _, element, rest) = der_element(body)?;
        out.extend_from_slice(element);
        body = rest;
    }
    out.extend(der(0xa0, &der(0x06, curve)));
    while !body.is_empty() {
        let (tag, _, element, rest) = der_element(body)?;
        if tag != 0xa0 {
            out.extend_from_slice(element);
        }
        body = rest;
    }
    Some(Zeroizing::new(der(0x30, &out)))
}

/// PKCS#8 PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }.
fn wrap_pkcs8(algorithm: &[u8], inner: &[u8]) -> Vec<u8> {
    let version = [0x02, 0x01, 0x00];
    let mut body = Zeroizing::new(Vec::with_capacity(inner.len().saturating_add(32)));
    body.extend_from_slice(&version);
    body.extend_from_slice(algorithm);
    body.extend(der(0x04, inner));
    der(0x30, &body)
}

#[cfg(test)]
mod tests;
