//! TLS for `/metrics`: the certificate is the operator's own serving certificate for
//! its metrics Service (a Secret in its namespace that the serving-cert controller
//! issues and renews), followed through a watch so a renewal or a CA rotation needs no
//! restart. Until the Secret exists, handshakes fail: nothing is served unencrypted.
//! Connections and handshakes are bounded in `serve`.

use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::names::{TLS_CERT, TLS_KEY};

/// The certificate currently served; empty until the Secret has been read.
#[derive(Debug, Default)]
pub struct ServedCert(RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for ServedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok()?.clone()
    }
}

impl ServedCert {
    fn set(&self, key: CertifiedKey) {
        if let Ok(mut current) = self.0.write() {
            *current = Some(Arc::new(key));
        }
    }
}

/// Reads `tls.crt` (leaf, then any intermediates) and `tls.key` from a serving Secret.
/// The error never contains key material.
fn certified_key(secret: &Secret) -> Result<CertifiedKey, String> {
    let data = secret.data.as_ref().ok_or("the Secret has no data")?;
    let chain_pem = data.get(TLS_CERT).ok_or("the Secret has no tls.crt")?;
    let key_pem = data.get(TLS_KEY).ok_or("the Secret has no tls.key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem.0)
        .collect::<Result<_, _>>()
        .map_err(|_| "tls.crt is not a PEM certificate chain".to_string())?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem.0).map_err(|_| "tls.key is not a PEM private key".to_string())?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|_| "tls.key is not a key type this server can sign with".to_string())?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| "tls.key does not belong to the certificate in tls.crt".to_string())?;
    Ok(certified)
}

/// Keeps `served` on the current contents of Secret `name` in `namespace`, until the
/// watch ends (it ends with the process). A deleted or broken Secret keeps the
/// previous certificate in use: the serving-cert controller re-creates it.
pub async fn follow_secret(client: Client, namespace: String, name: String, served: Arc<ServedCert>) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => secret,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, secret = %name, "watching the metrics certificate");
                continue;
            }
        };
        match certified_key(&secret) {
            Ok(key) => {
                served.set(key);
                tracing::info!(%namespace, secret = %name, "metrics server certificate loaded");
            }
            Err(problem) => tracing::warn!(%namespace, secret = %name, %problem, "cannot use the metrics certificate"),
        }
    }
}

pub fn server_config(served: Arc<ServedCert>) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(served);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
