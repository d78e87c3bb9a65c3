//! The whole envelope in one operator (issue 27): many namespaces, each with its
//! per-namespace bundle; Services with serving certificates spread over a tenth of them
//! (80 % ECDSA, 20 % the default RSA-2048); injected ConfigMaps; APIServices, CRDs and
//! webhook configurations; a burst of PodCertificateRequests for pods those Services
//! select. Shared by the bench (benches/scale/envelope.rs, `BENCH_ONLY=envelope`) and
//! its smoke in `make test` (tests/e2e/envelope.rs).
//!
//! Every object the operator writes is followed by a watch that records each
//! resourceVersion it saw (each one a write) and when each object first reached a
//! state (a fingerprint: the CA that signed a Secret, the bundle an object holds, a
//! request's answer), so a phase is timed by the last object to reach the expected
//! state and its writes are counted per object.

mod world;

pub use world::World;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Env, RUN_LABEL, certs, data, eventually};

/// The label that selects the run's namespaces for per-namespace bundles (value: the run).
pub const NS_LABEL: &str = "e2e.service-ca/envelope";
/// The label the operator puts on the per-namespace bundles (value: its namespace).
const BUNDLE_LABEL: &str = "service-ca.operators.openshift.io/namespace-bundle";
const BUNDLE_KEY: &str = "service-ca.crt";
const CONCURRENCY: usize = 32;

/// How many of each.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub namespaces: usize,
    /// The first this many namespaces hold the Services and ConfigMaps.
    pub service_namespaces: usize,
    pub services: usize,
    pub configmaps: usize,
    /// APIServices, CRDs, validating and mutating webhook configurations, in turn.
    pub cluster_objects: usize,
    pub pod_requests: usize,
    /// The first this many namespaces hold the pods (one Node each).
    pub pod_namespaces: usize,
}

impl Sizes {
    /// Services of the default key (RSA-2048): every fifth.
    pub fn rsa_services(&self) -> usize {
        self.services / 5
    }
}

/// A short fingerprint of some bytes (0 stands for "nothing yet").
pub fn fp(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish().max(1)
}

/// What a watch of one kind of object saw, per object (`namespace/name`).
#[derive(Default)]
pub struct Seen {
    versions: HashMap<String, HashSet<String>>,
    state: HashMap<String, u64>,
    first: HashMap<(String, u64), Instant>,
}

impl Seen {
    /// Writes seen so far, per object.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.versions.iter().map(|(k, v)| (k.clone(), v.len())).collect()
    }

    /// How many objects are in `state` now, and when the last of them first reached it.
    pub fn holding(&self, state: u64) -> (usize, Option<Instant>) {
        let now: Vec<&String> = self.state.iter().filter(|(_, s)| **s == state).map(|(k, _)| k).collect();
        let last = now.iter().filter_map(|k| self.first.get(&((*k).clone(), state))).max().copied();
        (now.len(), last)
    }
}

pub type Tracked = Arc<Mutex<Seen>>;

/// Writes since `mark` (from [`Seen::counts`]): in all, the most on one object, and
/// how many objects were written.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Writes {
    pub total: usize,
    pub max_per_object: usize,
    pub objects: usize,
}

pub fn writes_since(tracked: &Tracked, mark: &HashMap<String, usize>) -> Writes {
    let now = tracked.lock().unwrap().counts();
    let per: Vec<usize> =
        now.iter().map(|(k, n)| n.saturating_sub(mark.get(k).copied().unwrap_or(0))).filter(|n| *n > 0).collect();
    Writes { total: per.iter().sum(), max_per_object: per.iter().copied().max().unwrap_or(0), objects: per.len() }
}

/// Follows the objects of `api` that `config` selects into `into`; `state` gives each
/// object's fingerprint, or `None` for an object that is not the run's.
pub fn track_into<K, F>(into: &Tracked, api: Api<K>, config: watcher::Config, state: F)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(&K) -> Option<u64> + Send + 'static,
{
    track_versions(into, api, config, move |obj: &K| Some((state(obj)?, obj.resource_version()?)));
}

