//! `inspect`'s data: the objects it reads from the cluster (`Snapshot`) and the report
//! it makes of them (`Report`, its rows and summary, the exit status).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::pki::LeafPolicy;

/// The operator's settings that decide when things are due (the same defaults as the
/// operator's flags).
#[derive(Clone, Debug)]
pub struct Policy {
    pub ca_rotate_before: Duration,
    pub leaf: LeafPolicy,
}

/// `signing-key` as read.
#[derive(Clone, Debug, Default)]
pub struct CaSecret {
    pub data: BTreeMap<String, Vec<u8>>,
    pub annotations: BTreeMap<String, String>,
}

/// A Service (its metadata is enough).
#[derive(Clone, Debug, Default)]
pub struct ServiceObj {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
}

/// A Secret carrying the operator's managed label.
#[derive(Clone, Debug, Default)]
pub struct SecretObj {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub data: BTreeMap<String, Vec<u8>>,
}

/// The five kinds the operator injects into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Kind {
    ConfigMap,
    APIService,
    CustomResourceDefinition,
    MutatingWebhookConfiguration,
    ValidatingWebhookConfiguration,
}

/// An object annotated for injection.
#[derive(Clone, Debug)]
pub struct InjectedObj {
    pub kind: Kind,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
    /// Every injected field (one per webhook entry); empty when the object has no place
    /// for a bundle (a CRD without a conversion webhook, a webhook configuration without
    /// entries). `None` for a field that is not set.
    pub fields: Vec<Option<Vec<u8>>>,
    /// The legacy ConfigMap: the bundle followed by the cluster's root CA.
    pub legacy: bool,
    /// When the operator last wrote it (its field manager's managedFields time).
    pub changed_at: Option<OffsetDateTime>,
}

/// A pod, with what it mounts.
#[derive(Clone, Debug, Default)]
pub struct PodObj {
    pub namespace: String,
    pub name: String,
    pub start_time: Option<OffsetDateTime>,
    /// Secrets and ConfigMaps named by its volumes (including projected sources).
    pub secrets: BTreeSet<String>,
    pub config_maps: BTreeSet<String>,
    /// Its controller (kind, name), from ownerReferences.
    pub owner: Option<(String, String)>,
}

