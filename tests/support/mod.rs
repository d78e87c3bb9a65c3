//! Support for end-to-end tests against the real control plane
//! (tests/controlplane): one control plane per `make test` run (or per test process
//! when run with plain `cargo test`), a fresh namespace per test, and the real
//! operator binary started as a child process.

#![allow(dead_code)]

pub mod annotations;
pub mod certs;
mod controlplane;
pub mod envelope;
pub mod node;
pub mod objects;
mod operator;
pub mod pods;
pub mod steps;
pub mod tls;

pub use controlplane::*;
pub use operator::*;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

/// Label that scopes a test's objects to the operator instance of that test.
pub const RUN_LABEL: &str = "e2e.service-ca/run";

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    let mut name = format!("{prefix}-{pid}-{n}").to_lowercase().replace('_', "-");
    name.truncate(50);
    name.trim_end_matches('-').to_string()
}

/// Milliseconds per RSA-2048 key, one thread, on the machine the tests' timeouts were
/// set on (2 shared cores, 2026-11).
const REFERENCE_MS_PER_RSA_KEY: f64 = 45.0;

/// How much longer waits may take on this machine than on the reference one: RSA key
/// generation bounds most of them, and it runs 2-3x slower on some CI machines with the
/// same core count. Measured once per test process (RSA-2048 keys for about a second;
/// the figure shows in a failing test's output and in the perf smoke's line), between 1
/// and 8; `SERVICE_CA_TEST_TIME_SCALE` sets it instead.
pub fn time_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| {
        if let Some(scale) = std::env::var("SERVICE_CA_TEST_TIME_SCALE").ok().and_then(|v| v.parse::<f64>().ok()) {
            return scale.max(1.0);
        }
        let started = Instant::now();
        let mut keys = 0u32;
        while keys < 2 || started.elapsed() < Duration::from_secs(1) {
            service_ca_operator::pki::PrivateKey::generate_rsa(2048).expect("RSA key");
            keys += 1;
        }
        let ms_per_key = started.elapsed().as_secs_f64() * 1000.0 / f64::from(keys);
        let scale = (ms_per_key / REFERENCE_MS_PER_RSA_KEY).clamp(1.0, 8.0);
        eprintln!("this machine: {ms_per_key:.0} ms per RSA-2048 key; waits get {scale:.1}x their timeouts");
        scale
    })
}

