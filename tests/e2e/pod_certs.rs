//! Pod certificates and the ClusterTrustBundle on the real API server. No kubelet
//! runs there, so each test does what the kubelet would: a Node, a Pod bound to it,
//! and the PodCertificateRequest with a stub PKCS#10 request signed by the pod's key
//! (the API server verifies it, and validates the status the operator writes: chain,
//! times, conditions). Each test uses a signer name of its own, so that operators of
//! other tests never see its requests.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, PodCertificateRequest};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
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
    // As the administrator: NodeRestriction refuses the node a request for a signer its
    // pod does not mount.
    w.admin_request("other-signer", &pod, stub.clone(), |spec| spec["signerName"] = json!(other)).await;
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

/// Waits for `names`' answers; returns `<type> <reason>` by request.
async fn answers(w: &Kubelet, names: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in names {
        out.insert(name.to_string(), w.answered(name, T).await.0);
    }
    out
}

#[tokio::test]
async fn only_a_pod_that_asked_this_signer_gets_a_certificate_any_other_request_is_denied_with_its_reason() {
    let w = World::new("pod-certs-asked", &[]).await;
    let ns = w.env.ns.clone();
    w.service("web", "web", false).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    // The control: a pod with the volume, its request made by its node.
    let asked = w.pod("asked", "web", None).await;
    w.request("asked", &w.signer, &asked, stub.clone(), None).await;
    // The administrator (or anyone allowed to create requests) asks for pods that
    // did not ask, or names another node, service account or UID than the pod's.
    let no_volume = w.pod_with("no-volume", "web", |spec| drop(spec.as_object_mut().unwrap().remove("volumes"))).await;
    w.admin_request("no-volume", &no_volume, stub.clone(), |_| {}).await;
    let other = format!("e2e.other.test/{}", w.env.run);
    let other_signer = w
        .pod_with("other-signer", "web", |spec| {
            spec["volumes"][0]["projected"]["sources"][0]["podCertificate"]["signerName"] = json!(other);
        })
        .await;
    w.admin_request("other-signer", &other_signer, stub.clone(), |_| {}).await;
    let pod = w.pod("web", "web", None).await;
    w.admin_request("wrong-node", &pod, stub.clone(), |spec| {
        spec["nodeName"] = json!("elsewhere");
        spec["nodeUID"] = json!("00000000-0000-0000-0000-00000000e15e");
    })
    .await;
    w.admin_request("wrong-account", &pod, stub.clone(), |spec| spec["serviceAccountName"] = json!("intruder")).await;
    w.admin_request("wrong-uid", &pod, stub.clone(), |spec| {
        spec["podUID"] = json!("00000000-0000-0000-0000-0000000000a1");
    })
    .await;
    let finished = w.pod("finished", "web", None).await;
    let pods: Api<Pod> = Api::namespaced(w.env.client.clone(), &ns);
    let phase = json!({ "status": { "phase": "Succeeded" } });
    pods.patch_status("finished", &PatchParams::default(), &Patch::Merge(&phase)).await.unwrap();
    w.admin_request("finished", &finished, stub.clone(), |_| {}).await;
    // Being deleted (a finalizer holds it).
    let leaving = w.pod_with("leaving", "web", |_| {}).await;
    let hold = json!({ "metadata": { "finalizers": ["e2e.service-ca.test/hold"] } });
    pods.patch("leaving", &PatchParams::default(), &Patch::Merge(&hold)).await.unwrap();
    pods.delete("leaving", &DeleteParams::default()).await.unwrap();
    w.admin_request("leaving", &leaving, stub, |_| {}).await;

    let started = Instant::now();
    let got = answers(
        &w,
        &["asked", "no-volume", "other-signer", "wrong-node", "wrong-account", "wrong-uid", "finished", "leaving"],
    )
    .await;
    eprintln!("answered within {:?}: {got:#?}", started.elapsed());
    let release = json!({ "metadata": { "finalizers": null } });
    pods.patch("leaving", &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();
    let issued: Vec<&String> = got.iter().filter(|(_, c)| c.starts_with("Issued")).map(|(n, _)| n).collect();
    println!("requests for pods that did not ask (or not as they run): {} of 7 issued", issued.len() - 1);
    let want: BTreeMap<String, String> = [
        ("asked", "Issued Issued"),
        ("no-volume", "Denied PodDidNotAskThisSigner"),
        ("other-signer", "Denied PodDidNotAskThisSigner"),
        ("wrong-node", "Denied NodeNameMismatch"),
        ("wrong-account", "Denied ServiceAccountMismatch"),
        ("wrong-uid", "Denied PodUIDMismatch"),
        ("finished", "Denied PodNotActive"),
        ("leaving", "Denied PodNotActive"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want);
    let (_, pcr) = w.answered("other-signer", T).await;
    let message = &pcr.status.unwrap().conditions.unwrap()[0].message;
    assert!(message.contains(&w.signer) && message.contains("other-signer"), "{message}");
}

#[tokio::test]
async fn the_shipped_admission_policy_lets_only_the_node_a_request_names_create_one() {
    let env = Env::new("pod-certs-vap").await;
    let signer = service_ca_operator::names::POD_SIGNER_NAME;
    // The policy and its binding, as shipped in manifests/.
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/podcertificaterequest-policy.yaml"))
            .expect("manifests/podcertificaterequest-policy.yaml");
    let mut cleanup = Cleanup::default();
    let apply = PatchParams::apply("e2e").force();
    for doc in text.split("\n---") {
        let value: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
        let name = value["metadata"]["name"].as_str().unwrap().to_string();
        match value["kind"].as_str().unwrap() {
            "ValidatingAdmissionPolicy" => {
                let api: Api<ValidatingAdmissionPolicy> = Api::all(env.client.clone());
                api.patch(&name, &apply, &Patch::Apply(&value)).await.unwrap();
                cleanup.add::<ValidatingAdmissionPolicy>(name);
            }
            "ValidatingAdmissionPolicyBinding" => {
                let api: Api<ValidatingAdmissionPolicyBinding> = Api::all(env.client.clone());
                api.patch(&name, &apply, &Patch::Apply(&value)).await.unwrap();
                cleanup.add::<ValidatingAdmissionPolicyBinding>(name);
            }
            kind => panic!("unexpected {kind}"),
        }
    }
    let kubelet = Kubelet::new(&env, signer).await;
    let pod = kubelet.pod("web", "web", None).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);

    // A user with `create` on requests in the namespace (a Role of the test's).
    let tenant = format!("e2e-tenant-{}", env.run);
    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "requests", "namespace": env.ns },
        "rules": [{ "apiGroups": ["certificates.k8s.io"], "resources": ["podcertificaterequests"], "verbs": ["create"] }]
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "requests", "namespace": env.ns },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "requests" },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": tenant }]
    }))
    .unwrap();
    Api::<Role>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &role).await.unwrap();
    Api::<RoleBinding>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &binding).await.unwrap();
    let as_tenant: Api<PodCertificateRequest> =
        Api::namespaced(crate::support::client_as(&tenant, &["system:authenticated"]).await, &env.ns);

    // RBAC lets the tenant create requests (for another signer: admitted) ...
    let other = kubelet.request_object("other", &format!("e2e.other.test/{}", env.run), &pod, stub.clone(), None).await;
    eventually(T, "the tenant's RBAC", || async { as_tenant.create(&PostParams::default(), &other).await.ok() }).await;
    // ... the policy refuses the tenant's request for the pod signer (once the API
    // server has loaded the policy) ...
    let started = Instant::now();
    let base = kubelet.request_object("tenant", signer, &pod, stub.clone(), None).await;
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let refusal = eventually(T, "the tenant's request refused by the policy", || {
        let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut request = base.clone();
        request.metadata.name = Some(format!("tenant-{n}"));
        let as_tenant = as_tenant.clone();
        async move {
            match as_tenant.create(&PostParams::default(), &request).await {
                Err(kube::Error::Api(status)) => Some(status),
                Ok(_) => None,
                Err(error) => panic!("{error}"),
            }
        }
    })
    .await;
    let n = tries.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "tenant refused after {:?} ({} admitted while the policy loaded): {refusal:?}",
        started.elapsed(),
        n.saturating_sub(1)
    );
    assert_eq!(refusal.code, 403, "{refusal:?}");
    assert!(refusal.message.contains("only the node") && refusal.message.contains(&tenant), "{}", refusal.message);
    // ... and admits the node's own (system:node:<spec.nodeName>).
    kubelet.request("from-node", signer, &pod, stub, None).await;
    let admitted = kubelet.requests().get("from-node").await.unwrap();
    assert_eq!(admitted.spec.node_name, kubelet.node_name());
}

