//! Who may read `/metrics`: the bearer token is authenticated by a TokenReview and the
//! user it names authorised by a SubjectAccessReview for `get` on the non-resource URL
//! `/metrics` — the API server's own rules, so granting a scraper access is binding a
//! ClusterRole (manifests/metrics-clusterrole.yaml), as for the API server's /metrics.
//!
//! Verdicts are cached briefly (Prometheus scrapes every few seconds with the same
//! token), keyed by the SHA-256 of the token (the token itself is never kept), in two
//! bounded least-recently-used caches: one for tokens that were allowed, one for the
//! rest, so that made-up tokens can only evict each other. A token allowed within the
//! last [`KNOWN_FOR`] is reviewed again without waiting in line, so that a flood of
//! made-up tokens cannot keep an authorised scraper out. Any other token not in the
//! cache waits for a review: at most [`MAX_WAITING_REVIEWS`] wait at once (beyond that the
//! scraper is told 429 Too Many Requests), reviews start at [`REVIEWS_PER_SECOND`] on
//! average (bursts of [`REVIEW_BURST`]) and run [`CONCURRENT_REVIEWS`] at a time, so a
//! flood of made-up tokens costs the API server little.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::bounded;

/// How long a verdict is reused for the same token.
const VERDICT_TTL: Duration = Duration::from_secs(30);
/// A token allowed this recently skips the line when its verdict has expired.
const KNOWN_FOR: Duration = Duration::from_secs(600);
/// Allowed tokens remembered at once.
const ALLOWED_CAPACITY: usize = 64;
/// Other tokens (unknown, or whose user may not get /metrics) remembered at once.
const DENIED_CAPACITY: usize = 256;
/// Reviews in flight at once.
const CONCURRENT_REVIEWS: usize = 4;
/// Requests waiting for a review at most (in flight included); beyond: 429.
pub const MAX_WAITING_REVIEWS: usize = 16;
/// Reviews started per second, on average.
pub const REVIEWS_PER_SECOND: u32 = 10;
/// Reviews started at once after a quiet spell.
pub const REVIEW_BURST: u32 = 20;
/// A longer "token" is refused without asking the API server.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No token, or one the API server does not accept.
    Unauthenticated,
    /// Authenticated as the named user, who may not get /metrics.
    Forbidden(String),
    /// Too many tokens wait for a review: try again later (429).
    Busy,
}

/// The SHA-256 of a token: what the cache keeps instead of the token.
type TokenKey = [u8; 32];

pub struct Authorizer {
    client: Client,
    cache: Mutex<Verdicts>,
    waiting: Semaphore,
    limiter: Mutex<Limiter>,
    reviews: Semaphore,
}

impl Authorizer {
    pub fn new(client: Client) -> Self {
        Authorizer {
            client,
            cache: Mutex::new(Verdicts::default()),
            waiting: Semaphore::new(MAX_WAITING_REVIEWS),
            limiter: Mutex::new(Limiter::default()),
            reviews: Semaphore::new(CONCURRENT_REVIEWS),
        }
    }

