//! How a write ended, in one vocabulary for every controller: done, lost a race, the
//! object gone, held in deletion, or refused by the API server. Errors to retry with
//! backoff stay in each controller's error enum.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{api_message, is_conflict, is_not_found, is_refused};

/// How a write ended (other than in an error to retry with backoff).
#[derive(Debug)]
pub enum Outcome<T = ()> {
    /// Written (or nothing was left to write): what the object now holds.
    Done(T),
    /// The object changed, appeared or went between read and write (409/404): look
    /// again soon.
    Raced,
    /// The object, or its namespace, is gone or going: nothing more to do.
    Gone,
    /// The object is being deleted and something (a finalizer) holds it: nothing can
    /// be written until it is gone. Its metadata.
    Held(Box<ObjectMeta>),
    /// The API server refused the write (422 invalid, 403 admission, quota or RBAC): it
    /// will refuse it again until a person changes something. Why, bounded.
    Refused(String),
}

impl<T> Outcome<T> {
    /// The outcome of a write that failed with `error`: a lost race (409/404) or a
    /// refusal (422/403, the API server's message bounded); `None` for an error to
    /// retry with backoff.
    pub fn of_failure(error: &kube::Error) -> Option<Self> {
        if is_conflict(error) || is_not_found(error) {
            Some(Outcome::Raced)
        } else if is_refused(error) {
            Some(Outcome::Refused(crate::bounded(&api_message(error)).into_owned()))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        let status = kube::core::Status::failure(&"x".repeat(10_000), "Test").with_code(code);
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn a_failed_write_is_a_race_a_refusal_or_an_error() {
        assert!(matches!(Outcome::<()>::of_failure(&api(409)), Some(Outcome::Raced)));
        assert!(matches!(Outcome::<()>::of_failure(&api(404)), Some(Outcome::Raced)));
        for code in [422, 403] {
            match Outcome::<()>::of_failure(&api(code)) {
                Some(Outcome::Refused(why)) => assert!(why.len() < 1000, "bounded: {}", why.len()),
                other => panic!("{code}: {other:?}"),
            }
        }
        assert!(Outcome::<()>::of_failure(&api(500)).is_none());
        assert!(Outcome::<()>::of_failure(&api(413)).is_none());
        assert!(Outcome::<()>::of_failure(&kube::Error::Service("reset".into())).is_none());
    }
}
