//! A CA key inside the token: generated there, found by label and id, and signing
//! digests there (CKM_ECDSA; the digest is computed here, as every token supports).

use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use rand::Rng;
use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};
use sha2::Digest;

use super::{Failure, KeyUri, Token, TokenError, TokenProblem};
use crate::pki::KeyKind;

/// DER of the named-curve OIDs (CKA_EC_PARAMS).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// How the ids of the keys the operator generates start (then 16 random bytes): what
/// tells them from keys made or imported by others under the same label.
pub const GENERATED_ID_PREFIX: &[u8] = b"sco:";

/// A private key in the token and its public key (the uncompressed EC point).
#[derive(Clone)]
pub struct TokenKey {
    token: Arc<Token>,
    /// Token, label and id of the key object.
    uri: KeyUri,
    kind: KeyKind,
    public: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey({}, {})", self.kind, self.uri.render())
    }
}

fn curve(kind: KeyKind) -> Result<(&'static [u8], usize), TokenError> {
    match kind {
        KeyKind::EcdsaP256 => Ok((P256_PARAMS, 65)),
        KeyKind::EcdsaP384 => Ok((P384_PARAMS, 97)),
        KeyKind::Rsa { .. } => Err(TokenError::new(
            TokenProblem::Misconfigured,
            format!("a CA key in a PKCS#11 token is ECDSA P-256 or P-384, not {kind}"),
        )),
    }
}

impl TokenKey {
    /// Generates a key pair in the token: labelled as `--ca-key-pkcs11-uri` says, with
    /// a new id ([`GENERATED_ID_PREFIX`] and random bytes), private, sensitive and
    /// never extractable.
    pub fn generate(token: &Arc<Token>, kind: KeyKind) -> Result<Self, TokenError> {
        let (params, point_len) = curve(kind)?;
        let mut random = [0u8; 16];
        rand::rng().fill_bytes(&mut random);
        let id = [GENERATED_ID_PREFIX, &random].concat();
        let label = token.uri.object.clone();
        let public = token.with_session(|session, handles| {
            let common =
                [Attribute::Token(true), Attribute::Label(label.clone().into_bytes()), Attribute::Id(id.clone())];
            let mut public_template = vec![Attribute::Verify(true), Attribute::EcParams(params.to_vec())];
            public_template.extend(common.iter().cloned());
            let mut private_template = vec![
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
            ];
            private_template.extend(common.iter().cloned());
            let (public, private) = session
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public_template, &private_template)
                .map_err(|e| Failure::Ck("generating a key pair", e))?;
            let attributes = session
                .get_attributes(public, &[AttributeType::EcPoint])
                .map_err(|e| Failure::Ck("reading the new public key", e))?;
            let point = attributes.into_iter().find_map(|a| match a {
                Attribute::EcPoint(point) => Some(point),
                _ => None,
            });
            let point = point.and_then(|p| uncompressed_point(&p, point_len)).ok_or_else(|| {
                TokenError::new(TokenProblem::Unavailable, "the token returned no usable EC point for the new key")
            })?;
            handles.insert((label.clone(), id.clone()), private);
            Ok(point)
        })?;
        let uri = KeyUri { token: token.uri.token.clone(), object: label, id: Some(id) };
        tracing::info!(key = %uri.render(), %kind, "generated a CA key in the PKCS#11 token");
        Ok(TokenKey { token: token.clone(), uri, kind, public })
    }

    /// The key `uri` (from `signing-key`) names, whose public key is `public` (from the
    /// CA certificate). A probe signature checks that the token holds that very key.
    pub fn find(token: &Arc<Token>, uri: KeyUri, kind: KeyKind, public: Vec<u8>) -> Result<Self, TokenError> {
        curve(kind)?;
        if uri.token != token.uri.token {
            let detail = format!(
                "signing-key names a key in token {:?}, the operator is configured for token {:?}",
                crate::bounded(&uri.token),
                token.uri.token
            );
            return Err(TokenError::new(TokenProblem::Misconfigured, detail));
        }
        if uri.id.is_none() {
            return Err(TokenError::new(TokenProblem::Misconfigured, "the key reference in signing-key has no id="));
        }
        let key = TokenKey { token: token.clone(), uri, kind, public };
        let probe = b"service-ca-operator: does the token hold the key of the CA certificate?";
        let signature = key.sign_message(probe)?;
        let algorithm = match kind {
            KeyKind::EcdsaP384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
            _ => &ring::signature::ECDSA_P256_SHA256_ASN1,
        };
        ring::signature::UnparsedPublicKey::new(algorithm, &key.public).verify(probe, &signature).map_err(|_| {
            let detail = format!("the key {} is not the key of the CA certificate in tls.crt", key.uri.render());
            TokenError::new(TokenProblem::KeyMissing, detail)
        })?;
        Ok(key)
    }

    pub fn uri(&self) -> &KeyUri {
        &self.uri
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// An ECDSA signature of `message` in DER (what X.509 carries).
    fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, TokenError> {
        let digest = match self.kind {
            KeyKind::EcdsaP384 => sha2::Sha384::digest(message).to_vec(),
            _ => sha2::Sha256::digest(message).to_vec(),
        };
        let wanted = (self.uri.object.clone(), self.uri.id.clone().unwrap_or_default());
        let raw = self.token.with_session(|session, handles| {
            let handle = match handles.get(&wanted) {
                Some(handle) => *handle,
                None => {
                    let template = [
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::KeyType(KeyType::EC),
                        Attribute::Label(wanted.0.clone().into_bytes()),
                        Attribute::Id(wanted.1.clone()),
                    ];
                    let found = session.find_objects(&template).map_err(|e| Failure::Ck("finding the key", e))?;
                    let [handle] = found.as_slice() else {
                        let detail = format!("{} objects match {}", found.len(), self.uri.render());
                        return Err(TokenError::new(TokenProblem::KeyMissing, detail).into());
                    };
                    handles.insert(wanted.clone(), *handle);
                    *handle
                }
            };
            session.sign(&Mechanism::Ecdsa, handle, &digest).map_err(|e| Failure::Ck("signing", e))
        })?;
        der_signature(&raw)
            .ok_or_else(|| TokenError::new(TokenProblem::Unavailable, "the token returned a malformed ECDSA signature"))
    }
}