/// Like [`track_into`], with `state` giving the version too (a write is a new one).
fn track_versions<K, F>(into: &Tracked, api: Api<K>, config: watcher::Config, state: F)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(&K) -> Option<(u64, String)> + Send + 'static,
{
    let out = into.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(next) = stream.next().await {
            let Ok(obj) = next else { continue };
            let Some((s, version)) = state(&obj) else { continue };
            let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
            let mut seen = out.lock().unwrap();
            seen.versions.entry(key.clone()).or_default().insert(version);
            seen.state.insert(key.clone(), s);
            seen.first.entry((key, s)).or_insert_with(Instant::now);
        }
    });
}

/// The watches of one run: serving Secrets (state: the signer's key id), Services
/// (writes only), injected ConfigMaps and cluster objects (the bundle they hold),
/// per-namespace bundles, pod requests (1 issued, 2 another answer).
pub struct Watches {
    pub secrets: Tracked,
    pub services: Tracked,
    pub configmaps: Tracked,
    pub cluster: Tracked,
    pub bundles: Tracked,
    pub requests: Tracked,
}

/// The expected state of each kind: the CA's key id, the bundle (as text, and as the
/// base64 a cluster object holds).
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    pub ski: u64,
    pub bundle: u64,
    pub bundle_b64: u64,
    pub bundle_text: String,
}

impl Expected {
    /// The CA and bundle the operator publishes now (waits for both to exist).
    pub async fn now(env: &Env) -> Expected {
        let bundle_text = env.ca_bundle().await;
        let ski = eventually(Duration::from_secs(60), "signing-key", || async {
            Some(certs::ca_ski(&env.op_secrets().get_opt("signing-key").await.ok()??))
        })
        .await;
        let b64 = serde_json::to_value(ByteString(bundle_text.clone().into_bytes())).unwrap();
        Expected {
            ski: fp(&ski),
            bundle: fp(bundle_text.as_bytes()),
            bundle_b64: fp(b64.as_str().unwrap_or_default().as_bytes()),
            bundle_text,
        }
    }

    /// Once both the CA and the bundle differ from `old`'s.
    pub async fn changed_from(env: &Env, old: &Expected) -> Expected {
        eventually(Duration::from_secs(120), "a new CA and bundle", || async {
            let now = Expected::now(env).await;
            (now.ski != old.ski && now.bundle != old.bundle).then_some(now)
        })
        .await
    }
}

/// Every `caBundle` in a JSON object, joined.
fn ca_bundles(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("caBundle", Value::String(s)) => out.push(s.clone()),
                    _ => ca_bundles(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| ca_bundles(v, out)),
        _ => {}
    }
}

/// A cluster object's state: the fingerprint of its caBundle if every field holds the
/// same one, else 0; and its version: a fingerprint of all but its status (CRDs and
/// APIServices have their status written by the API server itself, which is no write
/// of the operator's). A change of managedFields alone is a write.
fn cluster_state<K: serde::Serialize>(obj: &K) -> Option<(u64, String)> {
    let mut value = serde_json::to_value(obj).ok()?;
    let mut found = Vec::new();
    ca_bundles(&value, &mut found);
    let state = match found.first() {
        Some(first) if found.iter().all(|f| f == first) => fp(first.as_bytes()),
        _ => 0,
    };
    let object = value.as_object_mut()?;
    object.remove("status");
    let meta = object.get_mut("metadata")?.as_object_mut()?;
    for noise in ["resourceVersion", "generation"] {
        meta.remove(noise);
    }
    // Entries for the status (with their times) are the API server's.
    if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
        entries.retain(|e| e.get("subresource").is_none_or(|s| s.as_str().unwrap_or_default().is_empty()));
    }
    Some((state, format!("{:x}", fp(value.to_string().as_bytes()))))
}

fn request_state(r: &PodCertificateRequest) -> u64 {
    let conditions = r.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    match conditions.first() {
        None => 0,
        Some(c) if c.type_ == "Issued" => 1,
        Some(_) => 2,
    }
}

