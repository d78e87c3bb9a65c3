//! The CA lifecycle's decisions as pure functions: what to do with `signing-key`
//! ([`plan`]), and what to publish once the CA is settled ([`publication`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use time::OffsetDateTime;

use crate::names::{FORCE_ROTATION, FORCED_ROTATION_REASON};
use crate::pki::pkcs11::Token;
use crate::pki::{CaPolicy, CertificateAuthority, KeyKind, PkiError};
use crate::signer::Signer;

/// What the loop has seen of one watched object.
#[derive(Clone, Debug, Default)]
pub enum Observed<T> {
    /// Not listed yet: nothing is decided before the first list.
    #[default]
    NotListed,
    Absent,
    Present(T),
}

/// What to do with `signing-key`.
#[derive(Debug)]
pub enum Plan {
    /// No Secret: a brand-new CA (first start, or the hard reset after a person
    /// deleted it).
    Create,
    /// A Secret that cannot be used: reported, never overwritten.
    Refuse(PkiError),
    /// Rotate with a trust bridge: due by time, or forced with a new reason.
    Rotate { ca: CertificateAuthority, forced: Option<String> },
    /// The CA is right as it is: use it.
    Use(CertificateAuthority),
}

/// Decides from the Secret (`None`: it does not exist) what the CA needs.
pub fn plan(secret: Option<&Secret>, policy: &CaPolicy, now: OffsetDateTime) -> Plan {
    plan_with(secret, policy, now, None)
}

/// [`plan`], with the CA key in `token` when one is configured (loading it asks the
/// token for a probe signature).
pub fn plan_with(secret: Option<&Secret>, policy: &CaPolicy, now: OffsetDateTime, token: Option<&Arc<Token>>) -> Plan {
    let Some(secret) = secret else {
        return Plan::Create;
    };
    let data: BTreeMap<String, Vec<u8>> = secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    let ca = match CertificateAuthority::load(&data, now, token) {
        Ok(ca) => ca,
        Err(error) => return Plan::Refuse(error),
    };
    let forced = forced_rotation(secret);
    if forced.is_some() || now >= ca.rotation_due(policy) {
        return Plan::Rotate { ca, forced };
    }
    Plan::Use(ca)
}

/// The key of the next CA: `asked` (`--ca-key-algorithm`) when set, else the current
/// CA's kind (`None` when there is none: a new CA gets RSA-2048). A rotation to another
/// kind has the same trust bridge as any rotation.
pub fn next_key_kind(current: Option<KeyKind>, asked: Option<KeyKind>) -> KeyKind {
    asked.or(current).unwrap_or(KeyKind::Rsa { bits: 2048 })
}

/// A force-rotation reason not acted on yet.
fn forced_rotation(secret: &Secret) -> Option<String> {
    let annotations = secret.annotations();
    let reason = annotations.get(FORCE_ROTATION).map(|r| r.trim()).filter(|r| !r.is_empty())?;
    (annotations.get(FORCED_ROTATION_REASON).map(String::as_str) != Some(reason)).then(|| reason.to_string())
}

/// What publishing a settled CA takes.
#[derive(Debug, PartialEq, Eq)]
pub struct Publication {
    /// The bundle (docs/spec.md §3.4) as of now.
    pub bundle_pem: String,
    /// `signing-cabundle` does not hold it yet.
    pub write_bundle: bool,
    /// The in-memory signer is another CA or bundle.
    pub swap_signer: bool,
    /// When the loop must look again by itself: rotation due, or a bundle member
    /// expiring (one second after, so that it has left the bundle).
    pub next: Option<OffsetDateTime>,
}

