//! The pure part of `inspect`: from the objects read from the cluster to a report.
//! No Kubernetes client here; every rule is testable with hand-made inputs and any
//! `now`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::model::{
    BundleStatus, CaReport, CertStatus, InjectedObj, InjectedRow, Kind, Policy, Report, SecretObj, ServiceObj,
    ServingRow, Snapshot, Summary, WorkloadRow,
};
use crate::controllers::serving::request::{self, Wanted};
use crate::names::{self as ann, ALPHA, BETA};
use crate::pki::{self, CertInfo, format_expiry, pem};

/// One certificate as `inspect` shows it.
#[derive(Clone, Debug)]
struct Cert {
    info: CertInfo,
    key_type: Option<String>,
    issuer_cn: Option<String>,
}

fn read_cert(der: Vec<u8>) -> Result<Cert, String> {
    let (key_type, issuer_cn) = match X509Certificate::from_der(&der) {
        Ok((_, cert)) => (
            key_type(&cert),
            cert.issuer().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned),
        ),
        Err(_) => (None, None),
    };
    let info = CertInfo::parse(ann::TLS_CERT, der).map_err(|e| e.to_string())?;
    Ok(Cert { info, key_type, issuer_cn })
}

/// The certificates of a PEM field, parsed.
fn read_certs(field: &'static str, bytes: &[u8]) -> Result<Vec<Cert>, String> {
    pem::decode_certificates(field, bytes).map_err(|e| e.to_string())?.into_iter().map(read_cert).collect()
}

/// "RSA-2048", "ECDSA P-256" (the operator's own names for key kinds).
fn key_type(cert: &X509Certificate<'_>) -> Option<String> {
    use x509_parser::public_key::PublicKey;
    match cert.public_key().parsed().ok()? {
        PublicKey::RSA(rsa) => Some(format!("RSA-{}", rsa.key_size())),
        PublicKey::EC(ec) => Some(format!("ECDSA P-{}", ec.key_size())),
        _ => Some("other".into()),
    }
}

fn time_str(t: OffsetDateTime) -> String {
    format_expiry(t)
}

/// The Secret name a Service asks for: the serving controllers' rule
/// ([`request::wanted_in`]: beta wins when set and non-empty).
fn requested_secret(svc: &ServiceObj) -> Option<String> {
    match request::wanted_in(&svc.annotations) {
        Wanted::Named { name, .. } => Some(name.to_string()),
        Wanted::NotRequested | Wanted::Empty(_) => None,
    }
}

fn either<'a>(annotations: &'a BTreeMap<String, String>, beta: &str, alpha: &str) -> Option<&'a String> {
    annotations.get(beta).or_else(|| annotations.get(alpha)).filter(|v| !v.is_empty())
}

/// What the published bundle trusts.
struct Trust {
    /// SubjectKeyIdentifiers of the unexpired bundle members.
    keys: BTreeSet<Vec<u8>>,
    ders: Vec<Vec<u8>>,
}

/// What the rest of the report needs from the current CA.
#[derive(Default)]
struct CurrentCa {
    ski: Option<Vec<u8>>,
    not_after: Option<OffsetDateTime>,
    /// The bundle `signing-key` itself carries (its `ca-bundle.crt`, else `tls.crt`).
    secret_bundle: Option<Vec<u8>>,
}

pub fn assess(snapshot: &Snapshot, policy: &Policy, now: OffsetDateTime) -> Report {
    let (mut ca_report, current) = ca_section(snapshot, policy, now);
    let trust = published_trust(snapshot, &current, &mut ca_report, now);
    let rows = serving_rows(snapshot, &trust, &current, policy, now);
    let injected = injected_rows(snapshot, &trust);
    let workloads = workloads(snapshot, &rows);
    let summary = summary(&ca_report, &rows, &injected, &workloads);
    Report {
        now: time_str(now),
        ca: ca_report,
        serving_certificates: rows,
        injected,
        workloads,
        pod_certificates: "not inspected: each PodCertificateRequest is answered once and its pod holds the result (kubectl get podcertificaterequests -A); their trust bundle is the ClusterTrustBundle of the pod signer",
        summary,
    }
}

