use super::*;

fn members(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("replica-{i}")).collect()
}

#[test]
fn rendezvous_spreads_keys_evenly_and_a_departure_moves_only_its_share() {
    let three = members(3);
    let keys: Vec<String> = (0..3000).map(|i| format!("ns{}/svc{i}", i % 7)).collect();
    let mut counts = std::collections::BTreeMap::new();
    for key in &keys {
        *counts.entry(owner(&three, key).unwrap()).or_insert(0) += 1;
    }
    for (member, n) in &counts {
        assert!((800..=1200).contains(n), "{member} owns {n} of 3000");
    }
    let two: Vec<String> = three[..2].to_vec();
    for key in &keys {
        let before = owner(&three, key).unwrap();
        let after = owner(&two, key).unwrap();
        if before != "replica-2" {
            assert_eq!(before, after, "{key} moved although its owner stayed");
        }
    }
    assert_eq!(owner(&[], "a/b"), None);
}

#[test]
fn lease_names_are_dns_subdomains() {
    assert_eq!(lease_name("Pod_A-1234"), "service-ca-operator-member-pod-a-1234");
    assert!(lease_name(&"x".repeat(400)).len() <= 253);
}

const OURS: Duration = Duration::from_secs(15);

fn record(holder: &str, duration: i64, renew: &str) -> Record {
    Record::from_spec(&json!({ "holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": renew }))
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// The exact Lease that broke the member watch: k8s-openapi's MicroTime (a jiff
/// Timestamp, which ends at 9999-12-30T22:00:00Z) cannot decode its renewTime, so
/// every list failed. Read untyped, it is one Lease that is not a member.
#[test]
fn a_lease_renewed_at_the_end_of_9999_decodes_and_is_not_a_member() {
    let text = r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"service-ca-operator-member-phantom","namespace":"op","uid":"7d6776fa-f822-4dcc-b7fe-fd9bef0a19e6","resourceVersion":"240","creationTimestamp":"2026-12-02T01:00:15Z","labels":{"service-ca.operators.openshift.io/member":"true"}},"spec":{"holderIdentity":"phantom","leaseDurationSeconds":15,"renewTime":"9999-12-31T23:59:59.999999Z"}}"#;
    assert!(serde_json::from_str::<Lease>(text).is_err(), "the typed Lease cannot hold it (the cause)");
    let lease: DynamicObject = serde_json::from_str(text).unwrap();
    let (now, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
    let mut members = Members::default();
    let warned = members.apply(watcher::Event::Apply(lease.clone()), now, wall, OURS);
    assert_eq!(warned.map(|(_, reason)| reason), Some(Ignored::FutureRenewal));
    assert_eq!(live_members(members.seen.values(), now, wall, OURS).0, Vec::<String>::new());
    // The same Lease seen again (a relist): no second Warning.
    assert!(members.apply(watcher::Event::Apply(lease), now, wall, OURS).is_none());
    // Year 0 and a huge duration decode too, and are not members.
    for spec in [
        json!({ "holderIdentity": "x", "leaseDurationSeconds": 15, "renewTime": "0000-01-01T00:00:00.000000Z" }),
        json!({ "holderIdentity": "x", "leaseDurationSeconds": 2147483647, "renewTime": "9999-12-31T23:59:59Z" }),
        json!({ "holderIdentity": 7, "leaseDurationSeconds": "15", "renewTime": {} }),
    ] {
        let r = Record::from_spec(&spec);
        let (seen, _) = observe(None, r, None, now, wall, OURS);
        assert_eq!(live_members([seen].iter(), now, wall, OURS).0, Vec::<String>::new(), "{spec}");
    }
}