/// How long a test step usually waits ([`eventually`] stretches it by [`time_scale`]).
pub const T: Duration = Duration::from_secs(30);

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` (times
/// [`time_scale`]) saying what was awaited.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let timeout = timeout.mul_f64(time_scale());
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One test's world: a namespace for its objects, a namespace for its operator, and
/// the label that makes its operator see only its objects.
pub struct Env {
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub ns: String,
    pub op_ns: String,
    pub run: String,
    pub name: String,
}

impl Env {
    pub async fn new(test: &str) -> Env {
        Self::on(test, kubeconfig_path()).await
    }

    /// A test world on another control plane.
    pub async fn on(test: &str, kubeconfig: &Path) -> Env {
        let client = client_for(kubeconfig).await;
        let ns = unique(test);
        let op_ns = format!("{ns}-op");
        let env =
            Env { client, kubeconfig: kubeconfig.to_path_buf(), run: ns.clone(), ns, op_ns, name: test.to_string() };
        for name in [&env.ns, &env.op_ns] {
            create_namespace(&env.client, name).await;
        }
        env
    }

    /// Labels that put an object under this test's operator.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(RUN_LABEL.to_string(), self.run.clone())])
    }

    pub fn meta(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(self.ns.clone()),
            labels: Some(self.labels()),
            ..Default::default()
        }
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn op_secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.op_ns)
    }
    pub fn op_configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.op_ns)
    }

    /// The standard operator arguments for this test.
    pub fn operator_args(&self) -> Vec<String> {
        vec![
            "--namespace".into(),
            self.op_ns.clone(),
            "--selector".into(),
            format!("{RUN_LABEL}={}", self.run),
            "--leader-elect=false".into(),
            // Per-namespace bundles reach every namespace of the shared cluster: off
            // unless a test narrows them to its own namespaces (tests/e2e/trust.rs).
            "--namespace-bundles=false".into(),
        ]
    }

    /// The standard arguments, with leader election (lease `lease`) in place of
    /// `--leader-elect=false`, then `extra`.
    pub fn leader_elect_args(&self, lease: &str, extra: &[&str]) -> Vec<String> {
        let mut args = self.operator_args();
        args.retain(|a| a != "--leader-elect=false");
        args.extend(
            ["--leader-elect=true", "--lease-duration", lease]
                .into_iter()
                .chain(extra.iter().copied())
                .map(String::from),
        );
        args
    }

    pub fn start_operator(&self, extra: &[&str]) -> Operator {
        let mut args = self.operator_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        Operator::start_with_kubeconfig(&self.name, &args, &self.kubeconfig)
    }

    /// Creates a ClusterIP (or headless) Service with the serving-cert annotation.
    pub async fn annotated_service(&self, name: &str, secret: &str, headless: bool) -> Service {
        self.service_with(name, &[("service.beta.openshift.io/serving-cert-secret-name", secret)], headless).await
    }

    /// Creates Services `s0` … `s{n-1}` at once, each asking for Secret `s{i}-tls`.
    pub async fn annotated_services(&self, n: usize) {
        let each =
            (0..n).map(|i| async move { self.annotated_service(&format!("s{i}"), &format!("s{i}-tls"), false).await });
        futures::future::join_all(each).await;
    }

    pub async fn service_with(&self, name: &str, annotations: &[(&str, &str)], headless: bool) -> Service {
        let mut svc: Service = serde_json::from_value(json!({
            "spec": { "ports": [{ "port": 443, "targetPort": 8443 }], "selector": { "app": name } }
        }))
        .unwrap();
        svc.metadata = self.meta(name);
        svc.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        if headless {
            svc.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        }
        self.services().create(&PostParams::default(), &svc).await.expect("create Service")
    }

    /// Waits for a serving Secret that carries a certificate signed by the current CA
    /// (its `expiry` annotation present).
    pub async fn serving_secret(&self, name: &str, timeout: Duration) -> Secret {
        let api = self.secrets();
        eventually(timeout, &format!("Secret {}/{name}", self.ns), || {
            let api = api.clone();
            async move {
                api.get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("tls.crt")))
            }
        })
        .await
    }

    /// The bundle currently in `signing-cabundle` (`ca-bundle.crt`). Waits (up to
    /// 30 s) only until the operator has first written it; once it is there this is
    /// a single read, so it also serves to follow the bundle through rotations.
    pub async fn ca_bundle(&self) -> String {
        let api = self.op_configmaps();
        eventually(Duration::from_secs(30), "signing-cabundle", || {
            let api = api.clone();
            async move { api.get_opt("signing-cabundle").await.ok().flatten()?.data?.remove("ca-bundle.crt") }
        })
        .await
    }

    /// Waits for the Warning Event about `regarding` in `namespace`, and checks it is the
    /// only one and was sent once (a repeat would be counted in its series).
    pub async fn the_one_warning(&self, namespace: &str, regarding: &str) -> Event {
        eventually(Duration::from_secs(30), &format!("a Warning Event on {regarding}"), || async {
            self.events(namespace, Some(regarding), None)
                .await
                .into_iter()
                .find(|e| e.type_.as_deref() == Some("Warning"))
        })
        .await;
        let warnings: Vec<Event> = self
            .events(namespace, Some(regarding), None)
            .await
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].series.is_none(), "the Warning was sent again: {:?}", warnings[0].series);
        warnings.into_iter().next().unwrap()
    }

    /// The Events (events.k8s.io/v1) in `namespace`, optionally only those about the
    /// object named `regarding` and/or with reason `reason`, in the API server's order.
    pub async fn events(&self, namespace: &str, regarding: Option<&str>, reason: Option<&str>) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| regarding.is_none_or(|name| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)))
            .filter(|e| reason.is_none_or(|reason| e.reason.as_deref() == Some(reason)))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let names = [self.ns.clone(), self.op_ns.clone()];
        // The ClusterTrustBundle an operator with the default pod signer published
        // (cluster-scoped: the namespaces do not take it with them).
        let bundle =
            service_ca_operator::names::trust_bundle_name(service_ca_operator::names::POD_SIGNER_NAME, &self.op_ns);
        let kubeconfig = self.kubeconfig.clone();
        // Delete in the background (namespace deletion is asynchronous anyway).
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let client = client_for(&kubeconfig).await;
                let api: Api<Namespace> = Api::all(client.clone());
                for name in names {
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
                let bundles: Api<k8s_openapi::api::certificates::v1::ClusterTrustBundle> = Api::all(client);
                let _ = bundles.delete(&bundle, &DeleteParams::background()).await;
            });
        })
        .join();
    }
}

pub async fn create_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    api.create(&PostParams::default(), &ns).await.expect("create namespace");
}

/// Minimal HTTP/1.1 GET over a plain TCP connection (the admin server).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host)).await.ok()?.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Decoded Secret data entry.
pub fn data(secret: &Secret, key: &str) -> String {
    secret.data.as_ref().and_then(|d| d.get(key)).map(|v| String::from_utf8_lossy(&v.0).to_string()).unwrap_or_default()
}

pub fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The sum of every series of a metric in a Prometheus text page whose line starts
/// with `series` (a name, optionally with the start of its labels, e.g.
/// `service_ca_api_writes_total{resource="services"`).
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(series) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Deletes cluster-scoped test objects when dropped (an unavailable APIService left
/// behind would stall namespace deletion for every other test).
#[derive(Default)]
pub struct Cleanup(Vec<Box<dyn FnOnce() + Send>>);

impl Cleanup {
    pub fn add<K>(&mut self, name: String)
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        self.0.push(Box::new(move || {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let api: Api<K> = Api::all(client().await);
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                });
            })
            .join();
        }));
    }
}

impl Cleanup {
    /// Deletes the object added last, now.
    pub fn now_the_last(&mut self) {
        if let Some(delete) = self.0.pop() {
            delete();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in self.0.drain(..) {
            f();
        }
    }
}
