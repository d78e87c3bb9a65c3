//! Issuing pod certificates: the certificate serves its Service's names and the
//! ClusterTrustBundle trusts it; a request waits for its Service; unsupported keys and
//! other signers; rotation and reset; only a pod that asked this signer is answered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

use super::{World, answers, p521_stub, verify_all};
use crate::support::pods::{bundle_name, key_and_stub};
use crate::support::tls::{self, TlsServer, connect_all};
use crate::support::{T, eventually};

/// The status the API server accepted for request `name`: times are the leaf's (of
/// `chain`), refresh at half-life.
async fn assert_status_times_are_the_leafs(w: &World, name: &str, chain: &str) {
    let pcr = w.requests().get(name).await.unwrap();
    let status = pcr.status.unwrap();
    let (nb, na, refresh) = (
        status.not_before.unwrap().0.as_second(),
        status.not_after.unwrap().0.as_second(),
        status.begin_refresh_at.unwrap().0.as_second(),
    );
    assert_eq!(na - nb, 3600, "maxExpirationSeconds caps the lifetime");
    assert_eq!(refresh, nb + 1800);
    let leaf = crate::support::certs::first(chain);
    assert_eq!((leaf.not_before.unix_timestamp(), leaf.not_after.unix_timestamp()), (nb, na));
}

/// Other key types the kubelet offers: issued for `pod`, and trusted by `bundle` for
/// `web.<ns>.svc` in every stack.
async fn other_key_types_are_issued(w: &World, pod: &Pod, bundle: &str) {
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
        w.request(name, &w.signer, pod, stub, None).await;
        let chain = w.issued(name).await;
        verify_all(&chain, bundle, &format!("web.{}.svc", w.env.ns));
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

    assert_status_times_are_the_leafs(&w, "web-0-p256", &chain).await;
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

    other_key_types_are_issued(&w, &pod, &bundle).await;
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
    w.env.force_rotation("pods").await;
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
    w.env.hard_reset().await;
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