/// Everything `inspect` read.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub ca: Option<CaSecret>,
    /// `signing-cabundle`'s `ca-bundle.crt`.
    pub bundle: Option<Vec<u8>>,
    pub services: Vec<ServiceObj>,
    pub secrets: Vec<SecretObj>,
    /// When false (a label selector was given), managed Secrets whose Service was not
    /// listed are left out instead of shown as orphans.
    pub include_orphans: bool,
    pub injected: Vec<InjectedObj>,
    pub pods: Vec<PodObj>,
    /// (namespace, ReplicaSet) → the Deployment that controls it.
    pub replica_set_owners: BTreeMap<(String, String), String>,
    /// The CA loaded with its key in the PKCS#11 token of `inspect`'s flags, as the
    /// operator loads it (`None`: no token given).
    pub token_check: Option<Result<(), String>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub now: String,
    pub ca: CaReport,
    pub serving_certificates: Vec<ServingRow>,
    pub injected: Vec<InjectedRow>,
    pub workloads: Vec<WorkloadRow>,
    /// Pod certificates (docs/spec.md §5.2) are not inspected: each request is answered once and
    /// the kubelet holds the result.
    pub pod_certificates: &'static str,
    pub summary: Summary,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CaReport {
    /// Why the CA is unusable (missing, cannot be read, expired), if it is.
    pub error: Option<String>,
    pub subject: Option<String>,
    pub key_type: Option<String>,
    /// Where the CA key is ([`super::ca_key`]).
    pub key_location: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub rotation_due: Option<String>,
    /// Whether a trust bridge to a previous CA is live, and until when.
    pub bridge_live: bool,
    pub previous_ca_trusted_until: Option<String>,
    pub forced_rotation_reason: Option<String>,
    /// A force-rotation value not acted on yet.
    pub force_rotation_pending: Option<String>,
    /// Certificates in `signing-cabundle` (0 when it is missing).
    pub bundle_certificates: usize,
    pub bundle_problem: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertStatus {
    /// Signed by the current CA, trusted by the published bundle.
    Current,
    /// Signed by the previous CA, still trusted through the bridge; re-issue pending.
    PreviousCa,
    /// Not trusted by the published bundle (e.g. after a hard reset, not re-issued yet).
    Untrusted,
    /// Past its NotAfter.
    Expired,
    /// No usable certificate: the Service's error annotation, an unreadable Secret, or
    /// no Secret yet.
    Error,
}

impl CertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Current => "current CA",
            CertStatus::PreviousCa => "previous CA (trusted)",
            CertStatus::Untrusted => "UNTRUSTED",
            CertStatus::Expired => "EXPIRED",
            CertStatus::Error => "ERROR",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ServingRow {
    pub namespace: String,
    pub service: String,
    pub secret: String,
    pub key_type: Option<String>,
    pub signer: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub refresh_at: Option<String>,
    pub status: CertStatus,
    pub detail: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BundleStatus {
    Current,
    Stale,
    Missing,
    NotApplicable,
}

impl BundleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleStatus::Current => "current",
            BundleStatus::Stale => "STALE",
            BundleStatus::Missing => "MISSING",
            BundleStatus::NotApplicable => "n/a (no place for a bundle)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct InjectedRow {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
    pub status: BundleStatus,
    pub changed_at: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkloadRow {
    pub namespace: String,
    /// Deployment, StatefulSet or DaemonSet; otherwise the pod's own owner kind (or
    /// `Pod` for a bare pod), which `--restart` cannot roll.
    pub kind: String,
    pub name: String,
    pub restartable: bool,
    pub pods: Vec<String>,
    pub reasons: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub serving_total: usize,
    pub serving_current: usize,
    pub pending_reissue: usize,
    pub untrusted: usize,
    pub errors: usize,
    pub injected_total: usize,
    pub injected_current: usize,
    pub injected_stale: usize,
    pub workloads_to_restart: usize,
    pub healthy: bool,
}

/// Exit status of `inspect`.
pub mod exit {
    /// Nothing untrusted or broken, no workload runs with replaced material.
    pub const OK: u8 = 0;
    /// `inspect` itself failed (cluster unreachable, permission denied, ...).
    pub const FAILED: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// Something is untrusted or broken: no usable CA, a certificate not trusted by the
    /// published bundle, expired, or missing/in error, or an injected bundle that is not
    /// the current one.
    pub const BROKEN: u8 = 3;
    /// Certificates and bundles are fine, but some workloads run with a certificate or
    /// bundle that changed after they started (restart them: `inspect --restart`).
    pub const RESTART_NEEDED: u8 = 4;
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        if !self.summary.healthy {
            exit::BROKEN
        } else if self.summary.workloads_to_restart > 0 {
            exit::RESTART_NEEDED
        } else {
            exit::OK
        }
    }

    /// "1,180 of 1,200 serving certificates from the current CA; 20 pending re-issue; 0 untrusted"
    pub fn summary_line(&self) -> String {
        let s = &self.summary;
        let mut line = format!(
            "{} of {} serving certificates from the current CA; {} pending re-issue; {} untrusted",
            thousands(s.serving_current),
            thousands(s.serving_total),
            thousands(s.pending_reissue),
            thousands(s.untrusted)
        );
        if s.errors > 0 {
            line.push_str(&format!("; {} in error", thousands(s.errors)));
        }
        line.push_str(&format!(
            "\n{} of {} injected bundles current; {} stale\n{} workloads to restart",
            thousands(s.injected_current),
            thousands(s.injected_total),
            thousands(s.injected_stale),
            thousands(s.workloads_to_restart)
        ));
        line
    }
}

/// 1180 → "1,180".
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && digits.len().saturating_sub(i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
