//! What a pod actually receives, seen through a real kubelet (issue 25): the test
//! control plane's hollow node (tests/controlplane/node.go) runs the real kubelet code
//! over a fake container runtime, and kube-scheduler places the pods on it. The
//! kubelet makes the pod's key, creates the PodCertificateRequest as
//! `system:node:<name>` (Node authorizer, NodeRestriction), and writes the projected,
//! Secret and ConfigMap volumes as files under its root directory, which these tests
//! read where a container would find them.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, PodCertificateRequest};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

use crate::support::certs::{ca_ski, signer_of, skis, try_signer_of};
use crate::support::node::{create_pod, file, node, pod_in_phase, split_bundle, uid};
use crate::support::pods::bundle_name;
use crate::support::tls::{self, serve_in_every_stack};
use crate::support::{Cleanup, Env, Operator, eventually};

const T: Duration = Duration::from_secs(90);

/// A test's namespace with an operator signing pod certificates for a signer of its
/// own (operators of other tests never see its requests).
pub(crate) struct World {
    pub(crate) env: Env,
    pub(crate) signer: String,
    _op: Operator,
    _cleanup: Cleanup,
}

impl World {
    pub(crate) async fn new(test: &str, extra: &[&str]) -> World {
        let env = Env::new(test).await;
        let signer = format!("e2e.service-ca.test/{}", env.run);
        let mut args = vec!["--pod-signer-name", &signer];
        args.extend_from_slice(extra);
        let op = env.start_operator(&args);
        eprintln!("operator log: {}", op.log.display());
        let mut cleanup = Cleanup::default();
        cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
        World { env, signer, _op: op, _cleanup: cleanup }
    }

    /// docs/operations.md's `podCertificate` source: key then chain in one file.
    pub(crate) fn cert_volume(&self, key_type: &str) -> Value {
        json!({ "name": "tls", "projected": { "sources": [{ "podCertificate": {
            "signerName": self.signer, "keyType": key_type, "credentialBundlePath": "credentials.pem"
        } }] } })
    }

    /// docs/operations.md's `clusterTrustBundle` source for the signer.
    pub(crate) fn bundle_volume(&self) -> Value {
        json!({ "name": "ca", "projected": { "sources": [{ "clusterTrustBundle": {
            "signerName": self.signer,
            "labelSelector": { "matchLabels": { "service-ca.operators.openshift.io/managed": "true" } },
            "path": "ca-bundle.crt"
        } }] } })
    }

    pub(crate) async fn pod(&self, name: &str, app: &str, volumes: Vec<Value>) -> Pod {
        create_pod(&self.env, name, app, pod_spec(volumes)).await
    }

    pub(crate) fn requests(&self) -> Api<PodCertificateRequest> {
        Api::namespaced(self.env.client.clone(), &self.env.ns)
    }
}

/// A one-container pod running as `default`, mounting each volume read-only.
fn pod_spec(volumes: Vec<Value>) -> Value {
    let mounts: Vec<Value> = volumes
        .iter()
        .map(|v| json!({ "name": v["name"], "mountPath": format!("/var/run/{}", v["name"].as_str().unwrap()), "readOnly": true }))
        .collect();
    json!({
        "serviceAccountName": "default",
        "containers": [{ "name": "main", "image": "registry.example.com/web:1.0", "volumeMounts": mounts }],
        "volumes": volumes,
    })
}

