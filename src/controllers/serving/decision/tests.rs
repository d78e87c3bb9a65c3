//! The re-issue decision's table (docs/spec.md §1): one stored Secret per rule, built
//! from a real CA and leaf, and what `decide` makes of it.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;

use super::{Decision, IssueReason, SecretFacts, decide};
use crate::names::{self as ann, TLS_CERT, TLS_KEY};
use crate::pki::{
    CaPolicy, CertificateAuthority, IssuedLeaf, KeyKind, LeafPolicy, LeafRequest, PrivateKey, format_expiry,
};

const DAY: Duration = Duration::from_secs(86_400);
const UID: &str = "3f1c2b9e-6d1a-4c55-9a0e-8b7f0c2d4e61";
const LEAF_LIFETIME: Duration = Duration::from_secs(730 * 86_400);

fn policy() -> CaPolicy {
    CaPolicy { lifetime: 790 * DAY, rotate_before: 395 * DAY }
}

fn now() -> OffsetDateTime {
    // Whole seconds, like certificate times.
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn key() -> PrivateKey {
    PrivateKey::generate_rsa(2048).unwrap()
}

fn new_ca(at: OffsetDateTime) -> CertificateAuthority {
    CertificateAuthority::create(key(), at, &policy()).unwrap()
}

fn service(headless: bool) -> LeafRequest {
    LeafRequest {
        service: "web".into(),
        namespace: "shop".into(),
        uid: UID.into(),
        headless,
        cluster_domain: "cluster.local".into(),
        key: KeyKind::Rsa { bits: 2048 },
    }
}

fn issue(ca: &CertificateAuthority, headless: bool, at: OffsetDateTime) -> IssuedLeaf {
    ca.issue(&service(headless), &key(), at, LEAF_LIFETIME).unwrap()
}

struct Stored {
    data: BTreeMap<String, Vec<u8>>,
    annotations: BTreeMap<String, String>,
    owners: Vec<String>,
    secret_type: String,
    labeled: bool,
}

impl Stored {
    fn from_leaf(leaf: &IssuedLeaf) -> Stored {
        let mut annotations = BTreeMap::new();
        annotations.insert(ann::BETA.originating_service_uid.to_string(), UID.to_string());
        annotations.insert(ann::BETA.originating_service_name.to_string(), "web".to_string());
        annotations.insert(ann::BETA.expiry.to_string(), format_expiry(leaf.not_after));
        annotations.insert(ann::ALPHA.expiry.to_string(), format_expiry(leaf.not_after));
        let mut data = BTreeMap::new();
        data.insert(TLS_CERT.to_string(), leaf.chain_pem.clone().into_bytes());
        data.insert(TLS_KEY.to_string(), leaf.key_pem.as_bytes().to_vec());
        Stored {
            data,
            annotations,
            owners: vec![UID.to_string()],
            secret_type: "kubernetes.io/tls".into(),
            labeled: true,
        }
    }

    fn facts(&self) -> SecretFacts<'_> {
        SecretFacts {
            secret_type: &self.secret_type,
            data: self.data.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect(),
            annotations: &self.annotations,
            owner_service_uids: self.owners.iter().map(String::as_str).collect(),
            labeled: self.labeled,
        }
    }
}

fn leaf_policy() -> LeafPolicy {
    LeafPolicy { cluster_domain: "cluster.local".into(), lifetime: LEAF_LIFETIME, refresh_before: 243 * DAY }
}

/// The case every rule of docs/spec.md §1 varies: a good leaf of `ca` for `svc`, at `at`.
struct Case {
    at: OffsetDateTime,
    ca: CertificateAuthority,
    leaf: IssuedLeaf,
    good: Stored,
    svc: LeafRequest,
    policy: LeafPolicy,
    refresh_at: OffsetDateTime,
}

impl Case {
    fn new() -> Case {
        let at = now();
        let ca = new_ca(at);
        let leaf = issue(&ca, false, at);
        let good = Stored::from_leaf(&leaf);
        let policy = leaf_policy();
        let refresh_at = leaf.not_after - policy.refresh_before;
        Case { at, ca, leaf, good, svc: service(false), policy, refresh_at }
    }

    /// The decision for `stored` and `svc` at `when`.
    fn d(&self, stored: &Stored, svc: &LeafRequest, when: OffsetDateTime) -> Decision {
        decide(Some(&stored.facts()), svc, &self.ca, &self.policy, when)
    }

    fn stored(&self) -> Stored {
        Stored::from_leaf(&self.leaf)
    }
}

#[test]
fn an_absent_secret_is_issued_and_a_good_one_kept_until_its_refresh() {
    let c = Case::new();
    assert_eq!(decide(None, &c.svc, &c.ca, &c.policy, c.at), Decision::Issue(IssueReason::Absent));
    assert_eq!(c.d(&c.good, &c.svc, c.at), Decision::Keep { refresh_at: Some(c.refresh_at) });
    // Refresh exactly at the threshold.
    let before = c.refresh_at - Duration::from_secs(1);
    assert_eq!(c.d(&c.good, &c.svc, before), Decision::Keep { refresh_at: Some(c.refresh_at) });
    assert_eq!(c.d(&c.good, &c.svc, c.refresh_at), Decision::Issue(IssueReason::DueForRefresh));
}

