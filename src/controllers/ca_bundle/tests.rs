use super::*;

fn meta(name: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

#[test]
fn annotation_values() {
    let beta = ann::BETA.inject_cabundle;
    let alpha = ann::ALPHA.inject_cabundle;
    assert_eq!(mode::<ConfigMap>(&meta("a", &[(beta, "TRUE")])), (Some(Mode::Bundle), None));
    assert_eq!(mode::<ConfigMap>(&meta("a", &[(beta, "false")])), (None, None));
    let (m, warning) = mode::<ConfigMap>(&meta("a", &[(beta, "yes")]));
    assert_eq!(m, None);
    assert!(warning.unwrap().contains("\"yes\""));
    assert_eq!(mode::<ConfigMap>(&meta("a", &[(alpha, "true")])).0, Some(Mode::Bundle));
    assert_eq!(mode::<CustomResourceDefinition>(&meta("a", &[(alpha, "true")])).0, None, "alpha not honoured for CRDs");
    assert_eq!(mode::<APIService>(&meta("a", &[(alpha, "true")])).0, Some(Mode::Bundle));
}

#[test]
fn the_operators_own_configmap_is_never_a_target() {
    let mut own = meta(SIGNING_CABUNDLE, &[(ann::BETA.inject_cabundle, "true")]);
    own.namespace = Some("openshift-service-ca".into());
    assert!(own_object::<ConfigMap>(&own, "openshift-service-ca"));
    assert!(!own_object::<ConfigMap>(&own, "elsewhere"), "another instance's namespace: a ConfigMap like any");
    assert!(!own_object::<APIService>(&own, "openshift-service-ca"));
    let mut other = own.clone();
    other.name = Some("trust".into());
    assert!(!own_object::<ConfigMap>(&other, "openshift-service-ca"));
}

#[test]
fn a_write_that_got_no_answer_backs_off_a_read_that_got_none_retries_soon() {
    // A patch over the API server's size limit may be cut off before any answer:
    // it must take the growing backoff, not the quick retry meant for outages.
    let cut = || kube::Error::Service("connection reset by peer".into());
    let write = Error::Kube { action: INJECT, object: "ValidatingWebhookConfiguration v".into(), source: cut() };
    assert!(!write.unreachable());
    assert_eq!(write.category(), "write");
    assert!(write.to_string().starts_with("injecting the CA bundle into ValidatingWebhookConfiguration v: "));
    assert!(Error::Kube { action: READ, object: "ConfigMap ns/c".into(), source: cut() }.unreachable());
    let no_root = Error::NoRootCa { object: "ConfigMap ns/kube-root-ca.crt".into() };
    assert!(!no_root.unreachable());
    assert_eq!(no_root.category(), "legacy-root-ca");
}

#[test]
fn a_warning_is_sent_once_per_distinct_note_until_cleared() {
    let warned = Warned::default();
    assert!(warned.first("ConfigMap.v1./cm.ns", "R", "no root CA"));
    assert!(!warned.first("ConfigMap.v1./cm.ns", "R", "no root CA"), "the same problem again: not re-sent");
    assert!(warned.first("ConfigMap.v1./other.ns", "R", "no root CA"), "another object");
    assert!(warned.first("ConfigMap.v1./cm.ns", "S", "no root CA"), "another reason");
    assert!(warned.first("ConfigMap.v1./cm.ns", "R", "413"), "a different problem");
    assert!(!warned.first("ConfigMap.v1./cm.ns", "R", "413"));
    warned.clear("ConfigMap.v1./cm.ns", Some("R"));
    assert!(warned.first("ConfigMap.v1./cm.ns", "R", "413"), "after it was solved, the problem is new again");
    assert!(!warned.first("ConfigMap.v1./cm.ns", "S", "no root CA"), "other reasons untouched");
    warned.clear("ConfigMap.v1./cm.ns", None);
    assert!(warned.first("ConfigMap.v1./cm.ns", "S", "no root CA"));
}

#[test]
fn legacy_mode_only_for_its_configmap_and_only_without_inject_keys() {
    let legacy = ann::INJECT_VULNERABLE_LEGACY_CABUNDLE;
    assert_eq!(mode::<ConfigMap>(&meta("openshift-service-ca.crt", &[(legacy, "true")])).0, Some(Mode::Legacy));
    assert_eq!(mode::<ConfigMap>(&meta("other", &[(legacy, "true")])).0, None);
    let both = meta("openshift-service-ca.crt", &[(legacy, "true"), (ann::ALPHA.inject_cabundle, "false")]);
    assert_eq!(mode::<ConfigMap>(&both).0, None, "an inject key of any value disables legacy mode");
    assert_eq!(mode::<APIService>(&meta("openshift-service-ca.crt", &[(legacy, "true")])).0, None);
}
