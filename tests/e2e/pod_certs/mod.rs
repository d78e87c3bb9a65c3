//! Pod certificates and the ClusterTrustBundle (docs/spec.md §5.2) on the real API server.
//! No kubelet runs there, so each test does what the kubelet would: a Node, a Pod bound
//! to it, and the PodCertificateRequest with a stub PKCS#10 request signed by the pod's
//! key (the API server verifies it, and validates the status the operator writes: chain,
//! times, conditions). Each test uses a signer name of its own, so that operators of
//! other tests never see its requests.

mod guards;
mod issuance;

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::api::certificates::v1::ClusterTrustBundle;

use crate::support::pods::{Kubelet, bundle_name, trust_bundle};
use crate::support::tls::{self};
use crate::support::{Cleanup, Env, Operator, T};

/// One test's world: its namespace, its own signer, its operator, and a kubelet (whose
/// methods it offers).
struct World {
    env: Env,
    signer: String,
    kubelet: Kubelet,
    op: Operator,
    _cleanup: Cleanup,
}

impl World {
    async fn new(test: &str, extra: &[&str]) -> World {
        let env = Env::new(test).await;
        let signer = format!("e2e.service-ca.test/{}", env.run);
        let mut args = vec!["--pod-signer-name", &signer];
        args.extend_from_slice(extra);
        let op = env.start_operator(&args);
        let mut cleanup = Cleanup::default();
        cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
        let kubelet = Kubelet::new(&env, &signer).await;
        World { env, signer, kubelet, op, _cleanup: cleanup }
    }

    /// The published ClusterTrustBundle's bundle (waits until it exists).
    async fn trust_bundle(&self) -> String {
        trust_bundle(&self.env, &self.signer, &self.env.op_ns).await
    }
}

impl std::ops::Deref for World {
    type Target = Kubelet;
    fn deref(&self) -> &Kubelet {
        &self.kubelet
    }
}

/// A stub PKCS#10 request over a P-521 key, made with OpenSSL (the signing library the
/// operator uses cannot make or certify P-521 keys).
fn p521_stub() -> Vec<u8> {
    let dir = tls::scratch_dir();
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521", "-nodes", "-subj", "/CN=x"])
        .args(["-outform", "DER", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("req.der"))
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(dir.join("req.der")).unwrap()
}

fn verify_all(chain: &str, bundle: &str, name: &str) {
    let results = [
        ("rustls", tls::rustls_verify_at(chain, bundle, name, SystemTime::now())),
        ("openssl", tls::openssl_verify(chain, bundle, name)),
        ("go", tls::go_verify(chain, bundle, name)),
    ];
    for (stack, result) in results {
        assert!(result.is_ok(), "{stack} does not verify the chain for {name}: {result:?}");
    }
}

/// Waits for `names`' answers; returns `<type> <reason>` by request.
async fn answers(w: &Kubelet, names: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in names {
        out.insert(name.to_string(), w.answered(name, T).await.0);
    }
    out
}
