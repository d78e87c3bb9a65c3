//! `service-ca-operator inspect` (also `kubectl service-ca inspect` when the binary is
//! installed as `kubectl-service_ca`): reads the cluster with the user's kubeconfig and
//! reports the CA, every serving certificate, every injected bundle and the workloads
//! that run with replaced material; `--restart` rolls those workloads.
//!
//! [`assess`] is the pure part (objects in, report out); this module only lists
//! objects, prints, and patches.

pub mod assess;
pub mod ca_key;
pub mod model;
mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use time::OffsetDateTime;

use crate::config::{InspectArgs, Output};
use crate::controllers::ca_bundle::{Mode, Target, mode};
use crate::names::{self as ann};
use model::{CaSecret, InjectedObj, Kind, PodObj, Policy, SecretObj, ServiceObj, Snapshot};

pub use model::exit;

/// What `kubectl rollout restart` sets on the pod template.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// Field manager of `inspect --restart`'s patches.
const RESTART_MANAGER: &str = "service-ca-inspect";

impl InspectArgs {
    fn policy(&self) -> Policy {
        Policy { ca_rotate_before: self.policy.ca_rotate_before, leaf: self.policy.leaf_policy(String::new()) }
    }
}

/// Runs `inspect` and returns its exit status (see [`exit`]).
pub async fn run(args: InspectArgs) -> u8 {
    match inspect(&args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("inspect: {e:#}");
            exit::FAILED
        }
    }
}

async fn inspect(args: &InspectArgs) -> anyhow::Result<u8> {
    if let Err(e) = crate::selector::parse_selector(&args.selector) {
        anyhow::bail!("-l {:?}: {e}", args.selector);
    }
    // The operator's token flags, if given: the CA key is checked in the token.
    let token = args.pkcs11.open(None, Box::new(|_| {})).map_err(anyhow::Error::msg)?;
    let client = client(args).await?;
    let mut snapshot = read(&client, args).await?;
    let now = OffsetDateTime::now_utc();
    if let (Some(token), Some(ca)) = (&token, &snapshot.ca) {
        let loaded = crate::pki::CertificateAuthority::load(&ca.data, now, Some(token));
        snapshot.token_check = Some(loaded.map(|_| ()).map_err(|e| e.to_string()));
    }
    let report = assess::assess(&snapshot, &args.policy(), now);
    let text = match args.output {
        Output::Json => serde_json::to_string_pretty(&report)? + "\n",
        Output::Table => render::table(&report),
    };
    // A closed pipe (`inspect | head`) is not an error worth a panic.
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(report.exit_code()),
        other => other?,
    }
    let mut code = report.exit_code();
    if args.restart {
        let restartable: Vec<&model::WorkloadRow> = report.workloads.iter().filter(|w| w.restartable).collect();
        for w in report.workloads.iter().filter(|w| !w.restartable) {
            eprintln!(
                "cannot restart {} {}/{} (not a Deployment, StatefulSet or DaemonSet): delete its pods {:?} by hand",
                w.kind, w.namespace, w.name, w.pods
            );
        }
        if restartable.is_empty() {
            eprintln!("nothing to restart");
        } else if args.yes || confirm(restartable.len())? {
            for w in &restartable {
                restart(&client, w).await?;
                eprintln!("restarted {} {}/{}", w.kind, w.namespace, w.name);
            }
            if code == exit::RESTART_NEEDED && restartable.len() == report.workloads.len() {
                code = exit::OK;
            }
        } else {
            for w in &restartable {
                eprintln!("would restart {} {}/{} (dry run; --yes to act)", w.kind, w.namespace, w.name);
            }
        }
    }
    Ok(code)
}