/// The CA part of the report, from `signing-key`: its certificate, whether it can be
/// used, and a forced rotation asked or done.
fn ca_section(snapshot: &Snapshot, policy: &Policy, now: OffsetDateTime) -> (CaReport, CurrentCa) {
    let mut report = CaReport::default();
    let mut current = CurrentCa::default();
    let Some(ca) = &snapshot.ca else {
        report.error = Some("Secret signing-key does not exist: no CA (is the operator running?)".into());
        return (report, current);
    };
    report.forced_rotation_reason = ca.annotations.get(ann::FORCED_ROTATION_REASON).cloned();
    if let Some(asked) = ca.annotations.get(ann::FORCE_ROTATION)
        && report.forced_rotation_reason.as_ref() != Some(asked)
    {
        report.force_rotation_pending = Some(asked.clone());
    }
    let (key_location, error) = super::ca_key::assess(&ca.data, snapshot.token_check.as_ref(), now);
    report.key_location = Some(key_location.into());
    report.error = error;
    match ca.data.get(ann::TLS_CERT).map(|b| read_certs(ann::TLS_CERT, b)) {
        Some(Ok(certs)) if !certs.is_empty() => {
            let cert = &certs[0];
            report.subject = Some(cert.info.subject_cn.clone());
            report.key_type = cert.key_type.clone();
            report.not_before = Some(time_str(cert.info.not_before));
            report.not_after = Some(time_str(cert.info.not_after));
            report.rotation_due = Some(time_str(crate::dates::before(cert.info.not_after, policy.ca_rotate_before)));
            current.ski = cert.info.subject_key_id.clone();
            current.not_after = Some(cert.info.not_after);
        }
        Some(Err(e)) => report.error = report.error.take().or(Some(e)),
        _ => {}
    }
    current.secret_bundle = ca.data.get(ann::CA_BUNDLE).or_else(|| ca.data.get(ann::TLS_CERT)).cloned();
    (report, current)
}

/// What the bundle clients are given trusts: signing-cabundle, else (reported) the
/// Secret's. Notes on `report` a live trust bridge and a bundle that is missing,
/// unreadable or lacks the current CA.
fn published_trust(snapshot: &Snapshot, current: &CurrentCa, report: &mut CaReport, now: OffsetDateTime) -> Trust {
    let bundle_bytes = match &snapshot.bundle {
        Some(b) => Some(b),
        None => {
            report.bundle_problem = Some("ConfigMap signing-cabundle (ca-bundle.crt) does not exist".into());
            current.secret_bundle.as_ref()
        }
    };
    let mut trust = Trust { keys: BTreeSet::new(), ders: Vec::new() };
    if let Some(bytes) = bundle_bytes {
        match read_certs(ann::CA_BUNDLE, bytes) {
            Ok(certs) => {
                for c in certs {
                    if now <= c.info.not_after
                        && let Some(ski) = &c.info.subject_key_id
                    {
                        trust.keys.insert(ski.clone());
                    }
                    // The previous CA (X1: its key, re-signed by the new one).
                    if current.ski.is_some() && c.info.subject_key_id != current.ski && now <= c.info.not_after {
                        report.bridge_live = true;
                        let until = time_str(c.info.not_after);
                        if report.previous_ca_trusted_until.as_ref().is_none_or(|u| *u < until) {
                            report.previous_ca_trusted_until = Some(until);
                        }
                    }
                    trust.ders.push(c.info.der);
                }
                report.bundle_certificates = trust.ders.len();
            }
            Err(e) => report.bundle_problem = Some(format!("signing-cabundle cannot be read: {e}")),
        }
    }
    if let Some(ski) = &current.ski
        && !trust.ders.is_empty()
        && !trust.keys.contains(ski)
    {
        report.bundle_problem = Some("signing-cabundle does not contain the current CA".into());
    }
    trust
}

/// Serving certificates: one row per Service asking for one, plus orphans (managed
/// Secrets no listed Service asks for) when no selector was given.
fn serving_rows(
    snapshot: &Snapshot,
    trust: &Trust,
    current: &CurrentCa,
    policy: &Policy,
    now: OffsetDateTime,
) -> Vec<ServingRow> {
    let mut secrets: BTreeMap<(String, String), &SecretObj> =
        snapshot.secrets.iter().map(|s| ((s.namespace.clone(), s.name.clone()), s)).collect();
    let row_of = |secret: &SecretObj| serving_row(secret, trust, current, policy, now);
    let mut rows = Vec::new();
    for svc in &snapshot.services {
        let Some(secret_name) = requested_secret(svc) else { continue };
        let error = either(&svc.annotations, BETA.generation_error, ALPHA.generation_error);
        let mut row = match secrets.remove(&(svc.namespace.clone(), secret_name.clone())) {
            Some(secret) => row_of(secret),
            None => ServingRow {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                secret: secret_name,
                key_type: None,
                signer: None,
                not_before: None,
                not_after: None,
                refresh_at: None,
                status: CertStatus::Error,
                detail: Some("no Secret yet".into()),
            },
        };
        row.service = svc.name.clone();
        if let Some(error) = error {
            row.status = CertStatus::Error;
            row.detail = Some(error.clone());
        }
        rows.push(row);
    }
    if snapshot.include_orphans {
        for secret in secrets.into_values() {
            let mut row = row_of(secret);
            row.detail = Some(match row.detail.take() {
                Some(d) => format!("{d}; its Service does not ask for it any more"),
                None => "its Service does not ask for it any more (not refreshed)".into(),
            });
            rows.push(row);
        }
    }
    rows.sort_by(|a, b| (&a.namespace, &a.service, &a.secret).cmp(&(&b.namespace, &b.service, &b.secret)));
    rows
}