    /// The verdict for an `Authorization` header value; `Err` when the API server
    /// could not be asked.
    pub async fn check(&self, authorization: Option<&str>) -> Result<Verdict, kube::Error> {
        let Some(token) = authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim) else {
            return Ok(Verdict::Unauthenticated);
        };
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Ok(Verdict::Unauthenticated);
        }
        let key: TokenKey = Sha256::digest(token.as_bytes()).into();
        if let Some(verdict) = self.cached(&key) {
            return Ok(verdict);
        }
        let known = self.cache.lock().is_ok_and(|c| c.allowed.knows(&key, Instant::now()));
        let _waiting = if known {
            None
        } else {
            let Ok(waiting) = self.waiting.try_acquire() else {
                return Ok(Verdict::Busy);
            };
            let wait = self.limiter.lock().map(|mut l| l.reserve(Instant::now())).unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            // The same token may have been reviewed meanwhile.
            if let Some(verdict) = self.cached(&key) {
                return Ok(verdict);
            }
            Some(waiting)
        };
        let verdict = {
            let _permit = self.reviews.acquire().await;
            self.review(token).await?
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.remember(key, verdict.clone(), Instant::now());
        }
        Ok(verdict)
    }

    fn cached(&self, key: &TokenKey) -> Option<Verdict> {
        self.cache.lock().ok()?.get(key, Instant::now())
    }

    async fn review(&self, token: &str) -> Result<Verdict, kube::Error> {
        let tokens: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), ..Default::default() },
            ..Default::default()
        };
        let status = tokens.create(&PostParams::default(), &review).await?.status.unwrap_or_default();
        let user = match status.user {
            Some(user) if status.authenticated == Some(true) => user,
            _ => return Ok(Verdict::Unauthenticated),
        };
        let access: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(crate::names::METRICS_PATH.to_string()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = access.create(&PostParams::default(), &review).await?.status.is_some_and(|s| s.allowed);
        Ok(if allowed {
            Verdict::Allowed
        } else {
            Verdict::Forbidden(bounded(&user.username.unwrap_or_default()).into_owned())
        })
    }
}

/// Verdicts by token hash: allowed ones apart, so that no number of made-up tokens
/// evicts a scraper's.
struct Verdicts {
    allowed: Lru,
    denied: Lru,
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts { allowed: Lru::new(ALLOWED_CAPACITY, KNOWN_FOR), denied: Lru::new(DENIED_CAPACITY, VERDICT_TTL) }
    }
}

impl Verdicts {
    fn get(&mut self, key: &TokenKey, now: Instant) -> Option<Verdict> {
        self.allowed.get(key, now).or_else(|| self.denied.get(key, now))
    }

    fn remember(&mut self, key: TokenKey, verdict: Verdict, now: Instant) {
        match verdict {
            Verdict::Busy => {}
            Verdict::Allowed => self.allowed.put(key, verdict, now),
            _ => self.denied.put(key, verdict, now),
        }
    }
}

/// A bounded cache of verdicts that expire after [`VERDICT_TTL`] and are kept for
/// `keep` (to know a token seen before); when full, those older than `keep` and then
/// the least recently used go first.
struct Lru {
    capacity: usize,
    keep: Duration,
    /// Counts uses: the entry with the lowest `used` is the least recently used.
    clock: u64,
    entries: HashMap<TokenKey, Entry>,
}

struct Entry {
    verdict: Verdict,
    at: Instant,
    used: u64,
}

impl Lru {
    fn new(capacity: usize, keep: Duration) -> Self {
        Lru { capacity, keep, clock: 0, entries: HashMap::new() }
    }

    /// Whether `key` got a verdict within `keep`.
    fn knows(&self, key: &TokenKey, now: Instant) -> bool {
        self.entries.get(key).is_some_and(|e| now.saturating_duration_since(e.at) < self.keep)
    }

    fn tick(&mut self) -> u64 {
        self.clock = self.clock.wrapping_add(1);
        self.clock
    }

    fn get(&mut self, key: &TokenKey, now: Instant) -> Option<Verdict> {
        let used = self.tick();
        let entry = self.entries.get_mut(key)?;
        if now.saturating_duration_since(entry.at) >= VERDICT_TTL {
            return None;
        }
        entry.used = used;
        Some(entry.verdict.clone())
    }

    fn put(&mut self, key: TokenKey, verdict: Verdict, now: Instant) {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let keep = self.keep;
            self.entries.retain(|_, e| now.saturating_duration_since(e.at) < keep);
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        let used = self.tick();
        self.entries.insert(key, Entry { verdict, at: now, used });
    }
}

/// Spaces reviews [`REVIEWS_PER_SECOND`] apart on average, allowing a burst of
/// [`REVIEW_BURST`] (a generic cell rate algorithm).
#[derive(Default)]
struct Limiter {
    /// When the next review is due if none ran early.
    next: Option<Instant>,
}

impl Limiter {
    fn interval() -> Duration {
        Duration::from_secs(1).checked_div(REVIEWS_PER_SECOND).unwrap_or(Duration::from_millis(100))
    }