impl PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.kind.signature_algorithm()
    }
}

impl SigningKey for TokenKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        // The failure is logged and reported by the token; rcgen's error has no room for it.
        self.sign_message(message).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the point (some modules give it bare).
pub(super) fn uncompressed_point(value: &[u8], len: usize) -> Option<Vec<u8>> {
    let point = match value {
        [0x04, n, rest @ ..] if usize::from(*n) == len && rest.len() == len => rest,
        bare if bare.len() == len => bare,
        _ => return None,
    };
    (point.first() == Some(&0x04)).then(|| point.to_vec())
}

/// PKCS#11's `r || s` as a DER `ECDSA-Sig-Value` (two INTEGERs in a SEQUENCE).
fn der_signature(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 132 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = Vec::new();
    for half in [r, s] {
        let start = half.iter().position(|b| *b != 0).unwrap_or(half.len().saturating_sub(1));
        let digits = half.get(start..)?;
        let pad = digits.first().is_some_and(|b| b & 0x80 != 0);
        body.push(0x02);
        body.push(u8::try_from(digits.len().checked_add(usize::from(pad))?).ok()?);
        if pad {
            body.push(0);
        }
        body.extend_from_slice(digits);
    }
    let mut der = vec![0x30];
    let len = u8::try_from(body.len()).ok()?;
    if len >= 0x80 {
        der.push(0x81);
    }
    der.push(len);
    der.extend(body);
    Some(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_become_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[63] = 1; // s is 1
        let der = der_signature(&raw).unwrap();
        assert_eq!(&der[..4], &[0x30, 33 + 2 + 3, 0x02, 33]);
        assert_eq!(&der[der.len() - 3..], &[0x02, 1, 1]);
        assert_eq!(der_signature(&[1, 2, 3]), None);
    }

    #[test]
    fn points_are_unwrapped() {
        let mut point = vec![0x04; 65];
        point[1] = 7;
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&point);
        assert_eq!(uncompressed_point(&wrapped, 65), Some(point.clone()));
        assert_eq!(uncompressed_point(&point, 65), Some(point));
        assert_eq!(uncompressed_point(&[0x04, 2, 0x04, 1], 65), None);
    }
}