/// One row per object annotated for injection, sorted by kind, namespace and name.
fn injected_rows(snapshot: &Snapshot, trust: &Trust) -> Vec<InjectedRow> {
    let mut injected: Vec<InjectedRow> = snapshot
        .injected
        .iter()
        .map(|obj| InjectedRow {
            kind: obj.kind,
            namespace: obj.namespace.clone(),
            name: obj.name.clone(),
            status: bundle_status(obj, &trust.ders),
            changed_at: obj.changed_at.map(time_str),
        })
        .collect();
    injected.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    injected
}

/// The counts, and whether all is well (the exit status follows from it).
fn summary(ca: &CaReport, rows: &[ServingRow], injected: &[InjectedRow], workloads: &[WorkloadRow]) -> Summary {
    let mut summary = Summary { serving_total: rows.len(), injected_total: injected.len(), ..Default::default() };
    for row in rows {
        let count = match row.status {
            CertStatus::Current => &mut summary.serving_current,
            CertStatus::PreviousCa => &mut summary.pending_reissue,
            CertStatus::Untrusted | CertStatus::Expired => &mut summary.untrusted,
            CertStatus::Error => &mut summary.errors,
        };
        *count = count.saturating_add(1);
    }
    for row in injected {
        let count = match row.status {
            BundleStatus::Current | BundleStatus::NotApplicable => &mut summary.injected_current,
            BundleStatus::Stale | BundleStatus::Missing => &mut summary.injected_stale,
        };
        *count = count.saturating_add(1);
    }
    summary.workloads_to_restart = workloads.len();
    summary.healthy = ca.error.is_none()
        && ca.bundle_problem.is_none()
        && summary.untrusted == 0
        && summary.errors == 0
        && summary.injected_stale == 0;
    summary
}

fn serving_row(
    secret: &SecretObj,
    trust: &Trust,
    current: &CurrentCa,
    policy: &Policy,
    now: OffsetDateTime,
) -> ServingRow {
    let current_ski = current.ski.as_deref();
    let service = request::originating_service_name(&secret.annotations).unwrap_or_default().to_string();
    let mut row = ServingRow {
        namespace: secret.namespace.clone(),
        service,
        secret: secret.name.clone(),
        key_type: None,
        signer: None,
        not_before: None,
        not_after: None,
        refresh_at: None,
        status: CertStatus::Error,
        detail: None,
    };
    let leaf = match secret.data.get(ann::TLS_CERT).map(|b| read_certs(ann::TLS_CERT, b)) {
        None => {
            row.detail = Some("tls.crt is missing".into());
            return row;
        }
        Some(Err(e)) => {
            row.detail = Some(e);
            return row;
        }
        Some(Ok(certs)) => match certs.into_iter().next() {
            Some(leaf) => leaf,
            None => {
                row.detail = Some("tls.crt holds no certificate".into());
                return row;
            }
        },
    };
    row.key_type = leaf.key_type.clone();
    row.signer = leaf.issuer_cn.clone();
    row.not_before = Some(time_str(leaf.info.not_before));
    row.not_after = Some(time_str(leaf.info.not_after));
    let refresh_at = match current.not_after {
        Some(ca) => policy.leaf.refresh_at(leaf.info.not_after, ca),
        None => Some(crate::dates::before(leaf.info.not_after, policy.leaf.refresh_before)),
    };
    row.refresh_at = refresh_at.map(time_str);
    if !secret.data.contains_key(ann::TLS_KEY) {
        row.detail = Some("tls.key is missing".into());
        return row;
    }
    let aki = leaf.info.authority_key_id.as_deref();
    row.status = if now > leaf.info.not_after {
        CertStatus::Expired
    } else if aki.is_some() && aki == current_ski && aki.is_some_and(|k| trust.keys.contains(k)) {
        CertStatus::Current
    } else if aki.is_some_and(|k| trust.keys.contains(k)) && aki != current_ski {
        CertStatus::PreviousCa
    } else {
        if aki.is_some() && aki == current_ski {
            row.detail = Some("signed by the current CA, which the published bundle does not contain".into());
        } else {
            row.detail = Some("signed by a CA the published bundle does not trust (re-issue pending?)".into());
        }
        CertStatus::Untrusted
    };
    if row.status == CertStatus::Current && refresh_at.is_some_and(|t| t <= now) {
        row.detail = Some("refresh due".into());
    }
    row
}