    /// Reserves a start for one review; returns how long to wait for it.
    fn reserve(&mut self, now: Instant) -> Duration {
        let due = self.next.map_or(now, |next| next.max(now));
        self.next = Some(due.checked_add(Self::interval()).unwrap_or(due));
        let burst = Self::interval().saturating_mul(REVIEW_BURST);
        due.saturating_duration_since(now).saturating_sub(burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> TokenKey {
        Sha256::digest(format!("token-{i}").as_bytes()).into()
    }

    #[test]
    fn made_up_tokens_never_evict_an_allowed_verdict() {
        let now = Instant::now();
        let mut cache = Verdicts::default();
        cache.remember(key(0), Verdict::Allowed, now);
        for i in 1..=1000 {
            cache.remember(key(i), Verdict::Unauthenticated, now);
        }
        assert_eq!(cache.get(&key(0), now), Some(Verdict::Allowed));
        assert_eq!(cache.denied.entries.len(), DENIED_CAPACITY);
        assert_eq!(cache.get(&key(1000), now), Some(Verdict::Unauthenticated));
        assert_eq!(cache.get(&key(1), now), None, "the oldest made-up token went first");
        assert_eq!(cache.get(&key(0), now + VERDICT_TTL), None, "verdicts expire");
        assert!(cache.allowed.knows(&key(0), now + VERDICT_TTL), "an allowed token is known for longer");
        assert!(!cache.allowed.knows(&key(0), now + KNOWN_FOR));
        assert!(!cache.denied.knows(&key(1000), now + VERDICT_TTL));
        cache.remember(key(2000), Verdict::Busy, now);
        assert_eq!(cache.get(&key(2000), now), None, "429 is not a verdict");
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let now = Instant::now();
        let mut lru = Lru::new(3, VERDICT_TTL);
        for i in 0..3 {
            lru.put(key(i), Verdict::Allowed, now);
        }
        assert!(lru.get(&key(0), now).is_some());
        lru.put(key(3), Verdict::Allowed, now);
        assert!(lru.get(&key(1), now).is_none(), "1 was used least recently");
        assert!(lru.get(&key(0), now).is_some() && lru.get(&key(2), now).is_some() && lru.get(&key(3), now).is_some());
        // Expired entries go before live ones.
        let later = now + VERDICT_TTL;
        lru.put(key(4), Verdict::Allowed, later);
        assert_eq!(lru.entries.len(), 1);
    }

    #[test]
    fn reviews_are_spaced_after_a_burst() {
        let now = Instant::now();
        let mut limiter = Limiter::default();
        let waits: Vec<Duration> = (0..30).map(|_| limiter.reserve(now)).collect();
        let free = usize::try_from(REVIEW_BURST).unwrap() + 1;
        assert!(waits[..free].iter().all(|w| w.is_zero()), "{waits:?}");
        assert_eq!(waits[free], Duration::from_millis(100));
        assert_eq!(waits[29], Duration::from_millis(900));
        // After a quiet spell the burst is back.
        assert!(limiter.reserve(now + Duration::from_secs(10)).is_zero());
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_without_a_review() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let authorizer = Authorizer::new(Client::try_from(config).unwrap());
        let _all = authorizer.waiting.try_acquire_many(u32::try_from(MAX_WAITING_REVIEWS).unwrap()).unwrap();
        assert_eq!(authorizer.check(Some("Bearer made-up")).await.unwrap(), Verdict::Busy);
        assert_eq!(authorizer.check(None).await.unwrap(), Verdict::Unauthenticated);
        // A token allowed a minute ago skips the full line: it is reviewed (and the
        // review fails here, there being no API server).
        let scraper: TokenKey = Sha256::digest(b"scraper").into();
        let a_minute_ago = Instant::now().checked_sub(Duration::from_secs(60)).unwrap();
        authorizer.cache.lock().unwrap().remember(scraper, Verdict::Allowed, a_minute_ago);
        assert!(authorizer.check(Some("Bearer scraper")).await.is_err());
    }
}
