//! Table output of `inspect`.

use std::fmt::Write;

use super::model::{CertStatus, Report};

/// Columns padded to their widest cell, two spaces apart. Every cell is shown escaped
/// (names, annotations and certificate subjects come from users).
fn columns(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|row| row.iter().map(|cell| crate::escaped(cell).into_owned()).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count()).saturating_add(2);
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, header.to_vec());
    for row in &rows {
        line(out, row.iter().map(String::as_str).collect());
    }
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

/// The table of a report, every value from the cluster shown escaped.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    ca_lines(&mut out, report);
    let _ = writeln!(out, "\nSERVING CERTIFICATES");
    serving_table(&mut out, report);
    let _ = writeln!(out, "\nINJECTED CA BUNDLES");
    let rows: Vec<Vec<String>> = report
        .injected
        .iter()
        .map(|r| {
            vec![
                format!("{:?}", r.kind),
                r.namespace.clone().unwrap_or_else(|| "(cluster)".into()),
                r.name.clone(),
                r.status.as_str().into(),
            ]
        })
        .collect();
    columns(&mut out, &["KIND", "NAMESPACE", "NAME", "BUNDLE"], &rows);

    let _ = writeln!(out, "\nWORKLOADS RUNNING WITH REPLACED CERTIFICATES OR BUNDLES");
    let rows: Vec<Vec<String>> = report
        .workloads
        .iter()
        .map(|w| {
            let kind = if w.restartable { w.kind.clone() } else { format!("{} (restart by hand)", w.kind) };
            vec![w.namespace.clone(), kind, w.name.clone(), w.reasons.first().cloned().unwrap_or_default()]
        })
        .collect();
    columns(&mut out, &["NAMESPACE", "KIND", "NAME", "WHY"], &rows);

    let _ = writeln!(out, "\nPod certificates: {}", report.pod_certificates);
    let _ = writeln!(out, "\n{}", report.summary_line());
    out
}

/// The CA section: the current CA, the trust bridge, forced rotations, the bundle.
fn ca_lines(out: &mut String, report: &Report) {
    let ca = &report.ca;
    let shown = |v: &Option<String>| crate::escaped(&or_dash(v)).into_owned();
    let _ = writeln!(out, "CA (at {})", report.now);
    if let Some(e) = &ca.error {
        let _ = writeln!(out, "  BROKEN: {}", crate::escaped(e));
    }
    if let Some(subject) = &ca.subject {
        let _ = writeln!(out, "  subject          CN={}", crate::escaped(subject));
        let _ = writeln!(out, "  key              {}", shown(&ca.key_type));
        let _ = writeln!(out, "  key location     {}", shown(&ca.key_location));
        let _ = writeln!(out, "  not after        {}", shown(&ca.not_after));
        let _ = writeln!(out, "  rotation due     {}", shown(&ca.rotation_due));
        let bridge = match (&ca.bridge_live, &ca.previous_ca_trusted_until) {
            (true, Some(until)) => format!("live: the previous CA stays trusted until {}", crate::escaped(until)),
            _ => "none (no earlier CA is trusted)".into(),
        };
        let _ = writeln!(out, "  trust bridge     {bridge}");
        let reason = ca.forced_rotation_reason.as_deref().unwrap_or("never");
        let _ = writeln!(out, "  forced rotation  {}", crate::escaped(reason));
        if let Some(pending) = &ca.force_rotation_pending {
            let _ = writeln!(out, "  force-rotation \"{}\" asked, not acted on yet", crate::escaped(pending));
        }
        let _ = writeln!(out, "  bundle           {} certificate(s) in signing-cabundle", ca.bundle_certificates);
    }
    if let Some(p) = &ca.bundle_problem {
        let _ = writeln!(out, "  BROKEN: {}", crate::escaped(p));
    }
}

/// One line per serving certificate; the status carries its detail.
fn serving_table(out: &mut String, report: &Report) {
    let rows: Vec<Vec<String>> = report
        .serving_certificates
        .iter()
        .map(|r| {
            let mut status = r.status.as_str().to_string();
            if let Some(d) = &r.detail {
                status = format!("{status}: {d}");
            } else if r.status == CertStatus::PreviousCa {
                status.push_str(", re-issue pending");
            }
            vec![
                r.namespace.clone(),
                r.service.clone(),
                r.secret.clone(),
                or_dash(&r.key_type),
                or_dash(&r.signer),
                or_dash(&r.not_after),
                or_dash(&r.refresh_at),
                status,
            ]
        })
        .collect();
    columns(out, &["NAMESPACE", "SERVICE", "SECRET", "KEY", "SIGNER", "NOT AFTER", "REFRESH AT", "STATUS"], &rows);
}
