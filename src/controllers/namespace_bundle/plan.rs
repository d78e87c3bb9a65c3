//! Pure: what one namespace's bundle ConfigMap needs, from metadata alone.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};

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
/// 16 bytes of its SHA-256, in hex.
pub fn digest(bundle: &str) -> String {
    Sha256::digest(bundle.as_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect()
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

/// The plan for `namespace`, given its bundle ConfigMap as cached (`None`: there is
/// none), this instance's name, the digest of the bundle, and the resourceVersion this
/// replica last saw the ConfigMap current at (`None`: not seen yet; its digest is
/// trusted, so that a restart costs no read per namespace).
pub fn plan(
    namespace: &ObjectMeta,
    bundle: Option<&ObjectMeta>,
    instance: &str,
    digest: &str,
    seen_current: Option<&str>,
) -> Plan {
    if namespace.deletion_timestamp.is_some() {
        return Plan::Nothing;
    }
    let Some(bundle) = bundle else {
        return Plan::Create;
    };
    if !ours(bundle, instance) {
        let annotations = bundle.annotations.clone().unwrap_or_default();
        let injected = ann::is_true(annotations.get(ann::INJECT_VULNERABLE_LEGACY_CABUNDLE))
            || ann::is_true(annotations.get(ann::BETA.inject_cabundle))
            || ann::is_true(annotations.get(ann::ALPHA.inject_cabundle));
        return Plan::Foreign { injected };
    }
    let version = bundle.resource_version.clone().unwrap_or_default();
    if !current(bundle, digest) {
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
    }

    #[test]
    fn plans() {
        let ns = ObjectMeta::default();
        let d = digest("bundle");
        let ours = meta(&[(NAMESPACE_BUNDLE_LABEL, "sca")], &[(BUNDLE_DIGEST, &d)], "7");
        assert_eq!(plan(&ns, None, "sca", &d, None), Plan::Create);
        assert_eq!(plan(&ns, Some(&ours), "sca", &d, None), Plan::Nothing, "first sight: the digest is trusted");
        assert_eq!(plan(&ns, Some(&ours), "sca", &d, Some("7")), Plan::Nothing);
        assert_eq!(plan(&ns, Some(&ours), "sca", &d, Some("5")), Plan::Verify, "written by someone else since");
        assert_eq!(plan(&ns, Some(&ours), "sca", &digest("new"), Some("7")), Plan::Update("7".into()));
        assert_eq!(plan(&ns, Some(&ours), "other", &d, None), Plan::Foreign { injected: false }, "another instance's");
        let user = meta(&[], &[], "3");
        assert_eq!(plan(&ns, Some(&user), "sca", &d, None), Plan::Foreign { injected: false });
        let legacy = meta(&[], &[(ann::INJECT_VULNERABLE_LEGACY_CABUNDLE, "true")], "3");
        assert_eq!(plan(&ns, Some(&legacy), "sca", &d, None), Plan::Foreign { injected: true });
        let terminating = ObjectMeta {
            deletion_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            )),
            ..Default::default()
        };
        assert_eq!(plan(&terminating, None, "sca", &d, None), Plan::Nothing);
    }
}