/// The prefix of the run's namespaces.
pub fn prefix(run: &str) -> String {
    format!("{run}-n")
}

fn ours(prefix: &str, namespace: Option<String>) -> bool {
    namespace.is_some_and(|ns| ns.starts_with(prefix))
}

impl Watches {
    /// Starts the watches for `env`'s run (the cluster objects of every kind into one).
    pub fn start(env: &Env) -> Watches {
        let (client, run) = (&env.client, &env.run);
        let by_run = || watcher::Config::default().labels(&format!("{RUN_LABEL}={run}"));
        let w = Watches {
            secrets: Tracked::default(),
            services: Tracked::default(),
            configmaps: Tracked::default(),
            cluster: Tracked::default(),
            bundles: Tracked::default(),
            requests: Tracked::default(),
        };
        let p = prefix(run);
        let (p1, p2, p3) = (p.clone(), p.clone(), p.clone());
        track_into(&w.secrets, Api::<Secret>::all(client.clone()), watcher::Config::default().labels(MANAGED_TRUE), {
            move |s: &Secret| {
                let signer = certs::try_signer_of(&data(s, "tls.crt"));
                ours(&p1, s.namespace()).then(|| signer.map_or(0, |k| fp(&k)))
            }
        });
        track_into(&w.services, Api::<Service>::all(client.clone()), by_run(), move |s: &Service| {
            ours(&p2, s.namespace()).then_some(1)
        });
        track_into(&w.configmaps, Api::<ConfigMap>::all(client.clone()), by_run(), configmap_state);
        let bundles = watcher::Config::default().labels(&format!("{BUNDLE_LABEL}={}", env.op_ns));
        track_into(&w.bundles, Api::<ConfigMap>::all(client.clone()), bundles, move |c: &ConfigMap| {
            ours(&p3, c.namespace()).then(|| configmap_state(c).unwrap_or(0))
        });
        track_cluster(&w.cluster, client, by_run);
        track_into(&w.requests, Api::<PodCertificateRequest>::all(client.clone()), watcher::Config::default(), {
            move |r: &PodCertificateRequest| ours(&p, r.namespace()).then(|| request_state(r))
        });
        w
    }