/// The public key (SPKI, DER) of a PEM private key, by OpenSSL.
fn public_key_of(key_pem: &str) -> Vec<u8> {
    let dir = tls::scratch_dir();
    let path = dir.join("key.pem");
    std::fs::write(&path, key_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&path)
        .output()
        .expect("run openssl");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "openssl cannot read the kubelet's key: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The leaf's SPKI (DER) and a short name of its key (`EC-256`, `RSA-3072`, `Ed25519`).
fn leaf_key(chain_pem: &str) -> (Vec<u8>, String) {
    let der = crate::support::certs::ders(chain_pem).into_iter().next().expect("a leaf");
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let spki = cert.tbs_certificate.subject_pki.clone();
    let kind = match spki.parsed() {
        Ok(PublicKey::EC(ec)) => format!("EC-{}", ec.key_size()),
        Ok(PublicKey::RSA(rsa)) => format!("RSA-{}", rsa.key_size()),
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => "Ed25519".to_string(),
        other => format!("{other:?}"),
    };
    (spki.raw.to_vec(), kind)
}

#[tokio::test]
async fn the_kubelet_writes_the_pod_certificate_and_a_pod_trusting_the_projected_bundle_handshakes_with_it() {
    let w = World::new("kubelet-pod-cert", &[]).await;
    let ns = w.env.ns.clone();
    w.env.service_with("web", &[], false).await;
    let client = w.pod("client-0", "client", vec![w.bundle_volume()]).await;

    let started = Instant::now();
    let web = w.pod("web-0", "web", vec![w.cert_volume("ECDSAP256")]).await;
    let bundle_path = node().volume_dir(&uid(&web), "projected", "tls").join("credentials.pem");
    let bundle = file(&bundle_path, T).await;
    let files_after = started.elapsed();
    let web = pod_in_phase(&w.env, "web-0", "Running", T).await;
    eprintln!(
        "pod created → credentials.pem written by the kubelet: {files_after:?}; Running after {:?} (on {:?})",
        started.elapsed(),
        web.spec.as_ref().unwrap().node_name
    );
    assert_eq!(web.spec.unwrap().node_name.as_deref(), Some(node().name.as_str()), "the scheduler placed it");

    // The kubelet made the request as the node, for its pod.
    let pcrs = w.requests().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(pcrs.len(), 1, "one request: {pcrs:?}");
    assert_eq!(pcrs[0].spec.node_name, node().name);
    assert_eq!(pcrs[0].spec.pod_name, "web-0");

    // The files: the key the kubelet made, and the chain for the Service's names.
    let (key, chain) = split_bundle(&bundle);
    let (spki, kind) = leaf_key(&chain);
    assert_eq!(kind, "EC-256", "the key type the pod asked for");
    assert_eq!(public_key_of(&key), spki, "the leaf certifies the kubelet's key");
    let mut sans = crate::support::certs::sans_of(&chain);
    sans.sort();
    assert_eq!(sans, [format!("web.{ns}.svc"), format!("web.{ns}.svc.cluster.local")]);
    assert_eq!(crate::support::certs::ders(&chain).len(), 2, "leaf then CA");

    // Another pod's clusterTrustBundle volume trusts it in every TLS stack.
    let ca = file(&node().volume_dir(&uid(&client), "projected", "ca").join("ca-bundle.crt"), T).await;
    let sorted = |pem: &str| {
        let mut ders = crate::support::certs::ders(pem);
        ders.sort();
        ders
    };
    assert_eq!(sorted(&ca), sorted(&w.env.ca_bundle().await), "the projected bundle holds signing-cabundle's CAs");
    let failures = serve_in_every_stack(&chain, &key, &ca, &format!("web.{ns}.svc"));
    assert!(failures.is_empty(), "handshakes failed: {failures:#?}");
    eprintln!("9 handshakes (rustls, OpenSSL, Go servers × clients) with the kubelet's files");
}

/// manifests/<file> as JSON, moved into `ns`.
fn manifest(file: &str, ns: &str) -> Value {
    let path = format!("{}/manifests/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut value: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value["metadata"]["namespace"] = json!(ns);
    value
}

#[tokio::test]
async fn the_shipped_deployment_is_scheduled_and_its_pods_run_as_the_manifests_service_account() {
    let env = Env::new("kubelet-shipped").await;
    let sa: ServiceAccount = serde_json::from_value(manifest("serviceaccount.yaml", &env.ns)).unwrap();
    Api::<ServiceAccount>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &sa).await.unwrap();
    // The manifests' Deployment as shipped (the chart renders the same one:
    // tests/e2e/chart.rs), in the test's namespace, kept to the node.
    let mut deployment = manifest("deployment.yaml", &env.ns);
    deployment["spec"]["template"]["spec"]["nodeSelector"] = json!({ "kubernetes.io/hostname": node().name });
    let deployment: Deployment = serde_json::from_value(deployment).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let started = Instant::now();
    deployments.create(&PostParams::default(), &deployment).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let running = eventually(T, "2 ready replicas, 2 pods Running", || async {
        let status = deployments.get("service-ca-operator").await.ok()?.status?;
        let selector = ListParams::default().labels("app.kubernetes.io/name=service-ca-operator");
        let list = pods.list(&selector).await.ok()?.items;
        let phases: Vec<_> = list.iter().filter_map(|p| p.status.as_ref()?.phase.clone()).collect();
        (status.ready_replicas == Some(2) && phases == ["Running", "Running"]).then_some(list)
    })
    .await;
    eprintln!("Deployment created → 2 pods Running and Ready on {}: {:?}", node().name, started.elapsed());
    for pod in running {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(node().name.as_str()));
        assert_eq!(spec.service_account_name.as_deref(), Some("service-ca-operator"));
        let security = spec.security_context.as_ref().unwrap();
        assert_eq!((security.run_as_non_root, security.run_as_user), (Some(true), Some(65532)));
        // The kubelet got the ServiceAccount's token for the pod (TokenRequest as the
        // node) and wrote it where the operator reads it.
        let volume = spec.volumes.as_ref().unwrap().iter().find(|v| v.name.starts_with("kube-api-access-")).unwrap();
        let dir = node().volume_dir(&uid(&pod), "projected", &volume.name);
        let token = file(&dir.join("token"), T).await;
        assert_eq!(token.split('.').count(), 3, "a JWT");
        assert!(!file(&dir.join("ca.crt"), T).await.is_empty());
        assert_eq!(file(&dir.join("namespace"), T).await, env.ns);
    }
}

