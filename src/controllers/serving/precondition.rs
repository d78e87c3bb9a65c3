//! What both serving controllers check before they write, as one pure plan in two
//! parts around the read of the Secret: [`ask`] (the Service alone: is a Secret asked
//! for, is the Service at its failure cap, is its key algorithm known) and [`step`]
//! (the Secret read: absent, being deleted, and whose it is to fix — the ownership
//! rule: Secrets with the managed label are cert-refresh's, unlabeled ones
//! serving-cert's, so the two never write the same Secret).

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use time::OffsetDateTime;

use super::MAX_FAILURES;
use super::decision::{Decision, IssueReason, SecretFacts};
use super::request::{Wanted, failures, key_algorithm, wanted};
use super::secret::secret_facts;
use crate::names::{self as ann, Family};
use crate::pki::KeyKind;

/// Which controller is looking, by what it is keyed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keyed<'a> {
    /// serving-cert: the Service.
    Service,
    /// cert-refresh: the managed Secret of this name.
    Secret(&'a str),
}

/// What to do before reading the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask<'a> {
    /// Read the Secret `name` and go on with a key of kind `key`.
    Read { name: &'a str, family: Family, key: KeyKind },
    /// Nothing until the Service changes (not asked, at the cap, or another's to report).
    Wait,
    /// Report this on the Service (serving-cert only).
    Report(String),
    /// The Service no longer names this Secret: release it (cert-refresh only).
    Release,
}

/// The first part of the plan: what the Service `svc` allows, seen by `keyed`.
pub fn ask<'a>(svc: &'a Service, keyed: Keyed<'_>, default_key: KeyKind, allowed: &[KeyKind]) -> Ask<'a> {
    let named = match (keyed, wanted(svc)) {
        (Keyed::Secret(secret), Wanted::Named { name, family }) if name == secret => Some((name, family)),
        (Keyed::Secret(_), _) => return Ask::Release,
        (Keyed::Service, _) => None,
    };
    // At the cap, nothing happens until a person edits the Service.
    if failures(svc) >= MAX_FAILURES {
        return Ask::Wait;
    }
    let (name, family) = match named.map(Ok).or_else(|| requested_secret(svc).transpose()) {
        Some(Ok(named)) => named,
        None => return Ask::Wait,
        Some(Err(problem)) => return Ask::Report(problem),
    };
    // An unknown key algorithm is the serving-cert controller's to report; the Secret
    // stays as it is until the Service is fixed.
    match (key_algorithm(svc, default_key, allowed), keyed) {
        (Ok(key), _) => Ask::Read { name, family, key },
        (Err(problem), Keyed::Service) => Ask::Report(problem),
        (Err(_), Keyed::Secret(_)) => Ask::Wait,
    }
}

/// The Secret name the Service asks for (`None`: none), or why it cannot have one.
fn requested_secret(svc: &Service) -> Result<Option<(&str, Family)>, String> {
    match wanted(svc) {
        Wanted::NotRequested => Ok(None),
        Wanted::Empty(family) => Err(format!(
            "the annotation {} is empty: set it to the name of the Secret to create",
            family.serving_cert_secret_name
        )),
        Wanted::Named { name, family } => match ann::check_subdomain(name) {
            Ok(()) => Ok(Some((name, family))),
            Err(why) => Err(format!("{:?} is not a valid Secret name: {why}", crate::bounded(name))),
        },
    }
}

/// What to do with the Secret read.
#[derive(Clone, Debug, PartialEq)]
pub enum Step<'s> {
    /// Nothing until something changes (it is absent for cert-refresh, or it is the
    /// other controller's to fix).
    Wait,
    /// It is being deleted and held: wait for it (see `secret::wait_for_deletion`).
    WaitForDeletion(&'s ObjectMeta),
    /// It is not ours (why): never modified.
    Foreign(String),
    /// Issue a new certificate into it.
    Issue(IssueReason),
    /// Fix its other data keys or our metadata, keeping certificate and key.
    Tidy { extra_keys: Vec<String>, expiry: OffsetDateTime, refresh_at: Option<OffsetDateTime> },
    /// Nothing for this controller to write; look again at `refresh_at`.
    Leave { refresh_at: Option<OffsetDateTime> },
}