    /// Every watch with its name, in report order.
    pub fn all(&self) -> [(&'static str, &Tracked); 6] {
        [
            ("Secrets", &self.secrets),
            ("Services", &self.services),
            ("injected ConfigMaps", &self.configmaps),
            ("APIServices, CRDs, webhooks", &self.cluster),
            ("namespace bundles", &self.bundles),
            ("pod requests", &self.requests),
        ]
    }

    /// The write counts of every watch now, to count a phase's writes from.
    pub fn mark(&self) -> Vec<HashMap<String, usize>> {
        self.all().iter().map(|(_, t)| t.lock().unwrap().counts()).collect()
    }

    /// The writes of each watch since `mark`, with its name.
    pub fn writes(&self, mark: &[HashMap<String, usize>]) -> Vec<(&'static str, Writes)> {
        self.all().iter().zip(mark).map(|((name, t), m)| (*name, writes_since(t, m))).collect()
    }

    /// Waits until every object of the run holds what `expected` says (`sizes` of each);
    /// when the last one first did.
    pub async fn all_current(&self, sizes: &Sizes, expected: &Expected, timeout: Duration) -> Instant {
        let want = [
            ("Secrets", &self.secrets, expected.ski, sizes.services),
            ("injected ConfigMaps", &self.configmaps, expected.bundle, sizes.configmaps),
            ("APIServices, CRDs, webhooks", &self.cluster, expected.bundle_b64, sizes.cluster_objects),
            ("namespace bundles", &self.bundles, expected.bundle, sizes.namespaces),
        ];
        let mut last = None;
        for (name, tracked, state, n) in want {
            let at = eventually(timeout, &format!("{n} {name} current"), || {
                let (holding, at) = tracked.lock().unwrap().holding(state);
                async move { (holding >= n).then_some(at).flatten() }
            })
            .await;
            last = last.max(Some(at));
        }
        last.unwrap()
    }

    /// [`Self::all_current`] from `since`, then every serving Secret of `world` checked
    /// against `expected`'s bundle: (how long it took, Secrets checked, invalid ones).
    pub async fn all_current_checked(
        &self,
        world: &World,
        client: &Client,
        expected: &Expected,
        timeout: Duration,
        since: Instant,
    ) -> (Duration, usize, usize) {
        let last = self.all_current(&world.sizes, expected, timeout).await;
        let (checked, invalid) = world.invalid_secrets(client, &expected.bundle_text).await;
        (last.saturating_duration_since(since), checked, invalid)
    }

    /// Waits until `n` pod requests are answered; (issued, when the last was answered).
    pub async fn requests_answered(&self, n: usize, timeout: Duration) -> (usize, Instant) {
        eventually(timeout, &format!("{n} pod requests answered"), || {
            let seen = self.requests.lock().unwrap();
            let (issued, at_issued) = seen.holding(1);
            let (other, at_other) = seen.holding(2);
            let last = at_issued.max(at_other);
            async move { (issued + other >= n).then_some(last.map(|at| (issued, at))).flatten() }
        })
        .await
    }
}

const MANAGED_TRUE: &str = "service-ca.operators.openshift.io/managed=true";

fn configmap_state(c: &ConfigMap) -> Option<u64> {
    Some(c.data.as_ref().and_then(|d| d.get(BUNDLE_KEY)).map_or(0, |b| fp(b.as_bytes())))
}

fn track_cluster(into: &Tracked, client: &Client, by_run: impl Fn() -> watcher::Config) {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration as Mutating, ValidatingWebhookConfiguration as Validating,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition as Crd;
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    track_versions(into, Api::<APIService>::all(client.clone()), by_run(), cluster_state::<APIService>);
    track_versions(into, Api::<Crd>::all(client.clone()), by_run(), cluster_state::<Crd>);
    track_versions(into, Api::<Validating>::all(client.clone()), by_run(), cluster_state::<Validating>);
    track_versions(into, Api::<Mutating>::all(client.clone()), by_run(), cluster_state::<Mutating>);
}

impl Watches {
    /// Waits until the watches have listed what the run created before the operator
    /// started (so that a phase's writes are the operator's).
    pub async fn listed(&self, sizes: &Sizes) {
        let want = [
            (&self.services, sizes.services),
            (&self.configmaps, sizes.configmaps),
            (&self.cluster, sizes.cluster_objects),
        ];
        for (tracked, n) in want {
            eventually(Duration::from_secs(300), "the watches' first lists", || {
                let listed = tracked.lock().unwrap().versions.len();
                async move { (listed >= n).then_some(()) }
            })
            .await;
        }
    }
}

/// Whether the operator's reconcile counters (its `/metrics` page) show every object
/// of `sizes` looked at once: each Service by serving-cert and cert-refresh, each
/// injected object by ca-bundle, each namespace by namespace-bundle.
pub fn looked_at(page: &str, sizes: &Sizes) -> bool {
    let count = |c: &str| super::metric(page, &format!("service_ca_reconcile_total{{controller=\"{c}\""));
    let want = [
        ("serving-cert", sizes.services),
        ("cert-refresh", sizes.services),
        ("ca-bundle", sizes.configmaps + sizes.cluster_objects),
        ("namespace-bundle", sizes.namespaces),
    ];
    want.iter().all(|(c, n)| count(c) >= *n as f64)
}

/// Series on a `/metrics` page (sample lines).
pub fn series(page: &str) -> usize {
    page.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count()
}

/// The world of `sizes` created with its pods, and the watches over it once they have
/// listed it all: (world, watches, time to create the objects, time to create the pods).
pub async fn set_up(env: &Env, sizes: Sizes, delete_namespaces: bool) -> (World, Watches, Duration, Duration) {
    let (mut world, created) = World::create(env, sizes, delete_namespaces).await;
    let pods = world.pods(env).await;
    let watches = Watches::start(env);
    watches.listed(&sizes).await;
    (world, watches, created, pods)
}
