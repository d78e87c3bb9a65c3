//! The pure decision for one PodCertificateRequest: issue (for which names, how
//! long), wait for a Service, deny or fail — in that order of checks:
//!
//! 1. already Issued, Denied or Failed → nothing (those are final);
//! 2. any `unverifiedUserAnnotations` key → Denied `InvalidUnverifiedUserAnnotations`
//!    (this signer recognises none);
//! 3. a key type the CA cannot certify → Denied `UnsupportedKeyType`; an unreadable
//!    request → Failed;
//! 4. only a pod that asked (each with a reason of its own, all Denied): the pod
//!    exists (`PodNotFound`) with the request's UID (`PodUIDMismatch`), has a
//!    projected `podCertificate` source with this signer (`PodDidNotAskThisSigner`),
//!    runs on the request's node (`NodeNameMismatch`) as its service account
//!    (`ServiceAccountMismatch`), and is Pending or Running and not being deleted
//!    (`PodNotActive`);
//! 5. no Service selects the pod → pending until the grace period (from the request's
//!    creation) ends, then Denied `NoServiceSelectsPod`;
//! 6. less than the API server's one-hour minimum left before the CA expires → Failed;
//! 7. otherwise issue.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;

use crate::pki::{KeyError, RequestedKey, format_expiry, requested_key};

/// The shortest pod certificate the API server accepts.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);

/// What the request asks for (the parts the decision reads).
pub struct Request<'a> {
    pub namespace: &'a str,
    pub created: OffsetDateTime,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
    pub node_name: &'a str,
    pub service_account_name: &'a str,
    pub max_expiration_seconds: Option<i32>,
    pub stub_pkcs10: &'a [u8],
    pub user_annotations: Option<&'a BTreeMap<String, String>>,
    /// Issued, Denied or Failed already.
    pub answered: bool,
}

/// The pod the request was made for, as read now.
pub struct Pod {
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    /// `status.phase` (`None`: not set yet, as Pending).
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// A projected volume of the pod has a `podCertificate` source with this signer.
    pub asks_this_signer: bool,
}

/// A Service of the request's namespace, as indexed: its name, its selector (label
/// pairs, as a slice: a map would cost half a KiB per Service; never empty, and
/// within [`MAX_SELECTOR_PAIRS`] and [`MAX_SELECTOR_BYTES`]) and whether it is
/// headless.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedService {
    pub name: Box<str>,
    pub selector: Box<[(Box<str>, Box<str>)]>,
    pub headless: bool,
}

impl IndexedService {
    /// Whether the Service selects a pod with `labels` (an empty selector selects none).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.selector.is_empty()
            && self.selector.iter().all(|(k, v)| labels.get(&**k).map(String::as_str) == Some(&**v))
    }
}

/// The most label pairs a Service's selector may have to be used for pod
/// certificates. Kubernetes sets no limit; real selectors have a handful.
pub const MAX_SELECTOR_PAIRS: usize = 64;
/// The most bytes (keys and values) such a selector may have: 64 pairs of typical
/// labels, or 21 of the longest Kubernetes allows (253-byte prefix, 63-byte name and
/// 63-byte value).
pub const MAX_SELECTOR_BYTES: usize = 8 * 1024;

/// What the index keeps of a Service's selector.
#[derive(Debug, PartialEq, Eq)]
pub enum Selector {
    /// No selector (or an empty one): it selects no pod, nothing to keep.
    None,
    /// Beyond [`MAX_SELECTOR_PAIRS`] or [`MAX_SELECTOR_BYTES`]: not kept, not used.
    Oversize {
        pairs: usize,
        bytes: usize,
    },
    Pairs(Box<[(Box<str>, Box<str>)]>),
}

/// The selector as the index keeps it (`selector`: the Service's, as read).
pub fn bounded_selector(selector: Option<&BTreeMap<String, String>>) -> Selector {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return Selector::None };
    let pairs = selector.len();
    let bytes = selector.iter().fold(0usize, |sum, (k, v)| sum.saturating_add(k.len()).saturating_add(v.len()));
    if pairs > MAX_SELECTOR_PAIRS || bytes > MAX_SELECTOR_BYTES {
        return Selector::Oversize { pairs, bytes };
    }
    Selector::Pairs(selector.iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect())
}

/// Settings and the moment of the decision.
pub struct Settings<'a> {
    pub now: OffsetDateTime,
    pub grace: Duration,
    /// The longest certificate handed out (the flag, and never longer than the old CA
    /// stays in the bundle after a rotation).
    pub max_lifetime: Duration,
    pub cluster_domain: &'a str,
    pub ca_not_after: OffsetDateTime,
    /// This signer's name (`--pod-signer-name`), for messages.
    pub signer_name: &'a str,
}

#[derive(Debug)]
pub enum Plan {
    /// Answered already: nothing to do.
    Nothing,
    /// No Service selects the pod yet: look again when one appears, or at `until`.
    Wait {
        until: OffsetDateTime,
    },
    Deny {
        reason: &'static str,
        message: String,
    },
    Fail {
        message: String,
    },
    Issue {
        names: Vec<String>,
        lifetime: Duration,
        key: RequestedKey,
    },
}

pub const DENIED_ANNOTATIONS: &str = "InvalidUnverifiedUserAnnotations";
pub const DENIED_KEY: &str = "UnsupportedKeyType";
pub const DENIED_NO_SERVICE: &str = "NoServiceSelectsPod";
pub const DENIED_NO_POD: &str = "PodNotFound";
pub const DENIED_POD_UID: &str = "PodUIDMismatch";
pub const DENIED_NOT_ASKED: &str = "PodDidNotAskThisSigner";
pub const DENIED_NODE: &str = "NodeNameMismatch";
pub const DENIED_SERVICE_ACCOUNT: &str = "ServiceAccountMismatch";
pub const DENIED_NOT_ACTIVE: &str = "PodNotActive";

