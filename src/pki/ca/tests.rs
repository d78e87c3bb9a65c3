use super::*;
use crate::dates::{EARLIEST, LATEST};
use crate::pki::{LeafInfo, LeafPolicy, LeafRequest, PrivateKey};

const DAY: Duration = Duration::from_secs(86_400);

fn policy() -> CaPolicy {
    CaPolicy { lifetime: 790 * DAY, rotate_before: 395 * DAY }
}

/// `signing-key` data with a CA of one's own (ECDSA: quick), valid from
/// `not_before` to `not_after` exactly, as an enterprise root is made.
pub(crate) fn own_ca(not_before: OffsetDateTime, not_after: OffsetDateTime) -> BTreeMap<String, Vec<u8>> {
    let key = PrivateKey::generate(KeyKind::EcdsaP256).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Example Corp Root");
    let mut params = ca_params(dn, not_before, not_after, KeyIdMethod::Sha256, key.kind());
    params.not_before = not_before;
    let cert = params.self_signed(&key.signing_key().unwrap()).unwrap();
    BTreeMap::from([
        (TLS_CERT.to_string(), cert.pem().into_bytes()),
        (TLS_KEY.to_string(), key.to_pem().as_bytes().to_vec()),
    ])
}

fn request() -> LeafRequest {
    LeafRequest {
        service: "web".into(),
        namespace: "shop".into(),
        uid: "uid-1".into(),
        headless: false,
        cluster_domain: "cluster.local".into(),
        key: KeyKind::EcdsaP256,
    }
}

#[test]
fn a_ca_valid_from_year_0_until_9999_loads_signs_and_rotates_without_overflow() {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let ca = CertificateAuthority::from_secret_data(&own_ca(EARLIEST, LATEST), now).unwrap();
    assert_eq!((ca.certificate().not_before, ca.not_after()), (EARLIEST, LATEST), "read as written");
    assert_eq!(ca.rotation_due(&policy()), crate::dates::before(LATEST, 395 * DAY));
    assert!(now < ca.rotation_due(&policy()), "not due for thousands of years");
    assert_eq!(ca.next_bundle_change(now), Some(LATEST));

    // A leaf: NotAfter = now + lifetime, never past the CA.
    let key = PrivateKey::generate(KeyKind::EcdsaP256).unwrap();
    let leaf = ca.issue(&request(), &key, now, 730 * DAY).unwrap();
    assert_eq!(leaf.not_after, now + 730 * DAY);
    let info = LeafInfo::parse(leaf.chain_pem.as_bytes()).unwrap();
    assert_eq!(info.authority_key_id.as_deref(), Some(ca.subject_key_id()));
    let policy_leaf = LeafPolicy { cluster_domain: "cluster.local".into(), lifetime: 730 * DAY, refresh_before: DAY };
    assert_eq!(policy_leaf.refresh_at(leaf.not_after, ca.not_after()), Some(now + 729 * DAY));
    // Issued in the CA's last seconds, or for a lifetime past 9999: capped, no panic.
    let last = crate::dates::before(LATEST, Duration::from_secs(2));
    let capped = ca.issue(&request(), &key, last, 730 * DAY).unwrap();
    assert_eq!(capped.not_after, LATEST);
    assert_eq!(policy_leaf.refresh_at(capped.not_after, ca.not_after()), None, "the CA's rotation refreshes it");
    assert_eq!(ca.issue(&request(), &key, now, Duration::MAX).unwrap().not_after, LATEST);
    assert!(matches!(ca.issue(&request(), &key, LATEST, DAY), Err(PkiError::Expired { .. })));

    // A rotation, now and in the CA's last year: the new CA and its bridges end in
    // 9999 at the latest.
    for at in [now, last] {
        let rotated = ca.rotate(PrivateKey::generate(KeyKind::EcdsaP256).unwrap(), at, &policy()).unwrap();
        assert_eq!(rotated.not_after(), crate::dates::after(at, 790 * DAY));
        assert!(rotated.bundle_certs().all(|c| c.not_after <= LATEST));
        assert_eq!(rotated.bundle_certs().nth(1).map(|x1| x1.not_after), Some(LATEST), "X1 keeps the old expiry");
        assert_eq!(rotated.intermediates()[0].not_after, rotated.not_after());
    }
}

#[test]
fn a_ca_valid_only_in_year_0_is_refused_as_expired_not_panicking() {
    let ancient = crate::dates::after(EARLIEST, DAY);
    let error = CertificateAuthority::from_secret_data(&own_ca(EARLIEST, ancient), OffsetDateTime::now_utc());
    assert!(matches!(error, Err(PkiError::Expired { .. })), "{error:?}");
    // Read at its own time, every date computed from it stays encodable.
    let ca = CertificateAuthority::from_secret_data(&own_ca(EARLIEST, ancient), EARLIEST).unwrap();
    assert_eq!(ca.rotation_due(&policy()), EARLIEST);
    let key = PrivateKey::generate(KeyKind::EcdsaP256).unwrap();
    let leaf = ca.issue(&request(), &key, EARLIEST, 730 * DAY).unwrap();
    assert_eq!(leaf.not_after, ancient, "capped at the CA's expiry");
    let info = LeafInfo::parse(leaf.chain_pem.as_bytes()).unwrap();
    assert_eq!(info.not_after, ancient);
}
