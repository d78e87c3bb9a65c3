//! Unit tests of `inspect`'s assessment: real CAs and leaves from the pki module,
//! hand-made cluster objects.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use time::OffsetDateTime;

use super::assess::*;
use super::model::*;
use crate::names::{ALPHA, BETA, FORCE_ROTATION, FORCED_ROTATION_REASON};
use crate::pki::{CaPolicy, CertificateAuthority, LeafPolicy, LeafRequest, PrivateKey};

const DAY: Duration = Duration::from_secs(86_400);

fn policy() -> Policy {
    Policy {
        ca_rotate_before: 395 * DAY,
        leaf: LeafPolicy {
            cluster_domain: "cluster.local".into(),
            lifetime: 730 * DAY,
            refresh_before: LeafPolicy::default_refresh_before(730 * DAY),
        },
    }
}

fn ca_policy() -> CaPolicy {
    CaPolicy { lifetime: 790 * DAY, rotate_before: 395 * DAY }
}

fn new_ca(now: OffsetDateTime) -> CertificateAuthority {
    CertificateAuthority::create(PrivateKey::generate_rsa(2048).unwrap(), now, &ca_policy()).unwrap()
}

fn secret_for(ca: &CertificateAuthority, ns: &str, svc: &str, now: OffsetDateTime) -> SecretObj {
    let req = LeafRequest {
        service: svc.into(),
        namespace: ns.into(),
        uid: "uid-1".into(),
        headless: false,
        cluster_domain: "cluster.local".into(),
        key: crate::pki::KeyKind::Rsa { bits: 2048 },
    };
    let leaf = ca.issue(&req, &PrivateKey::generate_rsa(2048).unwrap(), now, 730 * DAY).unwrap();
    SecretObj {
        namespace: ns.into(),
        name: format!("{svc}-tls"),
        annotations: BTreeMap::from([(BETA.originating_service_name.to_string(), svc.to_string())]),
        data: BTreeMap::from([
            ("tls.crt".to_string(), leaf.chain_pem.into_bytes()),
            ("tls.key".to_string(), leaf.key_pem.as_bytes().to_vec()),
        ]),
    }
}

fn service(ns: &str, name: &str) -> ServiceObj {
    ServiceObj {
        namespace: ns.into(),
        name: name.into(),
        annotations: BTreeMap::from([(BETA.serving_cert_secret_name.to_string(), format!("{name}-tls"))]),
    }
}

fn snapshot(ca: &CertificateAuthority, now: OffsetDateTime) -> Snapshot {
    Snapshot {
        ca: Some(CaSecret { data: ca.to_secret_data(), annotations: BTreeMap::new() }),
        bundle: Some(ca.bundle_pem(now).into_bytes()),
        include_orphans: true,
        ..Default::default()
    }
}

fn cm(name: &str, value: Option<&str>, changed_at: Option<OffsetDateTime>) -> InjectedObj {
    InjectedObj {
        kind: Kind::ConfigMap,
        namespace: Some("app".into()),
        name: name.into(),
        fields: vec![value.map(|v| v.as_bytes().to_vec())],
        legacy: false,
        changed_at,
    }
}

#[test]
fn a_fresh_ca_with_current_certificates_is_healthy() {
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now);
    let mut snap = snapshot(&ca, now);
    snap.services = vec![service("app", "web")];
    snap.secrets = vec![secret_for(&ca, "app", "web", now)];
    snap.injected = vec![cm("trust", Some(&ca.bundle_pem(now)), Some(now))];
    let report = assess(&snap, &policy(), now);
    assert_eq!(report.ca.subject.as_deref(), Some(ca.subject_cn()));
    assert_eq!(report.ca.key_type.as_deref(), Some("RSA-2048"));
    assert!(!report.ca.bridge_live);
    assert_eq!(report.ca.rotation_due, Some(crate::pki::format_expiry(ca.not_after() - 395 * DAY)));
    let row = &report.serving_certificates[0];
    assert_eq!((row.service.as_str(), row.secret.as_str(), row.status), ("web", "web-tls", CertStatus::Current));
    assert_eq!(row.key_type.as_deref(), Some("RSA-2048"));
    assert_eq!(row.signer.as_deref(), Some(ca.subject_cn()));
    assert!(row.refresh_at.is_some(), "730 days fit in the 790-day CA: refreshed by time");
    assert_eq!(report.injected[0].status, BundleStatus::Current);
    assert_eq!(report.exit_code(), exit::OK);
    assert!(
        report
            .summary_line()
            .starts_with("1 of 1 serving certificates from the current CA; 0 pending re-issue; 0 untrusted")
    );
}

