//! The authorizer: cache -> directory -> pure rule. Concurrent misses for one key share one
//! directory query; positive and negative answers have their own TTLs; directory errors are
//! returned (the caller fails closed with 503) and never cached.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use crate::claims::Claims;
use crate::credentials::CredentialKind;
use crate::credentials::{
    InvalidReason, Outcome, Presented, Principal, SessionCandidate, SessionToken, Verification,
};
use crate::directory::{DirectoryError, PodDirectory, SessionRecord};
use crate::ids::{PodSlug, UserId};
use crate::rule::{self, Decision};

/// Cache sizes and lifetimes.
#[derive(Debug, Clone)]
pub struct AuthorizerConfig {
    /// How long an `Allow` is reused. This bounds how long a removed member keeps access when
    /// nobody calls an `invalidate_*` method.
    pub allow_ttl: Duration,
    /// How long a denial, an unknown session or an unavailable pod is reused (shorter: a pod
    /// that is starting should become reachable quickly).
    pub deny_ttl: Duration,
    /// Most cached decisions (and, separately, sessions and users).
    pub max_entries: u64,
}

impl Default for AuthorizerConfig {
    fn default() -> Self {
        Self {
            allow_ttl: Duration::from_secs(30),
            deny_ttl: Duration::from_secs(5),
            max_entries: 100_000,
        }
    }
}

type DecisionKey = (UserId, PodSlug);

/// The cache lifetimes, changeable while running ([`Authorizer::set_ttls`]).
#[derive(Debug)]
struct Ttls {
    allow_ms: AtomicU64,
    deny_ms: AtomicU64,
}

impl Ttls {
    fn new(allow: Duration, deny: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            allow_ms: AtomicU64::new(ms(allow)),
            deny_ms: AtomicU64::new(ms(deny)),
        }
    }
}

/// The expiry policy: an allow (or a found session, an existing user) lives `allow`, anything
/// else `deny`.
struct TtlByAnswer(Arc<Ttls>);

impl TtlByAnswer {
    fn allow(&self) -> Duration {
        Duration::from_millis(self.0.allow_ms.load(Ordering::Relaxed))
    }

    fn deny(&self) -> Duration {
        Duration::from_millis(self.0.deny_ms.load(Ordering::Relaxed))
    }
}

impl Expiry<DecisionKey, Decision> for TtlByAnswer {
    fn expire_after_create(
        &self,
        _: &DecisionKey,
        value: &Decision,
        _: Instant,
    ) -> Option<Duration> {
        Some(match value {
            Decision::Allow { .. } => self.allow(),
            Decision::Unavailable { .. } | Decision::Deny(_) => self.deny(),
        })
    }
}

impl Expiry<SessionToken, Option<SessionRecord>> for TtlByAnswer {
    fn expire_after_create(
        &self,
        _: &SessionToken,
        value: &Option<SessionRecord>,
        _: Instant,
    ) -> Option<Duration> {
        Some(if value.is_some() {
            self.allow()
        } else {
            self.deny()
        })
    }
}

impl Expiry<UserId, bool> for TtlByAnswer {
    fn expire_after_create(&self, _: &UserId, exists: &bool, _: Instant) -> Option<Duration> {
        Some(if *exists { self.allow() } else { self.deny() })
    }
}

/// Whether a decision came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLookup {
    /// Answered from the cache.
    Hit,
    /// Not cached: the directory was asked (or a concurrent identical query was joined).
    Miss,
}