#[test]
fn a_member_is_live_while_this_replica_saw_its_lease_renewed_within_the_duration() {
    let t0 = std::time::Instant::now();
    let wall = time::OffsetDateTime::now_utc();
    let live = |seen: &Seen, at: std::time::Instant| live_members([seen.clone()].iter(), at, wall, OURS).0;
    // First sight of a recent renewal: live for one duration, then gone unless renewed.
    let (a, warn) = observe(None, record("a", 15, &rfc3339(wall)), None, t0, wall, OURS);
    assert_eq!(warn, None);
    assert_eq!(live(&a, t0 + Duration::from_secs(14)), vec!["a".to_string()]);
    assert!(live(&a, t0 + Duration::from_secs(16)).is_empty());
    // Renewed (renewTime changed) at t0+10: live until t0+25.
    let later = wall + time::Duration::seconds(10);
    let (a2, _) = observe(Some(&a), record("a", 15, &rfc3339(later)), None, t0 + OURS / 3 * 2, later, OURS);
    assert_eq!(live(&a2, t0 + Duration::from_secs(24)), vec!["a".to_string()]);
    // Seen again unchanged (a relist): not a renewal.
    let (a3, _) = observe(Some(&a2), a2.record.clone(), None, t0 + Duration::from_secs(20), later, OURS);
    assert!(live(&a3, t0 + Duration::from_secs(26)).is_empty());
    // First sight of a stale Lease (a member killed before this replica started):
    // not live; live from its next renewal.
    let old = wall - time::Duration::minutes(5);
    let (b, _) = observe(None, record("b", 15, &rfc3339(old)), None, t0, wall, OURS);
    assert!(live(&b, t0).is_empty());
    let (b2, _) = observe(Some(&b), record("b", 15, &rfc3339(old + time::Duration::seconds(5))), None, t0, wall, OURS);
    assert_eq!(live(&b2, t0), vec!["b".to_string()]);
    // A writer whose clock runs behind by far: live while it renews.
    let (c, _) = observe(None, record("c", 15, "2001-01-01T00:00:00Z"), None, t0, wall, OURS);
    let (c2, _) = observe(Some(&c), record("c", 15, "2001-01-01T00:00:05Z"), None, t0, wall, OURS);
    assert_eq!(live(&c2, t0), vec!["c".to_string()]);
}

#[test]
fn leases_that_cannot_be_members_are_ignored_with_one_warning_each() {
    let (now, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
    let recent = rfc3339(wall);
    let future = rfc3339(wall + time::Duration::seconds(60));
    let cases = [
        (record("d", 30, &recent), Ignored::ForeignDuration),
        (record("f", 15, &future), Ignored::FutureRenewal),
        (record(&"x".repeat(129), 15, &recent), Ignored::IdentityTooLong),
        (Record::from_spec(&json!({ "leaseDurationSeconds": 15, "renewTime": recent })), Ignored::NoHolder),
        (record("n", 15, "yesterday"), Ignored::NoRenewTime),
    ];
    for (r, reason) in cases {
        let (seen, warn) = observe(None, r.clone(), None, now, wall, OURS);
        assert_eq!(warn, Some(reason), "{r:?}");
        // Renewed again, still unusable: no second Warning; never live.
        let mut again = r.clone();
        again.renew = Some(rfc3339(wall + time::Duration::seconds(90)));
        let (seen2, warn2) = observe(Some(&seen), again, None, now, wall, OURS);
        assert!(warn2.is_none() || reason == Ignored::NoRenewTime, "{r:?}");
        assert!(live_members([seen, seen2].iter(), now, wall, OURS).0.is_empty(), "{r:?}");
    }
    // 128 bytes is still an identity.
    let (ok, warn) = observe(None, record(&"x".repeat(128), 15, &recent), None, now, wall, OURS);
    assert_eq!((live_members([ok].iter(), now, wall, OURS).0.len(), warn), (1, None));
}

#[test]
fn at_most_64_members_share_issuance() {
    let (now, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
    let seen: Vec<Seen> = (0..100)
        .map(|i| observe(None, record(&format!("m{i:03}"), 15, &rfc3339(wall)), None, now, wall, OURS).0)
        .collect();
    let (live, left_out) = live_members(seen.iter(), now, wall, OURS);
    assert_eq!((live.len(), left_out), (MAX_MEMBERS, 36));
    assert_eq!((live[0].as_str(), live[63].as_str()), ("m000", "m063"));
}

#[test]
fn a_relist_forgets_the_leases_it_no_longer_lists() {
    let (now, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
    let lease = |holder: &str| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": lease_name(holder), "resourceVersion": "1" },
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": rfc3339(wall) }
        }))
        .unwrap()
    };
    let mut members = Members::default();
    for holder in ["a", "b"] {
        members.apply(watcher::Event::Apply(lease(holder)), now, wall, OURS);
    }
    members.apply(watcher::Event::Init, now, wall, OURS);
    members.apply(watcher::Event::InitApply(lease("b")), now, wall, OURS);
    members.apply(watcher::Event::InitDone, now, wall, OURS);
    assert_eq!(live_members(members.seen.values(), now, wall, OURS).0, vec!["b".to_string()]);
    members.apply(watcher::Event::Delete(lease("b")), now, wall, OURS);
    assert!(members.seen.is_empty());
}
