//! Workload authentication in Kubernetes mode: the caller presents its
//! projected service-account token, and the API server says whose it is
//! (a `TokenReview`, through the `kube` client). The identity issued is the
//! service account the API server names, never anything the caller claims.
//!
//! Tokens must be bound to the agent's audience (`--token-audience`), so a
//! token minted for another service is no use here. Answers are cached
//! for a minute (by the token's SHA-256) so renewals do not each cost an API
//! call; a refusal is not cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

const CACHE_FOR: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReviewError {
    #[error("the Kubernetes API refused the token: {0}")]
    Refused(String),
    #[error("the token is valid but names {0:?}, not a service account")]
    NotServiceAccount(String),
    #[error("the token is not bound to audience {0:?}")]
    WrongAudience(String),
    #[error("the Kubernetes API could not review the token: {0}")]
    Unavailable(String),
}

pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    cache: Mutex<HashMap<String, (String, String, Instant)>>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str) -> Self {
        Self {
            api: Api::all(client),
            audience: audience.to_string(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The (namespace, service account) the token belongs to.
    pub async fn review(&self, token: &str) -> Result<(String, String), ReviewError> {
        let key = hex::encode(Sha256::digest(token.as_bytes()));
        if let Some((ns, sa, at)) = self.lock().get(&key).cloned()
            && at.elapsed() < CACHE_FOR
        {
            return Ok((ns, sa));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::Refused(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_string()),
            ));
        }
        if !status
            .audiences
            .as_deref()
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(ReviewError::WrongAudience(self.audience.clone()));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let (ns, sa) = service_account(&username)
            .ok_or_else(|| ReviewError::NotServiceAccount(username.clone()))?;
        let mut cache = self.lock();
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, _, at)| at.elapsed() < CACHE_FOR);
        }
        if cache.len() < CACHE_MAX {
            cache.insert(key, (ns.clone(), sa.clone(), Instant::now()));
        }
        Ok((ns, sa))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `system:serviceaccount:NS:NAME` → (NS, NAME), both DNS labels.
fn service_account(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    let ok = |s: &str| isthmus_api::names::check_label(s).is_ok();
    (ok(ns) && ok(sa)).then(|| (ns.to_string(), sa.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_service_account_usernames_map_to_identities() {
        use super::service_account;
        assert_eq!(
            service_account("system:serviceaccount:demo:echo"),
            Some(("demo".into(), "echo".into()))
        );
        for bad in [
            "system:admin",
            "system:serviceaccount:demo",
            "system:serviceaccount:Demo:echo",
            "system:serviceaccount:demo:echo:extra",
            "alice",
        ] {
            assert_eq!(service_account(bad), None, "{bad}");
        }
    }
}
