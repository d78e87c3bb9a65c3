//! Where `inspect` finds the CA key and whether the CA can be used: in `signing-key`
//! (`tls.key`), or in a PKCS#11 token named by its `pkcs11-key-uri`. A key in a token
//! is checked there when `inspect` is given the operator's token flags (the same load
//! as `run`'s); without them the rest of the CA is checked and the key is reported as
//! not checked, which is not a problem.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::pki::{CertificateAuthority, PKCS11_KEY_URI};

/// The key is `tls.key` of `signing-key`.
pub const IN_SECRET: &str = "in signing-key";
/// The key is in the token of `inspect`'s flags, and the CA loaded with it.
pub const IN_TOKEN_CHECKED: &str = "in a PKCS#11 token (checked)";
/// The key is in a token `inspect` was not given.
pub const IN_TOKEN_NOT_CHECKED: &str = "in a PKCS#11 token (not checked: give inspect the operator's \
                                        --ca-key-pkcs11-uri, --pkcs11-module and --pkcs11-pin-file to check it)";

/// Where the key of `data` is, and why the CA cannot be used if it cannot.
/// `token_check` is the outcome of loading the CA with the token of `inspect`'s flags
/// (`None`: no token given).
pub fn assess(
    data: &BTreeMap<String, Vec<u8>>,
    token_check: Option<&Result<(), String>>,
    now: OffsetDateTime,
) -> (&'static str, Option<String>) {
    let in_token = data.contains_key(PKCS11_KEY_URI);
    let (location, outcome) = match token_check {
        Some(Ok(())) => (IN_TOKEN_CHECKED, Ok(())),
        Some(Err(e)) => (if in_token { "in a PKCS#11 token" } else { IN_SECRET }, Err(e.clone())),
        None if in_token => {
            (IN_TOKEN_NOT_CHECKED, CertificateAuthority::check_without_token(data, now).map_err(|e| e.to_string()))
        }
        None => (IN_SECRET, CertificateAuthority::from_secret_data(data, now).map(|_| ()).map_err(|e| e.to_string())),
    };
    (location, outcome.err().map(|e| format!("signing-key cannot be used: {e}")))
}
