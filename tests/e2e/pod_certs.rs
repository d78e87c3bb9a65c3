//! Pod certificates and the ClusterTrustBundle on the real API server. No kubelet
//! runs there, so each test does what the kubelet would: a Node, a Pod bound to it,
//! and the PodCertificateRequest with a stub PKCS#10 request signed by the pod's key
//! (the API server verifies it, and validates the status the operator writes: chain,
//! times, conditions). Each test uses a signer name of its own, so that operators of
//! other tests never see its requests.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::support::pods::{Kubelet, bundle_name, key_and_stub, trust_bundle};
use crate::support::tls::{self, TlsServer, connect_all};
use crate::support::{Cleanup, Env, Operator, eventually};

const T: Duration = Duration::from_secs(30);

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

#[tokio::test]
async fn an_issued_pod_certificate_serves_its_service_names_and_the_cluster_trust_bundle_trusts_it() {
    let w = World::new("pod-certs-issue", &[]).await;
    let ns = w.env.ns.clone();
    w.service("web", "web", false).await;
    w.service("peers", "web", true).await;
    w.service("db", "db", false).await;
    let pod = w.pod("web-0", "web", Some(("web-0", "peers"))).await;
    let (key, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let started = Instant::now();
    w.request("web-0-p256", &w.signer, &pod, stub, None).await;
    let chain = w.issued("web-0-p256").await;
    eprintln!("request → Issued: {:?}", started.elapsed());

    // The status the API server accepted: times are the leaf's, refresh at half-life.
    let pcr = w.requests().get("web-0-p256").await.unwrap();
    let status = pcr.status.unwrap();
    let (nb, na, refresh) = (
        status.not_before.unwrap().0.as_second(),
        status.not_after.unwrap().0.as_second(),
        status.begin_refresh_at.unwrap().0.as_second(),
    );
    assert_eq!(na - nb, 3600, "maxExpirationSeconds caps the lifetime");
    assert_eq!(refresh, nb + 1800);
    let leaf = crate::support::certs::first(&chain);
    assert_eq!((leaf.not_before.unix_timestamp(), leaf.not_after.unix_timestamp()), (nb, na));
    let sans = crate::support::certs::sans_of(&chain);
    let want: Vec<String> = [
        format!("peers.{ns}.svc"),
        format!("peers.{ns}.svc.cluster.local"),
        format!("web-0.peers.{ns}.svc"),
        format!("web-0.peers.{ns}.svc.cluster.local"),
        format!("web.{ns}.svc"),
        format!("web.{ns}.svc.cluster.local"),
    ]
    .into();
    assert_eq!(sans, want, "every selecting Service, the headless one with the pod's own name; not db");

    // The ClusterTrustBundle holds what signing-cabundle holds, and trusts the chain
    // in a real handshake, in every stack, for every name.
    let bundle = w.trust_bundle().await;
    assert_eq!(bundle, w.env.ca_bundle().await);
    let api: Api<ClusterTrustBundle> = Api::all(w.env.client.clone());
    let ctb = api.get(&bundle_name(&w.signer, &w.env.op_ns)).await.unwrap();
    assert_eq!(ctb.spec.signer_name.as_deref(), Some(w.signer.as_str()));
    let labels = ctb.metadata.labels.unwrap();
    assert_eq!(labels.get("service-ca.operators.openshift.io/managed").map(String::as_str), Some("true"));
    assert_eq!(labels.get("service-ca.operators.openshift.io/instance"), Some(&w.env.op_ns));
    let server = TlsServer::start(&chain, &key.serialize_pem());
    for name in &want {
        for (stack, result) in connect_all(server.port, &bundle, name) {
            assert!(result.is_ok(), "{stack} → {name}: {result:?}");
        }
    }

    // Deleted by someone: published again.
    let name = bundle_name(&w.signer, &w.env.op_ns);
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    eventually(T, "the ClusterTrustBundle re-created", || async {
        api.get_opt(&name).await.unwrap().filter(|b| b.spec.trust_bundle == bundle).map(|_| ())
    })
    .await;

    // Other key types the kubelet offers.
    for (name, key) in [("ed25519", None), ("rsa3072", Some(3072))] {
        let stub = match key {
            None => key_and_stub(&rcgen::PKCS_ED25519).1,
            Some(bits) => {
                let rsa = service_ca_operator::pki::PrivateKey::generate_rsa(bits).unwrap();
                rcgen::CertificateParams::default()
                    .serialize_request(&rsa.signing_key().unwrap())
                    .unwrap()
                    .der()
                    .to_vec()
            }
        };
        w.request(name, &w.signer, &pod, stub, None).await;
        let chain = w.issued(name).await;
        verify_all(&chain, &bundle, &format!("web.{ns}.svc"));
    }
    assert!(w.op.logs().contains("pod certificate issued"));
}

#[tokio::test]
async fn a_request_waits_for_its_service_and_is_denied_when_none_comes_in_the_grace_period() {
    // 15 s: the waiting request's Service must come inside it even on a loaded machine
    // (with 8 s it was once denied first, with the whole suite running on 2 cores).
    const GRACE: u64 = 15;
    let w = World::new("pod-certs-wait", &["--pod-certificate-grace", &format!("{GRACE}s")]).await;
    let late = w.pod("late", "late", None).await;
    let lonely = w.pod("lonely", "nobody", None).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    w.request("late", &w.signer, &late, stub.clone(), None).await;
    let created = Instant::now();
    let lonely_request = w.request("lonely", &w.signer, &lonely, stub, None).await;
    w.trust_bundle().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending = w.requests().get("late").await.unwrap();
    assert!(pending.status.and_then(|s| s.conditions).unwrap_or_default().is_empty(), "pending while no Service");

    let service_created = Instant::now();
    w.service("late", "late", false).await;
    let chain = w.issued("late").await;
    let waited = service_created.elapsed();
    eprintln!("Service created → waiting request issued: {waited:?}");
    assert!(waited < Duration::from_secs(5), "issued as soon as the Service appeared: {waited:?}");
    assert!(crate::support::certs::sans_of(&chain).contains(&format!("late.{}.svc", w.env.ns)));

    let (condition, pcr) = w.answered("lonely", Duration::from_secs(GRACE + 22)).await;
    let denied_after = created.elapsed();
    eprintln!("no Service → Denied after {denied_after:?} (grace {GRACE}s)");
    assert_eq!(condition, "Denied NoServiceSelectsPod");
    // The grace counts from creationTimestamp (whole seconds, so up to a second before
    // the create call); on the API server's clock it is exact.
    assert!(denied_after >= Duration::from_secs(GRACE - 1), "not before the grace period ended: {denied_after:?}");
    let condition = &pcr.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
    let created_at = lonely_request.metadata.creation_timestamp.unwrap().0.as_second();
    assert!(condition.last_transition_time.0.as_second() - created_at >= GRACE as i64, "{condition:?}");
    let message = &condition.message;
    assert!(message.contains("no Service") && message.contains(&w.env.ns), "{message}");
}

#[tokio::test]
async fn unsupported_keys_and_unknown_annotations_are_denied_at_once_and_other_signers_untouched() {
    let w = World::new("pod-certs-deny", &[]).await;
    w.service("web", "web", false).await;
    let pod = w.pod("web", "web", None).await;
    let started = Instant::now();
    w.request("p521", &w.signer, &pod, p521_stub(), None).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let annotations = BTreeMap::from([("example.com/spiffe-path".to_string(), "x".to_string())]);
    w.request("annotated", &w.signer, &pod, stub.clone(), Some(annotations)).await;
    let other = format!("e2e.other.test/{}", w.env.run);
    w.request("other-signer", &other, &pod, stub.clone(), None).await;
    w.request("ours", &w.signer, &pod, stub, None).await;

    let (condition, pcr) = w.answered("p521", T).await;
    assert_eq!(condition, "Denied UnsupportedKeyType");
    let message = &pcr.status.unwrap().conditions.unwrap()[0].message;
    assert!(
        message.contains("ECDSA P-521") && message.contains("ECDSA P-256"),
        "names the key and what works: {message}"
    );
    let (condition, _) = w.answered("annotated", T).await;
    assert_eq!(condition, "Denied InvalidUnverifiedUserAnnotations");
    eprintln!("both denied within {:?}", started.elapsed());
    w.issued("ours").await;
    // The request for another signer was created before ours, which is answered.
    let untouched = w.requests().get("other-signer").await.unwrap();
    assert!(untouched.status.and_then(|s| s.conditions).unwrap_or_default().is_empty());
    // A Warning Event says why on each denied request.
    for name in ["p521", "annotated"] {
        let warning = w.env.the_one_warning(&w.env.ns, name).await;
        assert_eq!(warning.reason.as_deref(), Some("PodCertificateDenied"));
    }
}

#[tokio::test]
async fn the_trust_bundle_and_new_pod_certificates_follow_a_rotation_and_a_reset() {
    let w = World::new("pod-certs-rotate", &[]).await;
    let ns = w.env.ns.clone();
    let name = format!("web.{ns}.svc");
    w.service("web", "web", false).await;
    let pod = w.pod("web", "web", None).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    w.request("before", &w.signer, &pod, stub.clone(), None).await;
    let before = w.issued("before").await;
    let first_bundle = w.trust_bundle().await;

    // Graceful rotation: the bundle gains the new CA; a new certificate is from it;
    // the old certificate still verifies against the new bundle, the new one against
    // the old bundle.
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "pods" } } });
    w.env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let rotated = Instant::now();
    let bundle = eventually(T, "the bundle after the rotation", || async {
        let b = w.trust_bundle().await;
        (b != first_bundle).then_some(b)
    })
    .await;
    eprintln!("forced rotation → ClusterTrustBundle updated: {:?}", rotated.elapsed());
    assert_eq!(bundle, w.env.ca_bundle().await);
    w.request("after", &w.signer, &pod, stub.clone(), None).await;
    let after = w.issued("after").await;
    assert_ne!(crate::support::certs::signer_of(&after), crate::support::certs::signer_of(&before), "new CA");
    verify_all(&before, &bundle, &name);
    verify_all(&after, &bundle, &name);
    verify_all(&after, &first_bundle, &name);

    // Hard reset: a brand-new CA, the bundle is it alone, new certificates from it.
    w.env.op_secrets().delete("signing-key", &DeleteParams::default()).await.unwrap();
    let reset = Instant::now();
    let reset_bundle = eventually(T, "the bundle after the reset", || async {
        let b = w.trust_bundle().await;
        (b != bundle).then_some(b)
    })
    .await;
    eprintln!("hard reset → ClusterTrustBundle updated: {:?}", reset.elapsed());
    assert_eq!(crate::support::certs::ders(&reset_bundle).len(), 1, "no bridge after a reset");
    w.request("reset", &w.signer, &pod, stub, None).await;
    let fresh = w.issued("reset").await;
    verify_all(&fresh, &reset_bundle, &name);
    assert!(tls::openssl_verify(&before, &reset_bundle, &name).is_err(), "a reset trusts nothing from before");
}