/// Decides access with a cache in front of a [`PodDirectory`]. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Authorizer {
    directory: Arc<dyn PodDirectory>,
    ttls: Arc<Ttls>,
    decisions: Cache<DecisionKey, Decision>,
    sessions: Cache<SessionToken, Option<SessionRecord>>,
    users: Cache<UserId, bool>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("directory", &self.directory)
            .field("cached_decisions", &self.decisions.entry_count())
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// An authorizer over `directory`.
    pub fn new(directory: Arc<dyn PodDirectory>, config: &AuthorizerConfig) -> Self {
        let ttls = Arc::new(Ttls::new(config.allow_ttl, config.deny_ttl));
        let ttl = || TtlByAnswer(ttls.clone());
        Self {
            directory,
            ttls: ttls.clone(),
            decisions: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(ttl())
                .support_invalidation_closures()
                .build(),
            sessions: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(ttl())
                .support_invalidation_closures()
                .build(),
            users: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(ttl())
                .build(),
        }
    }

    /// Changes how long answers are cached, from the next answer on; with `forget` every
    /// cached answer goes too, so the new lifetimes hold at once.
    pub fn set_ttls(&self, allow: Duration, deny: Duration, forget: bool) {
        let fresh = Ttls::new(allow, deny);
        self.ttls
            .allow_ms
            .store(fresh.allow_ms.into_inner(), Ordering::Relaxed);
        self.ttls
            .deny_ms
            .store(fresh.deny_ms.into_inner(), Ordering::Relaxed);
        if forget {
            self.invalidate_all();
        }
    }

    /// The directory behind the cache.
    pub fn directory(&self) -> &Arc<dyn PodDirectory> {
        &self.directory
    }

    /// May `user` reach the pod `slug`, and where is it?
    ///
    /// # Errors
    /// [`DirectoryError`] when the directory could not answer: "could not decide", never a denial.
    pub async fn authorize(
        &self,
        user: &UserId,
        slug: &PodSlug,
    ) -> Result<Decision, DirectoryError> {
        self.authorize_with_lookup(user, slug)
            .await
            .map(|(decision, _)| decision)
    }

    /// [`Authorizer::authorize`], also telling whether the cache answered (for metrics).
    ///
    /// # Errors
    /// [`DirectoryError`] when the directory could not answer.
    pub async fn authorize_with_lookup(
        &self,
        user: &UserId,
        slug: &PodSlug,
    ) -> Result<(Decision, CacheLookup), DirectoryError> {
        let key = (user.clone(), slug.clone());
        if let Some(hit) = self.decisions.get(&key).await {
            return Ok((hit, CacheLookup::Hit));
        }
        self.decisions
            .try_get_with(key, async {
                let candidates = self.directory.pods_by_slug(slug, user).await?;
                Ok(rule::decide(&candidates, user))
            })
            .await
            .map(|decision| (decision, CacheLookup::Miss))
            .map_err(|e: Arc<DirectoryError>| (*e).clone())
    }

    /// Finishes what the pure verifier could not: looks up database session tokens and checks
    /// that an impersonated user exists. `now` is unix seconds.
    ///
    /// # Errors
    /// [`DirectoryError`] when the directory could not answer.
    pub async fn resolve(
        &self,
        verification: Verification,
        now: i64,
    ) -> Result<Outcome, DirectoryError> {
        match verification {
            Verification::Decided(Outcome::Valid(principal))
                if principal.impersonated_by.is_some() =>
            {
                if self.user_exists(&principal.user_id).await? {
                    Ok(Outcome::Valid(principal))
                } else {
                    Ok(Outcome::Invalid {
                        presented: principal.presented,
                        reason: InvalidReason::UnknownUser,
                    })
                }
            }
            Verification::Decided(outcome) => Ok(outcome),
            Verification::DatabaseSessions(candidates) => {
                // The first valid token authenticates; otherwise the first token's outcome.
                let mut first = None;
                for SessionCandidate { presented, token } in candidates {
                    let record = self
                        .sessions
                        .try_get_with(token.clone(), async {
                            self.directory.session(&token).await
                        })
                        .await
                        .map_err(|e: Arc<DirectoryError>| (*e).clone())?;
                    let outcome = session_outcome(presented, record, now);
                    if matches!(outcome, Outcome::Valid(_)) {
                        return Ok(outcome);
                    }
                    first.get_or_insert(outcome);
                }
                Ok(first.unwrap_or(Outcome::Missing))
            }
        }
    }

    async fn user_exists(&self, user: &UserId) -> Result<bool, DirectoryError> {
        self.users
            .try_get_with(user.clone(), async {
                self.directory.user_exists(user).await
            })
            .await
            .map_err(|e: Arc<DirectoryError>| (*e).clone())
    }

    /// Forgets every cached answer about `user` (e.g. removed from a team, signed out).
    pub fn invalidate_user(&self, user: &UserId) {
        let u = user.clone();
        // Only fails when closures are not enabled, which `new` always does.
        let _ = self
            .decisions
            .invalidate_entries_if(move |(k, _), _| *k == u);
        let u = user.clone();
        let _ = self
            .sessions
            .invalidate_entries_if(move |_, v| v.as_ref().is_some_and(|s| s.user_id == u));
        self.users.invalidate_all();
    }

    /// Forgets every cached answer about the pod(s) with `slug` (stopped, archived, moved).
    pub fn invalidate_pod(&self, slug: &PodSlug) {
        let s = slug.clone();
        let _ = self
            .decisions
            .invalidate_entries_if(move |(_, k), _| *k == s);
    }

    /// Forgets everything.
    pub fn invalidate_all(&self) {
        self.decisions.invalidate_all();
        self.sessions.invalidate_all();
        self.users.invalidate_all();
    }
}

/// A database session is valid while `expires > now`.
fn session_outcome(presented: Presented, record: Option<SessionRecord>, now: i64) -> Outcome {
    let Some(record) = record else {
        return Outcome::Invalid {
            presented,
            reason: InvalidReason::UnknownSession,
        };
    };
    if record.expires_at_ms > now.saturating_mul(1000) {
        Outcome::Valid(Principal {
            user_id: record.user_id,
            presented: Presented {
                kind: CredentialKind::DatabaseSession,
                ..presented
            },
            expires_at: Some(record.expires_at_ms.div_euclid(1000)),
            impersonated_by: None,
            scope: None,
            claims: Claims(Default::default()),
        })
    } else {
        Outcome::Expired {
            presented,
            user_id: Some(record.user_id),
            claims: None,
        }
    }
}
