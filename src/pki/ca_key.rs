//! The CA's key: in memory (read from and written to `tls.key`, the default), or in a
//! PKCS#11 token (`--ca-key-pkcs11-uri`), where `signing-key` holds only a reference
//! to it ([`PKCS11_KEY_URI`]) and `tls.key` stays empty. Which one is decided by the
//! configuration and checked against the Secret: never a silent fallback from one to
//! the other.

use std::collections::BTreeMap;
use std::sync::Arc;

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey};

use super::PkiError;
use super::keys::{KeyKind, PrivateKey, PublicKey};
use super::pkcs11::{KeyUri, Token, TokenError, TokenKey, TokenProblem};
use crate::names::TLS_KEY;

/// The `signing-key` data key holding the `pkcs11:` URI of the CA key when the key is in
/// a token (token, label and id of the private key object).
pub const PKCS11_KEY_URI: &str = "pkcs11-key-uri";

/// Where the CA key is.
#[derive(Debug)]
pub enum CaKey {
    Memory(PrivateKey),
    Token(TokenKey),
}

impl From<PrivateKey> for CaKey {
    fn from(key: PrivateKey) -> Self {
        CaKey::Memory(key)
    }
}

impl From<TokenKey> for CaKey {
    fn from(key: TokenKey) -> Self {
        CaKey::Token(key)
    }
}

impl CaKey {
    pub fn kind(&self) -> KeyKind {
        match self {
            CaKey::Memory(key) => key.kind(),
            CaKey::Token(key) => key.kind(),
        }
    }

    /// A second handle on the same key (a rotation that failed keeps its new key for
    /// the next attempt).
    pub fn duplicate(&self) -> Option<Self> {
        match self {
            CaKey::Memory(key) => PrivateKey::from_pem(TLS_KEY, key.to_pem().as_bytes()).ok().map(CaKey::Memory),
            CaKey::Token(key) => Some(CaKey::Token(key.clone())),
        }
    }

    /// What signs for this key.
    pub fn signer(&self) -> Result<CaSigner, PkiError> {
        match self {
            CaKey::Memory(key) => key.signing_key().map(CaSigner::Memory),
            CaKey::Token(key) => Ok(CaSigner::Token(key.clone())),
        }
    }

    /// The Secret data of the key: `tls.key` (empty for a key in a token, which the
    /// `kubernetes.io/tls` type still requires) and, for a token, the reference.
    pub fn secret_data(&self, data: &mut BTreeMap<String, Vec<u8>>) {
        match self {
            CaKey::Memory(key) => {
                data.insert(TLS_KEY.to_string(), key.to_pem().as_bytes().to_vec());
            }
            CaKey::Token(key) => {
                data.insert(TLS_KEY.to_string(), Vec::new());
                data.insert(PKCS11_KEY_URI.to_string(), key.uri().render().into_bytes());
            }
        }
    }

    /// The key of a `signing-key` whose certificate has the public key `public`:
    /// `tls.key` without a token, the referenced token object with one.
    pub fn load(
        data: &BTreeMap<String, Vec<u8>>,
        public: &PublicKey,
        token: Option<&Arc<Token>>,
    ) -> Result<Self, PkiError> {
        let reference = data.get(PKCS11_KEY_URI);
        let key_pem = data.get(TLS_KEY).filter(|pem| !pem.is_empty());
        let token_error = |problem, detail: String| PkiError::Token(TokenError::new(problem, detail));
        let (token, reference) = match (token, reference) {
            (None, None) => {
                let pem = data.get(TLS_KEY).ok_or(PkiError::Missing { field: TLS_KEY })?;
                let key = PrivateKey::from_pem(TLS_KEY, pem)?;
                if key.public_key() != public {
                    return Err(PkiError::KeyMismatch);
                }
                return Ok(CaKey::Memory(key));
            }
            (None, Some(_)) => {
                let detail = format!(
                    "signing-key names its key in a PKCS#11 token ({PKCS11_KEY_URI}), and the operator has no \
                     token configured: start it with --ca-key-pkcs11-uri, --pkcs11-module and --pkcs11-pin-file"
                );
                return Err(token_error(TokenProblem::Misconfigured, detail));
            }
            (Some(_), None) => {
                let detail = format!(
                    "signing-key holds the CA key itself ({TLS_KEY}) and the operator is configured to keep it in \
                     a PKCS#11 token: import the key into the token and name it in {PKCS11_KEY_URI} (docs/operations.md, \
                     \"CA key in an HSM\"), or delete signing-key for a new CA whose key is made in the token"
                );
                return Err(token_error(TokenProblem::Misconfigured, detail));
            }
            (Some(token), Some(reference)) => (token, reference),
        };
        if key_pem.is_some() {
            let detail = format!("signing-key has both {TLS_KEY} and {PKCS11_KEY_URI}: keep only the reference");
            return Err(token_error(TokenProblem::Misconfigured, detail));
        }
        let text = std::str::from_utf8(reference)
            .map_err(|_| PkiError::BadKey { field: PKCS11_KEY_URI, reason: "not UTF-8".into() })?;
        let uri = KeyUri::parse(text).map_err(|reason| PkiError::BadKey { field: PKCS11_KEY_URI, reason })?;
        let kind = public.kind().ok_or_else(|| PkiError::UnsupportedKey("the CA certificate's key".into()))?;
        Ok(CaKey::Token(TokenKey::find(token, uri, kind, public.raw().to_vec()).map_err(PkiError::Token)?))
    }
}

/// What signs with the CA key: `ring` for a key in memory, the token otherwise.
pub enum CaSigner {
    Memory(KeyPair),
    Token(TokenKey),
}

impl PublicKeyData for CaSigner {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaSigner::Memory(key) => key.der_bytes(),
            CaSigner::Token(key) => key.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            CaSigner::Memory(key) => PublicKeyData::algorithm(key),
            CaSigner::Token(key) => key.algorithm(),
        }
    }
}

impl SigningKey for CaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaSigner::Memory(key) => key.sign(message),
            CaSigner::Token(key) => key.sign(message),
        }
    }
}