#[test]
fn after_a_rotation_old_leaves_are_pending_and_still_trusted_until_the_bridge_ends() {
    let then = OffsetDateTime::now_utc() - 400 * DAY;
    let old = new_ca(then);
    let now = OffsetDateTime::now_utc();
    let rotated = old.rotate(PrivateKey::generate_rsa(2048).unwrap(), now, &ca_policy()).unwrap();
    let mut snap = snapshot(&rotated, now);
    snap.ca.as_mut().unwrap().annotations = BTreeMap::from([
        (FORCE_ROTATION.to_string(), "second".to_string()),
        (FORCED_ROTATION_REASON.to_string(), "first".to_string()),
    ]);
    snap.services = vec![service("app", "old"), service("app", "new")];
    snap.secrets = vec![secret_for(&old, "app", "old", then), secret_for(&rotated, "app", "new", now)];
    let report = assess(&snap, &policy(), now);
    assert!(report.ca.bridge_live);
    assert_eq!(report.ca.previous_ca_trusted_until, Some(crate::pki::format_expiry(now + 395 * DAY)));
    assert_eq!(report.ca.forced_rotation_reason.as_deref(), Some("first"));
    assert_eq!(report.ca.force_rotation_pending.as_deref(), Some("second"));
    let status: BTreeMap<&str, CertStatus> =
        report.serving_certificates.iter().map(|r| (r.service.as_str(), r.status)).collect();
    assert_eq!(status["old"], CertStatus::PreviousCa);
    assert_eq!(status["new"], CertStatus::Current);
    assert_eq!(report.summary.pending_reissue, 1);
    assert_eq!(report.exit_code(), exit::OK, "a live bridge keeps old leaves trusted");
}

#[test]
fn after_a_hard_reset_old_leaves_and_old_bundles_are_broken() {
    let now = OffsetDateTime::now_utc();
    let old = new_ca(now - DAY);
    let reset = new_ca(now);
    let mut snap = snapshot(&reset, now);
    snap.services = vec![service("app", "web")];
    snap.secrets = vec![secret_for(&old, "app", "web", now - DAY)];
    snap.injected = vec![cm("trust", Some(&old.bundle_pem(now)), None), cm("empty", None, None)];
    let report = assess(&snap, &policy(), now);
    assert_eq!(report.serving_certificates[0].status, CertStatus::Untrusted);
    assert_eq!(
        report.injected.iter().map(|r| r.status).collect::<Vec<_>>(),
        [BundleStatus::Missing, BundleStatus::Stale]
    );
    assert_eq!(report.summary.untrusted, 1);
    assert_eq!(report.summary.injected_stale, 2);
    assert_eq!(report.exit_code(), exit::BROKEN);
    assert!(
        report
            .summary_line()
            .contains("0 of 1 serving certificates from the current CA; 0 pending re-issue; 1 untrusted")
    );
}

