//! The test control plane's node: a hollow node (tests/controlplane/node.go), the real
//! kubelet code over a fake container runtime, placed pods on by the real
//! kube-scheduler. Its containers never run, but its volume plugins write real files
//! under its root directory, which the tests read as the pod would.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use super::{Env, controlplane_dir, eventually};

/// The node's name and the kubelet's root directory.
pub struct Node {
    pub name: String,
    pub root: PathBuf,
}

/// The node of the test control plane, read from `node.env` in its data directory
/// (written by the harness once the node is Ready).
pub fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let path = controlplane_dir().join("node.env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the test control plane has no node ({}: {e}): it is an old harness, or was started with --node=false; \
                 rebuild it with tests/controlplane/build.sh and start it again",
                path.display()
            )
        });
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key}= in {}:\n{text}", path.display()))
                .to_string()
        };
        Node { name: field("name"), root: PathBuf::from(field("root")) }
    })
}

impl Node {
    /// Where the kubelet writes the volume `volume` of the pod `uid`, by plugin
    /// (`projected`, `secret`, `configmap`).
    pub fn volume_dir(&self, uid: &str, plugin: &str, volume: &str) -> PathBuf {
        self.root.join("pods").join(uid).join("volumes").join(format!("kubernetes.io~{plugin}")).join(volume)
    }
}

/// The content of `path` once it exists (the kubelet writes volume files atomically).
pub async fn file(path: &Path, timeout: Duration) -> String {
    eventually(timeout, &format!("{} written by the kubelet", path.display()), || async {
        std::fs::read_to_string(path).ok().filter(|s| !s.is_empty())
    })
    .await
}

/// Creates a pod of the test that only the node may run (nodeSelector on its hostname
/// label; the scheduler places it): `spec` is completed with that selector and the
/// test's labels plus `app: <app>`.
pub async fn create_pod(env: &Env, name: &str, app: &str, mut spec: Value) -> Pod {
    let mut labels = env.labels();
    labels.insert("app".into(), app.into());
    spec["nodeSelector"] = json!({ "kubernetes.io/hostname": node().name });
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": env.ns, "labels": labels }, "spec": spec
    }))
    .unwrap();
    let api: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    // The namespace's default ServiceAccount may not be there yet.
    eventually(Duration::from_secs(30), "pod created", || async { api.create(&PostParams::default(), &pod).await.ok() })
        .await
}

/// The pod once its phase is `phase`.
pub async fn pod_in_phase(env: &Env, name: &str, phase: &str, timeout: Duration) -> Pod {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(timeout, &format!("pod {name} {phase}"), || async {
        let pod = api.get(name).await.ok()?;
        (pod.status.as_ref()?.phase.as_deref()? == phase).then_some(pod)
    })
    .await
}

/// The pod's UID.
pub fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap()
}

/// A credential bundle as the kubelet writes it (key PEM, then the chain): the key's
/// PEM and the chain's.
pub fn split_bundle(bundle: &str) -> (String, String) {
    let blocks = pem::parse_many(bundle).unwrap_or_else(|e| panic!("credential bundle does not parse: {e}"));
    let (mut key, mut chain) = (String::new(), String::new());
    for block in blocks {
        let text = pem::encode(&block);
        if block.tag().ends_with("PRIVATE KEY") { key.push_str(&text) } else { chain.push_str(&text) }
    }
    (key, chain)
}