/// Asks on the terminal; `false` (dry run) when stdin is not one.
fn confirm(n: usize) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("restart {n} workload(s)? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

async fn restart(client: &Client, w: &model::WorkloadRow) -> anyhow::Result<()> {
    let now = crate::pki::format_expiry(OffsetDateTime::now_utc());
    let patch = json!({ "spec": { "template": { "metadata": { "annotations": { RESTARTED_AT: now } } } } });
    let params = PatchParams { field_manager: Some(RESTART_MANAGER.into()), ..Default::default() };
    let ns = &w.namespace;
    match w.kind.as_str() {
        "Deployment" => {
            Api::<Deployment>::namespaced(client.clone(), ns).patch(&w.name, &params, &Patch::Merge(&patch)).await?;
        }
        "StatefulSet" => {
            Api::<StatefulSet>::namespaced(client.clone(), ns).patch(&w.name, &params, &Patch::Merge(&patch)).await?;
        }
        "DaemonSet" => {
            Api::<DaemonSet>::namespaced(client.clone(), ns).patch(&w.name, &params, &Patch::Merge(&patch)).await?;
        }
        other => anyhow::bail!("cannot restart a {other}"),
    }
    Ok(())
}

async fn client(args: &InspectArgs) -> anyhow::Result<Client> {
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let config = match &args.kubeconfig {
        Some(path) => Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?,
        None if args.context.is_some() => Config::from_kubeconfig(&options).await?,
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn annotations(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.annotations.clone().unwrap_or_default()
}

fn controller(owners: Option<&Vec<OwnerReference>>) -> Option<(String, String)> {
    owners?.iter().find(|o| o.controller == Some(true)).map(|o| (o.kind.clone(), o.name.clone()))
}

/// How the object asks for the bundle: the operator's own rule (`ca_bundle::mode`).
fn injection<K: Target>(meta: &ObjectMeta) -> Option<Mode> {
    mode::<K>(meta).0
}

/// When the operator's field manager last wrote the object.
fn operator_write_time(meta: &ObjectMeta) -> Option<OffsetDateTime> {
    meta.managed_fields
        .as_ref()?
        .iter()
        .filter(|m| m.manager.as_deref() == Some(ann::FIELD_MANAGER))
        .filter_map(|m| m.time.as_ref())
        .map(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).unwrap_or(OffsetDateTime::UNIX_EPOCH))
        .max()
}

/// Everything `inspect` looks at, read in named steps.
async fn read(client: &Client, args: &InspectArgs) -> anyhow::Result<Snapshot> {
    let ns = args.namespace.as_deref();
    let labels = ListParams::default().labels(&args.selector);
    let mut snapshot = Snapshot { include_orphans: args.selector.is_empty(), ..Default::default() };
    read_ca(client, &args.operator_namespace, &mut snapshot).await?;
    read_serving(client, ns, &labels, &mut snapshot).await?;
    read_config_maps(client, ns, &labels, &mut snapshot).await?;
    if ns.is_none() {
        read_cluster_injected(client, &labels, &mut snapshot).await?;
    }
    read_pods(client, ns, &mut snapshot).await?;
    read_replica_set_owners(client, ns, &mut snapshot).await?;
    Ok(snapshot)
}

/// `signing-key` and `signing-cabundle` in the operator's namespace.
async fn read_ca(client: &Client, operator_namespace: &str, snapshot: &mut Snapshot) -> anyhow::Result<()> {
    let op_secrets: Api<Secret> = Api::namespaced(client.clone(), operator_namespace);
    snapshot.ca = op_secrets.get_opt(ann::SIGNING_KEY).await?.map(|s| CaSecret {
        data: s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect(),
        annotations: annotations(&s.metadata),
    });
    let op_cms: Api<ConfigMap> = Api::namespaced(client.clone(), operator_namespace);
    snapshot.bundle = op_cms
        .get_opt(ann::SIGNING_CABUNDLE)
        .await?
        .and_then(|c| c.data?.remove(ann::CA_BUNDLE))
        .map(String::into_bytes);
    Ok(())
}

/// Services (metadata is enough) and the managed Secrets.
async fn read_serving(
    client: &Client,
    ns: Option<&str>,
    labels: &ListParams,
    snapshot: &mut Snapshot,
) -> anyhow::Result<()> {
    for svc in api::<Service>(client, ns).list_metadata(labels).await? {
        snapshot.services.push(ServiceObj {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
            annotations: annotations(&svc.metadata),
        });
    }
    let managed = ListParams::default().labels(&format!("{}={}", ann::MANAGED_LABEL, ann::MANAGED_LABEL_VALUE));
    for s in api::<Secret>(client, ns).list(&managed).await? {
        snapshot.secrets.push(SecretObj {
            namespace: s.metadata.namespace.clone().unwrap_or_default(),
            name: s.metadata.name.clone().unwrap_or_default(),
            annotations: annotations(&s.metadata),
            data: s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect(),
        });
    }
    Ok(())
}

/// ConfigMaps: metadata of all, bodies of the annotated ones only.
async fn read_config_maps(
    client: &Client,
    ns: Option<&str>,
    labels: &ListParams,
    snapshot: &mut Snapshot,
) -> anyhow::Result<()> {
    let cm_api = api::<ConfigMap>(client, ns);
    for meta in cm_api.list_metadata(labels).await? {
        let name = meta.metadata.name.clone().unwrap_or_default();
        let Some(how) = injection::<ConfigMap>(&meta.metadata) else { continue };
        let legacy = how == Mode::Legacy;
        let namespace = meta.metadata.namespace.clone().unwrap_or_default();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        let Some(cm) = cms.get_opt(&name).await? else { continue };
        let fields = cm.bundle_fields().into_iter().map(|f| f.map(<[u8]>::to_vec)).collect();
        snapshot.injected.push(InjectedObj {
            kind: Kind::ConfigMap,
            namespace: Some(namespace),
            name,
            fields,
            legacy,
            changed_at: operator_write_time(&cm.metadata),
        });
    }
    Ok(())
}

/// The cluster-scoped kinds annotated for injection (only when no namespace is given).
async fn read_cluster_injected(client: &Client, labels: &ListParams, snapshot: &mut Snapshot) -> anyhow::Result<()> {
    read_injected::<APIService>(client, labels, Kind::APIService, snapshot).await?;
    read_injected::<CustomResourceDefinition>(client, labels, Kind::CustomResourceDefinition, snapshot).await?;
    read_injected::<MutatingWebhookConfiguration>(client, labels, Kind::MutatingWebhookConfiguration, snapshot).await?;
    read_injected::<ValidatingWebhookConfiguration>(client, labels, Kind::ValidatingWebhookConfiguration, snapshot)
        .await?;
    Ok(())
}

/// The objects of a cluster-scoped kind annotated for injection, with their bundles
/// where the operator keeps them ([`Target::bundle_fields`]).
async fn read_injected<K: Target>(
    client: &Client,
    labels: &ListParams,
    kind: Kind,
    snapshot: &mut Snapshot,
) -> anyhow::Result<()> {
    for o in K::api(client.clone(), None).list(labels).await? {
        if injection::<K>(o.meta()).is_none() {
            continue;
        }
        let fields = o.bundle_fields().into_iter().map(|f| f.map(<[u8]>::to_vec)).collect();
        snapshot.injected.push(injected(kind, o.meta(), fields));
    }
    Ok(())
}

/// Pods that mount a Secret or a ConfigMap, and what they mount.
async fn read_pods(client: &Client, ns: Option<&str>, snapshot: &mut Snapshot) -> anyhow::Result<()> {
    for pod in api::<Pod>(client, ns).list(&ListParams::default()).await? {
        let mut obj = PodObj {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok()),
            owner: controller(pod.metadata.owner_references.as_ref()),
            ..Default::default()
        };
        for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            if let Some(name) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
                obj.secrets.insert(name);
            }
            if let Some(cm) = &volume.config_map {
                obj.config_maps.insert(cm.name.clone());
            }
            for source in volume.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(s) = &source.secret {
                    obj.secrets.insert(s.name.clone());
                }
                if let Some(c) = &source.config_map {
                    obj.config_maps.insert(c.name.clone());
                }
            }
        }
        if !obj.secrets.is_empty() || !obj.config_maps.is_empty() {
            snapshot.pods.push(obj);
        }
    }
    Ok(())
}