#[test]
fn service_errors_missing_secrets_and_a_missing_ca_are_reported() {
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now);
    let mut snap = snapshot(&ca, now);
    let mut failing = service("app", "taken");
    failing.annotations.insert(ALPHA.generation_error.into(), "Secret app/taken-tls already exists".into());
    snap.services = vec![failing, service("app", "waiting")];
    let report = assess(&snap, &policy(), now);
    let details: Vec<_> =
        report.serving_certificates.iter().map(|r| (r.status, r.detail.clone().unwrap_or_default())).collect();
    assert_eq!(details[0], (CertStatus::Error, "Secret app/taken-tls already exists".into()));
    assert_eq!(details[1], (CertStatus::Error, "no Secret yet".into()));
    assert_eq!(report.exit_code(), exit::BROKEN);

    snap.ca = None;
    snap.services.clear();
    let report = assess(&snap, &policy(), now);
    assert!(report.ca.error.as_deref().unwrap().contains("signing-key does not exist"));
    assert_eq!(report.exit_code(), exit::BROKEN);
}

#[test]
fn unreadable_secrets_and_orphans() {
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now);
    let mut snap = snapshot(&ca, now);
    let mut broken = secret_for(&ca, "app", "web", now);
    broken.data.insert("tls.crt".into(), b"not pem".to_vec());
    snap.secrets = vec![broken.clone()];
    let report = assess(&snap, &policy(), now);
    let row = &report.serving_certificates[0];
    assert_eq!(row.status, CertStatus::Error);
    assert!(row.detail.as_deref().unwrap().contains("not PEM"), "{row:?}");
    assert!(row.detail.as_deref().unwrap().contains("does not ask for it"), "{row:?}");
    // With a label selector, Secrets of Services not listed are left out.
    snap.include_orphans = false;
    assert!(assess(&snap, &policy(), now).serving_certificates.is_empty());
}

#[test]
fn webhooks_need_every_entry_current_and_crds_without_a_webhook_are_not_applicable() {
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now);
    let old = new_ca(now - DAY);
    let mut snap = snapshot(&ca, now);
    let bundle = ca.bundle_pem(now).into_bytes();
    snap.injected = vec![
        InjectedObj {
            kind: Kind::ValidatingWebhookConfiguration,
            namespace: None,
            name: "v".into(),
            fields: vec![Some(bundle.clone()), Some(old.bundle_pem(now).into_bytes())],
            legacy: false,
            changed_at: None,
        },
        InjectedObj {
            kind: Kind::CustomResourceDefinition,
            namespace: None,
            name: "c".into(),
            fields: vec![],
            legacy: false,
            changed_at: None,
        },
        InjectedObj {
            kind: Kind::ConfigMap,
            namespace: Some("app".into()),
            name: "openshift-service-ca.crt".into(),
            fields: vec![Some([bundle.clone(), old.bundle_pem(now).into_bytes(), b"\n".to_vec()].concat())],
            legacy: true,
            changed_at: None,
        },
    ];
    let report = assess(&snap, &policy(), now);
    let status: Vec<_> = report.injected.iter().map(|r| (r.kind, r.status)).collect();
    assert_eq!(
        status,
        [
            (Kind::ConfigMap, BundleStatus::Current),
            (Kind::CustomResourceDefinition, BundleStatus::NotApplicable),
            (Kind::ValidatingWebhookConfiguration, BundleStatus::Stale),
        ]
    );
}

