//! Serving certificates (docs/spec.md §1): the Secret's shape, headless Services, the
//! alpha and beta annotations, re-issue, key algorithms, real TLS.

mod idle_buffer;
mod issuance;
mod key_algorithms;
mod reissue;
