//! One shape for the controllers' errors. Each enum has the same variants where
//! they apply — `Kube { action, object, source }` for an API call, `Pki { action,
//! object, source }` for key or certificate work, and a few of its own — and prints
//! them the same way: `<action> <object>: <source>`, the object as [`super::shown`]
//! prints it (`Kind namespace/name`).

use std::fmt;

/// What was being done when something failed: a verb phrase for the message
/// (`doing`, e.g. "reading") and the bounded category it is counted under in the
/// `reconcile_errors` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub doing: &'static str,
    pub category: &'static str,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.doing)
    }
}

/// Whether an API error means the API server could not be reached (no answer).
pub fn no_answer(error: &kube::Error) -> bool {
    super::status_code(error).is_none()
}
