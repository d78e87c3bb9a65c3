//! service-ca-operator: serving certificates for annotated Services and CA bundle
//! injection, compatible with OpenShift's `service.beta.openshift.io/*` annotations.
//!
//! Map of the crate:
//! - [`config`]: flags and environment variables;
//! - [`app`]: wiring, leader election; [`shutdown`]: the one shutdown signal;
//! - [`names`]: every object name, data key, annotation, label and field manager;
//! - [`pki`]: pure certificate logic (no Kubernetes);
//! - [`signer`]: the shared in-memory signer; [`keypool`]: the key-generation pool;
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
pub mod keypool;
pub mod metrics;
pub mod names;
pub mod pki;
pub mod selector;
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
    Cow::Owned(format!("{}…", prefix_within(value, max)))
}

/// The longest start of `value` of at most `max` bytes that ends at a character
/// boundary (`str::floor_char_boundary`, not stable at our minimum Rust version).
pub fn prefix_within(value: &str, max: usize) -> &str {
    let mut cut = max.min(value.len());
    while !value.is_char_boundary(cut) {
        cut = cut.saturating_sub(1);
    }
    value.get(..cut).unwrap_or_default()
}

/// Whether `c` must not reach a terminal or a line-based log as it is: a control
/// character (a newline would forge a log line of its own, an escape sequence move the
/// cursor or recolour what follows), or a Unicode direction control (which reorders
/// what is shown after it).
fn unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `value` with every control character and direction control escaped as Rust writes
/// them (`\n`, `\u{1b}`, `\u{202e}`). The one place that escapes what users put in object
/// names, annotations and certificates: plain-format logs ([`EscapedLines`]) and the
/// `inspect` table go through it.
pub fn escaped(value: &str) -> Cow<'_, str> {
    if !value.chars().any(unprintable) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len().saturating_add(16));
    for c in value.chars() {
        if unprintable(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A log writer for the plain format: each write is one formatted log line (so
/// `tracing-subscriber` writes), and everything in it but its final newline is passed
/// through [`escaped`] — a value that carries a newline or an escape sequence stays on
/// its line, visibly.
pub struct EscapedLines<W>(pub W);

impl<W: std::io::Write> std::io::Write for EscapedLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (line, end) = match text.strip_suffix('\n') {
            Some(line) => (line, "\n"),
            None => (&*text, ""),
        };
        let mut out = escaped(line).into_owned();
        out.push_str(end);
        self.0.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn control_characters_and_direction_controls_are_escaped_once_in_one_place() {
        assert!(matches!(super::escaped("web.shop.svc"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(super::escaped("a\nb\r\u{1b}[31mred\t\u{202e}fdp.exe"), "a\\nb\\r\\u{1b}[31mred\\t\\u{202e}fdp.exe");
        assert_eq!(super::escaped("é✓"), "é✓", "printable Unicode stays");
        let mut log = super::EscapedLines(Vec::new());
        log.write_all(b"INFO rotated reason=\"x\nERROR forged line\"\n").unwrap();
        log.write_all(b"INFO next\n").unwrap();
        let text = String::from_utf8(log.0).unwrap();
        assert_eq!(text, "INFO rotated reason=\"x\\nERROR forged line\"\nINFO next\n");
        assert_eq!(text.lines().count(), 2, "one line per event");
    }

    #[test]
    fn echoes_are_bounded_at_a_character_boundary() {
        assert_eq!(super::bounded("short"), "short");
        let long = "é".repeat(200);
        let cut = super::bounded(&long);
        assert!(cut.len() <= super::ECHO_LIMIT + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }
}
