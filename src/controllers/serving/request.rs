//! What a Service asks for: whether it is annotated, the Secret it names, the key and
//! certificate it wants, what of it triggers the controllers, its failure count, and
//! the sharing keys of Services and their Secrets.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;

use super::MAX_FAILURES;
use crate::names::{self as ann, Family};
use crate::pki::{KeyKind, LeafRequest};

/// Whether a Service carries a serving-cert annotation (of any value): the only
/// Services worth caching.
pub fn is_annotated(svc: &Service) -> bool {
    let annotations = svc.annotations();
    [ann::BETA, ann::ALPHA].iter().any(|f| annotations.contains_key(f.serving_cert_secret_name))
}

/// The sharing key of a Service: `namespace/name`.
pub fn service_key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// The sharing key of a serving Secret: its Service's (so that one replica handles
/// both), or `namespace/name` of the Secret when it names no Service.
pub fn secret_key(secret: &PartialObjectMeta<Secret>) -> String {
    match originating_service(secret) {
        Some(svc) => format!("{}/{}", svc.namespace.unwrap_or_default(), svc.name),
        None => format!("{}/{}", secret.namespace().unwrap_or_default(), secret.name_any()),
    }
}

/// The Service a serving Secret was made for (from its originating-service-name).
pub fn originating_service(secret: &impl ResourceExt) -> Option<ObjectRef<Service>> {
    let name = originating_service_name(secret.annotations())?;
    Some(ObjectRef::new(name).within(&secret.namespace().unwrap_or_default()))
}

/// The originating-service-name annotation of a serving Secret (beta, else alpha).
pub fn originating_service_name(annotations: &BTreeMap<String, String>) -> Option<&str> {
    [ann::BETA, ann::ALPHA].iter().find_map(|f| annotations.get(f.originating_service_name)).map(String::as_str)
}

/// What a Service's annotations ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted<'a> {
    NotRequested,
    /// The annotation is present but empty (in every family that has it).
    Empty(Family),
    Named {
        name: &'a str,
        family: Family,
    },
}

/// The Secret name the Service asks for, if any.
pub(super) fn wanted_name(svc: &Service) -> Option<&str> {
    match wanted(svc) {
        Wanted::Named { name, .. } => Some(name),
        _ => None,
    }
}

/// Reads the serving-cert annotation: beta wins when both are set and non-empty.
pub fn wanted(svc: &Service) -> Wanted<'_> {
    wanted_in(svc.annotations())
}

/// [`wanted`], from a Service's annotations (`inspect` has only those).
pub fn wanted_in(annotations: &BTreeMap<String, String>) -> Wanted<'_> {
    let value = |f: Family| annotations.get(f.serving_cert_secret_name).map(|v| v.trim());
    match (value(ann::BETA), value(ann::ALPHA)) {
        (Some(name), _) if !name.is_empty() => Wanted::Named { name, family: ann::BETA },
        (_, Some(name)) if !name.is_empty() => Wanted::Named { name, family: ann::ALPHA },
        (Some(_), _) => Wanted::Empty(ann::BETA),
        (_, Some(_)) => Wanted::Empty(ann::ALPHA),
        (None, None) => Wanted::NotRequested,
    }
}

/// The kind of key a Service asks for: its serving-cert-key-algorithm annotation (beta
/// wins when both are set and non-empty; an empty one counts as absent), else
/// `default`. An unknown value, or one not in `allowed` (`--allowed-key-algorithms`;
/// empty: all), is an error to report on the Service (the value is echoed bounded).
pub fn key_algorithm(svc: &Service, default: KeyKind, allowed: &[KeyKind]) -> Result<KeyKind, String> {
    let annotations = svc.annotations();
    let set = [ann::BETA, ann::ALPHA].into_iter().find_map(|f| {
        let value = annotations.get(f.serving_cert_key_algorithm)?;
        (!value.trim().is_empty()).then_some((f, value))
    });
    let Some((family, value)) = set else { return Ok(default) };
    let problem = |why: &str| {
        format!("the annotation {} is {:?}: {why}", family.serving_cert_key_algorithm, crate::bounded(value))
    };
    let kind: KeyKind = value.parse().map_err(|why: String| problem(&why))?;
    if !allowed.is_empty() && !allowed.contains(&kind) {
        let why = format!("{kind} keys are not allowed here; use one of {}", crate::pki::key_values(allowed));
        return Err(problem(&why));
    }
    Ok(kind)
}

/// The certificate a Service asks for (its identity and DNS names), over a key of
/// kind `key` (see [`key_algorithm`]).
pub fn leaf_request(svc: &Service, cluster_domain: &str, key: KeyKind) -> LeafRequest {
    let meta = &svc.metadata;
    LeafRequest {
        service: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        headless: svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None"),
        cluster_domain: cluster_domain.to_string(),
        key,
    }
}

/// What of a Service matters to its serving Secret. Our own annotation writes
/// (errors, signed-by) leave it unchanged, so they trigger neither serving controller;
/// only what a person or the Service itself changes does.
pub fn trigger_hash(svc: &Service) -> u64 {
    let mut h = DefaultHasher::new();
    svc.uid().hash(&mut h);
    if let Some(spec) = &svc.spec {
        (&spec.cluster_ip, &spec.type_).hash(&mut h);
    }
    let annotations = svc.annotations();
    for f in [ann::BETA, ann::ALPHA] {
        annotations.get(f.serving_cert_secret_name).hash(&mut h);
        annotations.get(f.serving_cert_key_algorithm).hash(&mut h);
    }
    (failures(svc) >= MAX_FAILURES).hash(&mut h);
    h.finish()
}

