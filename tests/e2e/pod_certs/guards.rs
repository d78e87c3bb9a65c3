//! Who may get a pod certificate: the shipped admission policy, a member paused across
//! a hard reset, Services with huge selectors.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, PodCertificateRequest};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::pods::{Kubelet, bundle_name, key_and_stub, trust_bundle};
use crate::support::tls::{self};
use crate::support::{Cleanup, Env, T, eventually};

/// The policy and its binding, as shipped in manifests/, applied (and deleted when the
/// returned Cleanup is dropped).
async fn apply_the_shipped_policy(env: &Env) -> Cleanup {
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
    cleanup
}

/// A user with `create` on requests in the namespace (a Role of the test's): their name,
/// and the requests' API as them.
async fn tenant_who_may_create_requests(env: &Env) -> (String, Api<PodCertificateRequest>) {
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
    let as_tenant = Api::namespaced(crate::support::client_as(&tenant, &["system:authenticated"]).await, &env.ns);
    (tenant, as_tenant)
}

#[tokio::test]
async fn the_shipped_admission_policy_lets_only_the_node_a_request_names_create_one() {
    let env = Env::new("pod-certs-vap").await;
    let signer = service_ca_operator::names::POD_SIGNER_NAME;
    let _cleanup = apply_the_shipped_policy(&env).await;
    let kubelet = Kubelet::new(&env, signer).await;
    let pod = kubelet.pod("web", "web", None).await;
    let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (tenant, as_tenant) = tenant_who_may_create_requests(&env).await;

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

/// Requests `<prefix>-0` … `<prefix>-{n-1}` for `pod` from `signer`, each with a key of
/// its own.
async fn request_n(kubelet: &Kubelet, signer: &str, pod: &Pod, prefix: &str, n: usize) {
    for i in 0..n {
        let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
        kubelet.request(&format!("{prefix}-{i}"), signer, pod, stub, None).await;
    }
}

/// Waits until the ClusterTrustBundle of `signer` holds a new CA (not `old_ca`) alone,
/// the same as `signing-cabundle`; returns that bundle.
async fn new_ca_alone_published(env: &Env, signer: &str, old_ca: &[u8]) -> String {
    eventually(T, "the new CA in the ClusterTrustBundle", || async {
        let b = trust_bundle(env, signer, &env.op_ns).await;
        let ca = env.op_secrets().get_opt("signing-key").await.ok()??;
        let ski = crate::support::certs::ca_ski(&ca);
        // The new CA alone in the published bundle (signing-key is written before it).
        (ski != old_ca && crate::support::certs::skis(&b) == vec![ski] && env.ca_bundle().await == b).then_some(b)
    })
    .await
}

/// How many of the namespace's requests have no condition yet.
async fn unanswered(kubelet: &Kubelet) -> usize {
    let list = kubelet.requests().list(&Default::default()).await.unwrap();
    list.items
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.conditions.as_ref()).is_none_or(|c| c.is_empty()))
        .count()
}

/// Waits for `after-0` … `after-{n-1}` to be Issued; the names of those whose leaf the
/// CA `new_ca` did not sign.
async fn signed_by_another_ca(kubelet: &Kubelet, n: usize, new_ca: &[u8]) -> Vec<String> {
    let mut old = Vec::new();
    for i in 0..n {
        let name = format!("after-{i}");
        let chain = kubelet.issued(&name).await;
        if crate::support::certs::signer_of(&chain) != new_ca {
            old.push(name);
        }
    }
    old
}

#[tokio::test]
async fn a_paused_member_that_resumes_after_a_hard_reset_answers_no_request_with_the_old_ca() {
    let env = Env::new("pod-certs-paused").await;
    let signer = format!("e2e.service-ca.test/{}", env.run);
    // A long lease: the paused member stays a member (owning its share) while paused.
    let mut ops = env.replicas(2, "30s", &["--pod-signer-name", &signer]);
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
    request_n(&kubelet, &signer, &pod, "warm", warm).await;
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
    env.hard_reset().await;
    let new_bundle = new_ca_alone_published(&env, &signer, &old_ca).await;
    let new_ca = crate::support::certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
    // ... and pods ask for certificates: about half of them are the paused member's.
    let n = 12;
    request_n(&kubelet, &signer, &pod, "after", n).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending = unanswered(&kubelet).await;
    let pause = paused.elapsed();
    eprintln!("paused for {pause:?}; {pending} of {n} requests wait for the paused member");
    assert!(pause < Duration::from_secs(25), "the member's Lease must not expire while paused: {pause:?}");
    crate::support::unsafe_free_signal(ops[member].pid(), "CONT");

    let old = signed_by_another_ca(&kubelet, n, &new_ca).await;
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
    // 40 Services of ~1.1 MB of selector each (20,000 label pairs), created while
    // the operator runs, 8 at a time (the shared API server stalls with more). Kept,
    // such a selector costs ~2.6 MiB (100 of them peaked at 290 MiB): 40 would add
    // ~100 MiB, over twice the bound below.
    let (n, pairs) = (40, 20_000);
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
    let growth = peak - before;
    assert!(growth < 48.0, "peak RSS grew {growth:.1} MiB with {n} Services of 1.1 MB selectors (bound 48 MiB)");
    assert!(waited < limit, "a normal Service waited {waited:?} for its Secret (limit {limit:?})");
}