#[test]
fn a_secret_that_is_not_ours_is_never_touched() {
    let c = Case::new();
    let at = c.at;
    let mut foreign = c.stored();
    foreign.annotations.clear();
    assert!(matches!(c.d(&foreign, &c.svc, at), Decision::Foreign(_)));
    let mut other = c.stored();
    other.annotations.insert(ann::BETA.originating_service_uid.into(), "someone-else".into());
    assert!(matches!(c.d(&other, &c.svc, at), Decision::Foreign(m) if m.contains("someone-else")));
    let mut alpha = c.stored();
    alpha.annotations.remove(ann::BETA.originating_service_uid);
    alpha.annotations.insert(ann::ALPHA.originating_service_uid.into(), UID.into());
    let kept = Decision::Keep { refresh_at: Some(c.refresh_at) };
    assert_eq!(c.d(&alpha, &c.svc, c.at), kept, "alpha keys are ours too");
    let mut opaque = c.stored();
    opaque.secret_type = "Opaque".into();
    assert!(matches!(c.d(&opaque, &c.svc, c.at), Decision::Foreign(m) if m.contains("Opaque")));
}

#[test]
fn missing_or_tampered_data_is_issued_again() {
    let c = Case::new();
    for key in [TLS_CERT, TLS_KEY] {
        let mut s = c.stored();
        s.data.remove(key);
        assert_eq!(c.d(&s, &c.svc, c.at), Decision::Issue(IssueReason::MissingData(key)));
    }
    let mut garbage = c.stored();
    garbage.data.insert(TLS_CERT.into(), b"garbage".to_vec());
    assert!(matches!(c.d(&garbage, &c.svc, c.at), Decision::Issue(IssueReason::Unparseable(_))));
    let mut swapped = c.stored();
    swapped.data.insert(TLS_KEY.into(), key().to_pem().as_bytes().to_vec());
    assert_eq!(c.d(&swapped, &c.svc, c.at), Decision::Issue(IssueReason::KeyMismatch));
}

#[test]
fn another_ca_other_names_or_another_key_kind_are_issued_again() {
    let c = Case::new();
    // Signed by another CA (e.g. after a hard reset).
    let other_ca = new_ca(c.at);
    let issue_other = decide(Some(&c.good.facts()), &c.svc, &other_ca, &c.policy, c.at);
    assert_eq!(issue_other, Decision::Issue(IssueReason::OtherCa));
    // The Service became headless.
    assert_eq!(c.d(&c.good, &service(true), c.at), Decision::Issue(IssueReason::NamesChanged));
    // The Service (or the cluster default) asks for another kind of key.
    let rsa = KeyKind::Rsa { bits: 2048 };
    let ec = LeafRequest { key: KeyKind::EcdsaP256, ..service(false) };
    let want_ec = Decision::Issue(IssueReason::KeyAlgorithm { have: rsa, want: KeyKind::EcdsaP256 });
    assert_eq!(c.d(&c.good, &ec, c.at), want_ec);
    let ec_leaf = c.ca.issue(&ec, &PrivateKey::generate(KeyKind::EcdsaP256).unwrap(), c.at, LEAF_LIFETIME).unwrap();
    let ec_stored = Stored::from_leaf(&ec_leaf);
    assert!(matches!(c.d(&ec_stored, &ec, c.at), Decision::Keep { .. }), "an EC leaf is kept when EC is asked for");
    let p384 = LeafRequest { key: KeyKind::EcdsaP384, ..service(false) };
    assert!(matches!(c.d(&ec_stored, &p384, c.at), Decision::Issue(IssueReason::KeyAlgorithm { .. })));
    let back = c.d(&ec_stored, &c.svc, c.at);
    assert!(matches!(back, Decision::Issue(IssueReason::KeyAlgorithm { .. })), "and back");
}

#[test]
fn metadata_the_contract_requires_is_issued_again_when_missing() {
    let c = Case::new();
    let mut orphan = c.stored();
    orphan.owners.clear();
    assert_eq!(c.d(&orphan, &c.svc, c.at), Decision::Issue(IssueReason::NoOwnerReference));
    let mut no_expiry = c.stored();
    no_expiry.annotations.remove(ann::BETA.expiry);
    no_expiry.annotations.remove(ann::ALPHA.expiry);
    assert_eq!(c.d(&no_expiry, &c.svc, c.at), Decision::Issue(IssueReason::NoExpiry));
    let mut bad_expiry = c.stored();
    bad_expiry.annotations.insert(ann::BETA.expiry.into(), "next tuesday".into());
    assert_eq!(c.d(&bad_expiry, &c.svc, c.at), Decision::Issue(IssueReason::BadExpiry));
}

#[test]
fn what_can_be_fixed_without_a_new_certificate_is_tidied() {
    let c = Case::new();
    let tidy = |extra_keys: Vec<String>| Decision::Tidy {
        extra_keys,
        expiry: c.leaf.not_after,
        refresh_at: Some(c.refresh_at),
    };
    let mut extra = c.stored();
    extra.data.insert("ca.crt".into(), b"x".to_vec());
    assert_eq!(c.d(&extra, &c.svc, c.at), tidy(vec!["ca.crt".into()]));
    let mut unlabeled = c.stored();
    unlabeled.labeled = false;
    assert_eq!(c.d(&unlabeled, &c.svc, c.at), tidy(vec![]));
    let mut half = c.stored();
    half.annotations.remove(ann::ALPHA.expiry);
    assert_eq!(c.d(&half, &c.svc, c.at), tidy(vec![]));
}

#[test]
fn a_leaf_capped_at_the_ca_expiry_waits_for_the_ca_rotation() {
    let at = now();
    let short =
        CertificateAuthority::create(key(), at, &CaPolicy { lifetime: 100 * DAY, rotate_before: 50 * DAY }).unwrap();
    let leaf = issue(&short, false, at);
    let stored = Stored::from_leaf(&leaf);
    let decision = decide(Some(&stored.facts()), &service(false), &short, &leaf_policy(), at);
    assert_eq!(decision, Decision::Keep { refresh_at: None }, "re-issuing would give the same capped expiry");
}
