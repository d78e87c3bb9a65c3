//! `--pkcs11-on-reset destroy`: after a new CA was created because `signing-key` was
//! absent (first start, hard reset), the CA keys this operator generated earlier in the
//! token that the new `signing-key` does not reference are destroyed there
//! ([`crate::pki::pkcs11::InUse`] says what counts as referenced), once the new CA
//! signs on this replica (after it is published). A failure is
//! reported and changes nothing else: the new CA is in place either way.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::controllers::{Context, EventType};
use crate::names::{CA_BUNDLE, INTERMEDIATE, SIGNING_KEY, TLS_CERT};
use crate::pki::pkcs11::{InUse, KeyUri, OnReset};
use crate::pki::{CaKey, PKCS11_KEY_URI};

/// Destroys the unreferenced keys when configured; reports what it did. `spare` (a key
/// generated for a rotation that failed before) is one of them: it is dropped.
pub(super) async fn destroy_unused(ctx: &Context, created: &Secret, spare: &mut Option<CaKey>) {
    let Some(token) = ctx.ca_token.clone() else { return };
    if ctx.config.pkcs11.pkcs11_on_reset != OnReset::Destroy {
        return;
    }
    *spare = None;
    let in_use = in_use(created.data.as_ref());
    if in_use.ids.is_empty() {
        // Never guess: without the new key's reference nothing is known to be unused.
        tracing::warn!("{SIGNING_KEY} names no key in the token; no earlier key is destroyed");
        return;
    }
    let result = match tokio::task::spawn_blocking(move || token.destroy_unused(&in_use)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let regarding = created.object_ref(&());
    match result {
        Ok(destroyed) if destroyed.is_empty() => {
            tracing::info!("--pkcs11-on-reset destroy: no earlier CA key of this operator in the token");
        }
        Ok(destroyed) => {
            let list = crate::bounded_to(&destroyed.join(", "), 1024).into_owned();
            let note = format!(
                "Destroyed {} earlier CA key(s) this operator generated in the PKCS#11 token, which {SIGNING_KEY} no \
                 longer references (--pkcs11-on-reset destroy): {list}",
                destroyed.len()
            );
            tracing::info!("{note}");
            ctx.event(&regarding, EventType::Normal, "ServiceCAKeysDestroyed", note).await;
        }
        Err(error) => {
            let note = format!(
                "Destroying the earlier CA keys in the PKCS#11 token failed (--pkcs11-on-reset destroy): {error}. \
                 They stay in the token; the new CA is unaffected"
            );
            tracing::warn!("{note}");
            ctx.event(&regarding, EventType::Warning, "ServiceCAKeysNotDestroyed", note).await;
        }
    }
}

/// What a `signing-key`'s data still uses: the key id of its reference, and the public
/// keys of every certificate it holds (the CA, the bundle, the bridges).
pub(super) fn in_use(data: Option<&BTreeMap<String, ByteString>>) -> InUse {
    let mut in_use = InUse::default();
    let Some(data) = data else { return in_use };
    let reference = data.get(PKCS11_KEY_URI).and_then(|v| std::str::from_utf8(&v.0).ok());
    if let Some(id) = reference.and_then(|text| KeyUri::parse(text).ok()).and_then(|uri| uri.id) {
        in_use.ids.push(id);
    }
    for field in [TLS_CERT, CA_BUNDLE, INTERMEDIATE] {
        let Some(pem) = data.get(field) else { continue };
        for der in crate::pki::pem::decode_certificates(TLS_CERT, &pem.0).unwrap_or_default() {
            if let Ok((_, cert)) = X509Certificate::from_der(&der) {
                in_use.points.push(cert.public_key().subject_public_key.data.to_vec());
            }
        }
    }
    in_use
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_and_every_certificate_key_are_in_use() {
        let cert = |seed: &rcgen::KeyPair| {
            let params = rcgen::CertificateParams::new(vec!["ca".to_string()]).unwrap();
            params.self_signed(seed).unwrap().pem()
        };
        let (a, b) = (rcgen::KeyPair::generate().unwrap(), rcgen::KeyPair::generate().unwrap());
        let mut data = BTreeMap::new();
        data.insert(TLS_CERT.to_string(), ByteString(cert(&a).into_bytes()));
        data.insert(CA_BUNDLE.to_string(), ByteString(format!("{}{}", cert(&a), cert(&b)).into_bytes()));
        data.insert(PKCS11_KEY_URI.to_string(), ByteString(b"pkcs11:token=t;object=k;id=%73%01".to_vec()));
        let in_use = in_use(Some(&data));
        assert_eq!(in_use.ids, vec![vec![0x73, 1]]);
        assert_eq!(in_use.points.len(), 3);
        assert!(in_use.points.contains(&a.public_key_raw().to_vec()));
        assert!(in_use.points.contains(&b.public_key_raw().to_vec()));
        assert_eq!(super::in_use(None), InUse::default());
        data.remove(PKCS11_KEY_URI);
        assert!(super::in_use(Some(&data)).ids.is_empty());
    }
}
