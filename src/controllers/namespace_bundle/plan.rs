//! Pure: what one namespace's bundle ConfigMap needs, from what the controller keeps of
//! it ([`Bundle`]: a few bytes of its metadata).

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest as _, Sha256};

use crate::names::{self as ann, BUNDLE_DIGEST, NAMESPACE_BUNDLE_LABEL};

/// What to do for one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: the ConfigMap is ours and current, or the namespace is terminating.
    Nothing,
    /// There is none: create it.
    Create,
    /// Ours, holding another bundle: write the bundle over this resourceVersion.
    Update(String),
    /// Ours and current by its digest, but changed since this replica last saw it as
    /// current (someone else wrote it): read it and compare.
    Verify,
    /// A ConfigMap of that name that is not ours: left alone. `true` when it asks for
    /// injection (the legacy form or inject-cabundle), so it gets the bundle anyway.
    Foreign { injected: bool },
}

/// The digest of a bundle, as the [`BUNDLE_DIGEST`] annotation holds it: the first
/// 16 bytes of its SHA-256 (shown in hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest([u8; 16]);

impl Digest {
    pub fn of(bundle: &str) -> Digest {
        let mut bytes = [0u8; 16];
        bytes.iter_mut().zip(Sha256::digest(bundle.as_bytes())).for_each(|(b, d)| *b = d);
        Digest(bytes)
    }

    /// The digest an annotation value shows (`None`: not one).
    pub fn parse(hex: &str) -> Option<Digest> {
        let text = hex.as_bytes();
        if text.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Digest(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// [`Digest::of`] in hex, as the annotation holds it.
pub fn digest(bundle: &str) -> String {
    Digest::of(bundle).to_string()
}

/// What the controller keeps of a namespace's bundle ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub version: Box<str>,
    pub kind: Kind,
}

/// Whose the ConfigMap is, and what the plan needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// This instance's, with the digest its annotation shows.
    Ours { digest: Option<Digest> },
    /// Someone else's: whether it asks for injection, and its UID (for the Warning).
    Foreign { injected: bool, uid: Option<Box<str>> },
}

impl Bundle {
    /// What is kept of a ConfigMap with metadata `meta`, for this instance.
    pub fn of(meta: &ObjectMeta, instance: &str) -> Bundle {
        let annotations = meta.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        let kind = if ours(meta, instance) {
            Kind::Ours { digest: annotation(BUNDLE_DIGEST).and_then(|d| Digest::parse(d)) }
        } else {
            let injected = ann::is_true(annotation(ann::INJECT_VULNERABLE_LEGACY_CABUNDLE))
                || ann::is_true(annotation(ann::BETA.inject_cabundle))
                || ann::is_true(annotation(ann::ALPHA.inject_cabundle));
            Kind::Foreign { injected, uid: meta.uid.as_deref().map(Box::from) }
        };
        Bundle { version: meta.resource_version.as_deref().unwrap_or_default().into(), kind }
    }

