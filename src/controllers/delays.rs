//! When a controller looks again, in one place: after a lost race, while something
//! it needs is not there yet, after a failed watch, after a refusal, and the bounds of
//! the per-object retry backoff (see `Retries`).

use std::time::Duration;

/// After a write lost a race (409) or found its object gone (404): look again soon.
pub const LOOK_AGAIN: Duration = Duration::from_millis(500);

/// The same after a CA-bundle injection lost a race: a patch of one field, cheap to
/// plan again, so sooner.
pub const LOOK_AGAIN_INJECTING: Duration = Duration::from_millis(200);

/// While something needed is not there yet (the CA, the published bundle), or after a
/// conflict whose winner the watch is about to bring.
pub const NOT_YET: Duration = Duration::from_secs(1);

/// After a watch failed, before it is polled again (the watcher backs off by itself).
pub const WATCH_RETRY: Duration = Duration::from_secs(1);

/// After the API server refused a write (422, 403): a person has to change something
/// first, so there is no hurry.
pub const RETRY_REFUSED: Duration = Duration::from_secs(60);

/// While the API server cannot be reached, whatever the backoff says: such an attempt
/// costs nothing and the outage may be over.
pub const UNREACHABLE_RETRY: Duration = Duration::from_secs(5);

/// The longest delay between two attempts on one failing object.
pub const MAX_RETRY: Duration = Duration::from_secs(300);