pub fn plan(
    request: &Request<'_>,
    pod: Option<&Pod>,
    services: &[std::sync::Arc<IndexedService>],
    settings: &Settings<'_>,
) -> Plan {
    if request.answered {
        return Plan::Nothing;
    }
    if let Some(keys) = request.user_annotations.filter(|a| !a.is_empty()) {
        let keys: Vec<&str> = keys.keys().map(String::as_str).collect();
        let message = format!("this signer recognises no unverifiedUserAnnotations; remove {}", keys.join(", "));
        return Plan::Deny { reason: DENIED_ANNOTATIONS, message: crate::bounded(&message).into_owned() };
    }
    let key = match requested_key(request.stub_pkcs10) {
        Ok(key) => key,
        Err(error @ KeyError::Unsupported { .. }) => {
            return Plan::Deny { reason: DENIED_KEY, message: error.to_string() };
        }
        Err(error) => return Plan::Fail { message: error.to_string() },
    };
    let pod = match asked(request, pod, settings.signer_name) {
        Ok(pod) => pod,
        Err((reason, message)) => return Plan::Deny { reason, message: crate::bounded(&message).into_owned() },
    };
    let names = dns_names(request.namespace, pod, services, settings.cluster_domain);
    if names.is_empty() {
        let until = crate::dates::after(request.created, settings.grace);
        if settings.now < until {
            return Plan::Wait { until };
        }
        let message = format!(
            "no Service in namespace {} selects the pod's labels (waited {} for one); create a Service whose selector matches the pod",
            request.namespace,
            humantime::format_duration(settings.grace)
        );
        return Plan::Deny { reason: DENIED_NO_SERVICE, message };
    }
    let asked = Duration::from_secs(request.max_expiration_seconds.map_or(86_400, |s| u64::try_from(s).unwrap_or(0)));
    let ca_left = crate::dates::between(settings.now, settings.ca_not_after);
    let lifetime = asked.min(settings.max_lifetime).min(ca_left);
    if lifetime < MIN_LIFETIME {
        let message = format!(
            "the service CA expires at {}, less than the one-hour minimum of a pod certificate from now; it is rotated before that",
            format_expiry(settings.ca_not_after)
        );
        return Plan::Fail { message };
    }
    Plan::Issue { names, lifetime, key }
}

/// The pod, when it is the one the request names and it asked this signer for a
/// certificate; otherwise why not (a reason of its own for each check).
fn asked<'p>(
    request: &Request<'_>,
    pod: Option<&'p Pod>,
    signer_name: &str,
) -> Result<&'p Pod, (&'static str, String)> {
    let name = request.pod_name;
    let Some(pod) = pod else {
        return Err((DENIED_NO_POD, format!("pod {name} does not exist")));
    };
    if pod.uid != request.pod_uid {
        let message = format!("pod {name} has UID {}, not the request's {}", pod.uid, request.pod_uid);
        return Err((DENIED_POD_UID, message));
    }
    if !pod.asks_this_signer {
        let message = format!(
            "pod {name} has no projected podCertificate volume source with signerName {signer_name}: only a pod that \
             asks this signer gets a certificate from it"
        );
        return Err((DENIED_NOT_ASKED, message));
    }
    let node = pod.node_name.as_deref().unwrap_or_default();
    if node != request.node_name {
        let message = format!("pod {name} is bound to node '{node}', the request names node '{}'", request.node_name);
        return Err((DENIED_NODE, message));
    }
    // The API server sets `default` when a pod names none.
    let account = pod.service_account_name.as_deref().unwrap_or("default");
    if account != request.service_account_name {
        let message = format!(
            "pod {name} runs as service account '{account}', the request names '{}'",
            request.service_account_name
        );
        return Err((DENIED_SERVICE_ACCOUNT, message));
    }
    let phase = pod.phase.as_deref().unwrap_or("Pending");
    if pod.deleting || !matches!(phase, "Pending" | "Running") {
        let state = if pod.deleting { "being deleted".to_string() } else { format!("in phase {phase}") };
        return Err((DENIED_NOT_ACTIVE, format!("pod {name} is {state}: only a Pending or Running pod gets one")));
    }
    Ok(pod)
}

/// The names the pod serves: for every Service whose (non-empty) selector its labels
/// match, `<svc>.<ns>.svc` and `<svc>.<ns>.svc.<domain>`; for a headless Service named
/// by the pod's `subdomain` (a StatefulSet pod) also `<hostname>.<svc>.<ns>.svc[.<domain>]`.
/// Sorted bytewise, so the first (the CN) is the shortest form of the first Service.
pub fn dns_names(
    namespace: &str,
    pod: &Pod,
    services: &[std::sync::Arc<IndexedService>],
    cluster_domain: &str,
) -> Vec<String> {
    let mut names = Vec::new();
    for service in services {
        if !service.selects(&pod.labels) {
            continue;
        }
        let name = &*service.name;
        let base = format!("{name}.{namespace}.svc");
        names.push(format!("{base}.{cluster_domain}"));
        if service.headless
            && pod.subdomain.as_deref() == Some(name)
            && let Some(hostname) = pod.hostname.as_deref().filter(|h| !h.is_empty())
        {
            names.push(format!("{hostname}.{base}"));
            names.push(format!("{hostname}.{base}.{cluster_domain}"));
        }
        names.push(base);
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests;