    /// Whether it is ours and holds the bundle of `digest` (by its annotation).
    pub fn current(&self, digest: &Digest) -> bool {
        matches!(self.kind, Kind::Ours { digest: Some(d) } if d == *digest)
    }
}

/// Whether `meta` (of a ConfigMap named [`ann::NAMESPACE_BUNDLE`]) is one this
/// instance made.
pub fn ours(meta: &ObjectMeta, instance: &str) -> bool {
    meta.labels.as_ref().and_then(|l| l.get(NAMESPACE_BUNDLE_LABEL)).is_some_and(|v| v == instance)
}

/// Whether `meta` holds the bundle of `digest` (by its annotation).
pub fn current(meta: &ObjectMeta, digest: &str) -> bool {
    meta.annotations.as_ref().and_then(|a| a.get(BUNDLE_DIGEST)).is_some_and(|d| d == digest)
}

/// The plan for a namespace (`terminating` or not), given its bundle ConfigMap as kept
/// (`None`: there is none), the digest of the bundle, and the resourceVersion this
/// replica last saw the ConfigMap current at (`None`: not seen yet; its digest is
/// trusted, so that a restart costs no read per namespace).
pub fn plan(terminating: bool, bundle: Option<&Bundle>, digest: &Digest, seen_current: Option<&str>) -> Plan {
    if terminating {
        return Plan::Nothing;
    }
    let Some(bundle) = bundle else {
        return Plan::Create;
    };
    if let Kind::Foreign { injected, .. } = bundle.kind {
        return Plan::Foreign { injected };
    }
    let version = bundle.version.to_string();
    if !bundle.current(digest) {
        return Plan::Update(version);
    }
    match seen_current {
        Some(seen) if seen != version => Plan::Verify,
        _ => Plan::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(labels: &[(&str, &str)], annotations: &[(&str, &str)], version: &str) -> ObjectMeta {
        let map = |pairs: &[(&str, &str)]| Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        ObjectMeta {
            labels: map(labels),
            annotations: map(annotations),
            resource_version: Some(version.into()),
            ..Default::default()
        }
    }

    #[test]
    fn digest_is_short_and_follows_the_bundle() {
        assert_eq!(digest("a").len(), 32);
        assert_eq!(digest("a"), digest("a"));
        assert_ne!(digest("a"), digest("b"));
        assert_eq!(Digest::parse(&digest("a")), Some(Digest::of("a")), "read back from the annotation");
        for bad in ["", "xyz", &digest("a")[1..], &format!("{}zz", &digest("a")[2..])] {
            assert_eq!(Digest::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn plans() {
        let plan_of = |meta: Option<&ObjectMeta>, instance: &str, digest: &str, seen: Option<&str>| {
            let bundle = meta.map(|m| Bundle::of(m, instance));
            plan(false, bundle.as_ref(), &Digest::of(digest), seen)
        };
        let d = digest("bundle");
        let ours = meta(&[(NAMESPACE_BUNDLE_LABEL, "sca")], &[(BUNDLE_DIGEST, &d)], "7");
        assert_eq!(plan_of(None, "sca", "bundle", None), Plan::Create);
        assert_eq!(plan_of(Some(&ours), "sca", "bundle", None), Plan::Nothing, "first sight: the digest is trusted");
        assert_eq!(plan_of(Some(&ours), "sca", "bundle", Some("7")), Plan::Nothing);
        assert_eq!(plan_of(Some(&ours), "sca", "bundle", Some("5")), Plan::Verify, "written by someone else since");
        assert_eq!(plan_of(Some(&ours), "sca", "new", Some("7")), Plan::Update("7".into()));
        let unreadable = meta(&[(NAMESPACE_BUNDLE_LABEL, "sca")], &[(BUNDLE_DIGEST, "?")], "8");
        assert_eq!(plan_of(Some(&unreadable), "sca", "bundle", None), Plan::Update("8".into()));
        assert_eq!(plan_of(Some(&ours), "other", "bundle", None), Plan::Foreign { injected: false }, "another's");
        let user = meta(&[], &[], "3");
        assert_eq!(plan_of(Some(&user), "sca", "bundle", None), Plan::Foreign { injected: false });
        let legacy = meta(&[], &[(ann::INJECT_VULNERABLE_LEGACY_CABUNDLE, "true")], "3");
        assert_eq!(plan_of(Some(&legacy), "sca", "bundle", None), Plan::Foreign { injected: true });
        assert_eq!(plan(true, None, &Digest::of("bundle"), None), Plan::Nothing, "terminating");
    }

    #[test]
    fn what_is_kept_of_a_configmap_is_small() {
        // Per namespace: this, beside its name and resourceVersion (docs/benchmarks.md).
        assert!(size_of::<Bundle>() <= 40, "{}", size_of::<Bundle>());
        let foreign = meta(&[], &[], "3");
        let kept = Bundle::of(&ObjectMeta { uid: Some("u-1".into()), ..foreign }, "sca");
        assert_eq!(
            kept,
            Bundle { version: "3".into(), kind: Kind::Foreign { injected: false, uid: Some("u-1".into()) } }
        );
    }
}
