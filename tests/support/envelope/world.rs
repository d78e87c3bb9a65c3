//! The envelope's objects: namespaces, Services, ConfigMaps, cluster objects, pods and
//! their requests; the operator's arguments for them; the check that every serving
//! Secret verifies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::super::annotations::{BETA_ALG, BETA_NAME, INJECT};
use super::super::objects::{apiservice_json, crd_json, webhook_json};
use super::super::pods::{Kubelet, bundle_name, key_and_stub};
use super::super::{Cleanup, Env, RUN_LABEL, client, data, tls};
use super::{CONCURRENCY, MANAGED_TRUE, NS_LABEL, Sizes, prefix};

/// The run's objects (its namespaces are deleted with it unless the bench keeps them).
pub struct World {
    pub sizes: Sizes,
    run: String,
    pub signer: String,
    pub namespaces: Vec<String>,
    kubelets: Vec<Kubelet>,
    /// Pods made before the burst: (kubelet, pod, stub request).
    pods: Vec<(usize, Pod, Vec<u8>)>,
    delete_namespaces: bool,
    _cleanup: Cleanup,
}

/// Creates `items` (namespace, JSON) in the API `api` gives for the namespace,
/// [`CONCURRENCY`] at a time.
async fn create_all<K>(api: impl Fn(&str) -> Api<K>, items: Vec<(String, Value)>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let api = &api;
    futures::stream::iter(items)
        .map(|(ns, value)| async move {
            let obj: K = serde_json::from_value(value).unwrap();
            api(&ns)
                .create(&PostParams::default(), &obj)
                .await
                .unwrap_or_else(|e| panic!("create {}: {e}", K::kind(&())));
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

impl World {
    /// Creates the namespaces, Services, ConfigMaps and cluster objects of `sizes` (no
    /// operator runs yet); how long that took.
    pub async fn create(env: &Env, sizes: Sizes, delete_namespaces: bool) -> (World, Duration) {
        assert!(sizes.services >= sizes.service_namespaces && sizes.service_namespaces >= sizes.pod_namespaces);
        let started = Instant::now();
        let run = env.run.clone();
        let signer = format!("e2e.service-ca.test/{run}");
        let mut cleanup = Cleanup::default();
        cleanup.add::<ClusterTrustBundle>(bundle_name(&signer, &env.op_ns));
        let namespaces: Vec<String> = (0..sizes.namespaces).map(|i| format!("{}{i}", prefix(&run))).collect();
        let mut world = World {
            sizes,
            run: run.clone(),
            signer,
            namespaces,
            kubelets: Vec::new(),
            pods: Vec::new(),
            delete_namespaces,
            _cleanup: cleanup,
        };
        let c = &env.client;
        let labelled =
            |name: &String| (String::new(), json!({ "metadata": { "name": name, "labels": { NS_LABEL: run } } }));
        create_all::<Namespace>(|_| Api::all(c.clone()), world.namespaces.iter().map(labelled).collect()).await;
        let services = (0..sizes.services).map(|i| world.service(&run, i)).collect();
        create_all::<Service>(|ns| Api::namespaced(c.clone(), ns), services).await;
        let configmaps = (0..sizes.configmaps).map(|i| world.configmap(&run, i)).collect();
        create_all::<ConfigMap>(|ns| Api::namespaced(c.clone(), ns), configmaps).await;
        world.cluster_objects(env).await;
        (world, started.elapsed())
    }

    fn home(&self, i: usize) -> String {
        self.namespaces[i % self.sizes.service_namespaces].clone()
    }

    /// Service `s<i>` (Secret `s<i>-tls`, selecting `app: s<i>`): ECDSA but every fifth.
    fn service(&self, run: &str, i: usize) -> (String, Value) {
        let mut annotations = BTreeMap::from([(BETA_NAME, format!("s{i}-tls"))]);
        if i % 5 != 4 {
            annotations.insert(BETA_ALG, "ecdsa".into());
        }
        let ns = self.home(i);
        let value = json!({
            "metadata": { "name": format!("s{i}"), "namespace": ns, "labels": { RUN_LABEL: run }, "annotations": annotations },
            "spec": { "ports": [{ "port": 443, "targetPort": 8443 }], "selector": { "app": format!("s{i}") } }
        });
        (ns, value)
    }

    fn configmap(&self, run: &str, i: usize) -> (String, Value) {
        let ns = self.home(i);
        let value = json!({ "metadata": { "name": format!("c{i}"), "namespace": ns, "labels": { RUN_LABEL: run },
                                          "annotations": { INJECT: "true" } } });
        (ns, value)
    }

    /// APIServices, CRDs, validating and mutating webhook configurations in turn, each
    /// asking for the bundle, deleted with the world.
    async fn cluster_objects(&mut self, env: &Env) {
        let mut kinds: [Vec<(String, Value)>; 4] = Default::default();
        for i in 0..self.sizes.cluster_objects {
            let suffix = format!("{}-o{i}", env.run);
            let mut value = match i % 4 {
                0 => apiservice_json(&suffix),
                1 => crd_json(&suffix),
                2 => webhook_json("ValidatingWebhookConfiguration", &suffix, &["a", "b"]),
                _ => webhook_json("MutatingWebhookConfiguration", &suffix, &["a"]),
            };
            value["metadata"]["labels"] = json!({ RUN_LABEL: env.run });
            value["metadata"]["annotations"] = json!({ INJECT: "true" });
            let name = value["metadata"]["name"].as_str().unwrap_or_default().to_string();
            match i % 4 {
                0 => self._cleanup.add::<APIService>(name),
                1 => self._cleanup.add::<CustomResourceDefinition>(name),
                2 => self._cleanup.add::<ValidatingWebhookConfiguration>(name),
                _ => self._cleanup.add::<MutatingWebhookConfiguration>(name),
            }
            kinds[i % 4].push((String::new(), value));
        }
        let [apis, crds, validating, mutating] = kinds;
        let c = &env.client;
        create_all::<APIService>(|_| Api::all(c.clone()), apis).await;
        create_all::<CustomResourceDefinition>(|_| Api::all(c.clone()), crds).await;
        create_all::<ValidatingWebhookConfiguration>(|_| Api::all(c.clone()), validating).await;
        create_all::<MutatingWebhookConfiguration>(|_| Api::all(c.clone()), mutating).await;
    }

    /// The operator's arguments: the run's selector, its own pod signer, per-namespace
    /// bundles for the run's namespaces; then `extra`.
    pub fn operator_args(&self, env: &Env, extra: &[&str]) -> Vec<String> {
        let mut args = env.operator_args();
        args.retain(|a| a != "--namespace-bundles=false");
        args.extend(["--namespace-bundle-selector".into(), format!("{NS_LABEL}={}", env.run)]);
        args.extend(["--pod-signer-name".into(), self.signer.clone()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Nodes, and pods each selected by a Service of its namespace, with their stub
    /// requests: everything of the burst but the requests; how long that took.
    pub async fn pods(&mut self, env: &Env) -> Duration {
        let started = Instant::now();
        let n = self.sizes.pod_namespaces;
        for ns in &self.namespaces[..n] {
            self.kubelets.push(Kubelet::in_namespace(env, &self.signer, ns).await);
        }
        let sn = self.sizes.service_namespaces;
        let kubelets = &self.kubelets;
        let services = self.sizes.services;
        self.pods = futures::stream::iter(0..self.sizes.pod_requests)
            .map(|j| async move {
                let k = j % n;
                // The Services of namespace k are s<k>, s<k + sn>, …
                let in_ns = services.saturating_sub(k).div_ceil(sn).max(1);
                let app = format!("s{}", k + sn * ((j / n) % in_ns));
                let pod = kubelets[k].pod(&format!("p{j}"), &app, None).await;
                let (_, stub) = key_and_stub(&rcgen::PKCS_ECDSA_P256_SHA256);
                (k, pod, stub)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        started.elapsed()
    }

    /// The burst: a request for every pod, as its node; how long creating them took.
    pub async fn burst(&self) -> Duration {
        let started = Instant::now();
        futures::stream::iter(&self.pods)
            .map(|(k, pod, stub)| async move {
                let name = pod.name_any();
                self.kubelets[*k].request(&name, &self.signer, pod, stub.clone(), None).await;
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
        started.elapsed()
    }

    /// (serving Secrets of the run, those whose chain does not verify against `bundle`
    /// for their Service's name); a paged list, outside any timing.
    pub async fn invalid_secrets(&self, client: &Client, bundle: &str) -> (usize, usize) {
        let api: Api<Secret> = Api::all(client.clone());
        let mut params = ListParams::default().labels(MANAGED_TRUE).limit(500);
        let p = prefix(&self.run);
        let (mut checked, mut invalid) = (0, 0);
        loop {
            let page = api.list(&params).await.unwrap();
            for s in page.items.iter().filter(|s| s.namespace().is_some_and(|ns| ns.starts_with(&p))) {
                let name =
                    format!("{}.{}.svc", s.name_any().trim_end_matches("-tls"), s.namespace().unwrap_or_default());
                checked += 1;
                if tls::rustls_verify_at(&data(s, "tls.crt"), bundle, &name, SystemTime::now()).is_err() {
                    invalid += 1;
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return (checked, invalid),
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !self.delete_namespaces {
            return;
        }
        let names = std::mem::take(&mut self.namespaces);
        // A client of its own: the test's belongs to the runtime this drop blocks.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let api: Api<Namespace> = Api::all(client().await);
                for name in names {
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
            });
        })
        .join();
    }
}
