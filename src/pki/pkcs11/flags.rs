//! The flags that put the CA key in a PKCS#11 token (all three, or none: the key then
//! lives in `signing-key` as it always has).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{OnReset, Reporter, Token};
use crate::pki::KeyKind;

#[derive(Debug, Clone, Default, Args)]
pub struct Pkcs11Flags {
    /// Keep the CA key in a PKCS#11 token: an RFC 7512 URI naming the token and the
    /// label of the keys, e.g. `pkcs11:token=service-ca;object=service-ca-key`. New CA
    /// keys (first start, rotation, hard reset) are generated in the token (ECDSA);
    /// `signing-key` then holds a reference to the key, never the key. Needs
    /// --pkcs11-module and --pkcs11-pin-file.
    #[arg(long, env = "SERVICE_CA_CA_KEY_PKCS11_URI")]
    pub ca_key_pkcs11_uri: Option<String>,

    /// The PKCS#11 module (shared library) of the token, e.g.
    /// /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "SERVICE_CA_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,

    /// A file holding the token's user PIN (a trailing newline is ignored); read at
    /// each login, so a corrected PIN is picked up without a restart.
    #[arg(long, env = "SERVICE_CA_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,

    /// What becomes of the CA keys this operator generated earlier in the token when a
    /// new CA is created because `signing-key` is absent (first start, hard reset):
    /// `keep` them, or `destroy` those the new `signing-key` does not reference. Only
    /// keys under the label of --ca-key-pkcs11-uri whose id the operator made are
    /// ever destroyed; an imported key is never.
    #[arg(long, env = "SERVICE_CA_PKCS11_ON_RESET", value_enum, default_value_t = OnReset::Keep)]
    pub pkcs11_on_reset: OnReset,
}

impl Pkcs11Flags {
    /// The token, when configured; an error for an incomplete or unusable
    /// configuration (startup fails: never a silent fallback to a key in memory).
    pub fn open(&self, ca_key: Option<KeyKind>, report: Reporter) -> Result<Option<Arc<Token>>, String> {
        let (uri, module, pin_file) = match (&self.ca_key_pkcs11_uri, &self.pkcs11_module, &self.pkcs11_pin_file) {
            (None, None, None) => return Ok(None),
            (Some(uri), Some(module), Some(pin_file)) => (uri, module, pin_file),
            _ => {
                return Err("--ca-key-pkcs11-uri, --pkcs11-module and --pkcs11-pin-file go together: give all three \
                            (the CA key in a token) or none (the CA key in signing-key)"
                    .into());
            }
        };
        if let Some(kind @ KeyKind::Rsa { .. }) = ca_key {
            return Err(format!(
                "--ca-key-algorithm {}: a CA key in a PKCS#11 token is ecdsa-p256 (the default there) or ecdsa-p384",
                kind.value()
            ));
        }
        Token::open(module, uri, pin_file.clone(), report).map(|token| Some(Arc::new(token)))
    }
}
