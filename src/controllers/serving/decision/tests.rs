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

#[test]
fn decision_covers_every_rule_of_spec_section_1() {
    let at = now();
    let ca = new_ca(at);
    let leaf = issue(&ca, false, at);
    let good = Stored::from_leaf(&leaf);
    let svc = service(false);
    let p = leaf_policy();
    let refresh_at = leaf.not_after - p.refresh_before;
    let d = |s: &Stored, svc: &LeafRequest, when| decide(Some(&s.facts()), svc, &ca, &p, when);

    assert_eq!(decide(None, &svc, &ca, &p, at), Decision::Issue(IssueReason::Absent));
    assert_eq!(d(&good, &svc, at), Decision::Keep { refresh_at: Some(refresh_at) });

    // Ownership: never touch a Secret that is not ours.
    let mut foreign = Stored::from_leaf(&leaf);
    foreign.annotations.clear();
    assert!(matches!(d(&foreign, &svc, at), Decision::Foreign(_)));
    let mut other = Stored::from_leaf(&leaf);
    other.annotations.insert(ann::BETA.originating_service_uid.into(), "someone-else".into());
    assert!(matches!(d(&other, &svc, at), Decision::Foreign(m) if m.contains("someone-else")));
    let mut alpha = Stored::from_leaf(&leaf);
    alpha.annotations.remove(ann::BETA.originating_service_uid);
    alpha.annotations.insert(ann::ALPHA.originating_service_uid.into(), UID.into());
    assert_eq!(d(&alpha, &svc, at), Decision::Keep { refresh_at: Some(refresh_at) }, "alpha keys are ours too");
    let mut opaque = Stored::from_leaf(&leaf);
    opaque.secret_type = "Opaque".into();
    assert!(matches!(d(&opaque, &svc, at), Decision::Foreign(m) if m.contains("Opaque")));

    // Missing or tampered data.
    for key in [TLS_CERT, TLS_KEY] {
        let mut s = Stored::from_leaf(&leaf);
        s.data.remove(key);
        assert_eq!(d(&s, &svc, at), Decision::Issue(IssueReason::MissingData(key)));
    }
    let mut garbage = Stored::from_leaf(&leaf);
    garbage.data.insert(TLS_CERT.into(), b"garbage".to_vec());
    assert!(matches!(d(&garbage, &svc, at), Decision::Issue(IssueReason::Unparseable(_))));
    let mut swapped = Stored::from_leaf(&leaf);
    swapped.data.insert(TLS_KEY.into(), key().to_pem().as_bytes().to_vec());
    assert_eq!(d(&swapped, &svc, at), Decision::Issue(IssueReason::KeyMismatch));

    // Signed by another CA (e.g. after a hard reset).
    let other_ca = new_ca(at);
    assert_eq!(decide(Some(&good.facts()), &svc, &other_ca, &p, at), Decision::Issue(IssueReason::OtherCa));

    // The Service became headless.
    assert_eq!(d(&good, &service(true), at), Decision::Issue(IssueReason::NamesChanged));

    // The Service (or the cluster default) asks for another kind of key.
    let rsa = KeyKind::Rsa { bits: 2048 };
    let ec = LeafRequest { key: KeyKind::EcdsaP256, ..service(false) };
    assert_eq!(d(&good, &ec, at), Decision::Issue(IssueReason::KeyAlgorithm { have: rsa, want: KeyKind::EcdsaP256 }));
    let ec_leaf = ca.issue(&ec, &PrivateKey::generate(KeyKind::EcdsaP256).unwrap(), at, LEAF_LIFETIME).unwrap();
    let ec_stored = Stored::from_leaf(&ec_leaf);
    assert!(matches!(d(&ec_stored, &ec, at), Decision::Keep { .. }), "an EC leaf is kept when EC is asked for");
    let p384 = LeafRequest { key: KeyKind::EcdsaP384, ..service(false) };
    assert!(matches!(d(&ec_stored, &p384, at), Decision::Issue(IssueReason::KeyAlgorithm { .. })));
    assert!(matches!(d(&ec_stored, &svc, at), Decision::Issue(IssueReason::KeyAlgorithm { .. })), "and back");

    // Metadata docs/spec.md §1 requires.
    let mut orphan = Stored::from_leaf(&leaf);
    orphan.owners.clear();
    assert_eq!(d(&orphan, &svc, at), Decision::Issue(IssueReason::NoOwnerReference));
    let mut no_expiry = Stored::from_leaf(&leaf);
    no_expiry.annotations.remove(ann::BETA.expiry);
    no_expiry.annotations.remove(ann::ALPHA.expiry);
    assert_eq!(d(&no_expiry, &svc, at), Decision::Issue(IssueReason::NoExpiry));
    let mut bad_expiry = Stored::from_leaf(&leaf);
    bad_expiry.annotations.insert(ann::BETA.expiry.into(), "next tuesday".into());
    assert_eq!(d(&bad_expiry, &svc, at), Decision::Issue(IssueReason::BadExpiry));

    // Refresh exactly at the threshold.
    assert_eq!(d(&good, &svc, refresh_at - Duration::from_secs(1)), Decision::Keep { refresh_at: Some(refresh_at) });
    assert_eq!(d(&good, &svc, refresh_at), Decision::Issue(IssueReason::DueForRefresh));

    // Fixable without re-issuing.
    let mut extra = Stored::from_leaf(&leaf);
    extra.data.insert("ca.crt".into(), b"x".to_vec());
    assert_eq!(
        d(&extra, &svc, at),
        Decision::Tidy { extra_keys: vec!["ca.crt".into()], expiry: leaf.not_after, refresh_at: Some(refresh_at) }
    );
    let mut unlabeled = Stored::from_leaf(&leaf);
    unlabeled.labeled = false;
    assert_eq!(
        d(&unlabeled, &svc, at),
        Decision::Tidy { extra_keys: vec![], expiry: leaf.not_after, refresh_at: Some(refresh_at) }
    );
    let mut half = Stored::from_leaf(&leaf);
    half.annotations.remove(ann::ALPHA.expiry);
    assert_eq!(
        d(&half, &svc, at),
        Decision::Tidy { extra_keys: vec![], expiry: leaf.not_after, refresh_at: Some(refresh_at) }
    );
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
