//! Who may read `/metrics`: the bearer token is authenticated by a TokenReview and the
//! user it names authorised by a SubjectAccessReview for `get` on the non-resource URL
//! `/metrics` — the API server's own rules, so granting a scraper access is binding a
//! ClusterRole (manifests/metrics-clusterrole.yaml), as for the API server's /metrics.
//!
//! Verdicts are cached briefly per token (Prometheus scrapes every few seconds with
//! the same one), the cache is bounded, and reviews run a few at a time, so a flood of
//! made-up tokens costs the API server little.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Semaphore;

use crate::bounded;

/// How long a verdict is reused for the same token.
const VERDICT_TTL: Duration = Duration::from_secs(30);
/// Tokens remembered at once.
const CACHE_CAPACITY: usize = 256;
/// Reviews in flight at once.
const CONCURRENT_REVIEWS: usize = 4;
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
}

pub struct Authorizer {
    client: Client,
    cache: Mutex<HashMap<String, (Instant, Verdict)>>,
    reviews: Semaphore,
}

impl Authorizer {
    pub fn new(client: Client) -> Self {
        Authorizer { client, cache: Mutex::default(), reviews: Semaphore::new(CONCURRENT_REVIEWS) }
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
        if let Some(verdict) = self.cached(token) {
            return Ok(verdict);
        }
        let verdict = {
            let _permit = self.reviews.acquire().await;
            self.review(token).await?
        };
        self.remember(token, verdict.clone());
        Ok(verdict)
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

    fn cached(&self, token: &str) -> Option<Verdict> {
        let cache = self.cache.lock().ok()?;
        let (at, verdict) = cache.get(token)?;
        (at.elapsed() < VERDICT_TTL).then(|| verdict.clone())
    }

    fn remember(&self, token: &str, verdict: Verdict) {
        let Ok(mut cache) = self.cache.lock() else { return };
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, (at, _)| at.elapsed() < VERDICT_TTL);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (Instant::now(), verdict));
    }
}