/// Compares the CA with what is published (`stored_bundle` of `signing-cabundle`, the
/// signer held in memory).
pub fn publication(
    ca: &CertificateAuthority,
    stored_bundle: Option<&str>,
    held: Option<&Signer>,
    policy: &CaPolicy,
    now: OffsetDateTime,
) -> Publication {
    let bundle_pem = ca.bundle_pem(now);
    let next = [
        Some(ca.rotation_due(policy)),
        ca.next_bundle_change(now).map(|t| crate::dates::after(t, Duration::from_secs(1))),
    ]
    .into_iter()
    .flatten()
    .min();
    Publication {
        write_bundle: stored_bundle != Some(bundle_pem.as_str()),
        swap_signer: held
            .is_none_or(|held| held.ca.certificate().der != ca.certificate().der || held.bundle_pem != bundle_pem),
        bundle_pem,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::PrivateKey;
    use k8s_openapi::ByteString;

    const DAY: Duration = Duration::from_secs(86_400);

    fn policy() -> CaPolicy {
        CaPolicy { lifetime: 10 * DAY, rotate_before: 4 * DAY }
    }

    fn secret_of(ca: &CertificateAuthority, annotations: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(ca.to_secret_data().into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
            metadata: kube::api::ObjectMeta {
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Secret::default()
        }
    }

    fn new_ca(now: OffsetDateTime) -> CertificateAuthority {
        let key = PrivateKey::generate_rsa(2048).expect("key");
        CertificateAuthority::create(key, now, &policy()).expect("CA")
    }

    #[test]
    fn absent_creates_unusable_refuses() {
        let now = OffsetDateTime::now_utc();
        assert!(matches!(plan(None, &policy(), now), Plan::Create));
        let broken = Secret {
            data: Some(BTreeMap::from([("tls.crt".to_string(), ByteString(b"junk".to_vec()))])),
            ..Secret::default()
        };
        assert!(matches!(plan(Some(&broken), &policy(), now), Plan::Refuse(_)));
    }

    #[test]
    fn rotates_when_due_or_forced_once_per_reason() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca(now);
        assert!(matches!(plan(Some(&secret_of(&ca, &[])), &policy(), now), Plan::Use(_)));
        assert!(
            matches!(plan(Some(&secret_of(&ca, &[])), &policy(), now + 6 * DAY), Plan::Rotate { forced: None, .. }),
            "less than rotate-before left"
        );
        let asked = secret_of(&ca, &[(FORCE_ROTATION, " r1 ")]);
        assert!(matches!(plan(Some(&asked), &policy(), now), Plan::Rotate { forced: Some(r), .. } if r == "r1"));
        let done = secret_of(&ca, &[(FORCE_ROTATION, "r1"), (FORCED_ROTATION_REASON, "r1")]);
        assert!(matches!(plan(Some(&done), &policy(), now), Plan::Use(_)), "each reason rotates once");
        let blank = secret_of(&ca, &[(FORCE_ROTATION, "  ")]);
        assert!(matches!(plan(Some(&blank), &policy(), now), Plan::Use(_)));
    }

    #[test]
    fn the_ca_key_kind_is_kept_unless_another_is_asked_for() {
        let rsa = KeyKind::Rsa { bits: 2048 };
        assert_eq!(next_key_kind(None, None), rsa, "a new CA: RSA-2048 by default");
        assert_eq!(next_key_kind(None, Some(KeyKind::EcdsaP256)), KeyKind::EcdsaP256);
        assert_eq!(next_key_kind(Some(KeyKind::Rsa { bits: 4096 }), None), KeyKind::Rsa { bits: 4096 }, "kept");
        assert_eq!(next_key_kind(Some(rsa), Some(KeyKind::EcdsaP384)), KeyKind::EcdsaP384, "moved");
    }

    #[test]
    fn publication_writes_and_swaps_only_what_differs() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca(now);
        let first = publication(&ca, None, None, &policy(), now);
        assert!(first.write_bundle && first.swap_signer);
        assert_eq!(first.next, Some(ca.rotation_due(&policy())), "the CA's own expiry is later than its rotation");
        let same = CertificateAuthority::from_secret_data(&ca.to_secret_data(), now).expect("reload");
        let held = Signer::new(same, now);
        let settled = publication(&ca, Some(&first.bundle_pem), Some(&held), &policy(), now);
        assert!(!settled.write_bundle && !settled.swap_signer, "nothing to write when nothing changed");
        let other = Signer::new(new_ca(now), now);
        assert!(publication(&ca, Some(&first.bundle_pem), Some(&other), &policy(), now).swap_signer);
    }

    #[test]
    fn a_ca_of_ones_own_valid_until_9999_is_used_and_published_without_overflow() {
        let now = OffsetDateTime::now_utc();
        let data = crate::pki::own_ca(crate::dates::EARLIEST, crate::dates::LATEST);
        let secret =
            Secret { data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()), ..Secret::default() };
        let Plan::Use(ca) = plan(Some(&secret), &policy(), now) else { panic!("the CA is used as it is") };
        let due = ca.rotation_due(&policy());
        assert_eq!(due, crate::dates::before(crate::dates::LATEST, 4 * DAY));
        let published = publication(&ca, None, None, &policy(), now);
        assert_eq!(published.next, Some(due), "rotation before the bundle's end (9999, plus one second: capped)");
        assert!(crate::controllers::until(due) <= crate::dates::LONGEST_WAIT, "a wait any timer can hold");
        // In its last days: rotation due, and the bundle's end is the latest date.
        let late = crate::dates::before(crate::dates::LATEST, DAY);
        assert!(matches!(plan(Some(&secret), &policy(), late), Plan::Rotate { forced: None, .. }));
        assert_eq!(publication(&ca, None, None, &policy(), late).next, Some(due));
        let last = publication(&ca, None, None, &CaPolicy { lifetime: DAY, rotate_before: Duration::ZERO }, late);
        assert_eq!(last.next, Some(crate::dates::LATEST), "the bundle change, one second after 9999's end: capped");
    }
}
