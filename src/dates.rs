//! Date and deadline arithmetic that never panics, whatever a certificate, a Lease or
//! a request carries.
//!
//! `time`'s `OffsetDateTime + Duration` panics past the year 9999, which a CA with the
//! RFC 5280 §4.1.2.5 "no well-defined expiration" NotAfter (`99991231235959Z`) reaches
//! as soon as anything is added to it. Every date computed from such input goes through
//! these helpers; they clamp to what X.509 (GeneralizedTime, years 0 to 9999) and the
//! API server can encode.

use std::time::Duration;

use time::OffsetDateTime;

/// The latest date a certificate can carry: RFC 5280's `99991231235959Z`.
pub const LATEST: OffsetDateTime = match time::Date::MAX.with_hms(23, 59, 59) {
    Ok(at) => at.assume_utc(),
    Err(_) => OffsetDateTime::UNIX_EPOCH,
};

/// The earliest date a certificate can carry: `00000101000000Z`.
pub const EARLIEST: OffsetDateTime = match time::Date::from_ordinal_date(0, 1) {
    Ok(day) => day.midnight().assume_utc(),
    Err(_) => OffsetDateTime::UNIX_EPOCH,
};

/// The longest a loop sleeps or a requeue waits before it looks again: far enough that
/// it changes nothing, near enough that no timer arithmetic can overflow.
pub const LONGEST_WAIT: Duration = Duration::from_secs(366 * 86_400);

/// `at + after`, at most [`LATEST`].
pub fn after(at: OffsetDateTime, after: Duration) -> OffsetDateTime {
    time::Duration::try_from(after).ok().and_then(|d| at.checked_add(d)).map_or(LATEST, |t| t.min(LATEST))
}

/// `at - before`, at least [`EARLIEST`].
pub fn before(at: OffsetDateTime, before: Duration) -> OffsetDateTime {
    time::Duration::try_from(before).ok().and_then(|d| at.checked_sub(d)).map_or(EARLIEST, |t| t.max(EARLIEST))
}

/// The time from `from` to `to`; zero when `to` is not later.
pub fn between(from: OffsetDateTime, to: OffsetDateTime) -> Duration {
    // The difference of two dates is at most about 20,000 years: it cannot overflow.
    #[allow(clippy::arithmetic_side_effects)]
    let span = to - from;
    Duration::try_from(span).unwrap_or(Duration::ZERO)
}

/// Time from now until `at` (zero if past), at most [`LONGEST_WAIT`]: for requeues.
pub fn until(at: OffsetDateTime) -> Duration {
    between(OffsetDateTime::now_utc(), at).min(LONGEST_WAIT)
}

/// The instant `wait` from now, with `wait` capped at [`LONGEST_WAIT`]: for timers.
pub fn deadline(wait: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(wait.min(LONGEST_WAIT)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_bounds_are_what_x509_can_encode() {
        assert_eq!(LATEST.year(), 9999);
        assert_eq!((LATEST.month() as u8, LATEST.day()), (12, 31));
        assert_eq!((LATEST.hour(), LATEST.minute(), LATEST.second()), (23, 59, 59));
        assert_eq!(EARLIEST.year(), 0);
        assert_eq!(EARLIEST.ordinal(), 1);
        assert_eq!((EARLIEST.hour(), EARLIEST.minute(), EARLIEST.second()), (0, 0, 0));
    }

    #[test]
    fn sums_clamp_at_the_ends_instead_of_panicking() {
        assert_eq!(after(LATEST, Duration::from_secs(1)), LATEST);
        assert_eq!(after(LATEST, Duration::MAX), LATEST);
        assert_eq!(after(EARLIEST, Duration::MAX), LATEST);
        assert_eq!(before(EARLIEST, Duration::from_secs(1)), EARLIEST);
        assert_eq!(before(LATEST, Duration::MAX), EARLIEST);
        let now = OffsetDateTime::now_utc();
        assert_eq!(between(now, after(now, 3 * DAY)), 3 * DAY, "ordinary sums are exact");
        assert_eq!(between(before(now, 3 * DAY), now), 3 * DAY);
    }

    #[test]
    fn spans_and_waits_are_never_negative_nor_unbounded() {
        assert_eq!(between(LATEST, EARLIEST), Duration::ZERO);
        assert!(between(EARLIEST, LATEST) > 9_999 * 365 * DAY);
        assert_eq!(until(LATEST), LONGEST_WAIT);
        assert_eq!(until(EARLIEST), Duration::ZERO);
    }

    #[tokio::test]
    async fn deadlines_are_capped() {
        let now = tokio::time::Instant::now();
        let far = deadline(Duration::MAX);
        assert!(far >= now && far.duration_since(now) <= LONGEST_WAIT + DAY);
    }
}
