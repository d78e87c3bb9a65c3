//! New CA keys: where they are made (the key pool in memory, or the PKCS#11 token) and
//! of which kind.

use super::error::GENERATE_KEY;
use super::{Error, plan};
use crate::controllers::Context;
use crate::pki::pkcs11::TokenKey;
use crate::pki::{CaKey, KeyKind, PkiError};

/// The kind of the next CA key: [`plan::next_key_kind`]; in a token, ECDSA P-256 where
/// that would be RSA (the flags refuse an RSA --ca-key-algorithm with a token).
pub(super) fn key_kind(ctx: &Context, current: Option<KeyKind>) -> KeyKind {
    match plan::next_key_kind(current, ctx.config.ca_key_algorithm) {
        KeyKind::Rsa { .. } if ctx.ca_token.is_some() => KeyKind::EcdsaP256,
        kind => kind,
    }
}

/// A new CA key: from the key pool in memory, or generated inside the token.
pub(super) async fn new_key(ctx: &Context, kind: KeyKind) -> Result<CaKey, Error> {
    let failed = Error::pki(GENERATE_KEY, &ctx.config.namespace);
    let Some(token) = ctx.ca_token.clone() else {
        return ctx.keys.generate(kind).await.map(CaKey::from).map_err(failed);
    };
    let generated = match tokio::task::spawn_blocking(move || TokenKey::generate(&token, kind)).await {
        Ok(generated) => generated.map_err(PkiError::Token),
        Err(e) => Err(PkiError::KeyGeneration(e.to_string())),
    };
    generated.map(CaKey::from).map_err(failed)
}
