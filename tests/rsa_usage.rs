//! Holds true the justification for ignoring RUSTSEC-2023-0071 in deny.toml: the `rsa`
//! crate is used only to generate and encode keys, never for a private-key operation
//! (decryption or signing), which is where its timing side channel lives.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

/// Every `rsa::` path the source may use: key generation, encoding, and structural
/// (non-arithmetic) decoding of PKCS#1/PKCS#8 containers.
const ALLOWED: &[&str] = &[
    "rsa::PrivateKey::new",
    "rsa::pkcs1::der::Encode",
    "rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey}",
    "rsa::pkcs8::EncodePrivateKey",
    "rsa::pkcs8::PrivateKeyInfoRef::try_from",
    "rsa::pkcs1::RsaPrivateKeyRef::try_from",
    "rsa::pkcs1::RsaPublicKey",
];

/// Names of the `rsa` API that perform private-key operations.
const FORBIDDEN: &[&str] = &[
    "decrypt",
    "Pkcs1v15Sign",
    "Pkcs1v15Encrypt",
    "Oaep",
    "Pss",
    "BlindedSigningKey",
    "SigningKey",
    "hazmat",
    "sign_with_rng",
];

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn rsa_crate_is_used_for_key_generation_and_encoding_only() {
    let mut files = Vec::new();
    sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let mut uses = 0;
    for (path, text) in &files {
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            let mut rest = code;
            while let Some(at) = rest.find("rsa::") {
                let path_text: String =
                    rest[at..].chars().take_while(|c| c.is_alphanumeric() || "_:{}, ".contains(*c)).collect();
                let path_text = path_text.trim_end_matches([' ', ',']).to_string();
                assert!(
                    ALLOWED.iter().any(|a| path_text.starts_with(a)),
                    "{path}:{}: `{path_text}` is not on the allowed list of rsa uses (see deny.toml)",
                    n + 1
                );
                uses += 1;
                rest = &rest[at + 5..];
            }
        }
        if text.contains("rsa::") {
            let code: String =
                text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
            for word in FORBIDDEN {
                assert!(!code.contains(word), "{path} uses the rsa crate and calls `{word}`");
            }
        }
    }
    assert!(uses >= 5, "expected to find the rsa uses in src/pki/keys.rs, found {uses}");

    // And no feature that opens the private-key API wider.
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let rsa_line = manifest.lines().find(|l| l.starts_with("rsa ")).expect("rsa dependency");
    assert!(!rsa_line.contains("hazmat") && !rsa_line.contains("sha"), "{rsa_line}");
}
