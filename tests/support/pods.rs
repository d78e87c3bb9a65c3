//! What the kubelet does for a pod with a `podCertificate` volume, done by hand (for
//! requests a kubelet would not make; tests/e2e/kubelet.rs has the real one): a Node, Pods bound to it (running as the
//! namespace's `default` ServiceAccount, with a projected `podCertificate` volume
//! source for the signer), Services that select them, and PodCertificateRequests with
//! a stub PKCS#10 request signed by the pod's key, created as the node
//! (`system:node:<name>`, impersonated) like a kubelet does. Shared by the end-to-end
//! tests and the bench.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, PodCertificateRequest};
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{Cleanup, Env, client_as, eventually};

/// The ClusterRole (and its binding to the group `system:nodes`) that lets a node
/// create PodCertificateRequests. The test control plane now runs the Node authorizer
/// (which allows the create) and NodeRestriction (which checks it against the pod);
/// kept for a control plane authorising by RBAC alone. Shared by all tests, never
/// deleted.
pub const NODE_ROLE: &str = "e2e-nodes-create-podcertificaterequests";

const T: Duration = Duration::from_secs(30);

/// What the kubelet would do for a test namespace: a Node (deleted at the end), Pods
/// bound to it, and their PodCertificateRequests.
pub struct Kubelet {
    /// The signer the pods' `podCertificate` volumes ask (the README's Pod spec).
    signer: String,
    client: kube::Client,
    ns: String,
    labels: BTreeMap<String, String>,
    node: Node,
    /// The API as the node (`system:node:<name>`, group `system:nodes`).
    as_node: kube::Client,
    _cleanup: Cleanup,
}

impl Kubelet {
    pub async fn new(env: &Env, signer: &str) -> Kubelet {
        Self::in_namespace(env, signer, &env.ns).await
    }

    /// A kubelet for the test `env`'s objects in another namespace `ns` (its Node is
    /// named after `ns`).
    pub async fn in_namespace(env: &Env, signer: &str, ns: &str) -> Kubelet {
        let nodes: Api<Node> = Api::all(env.client.clone());
        let node =
            Node { metadata: ObjectMeta { name: Some(ns.to_string()), ..Default::default() }, ..Default::default() };
        let node = nodes.create(&PostParams::default(), &node).await.expect("create Node");
        let mut cleanup = Cleanup::default();
        cleanup.add::<Node>(ns.to_string());
        node_rbac(&env.client).await;
        Kubelet {
            signer: signer.to_string(),
            client: env.client.clone(),
            ns: ns.to_string(),
            labels: env.labels(),
            as_node: client_as(&format!("system:node:{ns}"), &["system:nodes", "system:authenticated"]).await,
            node,
            _cleanup: cleanup,
        }
    }

    /// The Node's name.
    pub fn node_name(&self) -> String {
        self.node.metadata.name.clone().unwrap()
    }

    /// A Pod bound to the Node, with `app: <app>` (and the test's run label), running as
    /// `default`, with a projected `podCertificate` volume source for the signer.
    pub async fn pod(&self, name: &str, app: &str, host: Option<(&str, &str)>) -> Pod {
        self.pod_with(name, app, |spec| {
            if let Some((hostname, subdomain)) = host {
                spec["hostname"] = json!(hostname);
                spec["subdomain"] = json!(subdomain);
            }
        })
        .await
    }

