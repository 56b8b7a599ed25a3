//! The authorizer: cache -> directory -> pure rule. Concurrent misses for one key share one
//! directory query; positive and negative answers have their own TTLs; directory errors are
//! returned (the caller fails closed with 503) and never cached. Stale-if-error: when the
//! directory cannot answer, an allow (or a found database session) that expired less than
//! `stale_if_error` ago is still honoured, marked [`CacheLookup::Stale`]; invalidation forgets
//! those too, so a revoked grant is never served stale.

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
    /// How long after it expired an allow is still honoured while the directory cannot answer
    /// (zero: never).
    pub stale_if_error: Duration,
}

impl Default for AuthorizerConfig {
    fn default() -> Self {
        Self {
            allow_ttl: Duration::from_secs(30),
            deny_ttl: Duration::from_secs(5),
            max_entries: 100_000,
            stale_if_error: Duration::from_secs(300),
        }
    }
}

type DecisionKey = (UserId, PodSlug);

/// The user id [`Authorizer::locate`] gives the directory (never a real user's: ids the
/// dashboard makes have no spaces).
const ANONYMOUS: &str = "pinacle-ingress anonymous";

/// The cache lifetimes, changeable while running ([`Authorizer::set_ttls`]).
#[derive(Debug)]
struct Ttls {
    allow_ms: AtomicU64,
    deny_ms: AtomicU64,
    stale_ms: AtomicU64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Ttls {
    fn new(allow: Duration, deny: Duration, stale: Duration) -> Self {
        Self {
            allow_ms: AtomicU64::new(millis(allow)),
            deny_ms: AtomicU64::new(millis(deny)),
            stale_ms: AtomicU64::new(millis(stale)),
        }
    }

    fn stale(&self) -> Duration {
        Duration::from_millis(self.stale_ms.load(Ordering::Relaxed))
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

impl Expiry<PodSlug, Decision> for TtlByAnswer {
    fn expire_after_create(&self, _: &PodSlug, value: &Decision, _: Instant) -> Option<Duration> {
        Some(match value {
            Decision::Allow { .. } => self.allow(),
            Decision::Unavailable { .. } | Decision::Deny(_) => self.deny(),
        })
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

/// The last-resort copies of allows: they live the allow TTL plus the stale-if-error window.
struct StaleTtl(Arc<Ttls>);

impl<K, V> Expiry<K, V> for StaleTtl {
    fn expire_after_create(&self, _: &K, _: &V, _: Instant) -> Option<Duration> {
        Some(TtlByAnswer(self.0.clone()).allow() + self.0.stale())
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
    /// The directory could not answer; an allow that expired less than `stale_if_error` ago
    /// answered instead.
    Stale,
}

/// Decides access with a cache in front of a [`PodDirectory`]. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Authorizer {
    directory: Arc<dyn PodDirectory>,
    ttls: Arc<Ttls>,
    decisions: Cache<DecisionKey, Decision>,
    sessions: Cache<SessionToken, Option<SessionRecord>>,
    users: Cache<UserId, bool>,
    stale_decisions: Cache<DecisionKey, Decision>,
    stale_sessions: Cache<SessionToken, SessionRecord>,
    located: Cache<PodSlug, Decision>,
    /// When a stale answer was last given (milliseconds since `started`, 0: never).
    last_stale_ms: Arc<AtomicU64>,
    started: Instant,
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
        let ttls = Arc::new(Ttls::new(
            config.allow_ttl,
            config.deny_ttl,
            config.stale_if_error,
        ));
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
            stale_decisions: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(StaleTtl(ttls.clone()))
                .support_invalidation_closures()
                .build(),
            stale_sessions: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(StaleTtl(ttls.clone()))
                .support_invalidation_closures()
                .build(),
            located: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(ttl())
                .support_invalidation_closures()
                .build(),
            last_stale_ms: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    /// Changes the stale-if-error window, from the next answer on (zero: never serve stale).
    pub fn set_stale_if_error(&self, window: Duration) {
        self.ttls.stale_ms.store(millis(window), Ordering::Relaxed);
        if window.is_zero() {
            self.stale_decisions.invalidate_all();
            self.stale_sessions.invalidate_all();
        }
    }

    /// Whether a stale answer was given within the last `within` (the directory could not
    /// answer and grants were honoured from memory: "degraded").
    pub fn served_stale_within(&self, within: Duration) -> bool {
        let last = self.last_stale_ms.load(Ordering::Relaxed);
        last != 0 && millis(self.started.elapsed()).saturating_sub(last) <= millis(within)
    }

    /// How many grants could be honoured stale now.
    pub fn stale_grants(&self) -> u64 {
        self.stale_decisions.entry_count()
    }

    fn note_stale(&self) {
        self.last_stale_ms
            .store(millis(self.started.elapsed()).max(1), Ordering::Relaxed);
    }

    /// Changes how long answers are cached, from the next answer on; with `forget` every
    /// cached answer goes too, so the new lifetimes hold at once.
    pub fn set_ttls(&self, allow: Duration, deny: Duration, forget: bool) {
        let fresh = Ttls::new(allow, deny, Duration::ZERO);
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
        let fresh = self
            .decisions
            .try_get_with(key.clone(), async {
                let candidates = self.directory.pods_by_slug(slug, user).await?;
                Ok(rule::decide(&candidates, user))
            })
            .await
            .map_err(|e: Arc<DirectoryError>| (*e).clone());
        match fresh {
            Ok(decision) => {
                if matches!(decision, Decision::Allow { .. }) && !self.ttls.stale().is_zero() {
                    self.stale_decisions.insert(key, decision.clone()).await;
                }
                Ok((decision, CacheLookup::Miss))
            }
            Err(e) => match self.stale_decisions.get(&key).await {
                Some(stale) => {
                    self.note_stale();
                    Ok((stale, CacheLookup::Stale))
                }
                None => Err(e),
            },
        }
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
                    let record = self.session(&token).await?;
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

    /// How many directory queries [`Authorizer::resolve`] would make for `verification` now:
    /// its database session tokens that are not cached. Lets a caller bound what anonymous
    /// clients can make the directory do (any opaque cookie value is a token to look up).
    pub fn lookups_needed(&self, verification: &Verification) -> usize {
        match verification {
            Verification::DatabaseSessions(candidates) => candidates
                .iter()
                .filter(|c| !self.sessions.contains_key(&c.token))
                .count(),
            Verification::Decided(_) => 0,
        }
    }

    /// Whether [`Authorizer::locate`] would answer `slug` from its cache.
    pub fn is_located(&self, slug: &PodSlug) -> bool {
        self.located.contains_key(slug)
    }

    /// A database session, from the cache or the directory; a found one is kept for
    /// stale-if-error.
    async fn session(&self, token: &SessionToken) -> Result<Option<SessionRecord>, DirectoryError> {
        let fresh = self
            .sessions
            .try_get_with(token.clone(), async { self.directory.session(token).await })
            .await
            .map_err(|e: Arc<DirectoryError>| (*e).clone());
        match fresh {
            Ok(record) => {
                if let Some(found) = &record
                    && !self.ttls.stale().is_zero()
                    && !self.stale_sessions.contains_key(token)
                {
                    self.stale_sessions
                        .insert(token.clone(), found.clone())
                        .await;
                }
                Ok(record)
            }
            Err(e) => match self.stale_sessions.get(token).await {
                Some(stale) => {
                    self.note_stale();
                    Ok(Some(stale))
                }
                None => Err(e),
            },
        }
    }

    /// Where the pod `slug` names is, for a request that carries no user by design (a CORS
    /// preflight passed to the pod): [`rule::locate`], cached like decisions (one directory
    /// query per slug and TTL, however many anonymous requests arrive).
    ///
    /// # Errors
    /// [`DirectoryError`] when the directory could not answer.
    pub async fn locate(&self, slug: &PodSlug) -> Result<Decision, DirectoryError> {
        self.located
            .try_get_with(slug.clone(), async {
                // The directory's query takes a user for the membership flag, unused here.
                let nobody = UserId::new(ANONYMOUS).map_err(|_| {
                    DirectoryError::Query("the anonymous user id is not valid".into())
                })?;
                let candidates = self.directory.pods_by_slug(slug, &nobody).await?;
                Ok(rule::locate(&candidates))
            })
            .await
            .map_err(|e: Arc<DirectoryError>| (*e).clone())
    }

    /// Whether a database session still exists (expired or not: only its deletion revokes).
    ///
    /// # Errors
    /// [`DirectoryError`] when the directory could not answer.
    pub async fn session_exists(&self, token: &SessionToken) -> Result<bool, DirectoryError> {
        self.session(token).await.map(|record| record.is_some())
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
            .stale_decisions
            .invalidate_entries_if(move |(k, _), _| *k == u);
        let u = user.clone();
        let _ = self
            .sessions
            .invalidate_entries_if(move |_, v| v.as_ref().is_some_and(|s| s.user_id == u));
        let u = user.clone();
        let _ = self
            .stale_sessions
            .invalidate_entries_if(move |_, s| s.user_id == u);
        // Unknown sessions are cached as `None` (whose user nobody knows): a new session of
        // this user may be among them.
        let _ = self.sessions.invalidate_entries_if(|_, v| v.is_none());
        self.users.invalidate_all();
    }

    /// Forgets every cached answer about the pod(s) with `slug` (stopped, archived, moved).
    pub fn invalidate_pod(&self, slug: &PodSlug) {
        let s = slug.clone();
        let _ = self
            .decisions
            .invalidate_entries_if(move |(_, k), _| *k == s);
        let s = slug.clone();
        let _ = self
            .stale_decisions
            .invalidate_entries_if(move |(_, k), _| *k == s);
        let s = slug.clone();
        let _ = self.located.invalidate_entries_if(move |k, _| *k == s);
    }

    /// Forgets everything.
    pub fn invalidate_all(&self) {
        self.decisions.invalidate_all();
        self.sessions.invalidate_all();
        self.users.invalidate_all();
        self.stale_decisions.invalidate_all();
        self.stale_sessions.invalidate_all();
        self.located.invalidate_all();
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