#[test]
fn workloads_started_before_their_material_changed_are_listed_by_controller() {
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now - 3600 * Duration::from_secs(1));
    let mut snap = snapshot(&ca, now);
    snap.services = vec![service("app", "web")];
    let issued = now - Duration::from_secs(600);
    snap.secrets = vec![secret_for(&ca, "app", "web", issued)];
    snap.injected = vec![cm("trust", Some(&ca.bundle_pem(now)), Some(now - Duration::from_secs(300)))];
    let pod = |name: &str, started: OffsetDateTime, owner: (&str, &str), secret: &str, cm: &str| PodObj {
        namespace: "app".into(),
        name: name.into(),
        start_time: Some(started),
        secrets: BTreeSet::from([secret.to_string()]).into_iter().filter(|s| !s.is_empty()).collect(),
        config_maps: BTreeSet::from([cm.to_string()]).into_iter().filter(|s| !s.is_empty()).collect(),
        owner: Some((owner.0.into(), owner.1.into())),
    };
    let old = now - Duration::from_secs(3000);
    let fresh = now - Duration::from_secs(60);
    snap.pods = vec![
        pod("web-abc-1", old, ("ReplicaSet", "web-abc"), "web-tls", ""),
        pod("web-abc-2", fresh, ("ReplicaSet", "web-abc"), "web-tls", ""),
        pod("db-0", old, ("StatefulSet", "db"), "", "trust"),
        pod("agent-x", fresh, ("DaemonSet", "agent"), "web-tls", "trust"),
        pod("job-1", old, ("Job", "once"), "web-tls", ""),
    ];
    snap.replica_set_owners.insert(("app".into(), "web-abc".into()), "web".into());
    let report = assess(&snap, &policy(), now);
    let listed: Vec<(&str, &str, bool, usize)> =
        report.workloads.iter().map(|w| (w.kind.as_str(), w.name.as_str(), w.restartable, w.pods.len())).collect();
    assert_eq!(listed, [("Deployment", "web", true, 1), ("Job", "once", false, 1), ("StatefulSet", "db", true, 1)]);
    assert!(report.workloads[0].reasons[0].starts_with("Secret web-tls re-issued at"), "{:?}", report.workloads[0]);
    assert_eq!(report.exit_code(), exit::RESTART_NEEDED);
}

#[test]
fn thousands_separators() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1180), "1,180");
    assert_eq!(thousands(1_234_567), "1,234,567");
}

#[test]
fn the_table_names_every_section() {
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now);
    let mut snap = snapshot(&ca, now);
    snap.services = vec![service("app", "web")];
    snap.secrets = vec![secret_for(&ca, "app", "web", now)];
    let text = super::render::table(&assess(&snap, &policy(), now));
    for needle in [
        "CA (at ",
        "SERVING CERTIFICATES",
        "INJECTED CA BUNDLES",
        "WORKLOADS",
        "Pod certificates: not inspected",
        "web-tls",
        "current CA",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

#[test]
fn a_change_in_the_same_second_as_the_start_counts_as_after_it() {
    // Seen on the test control plane: a rotation 0.5 s after the pod started, both in
    // the same whole second of the API's timestamps.
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let ca = new_ca(now - DAY);
    let mut snap = snapshot(&ca, now);
    snap.services = vec![service("app", "web")];
    snap.secrets = vec![secret_for(&ca, "app", "web", now)];
    snap.pods = vec![PodObj {
        namespace: "app".into(),
        name: "web-0".into(),
        start_time: Some(now),
        secrets: BTreeSet::from(["web-tls".to_string()]),
        config_maps: BTreeSet::new(),
        owner: Some(("StatefulSet".into(), "web".into())),
    }];
    assert_eq!(assess(&snap, &policy(), now).workloads.len(), 1);
    snap.pods[0].start_time = Some(now + Duration::from_secs(1));
    assert!(assess(&snap, &policy(), now).workloads.is_empty());
}

#[test]
fn a_managed_secret_whose_leaf_starts_in_9999_is_assessed_without_overflow() {
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now);
    let mut snap = snapshot(&ca, now);
    snap.services = vec![service("app", "web")];
    let mut secret = secret_for(&ca, "app", "web", now);
    // A tenant's own certificate, valid from and until 99991231235959Z.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["web.app.svc".to_string()]).unwrap();
    params.not_before = crate::dates::LATEST;
    params.not_after = crate::dates::LATEST;
    let leaf = params.self_signed(&key).unwrap();
    secret.data.insert("tls.crt".into(), leaf.pem().into_bytes());
    snap.secrets = vec![secret];
    let report = assess(&snap, &policy(), now);
    let row = &report.serving_certificates[0];
    assert_eq!(row.not_before.as_deref(), Some("9999-12-31T23:59:59Z"));
    assert_eq!(row.status, CertStatus::Untrusted);
}