/// A Deployment `name` of one pod on the node, mounting `volumes`.
async fn deployment(env: &Env, name: &str, volumes: Vec<Value>) {
    let labels = json!({ "app": name });
    let mut spec = pod_spec(volumes);
    spec["nodeSelector"] = json!({ "kubernetes.io/hostname": node().name });
    spec["terminationGracePeriodSeconds"] = json!(1);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "replicas": 1, "selector": { "matchLabels": labels },
                  "template": { "metadata": { "labels": labels }, "spec": spec } }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &d).await.unwrap();
}

/// The Deployment's only pod, once its rollout is complete: one pod, Running, the old
/// ones gone.
async fn rolled_out(env: &Env, name: &str) -> Pod {
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(T, &format!("Deployment {name} rolled out"), || async {
        let d = deployments.get(name).await.ok()?;
        let status = d.status?;
        let done = status.observed_generation == d.metadata.generation
            && (status.replicas, status.updated_replicas, status.ready_replicas) == (Some(1), Some(1), Some(1));
        let list = pods.list(&ListParams::default().labels(&format!("app={name}"))).await.ok()?.items;
        let running = list.len() == 1 && list[0].status.as_ref()?.phase.as_deref() == Some("Running");
        (done && running).then(|| list[0].clone())
    })
    .await
}

const BIN: &str = env!("CARGO_BIN_EXE_service-ca-operator");