/// The ReplicaSets (metadata) of those pods, to find their Deployments.
async fn read_replica_set_owners(client: &Client, ns: Option<&str>, snapshot: &mut Snapshot) -> anyhow::Result<()> {
    let wanted: BTreeSet<(String, String)> = snapshot
        .pods
        .iter()
        .filter_map(|p| match &p.owner {
            Some((kind, name)) if kind == "ReplicaSet" => Some((p.namespace.clone(), name.clone())),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    for rs in api::<ReplicaSet>(client, ns).list_metadata(&ListParams::default()).await? {
        let key = (rs.metadata.namespace.clone().unwrap_or_default(), rs.metadata.name.clone().unwrap_or_default());
        if !wanted.contains(&key) {
            continue;
        }
        if let Some((kind, name)) = controller(rs.metadata.owner_references.as_ref())
            && kind == "Deployment"
        {
            snapshot.replica_set_owners.insert(key, name);
        }
    }
    Ok(())
}

fn injected(kind: Kind, meta: &ObjectMeta, fields: Vec<Option<Vec<u8>>>) -> InjectedObj {
    InjectedObj {
        kind,
        namespace: None,
        name: meta.name.clone().unwrap_or_default(),
        fields,
        legacy: false,
        changed_at: operator_write_time(meta),
    }
}

#[cfg(test)]
mod tests;
