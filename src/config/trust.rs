//! The flags of trust distribution (docs/spec.md §5.5): the per-namespace bundle.

use clap::Args;

use crate::selector::parse_selector;

#[derive(Debug, Clone, Args)]
pub struct TrustFlags {
    /// Keep ConfigMap `openshift-service-ca.crt` (key `service-ca.crt`: the CA bundle)
    /// in every namespace, as OpenShift does.
    #[arg(long, env = "SERVICE_CA_NAMESPACE_BUNDLES", default_value_t = true, action = clap::ArgAction::Set)]
    pub namespace_bundles: bool,

    /// Only namespaces whose labels match this selector (kubectl syntax) get the
    /// per-namespace bundle. Empty: all.
    #[arg(long, env = "SERVICE_CA_NAMESPACE_BUNDLE_SELECTOR", default_value = "")]
    pub namespace_bundle_selector: String,
}

impl TrustFlags {
    pub fn validate(&self) -> Result<(), String> {
        parse_selector(&self.namespace_bundle_selector).map(|_| ()).map_err(|e| {
            format!("--namespace-bundle-selector {:?}: {e}", crate::bounded(&self.namespace_bundle_selector))
        })
    }
}