/// `inspect -o json` (or with `extra`) for the test's namespace: exit code and stdout.
fn inspect(env: &Env, extra: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .args(["inspect", "-n", &env.ns, "--operator-namespace", &env.op_ns])
        .args(extra)
        .env("KUBECONFIG", &env.kubeconfig)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The Deployments `inspect` lists, once it exits 4 with everything current.
async fn stale_deployments(env: &Env) -> Vec<String> {
    eventually(T, "inspect: re-issued, re-injected, workloads listed", || async {
        let (code, out) = inspect(env, &["-o", "json"]);
        let report: Value = serde_json::from_str(&out).ok()?;
        let current = report["summary"]["serving_current"] == 1 && report["summary"]["injected_current"] == 1;
        (code == 4 && current).then_some(())?;
        let mut names: Vec<String> = report["workloads"]
            .as_array()?
            .iter()
            .map(|w| format!("{}/{}", w["kind"].as_str().unwrap_or("?"), w["name"].as_str().unwrap_or("?")))
            .collect();
        names.sort();
        Some(names)
    })
    .await
}

#[tokio::test]
async fn pods_see_rotated_files_and_inspect_restarts_exactly_the_stale_deployments_after_a_hard_reset() {
    let env = Env::new("kubelet-rotation").await;
    let op = env.start_operator(&[]);
    op.wait_ready(T).await;
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", T).await;
    let bundle = env.injected_configmap("trust", T).await;
    // Pods start strictly after the Secret and ConfigMap were written (whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    deployment(&env, "web", vec![json!({ "name": "tls", "secret": { "secretName": "web-tls" } })]).await;
    deployment(&env, "client", vec![json!({ "name": "ca", "configMap": { "name": "trust" } })]).await;
    deployment(&env, "other", vec![]).await;
    let (web, client, other) =
        (rolled_out(&env, "web").await, rolled_out(&env, "client").await, rolled_out(&env, "other").await);
    let crt = node().volume_dir(&uid(&web), "secret", "tls").join("tls.crt");
    let ca = node().volume_dir(&uid(&client), "configmap", "ca").join("service-ca.crt");
    assert_eq!(file(&crt, T).await, crate::support::data(&env.secrets().get("web-tls").await.unwrap(), "tls.crt"));
    assert_eq!(file(&ca, T).await, bundle);

    // A forced rotation: the kubelet brings the re-issued certificate and the new bundle
    // into the running pods' files.
    env.force_rotation("kubelet-sync").await;
    let new_ski = ca_ski(&env.rotated("kubelet-sync").await);
    let started = Instant::now();
    eventually(T, "the pod's tls.crt signed by the new CA", || async {
        (try_signer_of(&std::fs::read_to_string(&crt).ok()?)? == new_ski).then_some(())
    })
    .await;
    let crt_after = started.elapsed();
    eventually(T, "the pod's service-ca.crt trusting the new CA", || async {
        skis(&std::fs::read_to_string(&ca).ok()?).contains(&new_ski).then_some(())
    })
    .await;
    eprintln!("rotation → new tls.crt in the pod: {crt_after:?}; new service-ca.crt: {:?}", started.elapsed());

    // A hard reset: inspect lists exactly the Deployments whose pods started before it.
    env.op_secrets().delete("signing-key", &DeleteParams::default()).await.unwrap();
    let reset_ski = eventually(T, "a new CA", || async {
        let secret = env.op_secrets().get("signing-key").await.ok()?;
        secret.data.as_ref()?.get("tls.crt")?;
        let ski = ca_ski(&secret);
        (ski != new_ski).then_some(ski)
    })
    .await;
    assert_eq!(stale_deployments(&env).await, ["Deployment/client", "Deployment/web"]);
    // New pods must start in a later second than the re-issue, or inspect (whole
    // seconds, "when in doubt, restart") rightly lists them again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, out) = inspect(&env, &["--restart", "--yes"]);
    assert_eq!(code, 0, "every listed workload restarted:\n{out}");
    let started = Instant::now();
    let (web2, client2, other2) =
        (rolled_out(&env, "web").await, rolled_out(&env, "client").await, rolled_out(&env, "other").await);
    eprintln!("inspect --restart --yes → both Deployments rolled out, new pods Running: {:?}", started.elapsed());
    assert!(uid(&web2) != uid(&web) && uid(&client2) != uid(&client), "new pods");
    assert_eq!(uid(&other2), uid(&other), "the Deployment that mounts nothing was left alone");
    let crt2 = file(&node().volume_dir(&uid(&web2), "secret", "tls").join("tls.crt"), T).await;
    assert_eq!(signer_of(&crt2), reset_ski, "the new pod has the new CA's certificate");
    let (code, out) = inspect(&env, &[]);
    assert_eq!(code, 0, "nothing left to restart:\n{out}");
}

#[tokio::test]
async fn each_key_type_the_kubelet_generates_is_issued_or_refused_as_documented() {
    let w = World::new("kubelet-key-types", &[]).await;
    w.env.service_with("kt", &[], false).await;
    // docs/operations.md: ECDSA P-256/P-384, Ed25519, RSA-3072/4096 issued; P-521 denied.
    let issued = [
        ("RSA3072", "RSA-3072"),
        ("RSA4096", "RSA-4096"),
        ("ECDSAP256", "EC-256"),
        ("ECDSAP384", "EC-384"),
        ("ED25519", "Ed25519"),
    ];
    let started = Instant::now();
    let mut pods = Vec::new();
    for (key_type, _) in issued.iter().chain([&("ECDSAP521", "")]) {
        let name = format!("kt-{}", key_type.to_lowercase());
        pods.push(w.pod(&name, "kt", vec![w.cert_volume(key_type)]).await);
    }
    for ((key_type, kind), pod) in issued.iter().zip(&pods) {
        let bundle = file(&node().volume_dir(&uid(pod), "projected", "tls").join("credentials.pem"), T).await;
        let (key, chain) = split_bundle(&bundle);
        let (spki, got) = leaf_key(&chain);
        assert_eq!(&got, kind, "{key_type}");
        assert_eq!(public_key_of(&key), spki, "{key_type}: the leaf certifies the kubelet's key");
        eprintln!("{key_type}: files after {:?}", started.elapsed());
    }
    // P-521: denied, and the kubelet says so on the pod, which does not start.
    let refused = pods.last().unwrap();
    let name = refused.metadata.name.clone().unwrap();
    let event = eventually(T, "the kubelet's Warning on the P-521 pod", || async {
        w.env.events(&w.env.ns, Some(&name), None).await.into_iter().find(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.note.as_deref().unwrap_or_default().contains("UnsupportedKeyType")
        })
    })
    .await;
    eprintln!("P-521: {:?} {:?}", event.reason, event.note);
    let pod = Api::<Pod>::namespaced(w.env.client.clone(), &w.env.ns).get(&name).await.unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"), "a pod without its credentials does not start");
    assert!(!node().volume_dir(&uid(refused), "projected", "tls").join("credentials.pem").exists());
}