#[tokio::test]
async fn a_paused_member_that_resumes_after_a_hard_reset_answers_no_request_with_the_old_ca() {
    let env = Env::new("pod-certs-paused").await;
    let signer = format!("e2e.service-ca.test/{}", env.run);
    // A long lease: the paused member stays a member (owning its share) while paused.
    let mut ops: Vec<Operator> = (0..2)
        .map(|i| {
            let identity = format!("r{i}");
            let args = env.leader_elect_args(
                "30s",
                &["--default-key-algorithm", "ecdsa", "--lease-identity", &identity, "--pod-signer-name", &signer],
            );
            Operator::start_with_kubeconfig(&env.name, &args, &env.kubeconfig)
        })
        .collect();
    let mut cleanup = Cleanup::default();
    cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
    for op in &ops {
        op.wait_ready(Duration::from_secs(60)).await;
    }
    let kubelet = Kubelet::new(&env, &signer).await;
    kubelet.service("web", "web", false).await;
    let pod = kubelet.pod("web", "web", None).await;
    // Both replicas answer their share (each request belongs to one).
    let warm = 8;
    for i in 0..warm {
        let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
        kubelet.request(&format!("warm-{i}"), &signer, &pod, stub, None).await;
    }
    for i in 0..warm {
        kubelet.issued(&format!("warm-{i}")).await;
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.op_ns);
    let holder = leases.get("service-ca-operator").await.unwrap().spec.unwrap().holder_identity.unwrap();
    let member = if holder == "r0" { 1 } else { 0 };
    let old_ca = crate::support::certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());

    // The member stops (SIGSTOP) ...
    crate::support::unsafe_free_signal(ops[member].pid(), "STOP");
    let paused = Instant::now();
    // ... the leader hard-resets the CA and publishes it ...
    env.op_secrets().delete("signing-key", &DeleteParams::default()).await.unwrap();
    let new_bundle = eventually(T, "the new CA in the ClusterTrustBundle", || async {
        let b = trust_bundle(&env, &signer, &env.op_ns).await;
        let ca = env.op_secrets().get_opt("signing-key").await.ok()??;
        let ski = crate::support::certs::ca_ski(&ca);
        // The new CA alone in the published bundle (signing-key is written before it).
        (ski != old_ca && crate::support::certs::skis(&b) == vec![ski] && env.ca_bundle().await == b).then_some(b)
    })
    .await;
    let new_ca = crate::support::certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
    // ... and pods ask for certificates: about half of them are the paused member's.
    let n = 12;
    for i in 0..n {
        let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
        kubelet.request(&format!("after-{i}"), &signer, &pod, stub, None).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending = {
        let list = kubelet.requests().list(&Default::default()).await.unwrap();
        list.items
            .iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.conditions.as_ref()).is_none_or(|c| c.is_empty()))
            .count()
    };
    let pause = paused.elapsed();
    eprintln!("paused for {pause:?}; {pending} of {n} requests wait for the paused member");
    assert!(pause < Duration::from_secs(25), "the member's Lease must not expire while paused: {pause:?}");
    crate::support::unsafe_free_signal(ops[member].pid(), "CONT");

    let mut old = Vec::new();
    for i in 0..n {
        let name = format!("after-{i}");
        let chain = kubelet.issued(&name).await;
        if crate::support::certs::signer_of(&chain) != new_ca {
            old.push(name);
        }
    }
    println!(
        "after a hard reset while a member was paused: {} of {n} requests ({pending} its share) signed by the old CA",
        old.len()
    );
    assert!(old.is_empty(), "signed by the old CA after the reset: {old:?}");
    for i in 0..n {
        let chain = kubelet.issued(&format!("after-{i}")).await;
        let verified = tls::openssl_verify(&chain, &new_bundle, &format!("web.{}.svc", env.ns));
        assert!(verified.is_ok(), "after-{i}: {verified:?}\n{chain}");
    }
    for op in &mut ops {
        assert!(op.running(), "no replica exited");
    }
}