    /// Like [`Kubelet::pod`], with `change` applied to the spec first (e.g. another
    /// signer in its volume, or none).
    pub async fn pod_with(&self, name: &str, app: &str, change: impl FnOnce(&mut Value)) -> Pod {
        let mut labels = self.labels.clone();
        labels.insert("app".into(), app.into());
        let mut spec = json!({
            "nodeName": self.node.metadata.name,
            "serviceAccountName": "default",
            "containers": [{ "name": "main", "image": "none" }],
            "volumes": [{ "name": "certs", "projected": { "sources": [
                { "podCertificate": { "signerName": self.signer, "keyType": "ECDSAP256", "credentialBundlePath": "bundle.pem" } }
            ] } }],
        });
        change(&mut spec);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns, "labels": labels }, "spec": spec
        }))
        .unwrap();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        // The namespace's default ServiceAccount may not be there yet.
        eventually(T, "pod created", || async { api.create(&PostParams::default(), &pod).await.ok() }).await
    }

    /// A Service selecting `app: <app>` (no annotation: pod certificates need none).
    pub async fn service(&self, name: &str, app: &str, headless: bool) -> Service {
        let mut svc: Service = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns, "labels": self.labels },
            "spec": { "ports": [{ "port": 443 }], "selector": { "app": app } }
        }))
        .unwrap();
        if headless {
            svc.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        }
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        api.create(&PostParams::default(), &svc).await.expect("create Service")
    }

    /// A Service `name` selecting `app: <name>-0`, whose selector then changes every
    /// second (`<name>-1`, `<name>-2`, …) until `length` has passed since it was asked
    /// for; returns how many selectors it had.
    pub async fn churn_selector(&self, name: &str, length: Duration) -> usize {
        let started = Instant::now();
        self.service(name, &format!("{name}-0"), false).await;
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        let mut changes = 1;
        while started.elapsed() < length {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let patch = json!({ "spec": { "selector": { "app": format!("{name}-{changes}") } } });
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("change the selector");
            changes += 1;
        }
        changes
    }

    /// Creates a request for `pod` as the kubelet would (as the node), with `stub` as
    /// its PKCS#10.
    pub async fn request(
        &self,
        name: &str,
        signer: &str,
        pod: &Pod,
        stub: Vec<u8>,
        annotations: Option<BTreeMap<String, String>>,
    ) -> PodCertificateRequest {
        let pcr = self.request_object(name, signer, pod, stub, annotations).await;
        let api: Api<PodCertificateRequest> = Api::namespaced(self.as_node.clone(), &self.ns);
        // NodeRestriction reads the pod from the API server's own cache, which may not
        // hold a pod created a moment ago (500 "pod ... not found"): look again, as the
        // kubelet does.
        let started = Instant::now();
        loop {
            match api.create(&PostParams::default(), &pcr).await {
                Ok(created) => return created,
                Err(kube::Error::Api(status))
                    if status.code == 500 && status.message.contains("not found") && started.elapsed() < T =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("create PodCertificateRequest as the node: {e:?}"),
            }
        }
    }

    /// Creates a request for `pod` as the cluster administrator (the API server checks
    /// nothing against the pod then), with `change` applied to its spec first.
    pub async fn admin_request(
        &self,
        name: &str,
        pod: &Pod,
        stub: Vec<u8>,
        change: impl FnOnce(&mut Value),
    ) -> PodCertificateRequest {
        let pcr = self.request_object(name, &self.signer, pod, stub, None).await;
        let mut value = serde_json::to_value(pcr).unwrap();
        change(&mut value["spec"]);
        let pcr: PodCertificateRequest = serde_json::from_value(value).unwrap();
        self.requests().create(&PostParams::default(), &pcr).await.expect("create PodCertificateRequest")
    }

    /// The request the kubelet would make for `pod`.
    pub async fn request_object(
        &self,
        name: &str,
        signer: &str,
        pod: &Pod,
        stub: Vec<u8>,
        annotations: Option<BTreeMap<String, String>>,
    ) -> PodCertificateRequest {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let sa =
            eventually(T, "default ServiceAccount", || async { sas.get_opt("default").await.ok().flatten() }).await;
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns },
            "spec": {
                "signerName": signer,
                "podName": pod.metadata.name, "podUID": pod.metadata.uid,
                "serviceAccountName": "default", "serviceAccountUID": sa.metadata.uid,
                "nodeName": self.node.metadata.name, "nodeUID": self.node.metadata.uid,
                "maxExpirationSeconds": 3600,
                "stubPKCS10Request": ByteString(stub),
                "unverifiedUserAnnotations": annotations,
            }
        }))
        .unwrap()
    }

    pub fn requests(&self) -> Api<PodCertificateRequest> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Waits for the request's final condition; returns it (`<type> <reason>`) with the
    /// request.
    pub async fn answered(&self, name: &str, timeout: Duration) -> (String, PodCertificateRequest) {
        let api = self.requests();
        eventually(timeout, &format!("PodCertificateRequest {name} answered"), || async {
            let pcr = api.get(name).await.ok()?;
            let condition = pcr.status.as_ref()?.conditions.as_ref()?.first()?.clone();
            Some((format!("{} {}", condition.type_, condition.reason), pcr))
        })
        .await
    }

    /// Waits for the request to be Issued; returns its chain.
    pub async fn issued(&self, name: &str) -> String {
        let (condition, pcr) = self.answered(name, T).await;
        assert_eq!(condition, "Issued Issued", "{:?}", pcr.status);
        pcr.status.unwrap().certificate_chain.unwrap()
    }
}

/// Lets the group `system:nodes` create PodCertificateRequests ([`NODE_ROLE`]); the
/// objects are created once and shared by every test.
async fn node_rbac(client: &kube::Client) {
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": { "name": NODE_ROLE },
        "rules": [{ "apiGroups": ["certificates.k8s.io"], "resources": ["podcertificaterequests"], "verbs": ["create"] }]
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": NODE_ROLE },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NODE_ROLE },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes" }]
    }))
    .unwrap();
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    // AlreadyExists (another test made them) is fine.
    let _ = roles.create(&PostParams::default(), &role).await;
    let _ = bindings.create(&PostParams::default(), &binding).await;
    eventually(T, "the node RBAC", || async {
        roles.get_opt(NODE_ROLE).await.ok()??;
        bindings.get_opt(NODE_ROLE).await.ok()??;
        Some(())
    })
    .await;
}

/// The bundle of the ClusterTrustBundle `signer` has from the instance in `namespace`
/// (waits until it exists).
pub async fn trust_bundle(env: &Env, signer: &str, namespace: &str) -> String {
    let api: Api<ClusterTrustBundle> = Api::all(env.client.clone());
    let name = bundle_name(signer, namespace);
    eventually(T, "ClusterTrustBundle", || async { Some(api.get_opt(&name).await.ok()??.spec.trust_bundle) }).await
}

pub fn bundle_name(signer: &str, namespace: &str) -> String {
    format!("{}:{namespace}", signer.replace('/', ":"))
}

/// A fresh key of `alg` and its stub PKCS#10 request (DER), as the kubelet makes them.
pub fn key_and_stub(alg: &'static rcgen::SignatureAlgorithm) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let stub = rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
    (key, stub)
}