/// Consecutive failures recorded on the Service. Both families carry the count;
/// removing (or lowering) either one is the person's edit that lifts the cap.
pub fn failures(svc: &Service) -> u32 {
    let annotations = svc.annotations();
    [ann::BETA, ann::ALPHA]
        .iter()
        .map(|f| annotations.get(f.generation_error_num).and_then(|n| n.trim().parse().ok()).unwrap_or(0))
        .min()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::serving::fixtures::svc;

    #[test]
    fn beta_wins_when_both_are_set_and_non_empty() {
        let both = svc(&[(ann::BETA.serving_cert_secret_name, "b"), (ann::ALPHA.serving_cert_secret_name, "a")], None);
        assert_eq!(wanted(&both), Wanted::Named { name: "b", family: ann::BETA });
        let empty_beta =
            svc(&[(ann::BETA.serving_cert_secret_name, ""), (ann::ALPHA.serving_cert_secret_name, "a")], None);
        assert_eq!(wanted(&empty_beta), Wanted::Named { name: "a", family: ann::ALPHA });
        assert_eq!(wanted(&svc(&[(ann::BETA.serving_cert_secret_name, " ")], None)), Wanted::Empty(ann::BETA));
        assert_eq!(wanted(&svc(&[], None)), Wanted::NotRequested);
    }

    #[test]
    fn the_key_algorithm_annotation_picks_the_key_kind() {
        let rsa = KeyKind::Rsa { bits: 2048 };
        let key = |annotations: &[(&str, &str)], default| key_algorithm(&svc(annotations, None), default, &[]);
        assert_eq!(key(&[], rsa), Ok(rsa));
        assert_eq!(key(&[], KeyKind::EcdsaP256), Ok(KeyKind::EcdsaP256), "the cluster default");
        assert_eq!(key(&[(ann::BETA.serving_cert_key_algorithm, "ECDSA")], rsa), Ok(KeyKind::EcdsaP256));
        assert_eq!(key(&[(ann::ALPHA.serving_cert_key_algorithm, "rsa-4096")], rsa), Ok(KeyKind::Rsa { bits: 4096 }));
        let both =
            [(ann::BETA.serving_cert_key_algorithm, "ecdsa-p384"), (ann::ALPHA.serving_cert_key_algorithm, "rsa")];
        assert_eq!(key(&both, rsa), Ok(KeyKind::EcdsaP384), "beta wins");
        let empty_beta =
            [(ann::BETA.serving_cert_key_algorithm, " "), (ann::ALPHA.serving_cert_key_algorithm, "ecdsa")];
        assert_eq!(key(&empty_beta, rsa), Ok(KeyKind::EcdsaP256), "an empty value counts as absent");
        let error = key(&[(ann::BETA.serving_cert_key_algorithm, "dsa")], KeyKind::EcdsaP256).unwrap_err();
        assert!(error.contains(ann::BETA.serving_cert_key_algorithm) && error.contains("\"dsa\""), "{error}");
        let long = "x".repeat(100_000);
        let error = key(&[(ann::BETA.serving_cert_key_algorithm, &long)], rsa).unwrap_err();
        assert!(error.len() < 600, "the echo is bounded: {} bytes", error.len());
        // --allowed-key-algorithms: another kind is refused naming the allowed values;
        // the default needs no annotation.
        let allowed = [rsa, KeyKind::EcdsaP256];
        let asked = svc(&[(ann::BETA.serving_cert_key_algorithm, "RSA-4096")], None);
        let error = key_algorithm(&asked, rsa, &allowed).unwrap_err();
        assert!(error.contains("\"RSA-4096\"") && error.contains("use one of rsa-2048, ecdsa-p256"), "{error}");
        let asked = svc(&[(ann::ALPHA.serving_cert_key_algorithm, "ecdsa")], None);
        assert_eq!(key_algorithm(&asked, rsa, &allowed), Ok(KeyKind::EcdsaP256));
        assert_eq!(key_algorithm(&svc(&[], None), rsa, &allowed), Ok(rsa));
    }

    #[test]
    fn own_annotation_writes_do_not_retrigger() {
        let mut svc = Service::default();
        svc.metadata.uid = Some("u".into());
        svc.annotations_mut().insert(ann::BETA.serving_cert_secret_name.into(), "tls".into());
        let before = trigger_hash(&svc);
        svc.annotations_mut().insert(ann::BETA.signed_by.into(), "ca".into());
        svc.annotations_mut().insert(ann::BETA.generation_error.into(), "boom".into());
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "3".into());
        assert_eq!(trigger_hash(&svc), before);
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "10".into());
        svc.annotations_mut().insert(ann::ALPHA.generation_error_num.into(), "10".into());
        assert_ne!(trigger_hash(&svc), before, "reaching the cap is a change");
        assert_eq!(failures(&svc), 10);
        svc.annotations_mut().remove(ann::BETA.generation_error_num);
        assert_eq!(failures(&svc), 0, "removing the beta count (as the Event says) lifts the cap");
        assert_eq!(trigger_hash(&svc), before, "and is a change");
        svc.annotations_mut().insert(ann::BETA.generation_error_num.into(), "10".into());
        svc.annotations_mut().insert(ann::BETA.serving_cert_secret_name.into(), "other".into());
        assert_ne!(trigger_hash(&svc), before);
    }
}