/// The second part of the plan: what `keyed` does with the Secret read (`existing`),
/// given the re-issue decision (`decide`, see `decision::decide`, called only for a
/// Secret not being deleted).
pub fn step<'s>(
    keyed: Keyed<'_>,
    existing: Option<&'s Secret>,
    decide: impl FnOnce(Option<&SecretFacts<'_>>) -> Decision,
) -> Step<'s> {
    let facts = existing.map(secret_facts);
    let labeled = facts.as_ref().is_some_and(|f| f.labeled);
    let serving = keyed == Keyed::Service;
    match existing {
        // Gone: garbage collection follows; its deletion brought serving-cert already.
        None if !serving => return Step::Wait,
        // Being deleted: waited for (by cert-refresh when it is labeled); its deletion
        // brings serving-cert back to create it.
        Some(held) if held.metadata.deletion_timestamp.is_some() => {
            return if serving && labeled { Step::Wait } else { Step::WaitForDeletion(&held.metadata) };
        }
        _ => {}
    }
    match decide(facts.as_ref()) {
        Decision::Foreign(why) => Step::Foreign(why),
        // Labeled Secrets are cert-refresh's to fix; its write brings serving-cert back.
        Decision::Issue(_) if serving && labeled => Step::Wait,
        Decision::Issue(reason) => Step::Issue(reason),
        Decision::Tidy { refresh_at, .. } if serving && labeled => Step::Leave { refresh_at },
        Decision::Tidy { extra_keys, expiry, refresh_at } => Step::Tidy { extra_keys, expiry, refresh_at },
        Decision::Keep { refresh_at } => Step::Leave { refresh_at },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::serving::fixtures::svc;

    const RSA: KeyKind = KeyKind::Rsa { bits: 2048 };

    #[test]
    fn what_the_service_allows_each_controller() {
        let beta = ann::BETA.serving_cert_secret_name;
        let alg = ann::BETA.serving_cert_key_algorithm;
        let errors = ann::BETA.generation_error_num;
        let capped = [(beta, "tls"), (errors, "10"), (ann::ALPHA.generation_error_num, "10")];
        let read = Ask::Read { name: "tls", family: ann::BETA, key: RSA };
        type Annotations<'a> = &'a [(&'a str, &'a str)];
        let table: &[(Annotations<'_>, Keyed<'_>, Ask<'_>)] = &[
            (&[(beta, "tls")], Keyed::Service, read.clone()),
            (&[(beta, "tls")], Keyed::Secret("tls"), read.clone()),
            (&[], Keyed::Service, Ask::Wait),
            (&[], Keyed::Secret("tls"), Ask::Release),
            (&[(beta, "other")], Keyed::Secret("tls"), Ask::Release),
            (&capped, Keyed::Service, Ask::Wait),
            (&capped, Keyed::Secret("tls"), Ask::Wait),
            (&[(beta, "")], Keyed::Secret("tls"), Ask::Release),
            (&[(beta, "tls"), (alg, "dsa")], Keyed::Secret("tls"), Ask::Wait),
        ];
        for (annotations, keyed, want) in table {
            assert_eq!(&ask(&svc(annotations, None), *keyed, RSA, &[]), want, "{annotations:?} {keyed:?}");
        }
        // Bad input is reported by serving-cert, and only below the cap.
        let reported = |annotations: &[(&str, &str)]| match ask(&svc(annotations, None), Keyed::Service, RSA, &[]) {
            Ask::Report(problem) => problem,
            other => panic!("{annotations:?}: {other:?}"),
        };
        assert!(reported(&[(beta, " ")]).contains("is empty"));
        assert!(reported(&[(beta, "Not_A_Name")]).contains("is not a valid Secret name"));
        assert!(reported(&[(beta, "tls"), (alg, "dsa")]).contains("\"dsa\""));
        let capped_bad = [(beta, ""), (errors, "10"), (ann::ALPHA.generation_error_num, "10")];
        assert_eq!(ask(&svc(&capped_bad, None), Keyed::Service, RSA, &[]), Ask::Wait);
    }

    fn secret(labeled: bool, deleting: bool) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.name = Some("tls".into());
        if labeled {
            secret.metadata.labels =
                Some([(ann::MANAGED_LABEL.to_string(), ann::MANAGED_LABEL_VALUE.to_string())].into());
        }
        if deleting {
            secret.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-12-02T01:00:00Z".parse().unwrap()));
        }
        secret
    }

    #[test]
    fn whose_secret_it_is_to_fix() {
        let at = OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        let tidy = Decision::Tidy { extra_keys: vec!["x".into()], expiry: at, refresh_at: Some(at) };
        let issue = Decision::Issue(IssueReason::OtherCa);
        let (serving, refresh) = (Keyed::Service, Keyed::Secret("tls"));
        let (labeled, unlabeled) = (secret(true, false), secret(false, false));
        let (held_labeled, held) = (secret(true, true), secret(false, true));
        let tidied = Step::Tidy { extra_keys: vec!["x".into()], expiry: at, refresh_at: Some(at) };
        let table: Vec<(Keyed<'_>, Option<&Secret>, Decision, Step<'_>)> = vec![
            (serving, None, Decision::Issue(IssueReason::Absent), Step::Issue(IssueReason::Absent)),
            (refresh, None, Decision::Issue(IssueReason::Absent), Step::Wait),
            (serving, Some(&held_labeled), issue.clone(), Step::Wait),
            (serving, Some(&held), issue.clone(), Step::WaitForDeletion(&held.metadata)),
            (refresh, Some(&held_labeled), issue.clone(), Step::WaitForDeletion(&held_labeled.metadata)),
            (serving, Some(&labeled), issue.clone(), Step::Wait),
            (serving, Some(&unlabeled), issue.clone(), Step::Issue(IssueReason::OtherCa)),
            (refresh, Some(&labeled), issue.clone(), Step::Issue(IssueReason::OtherCa)),
            (serving, Some(&labeled), tidy.clone(), Step::Leave { refresh_at: Some(at) }),
            (serving, Some(&unlabeled), tidy.clone(), tidied.clone()),
            (refresh, Some(&labeled), tidy.clone(), tidied.clone()),
            (serving, Some(&labeled), Decision::Foreign("no".into()), Step::Foreign("no".into())),
            (refresh, Some(&labeled), Decision::Foreign("no".into()), Step::Foreign("no".into())),
            (refresh, Some(&labeled), Decision::Keep { refresh_at: None }, Step::Leave { refresh_at: None }),
        ];
        for (keyed, existing, decision, want) in table {
            let case = format!("{keyed:?} {existing:?} {decision:?}");
            assert_eq!(step(keyed, existing, |_| decision), want, "{case}");
        }
    }
}