/// `signing-key` as the operator writes it with the key in a token: `tls.key` empty and
/// a reference (made here from a CA whose key is in memory; no token is opened).
fn token_backed(ca: &CertificateAuthority) -> BTreeMap<String, Vec<u8>> {
    let mut data = ca.to_secret_data();
    data.insert("tls.key".into(), Vec::new());
    data.insert(crate::pki::PKCS11_KEY_URI.into(), b"pkcs11:token=service-ca;object=service-ca-key;id=%01".to_vec());
    data
}

#[test]
fn a_ca_whose_key_is_in_a_token_is_healthy_unchecked_without_the_token_flags() {
    let now = OffsetDateTime::now_utc();
    let ca =
        CertificateAuthority::create(PrivateKey::generate(crate::pki::KeyKind::EcdsaP256).unwrap(), now, &ca_policy())
            .unwrap();
    let mut snap = snapshot(&ca, now);
    snap.ca.as_mut().unwrap().data = token_backed(&ca);
    snap.services = vec![service("app", "web")];
    snap.secrets = vec![secret_for(&ca, "app", "web", now)];
    let report = assess(&snap, &policy(), now);
    assert_eq!(report.ca.error, None);
    assert_eq!(report.ca.key_location.as_deref(), Some(super::ca_key::IN_TOKEN_NOT_CHECKED));
    assert_eq!(report.ca.key_type.as_deref(), Some("ECDSA P-256"), "the CA is read from tls.crt");
    assert_eq!(report.serving_certificates[0].status, CertStatus::Current);
    assert_eq!(report.exit_code(), exit::OK);
    assert!(super::render::table(&report).contains("key location     in a PKCS#11 token (not checked"));

    // The rest of the CA is still checked: a bundle without the CA is broken.
    let other = new_ca(now);
    snap.ca.as_mut().unwrap().data.insert("ca-bundle.crt".into(), other.certificate().pem().into_bytes());
    let report = assess(&snap, &policy(), now);
    assert!(report.ca.error.as_deref().is_some_and(|e| e.contains("ca-bundle.crt")), "{:?}", report.ca.error);
    assert_eq!(report.exit_code(), exit::BROKEN);
    // An expired CA too.
    snap.ca.as_mut().unwrap().data = token_backed(&ca);
    let report = assess(&snap, &policy(), now + 800 * DAY);
    assert!(report.ca.error.is_some());
}

#[test]
fn with_the_token_flags_the_key_is_checked_and_a_failure_is_a_problem() {
    let now = OffsetDateTime::now_utc();
    let ca =
        CertificateAuthority::create(PrivateKey::generate(crate::pki::KeyKind::EcdsaP256).unwrap(), now, &ca_policy())
            .unwrap();
    let mut snap = snapshot(&ca, now);
    snap.ca.as_mut().unwrap().data = token_backed(&ca);
    snap.token_check = Some(Ok(()));
    let report = assess(&snap, &policy(), now);
    assert_eq!(report.ca.key_location.as_deref(), Some(super::ca_key::IN_TOKEN_CHECKED));
    assert_eq!((report.ca.error.as_deref(), report.exit_code()), (None, exit::OK));

    let refused = "the PKCS#11 token refuses the PIN of --pkcs11-pin-file: C_Login answered PinIncorrect";
    snap.token_check = Some(Err(refused.into()));
    let report = assess(&snap, &policy(), now);
    assert_eq!(report.ca.error, Some(format!("signing-key cannot be used: {refused}")));
    assert_eq!(report.exit_code(), exit::BROKEN);

    // A key in memory without the flags: as before.
    let report = assess(&snapshot(&ca, now), &policy(), now);
    assert_eq!(report.ca.key_location.as_deref(), Some(super::ca_key::IN_SECRET));
    assert_eq!(report.exit_code(), exit::OK);
}