#[tokio::test]
async fn memory_stays_bounded_when_tenants_put_huge_selectors_in_services() {
    let env = Env::new("pod-certs-selectors").await;
    let signer = format!("e2e.service-ca.test/{}", env.run);
    // ECDSA keys: what is measured here is the selectors, not RSA keys' CPU.
    let op = env.start_operator(&["--pod-signer-name", &signer, "--default-key-algorithm", "ecdsa"]);
    let mut cleanup = Cleanup::default();
    cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
    op.wait_ready(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = op.rss_kib() as f64 / 1024.0;
    // 100 Services of ~1.1 MB of selector each (20,000 label pairs), created while
    // the operator runs, 8 at a time (the shared API server stalls with more).
    let (n, pairs) = (100, 20_000);
    let selector: serde_json::Map<String, serde_json::Value> =
        (0..pairs).map(|i| (format!("k{i:05}"), json!("v".repeat(49)))).collect();
    let bytes: usize = selector.iter().map(|(k, v)| k.len() + v.as_str().unwrap().len()).sum();
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
                "metadata": { "name": format!("big{i}"), "namespace": env.ns, "labels": env.labels() },
                "spec": { "ports": [{ "port": 443 }], "selector": selector },
            }))
            .unwrap();
            let api = env.services();
            async move {
                match api.create(&PostParams::default(), &service).await {
                    Ok(_) => {}
                    // A retried create that went through the first time.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => panic!("create big{i}: {e}"),
                }
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    eprintln!("{n} Services of {bytes} selector bytes created in {:?}", started.elapsed());
    // Every one was looked at: each got its one Warning.
    let warned = eventually(Duration::from_secs(60), "a SelectorTooLarge Warning on every big Service", || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let events = env.events(&env.ns, None, Some("SelectorTooLarge")).await;
        (events.len() >= n).then_some(events.len())
    })
    .await;
    // A normal Service still gets its Secret promptly.
    let limit = Duration::from_secs_f64(10.0 * crate::support::time_scale());
    let asked = Instant::now();
    env.annotated_service("normal", "normal-tls", false).await;
    env.serving_secret("normal-tls", limit).await;
    let waited = asked.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = op.peak_rss_kib() as f64 / 1024.0;
    println!(
        "{n} Services with {pairs}-pair selectors ({:.1} MB each): operator RSS {before:.1} MiB before, peak \
         {peak:.1} MiB; {warned} SelectorTooLarge Warnings; a normal Service's Secret after {waited:?}",
        bytes as f64 / 1e6
    );
    let warning = env.the_one_warning(&env.ns, "big0").await;
    assert!(warning.note.as_deref().unwrap_or_default().contains("20000 label pairs"), "{warning:?}");
    assert!(peak < 128.0, "peak RSS {peak:.1} MiB with {n} Services of 1.1 MB selectors (target < 128 MiB)");
    assert!(waited < limit, "a normal Service waited {waited:?} for its Secret (limit {limit:?})");
}