fn bundle_status(obj: &InjectedObj, bundle: &[Vec<u8>]) -> BundleStatus {
    if obj.fields.is_empty() {
        return BundleStatus::NotApplicable;
    }
    let mut status = BundleStatus::Current;
    for field in &obj.fields {
        let Some(bytes) = field else { return BundleStatus::Missing };
        let ders = pem::decode_certificates("bundle", bytes).unwrap_or_default();
        let matches =
            if obj.legacy { ders.len() > bundle.len() && ders[..bundle.len()] == *bundle } else { ders == bundle };
        if !matches || bundle.is_empty() {
            status = BundleStatus::Stale;
        }
    }
    status
}

/// Workloads whose pods mount a serving Secret or an injected ConfigMap that changed
/// after the pod started. A serving Secret changed when its leaf was issued (NotBefore
/// is the issue time minus one second); an injected ConfigMap when the operator's field
/// manager last wrote it (managedFields time). All of these times are whole seconds, so
/// a change in the same second as the pod's start counts as after it: when in doubt,
/// restart.
fn workloads(snapshot: &Snapshot, rows: &[ServingRow]) -> Vec<WorkloadRow> {
    let mut secret_changed: BTreeMap<(&str, &str), OffsetDateTime> = BTreeMap::new();
    for row in rows {
        if let Some(nb) = row.not_before.as_deref().and_then(pki::parse_expiry) {
            secret_changed
                .insert((row.namespace.as_str(), row.secret.as_str()), crate::dates::after(nb, Duration::from_secs(1)));
        }
    }
    let mut cm_changed: BTreeMap<(&str, &str), OffsetDateTime> = BTreeMap::new();
    for obj in &snapshot.injected {
        if let (Kind::ConfigMap, Some(ns), Some(t)) = (obj.kind, &obj.namespace, obj.changed_at) {
            cm_changed.insert((ns.as_str(), obj.name.as_str()), t);
        }
    }
    let mut out: BTreeMap<(String, String, String), WorkloadRow> = BTreeMap::new();
    for pod in &snapshot.pods {
        let Some(started) = pod.start_time else { continue };
        let mut reasons = Vec::new();
        for name in &pod.secrets {
            if let Some(t) = secret_changed.get(&(pod.namespace.as_str(), name.as_str()))
                && *t >= started
            {
                reasons.push(format!("Secret {name} re-issued at {}", time_str(*t)));
            }
        }
        for name in &pod.config_maps {
            if let Some(t) = cm_changed.get(&(pod.namespace.as_str(), name.as_str()))
                && *t >= started
            {
                reasons.push(format!("ConfigMap {name} re-injected at {}", time_str(*t)));
            }
        }
        if reasons.is_empty() {
            continue;
        }
        let (kind, name) = match &pod.owner {
            Some((kind, rs)) if kind == "ReplicaSet" => {
                match snapshot.replica_set_owners.get(&(pod.namespace.clone(), rs.clone())) {
                    Some(deployment) => ("Deployment".to_string(), deployment.clone()),
                    None => (kind.clone(), rs.clone()),
                }
            }
            Some((kind, name)) => (kind.clone(), name.clone()),
            None => ("Pod".to_string(), pod.name.clone()),
        };
        let restartable = matches!(kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet");
        let entry = out.entry((pod.namespace.clone(), kind.clone(), name.clone())).or_insert_with(|| WorkloadRow {
            namespace: pod.namespace.clone(),
            kind,
            name,
            restartable,
            pods: Vec::new(),
            reasons: Vec::new(),
        });
        entry.pods.push(pod.name.clone());
        for r in reasons {
            let r = format!("{r}, after pod {} started at {}", pod.name, time_str(started));
            entry.reasons.push(r);
        }
    }
    out.into_values().collect()
}
