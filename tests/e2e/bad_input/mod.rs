//! Bad input and faults (docs/operations.md, *Bad input and failures*): clear errors, no
//! crash, nothing lost or overwritten, bounded cost, one tenant never delaying another.

mod fairness;
mod injection;
mod loops_and_caps;
mod objects;
mod outages;
mod signing_key;
