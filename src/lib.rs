//! service-ca-operator: serving certificates for annotated Services and CA bundle
//! injection, compatible with OpenShift's `service.beta.openshift.io/*` annotations.
//!
//! Map of the crate:
//! - [`config`]: flags and environment variables;
//! - [`app`]: wiring, leader election; [`shutdown`]: the one shutdown signal;
//! - [`names`]: every object name, data key, annotation, label and field manager;
//! - [`pki`]: pure certificate logic (no Kubernetes);
//! - [`signer`]: the shared in-memory signer and the key-generation pool;
//! - [`controllers`]: `serving` (serving_cert, cert_refresh), `ca_bundle`,
//!   `ca_lifecycle`;
//! - [`admin`] and [`metrics`]: probes and Prometheus metrics;
//! - [`inspect`]: the `inspect` subcommand (a read-only report, and `--restart`).

// Arithmetic that can overflow or panic is refused outside tests: dates go through
// `dates`, counters saturate, and each exception says why it cannot overflow.
#![cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]

pub mod admin;
pub mod app;
pub mod config;
pub mod controllers;
pub mod dates;
pub mod inspect;
pub mod metrics;
pub mod names;
pub mod pki;
pub mod shutdown;
pub mod signer;

use std::borrow::Cow;

/// How much of a value taken from user input is copied into our annotations, Events
/// and logs.
pub const ECHO_LIMIT: usize = 256;

/// `value` cut to [`ECHO_LIMIT`] bytes (at a character boundary) with an ellipsis, for
/// echoing user input.
pub fn bounded(value: &str) -> Cow<'_, str> {
    bounded_to(value, ECHO_LIMIT)
}

/// `value` cut to at most `max` bytes plus an ellipsis, at a character boundary.
pub fn bounded_to(value: &str, max: usize) -> Cow<'_, str> {
    if value.len() <= max {
        return Cow::Borrowed(value);
    }
    let mut cut = max;
    while !value.is_char_boundary(cut) {
        cut = cut.saturating_sub(1);
    }
    Cow::Owned(format!("{}…", &value[..cut]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn echoes_are_bounded_at_a_character_boundary() {
        assert_eq!(super::bounded("short"), "short");
        let long = "é".repeat(200);
        let cut = super::bounded(&long);
        assert!(cut.len() <= super::ECHO_LIMIT + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }
}
