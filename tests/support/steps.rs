//! Steps several end-to-end tests take: force a rotation and wait for it, a hard reset,
//! wait for a Warning Event, start replicas.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::annotations::{FORCE_ROTATION, FORCED_ROTATION_REASON, INJECT};
use super::{Env, Operator, annotation, eventually};

impl Env {
    /// Creates ConfigMap `name` asking for the bundle and waits (up to `timeout`) until it
    /// holds the current one under `service-ca.crt`; returns that bundle.
    pub async fn injected_configmap(&self, name: &str, timeout: Duration) -> String {
        let mut cm: ConfigMap = serde_json::from_value(json!({})).unwrap();
        cm.metadata = self.meta(name);
        cm.metadata.annotations = Some([(INJECT.to_string(), "true".to_string())].into());
        self.configmaps().create(&PostParams::default(), &cm).await.unwrap();
        let bundle = self.ca_bundle().await;
        eventually(timeout, &format!("ConfigMap {name} injected"), || async {
            (self.configmaps().get(name).await.ok()?.data?.get("service-ca.crt") == Some(&bundle)).then_some(())
        })
        .await;
        bundle
    }

    /// Asks for a forced rotation of the CA with `reason` (docs/spec.md §3.3).
    pub async fn force_rotation(&self, reason: &str) {
        let patch = json!({ "metadata": { "annotations": { FORCE_ROTATION: reason } } });
        self.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    /// `signing-key` once the forced rotation asked for with `reason` is done.
    pub async fn rotated(&self, reason: &str) -> Secret {
        eventually(Duration::from_secs(30), "the forced rotation", || async {
            let s = self.op_secrets().get("signing-key").await.ok()?;
            (annotation(&s.metadata, FORCED_ROTATION_REASON) == Some(reason)).then_some(s)
        })
        .await
    }

    /// A hard reset, as a person does it: deletes `signing-key` (docs/spec.md §3.2).
    pub async fn hard_reset(&self) {
        self.op_secrets().delete("signing-key", &DeleteParams::default()).await.unwrap();
    }

    /// Waits (up to 30 s) for a Warning Event about `regarding` in `namespace`, with
    /// `reason` if given.
    pub async fn warning(&self, namespace: &str, regarding: &str, reason: Option<&str>) -> Event {
        eventually(Duration::from_secs(30), &format!("a Warning Event about {regarding} ({reason:?})"), || async {
            self.events(namespace, Some(regarding), reason)
                .await
                .into_iter()
                .find(|e| e.type_.as_deref() == Some("Warning"))
        })
        .await
    }

    /// Waits (up to 30 s) for a Warning Event about `regarding` whose note contains
    /// `contains`, and returns the note.
    pub async fn warning_containing(&self, namespace: &str, regarding: &str, contains: &str) -> String {
        eventually(
            Duration::from_secs(30),
            &format!("a Warning Event about {regarding} containing {contains:?}"),
            || async {
                self.events(namespace, Some(regarding), None).await.into_iter().find_map(|e| {
                    let note = e.note.clone().unwrap_or_default();
                    (e.type_.as_deref() == Some("Warning") && note.contains(contains)).then_some(note)
                })
            },
        )
        .await
    }

    /// `n` replicas of this test's operator with leader election (Lease duration
    /// `lease`) and shared issuance (the default), identities r0, r1, …; ECDSA keys keep
    /// the machine free for the API server. `extra` flags come last.
    pub fn replicas(&self, n: usize, lease: &str, extra: &[&str]) -> Vec<Operator> {
        (0..n)
            .map(|i| {
                let identity = format!("r{i}");
                let mut args = vec!["--default-key-algorithm", "ecdsa", "--lease-identity", &identity];
                args.extend_from_slice(extra);
                let args = self.leader_elect_args(lease, &args);
                Operator::start_with_kubeconfig(&self.name, &args, &self.kubeconfig)
            })
            .collect()
    }
}

/// The sum of the samples of metric `name` whose labels include every one of `labels`.
pub fn metric_with(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
