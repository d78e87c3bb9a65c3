//! CA bundle injection (docs/spec.md §2): the five kinds and the legacy ConfigMap, and
//! injection next to other managers of the same objects.

mod kinds;
mod managers;
