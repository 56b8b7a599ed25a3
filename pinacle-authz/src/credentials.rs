//! Credentials from a `Cookie` header -> an [`Outcome`]: which cookie was presented, whether it is
//! valid, expired, invalid (and why) or missing. Pure: no I/O, the clock is a parameter.
//! Database session tokens and impersonation targets are resolved later by the
//! [`Authorizer::resolve`](crate::Authorizer::resolve), which owns the directory.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::claims::{ClaimCheck, Claims};
use crate::cookies::{self, NameMatch};
use crate::ids::UserId;
use crate::jwe::{self, JweError, V4Key, V5Key};
use crate::proxy_token::{ProxyScope, ProxyTokenClaims, ProxyTokenKeys, TokenCheck};
use crate::secret::Secret;

/// The name of Pinacle's proxy token cookie.
pub const PROXY_TOKEN_COOKIE: &str = "pinacle-proxy-token";

/// Which library wrote a session cookie, and so how it is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionFormat {
    /// next-auth v4: JWE dir + A256GCM, HKDF with an empty salt.
    NextauthV4,
    /// Auth.js v5: JWE dir + A256CBC-HS512, HKDF salted with the cookie name, `kid` header.
    AuthjsV5,
}

/// A session cookie name the dashboard may use, and its format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCookie {
    /// The cookie name (chunks are `<name>.0`, `<name>.1`, ...).
    pub name: String,
    /// The format of its value.
    pub format: SessionFormat,
}

impl SessionCookie {
    /// The four names next-auth v4 and Auth.js v5 use, plain and `__Secure-`.
    pub fn defaults() -> Vec<Self> {
        [
            ("next-auth.session-token", SessionFormat::NextauthV4),
            (
                "__Secure-next-auth.session-token",
                SessionFormat::NextauthV4,
            ),
            ("authjs.session-token", SessionFormat::AuthjsV5),
            ("__Secure-authjs.session-token", SessionFormat::AuthjsV5),
        ]
        .into_iter()
        .map(|(name, format)| Self {
            name: name.to_owned(),
            format,
        })
        .collect()
    }
}

/// How a credential was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// next-auth v4 JWT session cookie.
    NextauthV4,
    /// Auth.js v5 JWT session cookie.
    AuthjsV5,
    /// An opaque database session token in a session cookie.
    DatabaseSession,
    /// Pinacle's per-pod proxy token.
    ProxyToken,
}

impl CredentialKind {
    /// The stable name used in JSON output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NextauthV4 => "nextauth-v4",
            Self::AuthjsV5 => "authjs-v5",
            Self::DatabaseSession => "database-session",
            Self::ProxyToken => "proxy-token",
        }
    }
}

/// Why a presented credential was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// Not a token of the expected shape (segments, base64url, JSON).
    Malformed,
    /// An algorithm other than the format's.
    UnsupportedAlgorithm,
    /// The key is ours (Auth.js `kid` matched) but the authentication tag failed.
    Tampered,
    /// Made with a key we do not have (Auth.js `kid` matched none of ours).
    WrongSecret,
    /// The tag failed and the format cannot tell tampering from a foreign key (v4 GCM, HMAC JWT).
    TamperedOrWrongSecret,
    /// `nbf` in the future.
    NotYetValid,
    /// No user id in the claims.
    NoSubject,
    /// A claim of the wrong type.
    BadClaims,
    /// A database session token that is not in the `session` table.
    UnknownSession,
    /// The user it names (e.g. an impersonation target) does not exist.
    UnknownUser,
}

impl InvalidReason {
    /// The stable name used in JSON output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedAlgorithm => "unsupported_algorithm",
            Self::Tampered => "tampered",
            Self::WrongSecret => "wrong_secret",
            Self::TamperedOrWrongSecret => "tampered_or_wrong_secret",
            Self::NotYetValid => "not_yet_valid",
            Self::NoSubject => "no_subject",
            Self::BadClaims => "bad_claims",
            Self::UnknownSession => "unknown_session",
            Self::UnknownUser => "unknown_user",
        }
    }
}

/// Which cookie carried a credential, and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// The kind of credential.
    pub kind: CredentialKind,
    /// The cookie's (base) name.
    pub cookie: Arc<str>,
}

/// An authenticated browser.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The effective user.
    pub user_id: UserId,
    /// How the user was authenticated.
    pub presented: Presented,
    /// When the credential expires (unix seconds), when it says.
    pub expires_at: Option<i64>,
    /// The admin impersonating `user_id`, if any.
    pub impersonated_by: Option<UserId>,
    /// For a proxy token: the only pod and port it is good for.
    pub scope: Option<ProxyScope>,
    /// The session token's claims (empty for database sessions).
    pub claims: Claims,
}

/// The answer to "who is this browser?".
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A valid credential.
    Valid(Principal),
    /// A genuine credential past its expiry.
    Expired {
        /// Which cookie.
        presented: Presented,
        /// The user it named, when readable.
        user_id: Option<UserId>,
        /// Its claims, when it was a session JWT.
        claims: Option<Claims>,
    },
    /// A credential that is not acceptable.
    Invalid {
        /// Which cookie.
        presented: Presented,
        /// Why.
        reason: InvalidReason,
    },
    /// No credential cookie at all.
    Missing,
}

impl Outcome {
    /// `valid`, `expired`, `invalid` or `missing`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Valid(_) => "valid",
            Self::Expired { .. } => "expired",
            Self::Invalid { .. } => "invalid",
            Self::Missing => "missing",
        }
    }

    /// The cookie that decided the outcome.
    pub fn presented(&self) -> Option<&Presented> {
        match self {
            Self::Valid(p) => Some(&p.presented),
            Self::Expired { presented, .. } | Self::Invalid { presented, .. } => Some(presented),
            Self::Missing => None,
        }
    }
}

/// An opaque database session token. Its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionToken(Arc<str>);

impl SessionToken {
    /// The token text, for the directory query only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// A database session token found in a session cookie, to be looked up in the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionCandidate {
    /// The cookie it came in.
    pub presented: Presented,
    /// The token.
    pub token: SessionToken,
}

/// The pure verdict on a `Cookie` header.
#[derive(Debug, Clone, PartialEq)]
pub enum Verification {
    /// Decided without the directory (though a valid impersonation still needs the target checked).
    Decided(Outcome),
    /// No cookie verified on its own, but session cookies hold opaque tokens: look them up in the
    /// directory, in order; the first valid one authenticates. Never empty.
    DatabaseSessions(Vec<SessionCandidate>),
}

/// The verdict plus which segments of the header are credentials (to strip).
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// The best credential found.
    pub verification: Verification,
    /// Indices (in [`cookies::segments`] order, ascending) of the segments that must never be
    /// forwarded: every proxy token, every cookie that is the dashboard's, every chunk that cannot
    /// be attributed to one cookie.
    stripped: Vec<usize>,
    /// How many segments the header had.
    segments: usize,
}

impl Inspection {
    /// The `Cookie` header to forward upstream: the header inspected without its credential
    /// segments, everything else byte for byte. `None` when nothing is left (drop the field).
    pub fn forwardable_cookie_header<'h>(&self, header: &'h [u8]) -> Option<Cow<'h, [u8]>> {
        if self.segments > 0 && self.stripped.len() == self.segments {
            // Only credentials (the usual header of a tab that has just one): nothing left.
            return None;
        }
        cookies::without_segments(header, &self.stripped)
    }

    /// How many segments are stripped.
    pub fn stripped_count(&self) -> usize {
        self.stripped.len()
    }
}

/// Invalid credential configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CredentialConfigError {
    /// No secret was given.
    #[error("at least one secret (NEXTAUTH_SECRET or AUTH_SECRET) is required")]
    NoSecret,
    /// A secret was empty.
    #[error("secret #{0} is empty")]
    EmptySecret(usize),
    /// A cookie name was empty or repeated.
    #[error("session cookie name {0:?} is empty or repeated")]
    BadCookieName(String),
}

/// What the verifier needs: secrets (newest first; all are accepted, the first mints) and names.
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    /// Secrets, newest first.
    pub secrets: Vec<Secret>,
    /// Session cookie names, in the order they are preferred.
    pub session_cookies: Vec<SessionCookie>,
    /// Whether opaque session cookie values are database session tokens.
    pub database_sessions: bool,
    /// How many decrypted session cookies are remembered, by their exact value, for
    /// [`DECRYPTED_SESSION_TTL`] (0: none). A browser sends the same cookie with every request;
    /// remembering it saves the decryption (most of a decode). Time claims (`exp`, `nbf`) are
    /// checked again on every use, and only cookies that decrypted are remembered.
    pub decrypted_sessions: u64,
}

/// The default of [`CredentialConfig::decrypted_sessions`]: a few MiB at most.
pub const DEFAULT_DECRYPTED_SESSIONS: u64 = 4096;

/// How long a decrypted session cookie is remembered (see
/// [`CredentialConfig::decrypted_sessions`]).
pub const DECRYPTED_SESSION_TTL: Duration = Duration::from_secs(300);

impl CredentialConfig {
    /// The default names with the given secrets, remembering up to 4,096 decrypted cookies (a few MiB).
    pub fn with_secrets(secrets: Vec<Secret>) -> Self {
        Self {
            secrets,
            session_cookies: SessionCookie::defaults(),
            database_sessions: true,
            decrypted_sessions: DEFAULT_DECRYPTED_SESSIONS,
        }
    }
}

enum Keys {
    V4(Vec<V4Key>),
    V5(Vec<V5Key>),
}

struct CookieSpec {
    name: Arc<str>,
    keys: Keys,
    /// Claims of cookies that decrypted, by cookie value.
    decrypted: Option<moka::sync::Cache<Arc<str>, Arc<Claims>>>,
}

impl CookieSpec {
    fn kind(&self) -> CredentialKind {
        match self.keys {
            Keys::V4(_) => CredentialKind::NextauthV4,
            Keys::V5(_) => CredentialKind::AuthjsV5,
        }
    }
}

/// How many cookies of one credential name are tried (and how many ways to put its chunks
/// together); any beyond are stripped untried. Bounds the work one request can cause (a
/// decryption is a few microseconds).
pub const MAX_CANDIDATES: usize = 16;

/// A credential-named cookie in the header.
struct Found<'h> {
    /// Its segment index.
    index: usize,
    what: What,
    value: &'h [u8],
}

#[derive(Clone, Copy)]
enum What {
    Proxy(NameMatch),
    /// The index of the session cookie spec, and how the name matched it.
    Session(usize, NameMatch),
}

/// The running choice among candidates: the first valid one, else database tokens, else the
/// first rejection.
#[derive(Default)]
struct Choice {
    valid: Option<Verification>,
    database: Vec<SessionCandidate>,
    rejection: Option<Verification>,
}

impl Choice {
    fn consider(&mut self, v: Verification) {
        match v {
            Verification::Decided(Outcome::Valid(_)) => {
                self.valid.get_or_insert(v);
            }
            Verification::DatabaseSessions(candidates) => {
                for c in candidates {
                    if self.database.len() < MAX_CANDIDATES && !self.database.contains(&c) {
                        self.database.push(c);
                    }
                }
            }
            other => {
                self.rejection.get_or_insert(other);
            }
        }
    }

    fn verdict(self) -> Verification {
        if let Some(valid) = self.valid {
            return valid;
        }
        if !self.database.is_empty() {
            return Verification::DatabaseSessions(self.database);
        }
        self.rejection
            .unwrap_or(Verification::Decided(Outcome::Missing))
    }
}

/// The value of chunks that go together one way only: numbered `.0` to `.n`, each once.
/// Sorts `chunks` by number.
fn attributed(chunks: &mut [(Option<u32>, usize, &[u8])]) -> Option<Vec<u8>> {
    chunks.sort_by_key(|(number, index, _)| (*number, *index));
    let in_order = chunks
        .iter()
        .enumerate()
        .all(|(i, (number, _, _))| *number == u32::try_from(i).ok());
    in_order.then(|| {
        chunks
            .iter()
            .flat_map(|(_, _, v)| v.iter().copied())
            .collect()
    })
}

/// Up to [`MAX_CANDIDATES`] values of chunks numbered from `.0` on: for `.0` to `.k` (longest
/// first, every `k` up to the first missing number, since junk may follow a real set), every
/// combination of one chunk per number. `chunks` is sorted by number.
fn arrangements(chunks: &[(Option<u32>, usize, &[u8])]) -> Vec<Vec<u8>> {
    // The choices for each number 0, 1, ... up to the first missing one.
    let mut choices: Vec<Vec<&[u8]>> = Vec::new();
    for (number, _, value) in chunks {
        // Numbers too large to place sort first (as `None`); they belong to no arrangement.
        let Some(number) = number.and_then(|n| usize::try_from(n).ok()) else {
            continue;
        };
        if number == choices.len() {
            choices.push(vec![value]);
        } else if number + 1 == choices.len() {
            if let Some(last) = choices.last_mut() {
                last.push(value);
            }
        } else {
            break;
        }
    }
    let mut values = Vec::new();
    for len in (1..=choices.len()).rev() {
        combine(choices.get(..len).unwrap_or_default(), &mut values);
    }
    values
}

/// Appends every combination of one part per position (odometer order) to `values`, while
/// fewer than [`MAX_CANDIDATES`].
fn combine(choices: &[Vec<&[u8]>], values: &mut Vec<Vec<u8>>) {
    let mut picks = vec![0usize; choices.len()];
    while values.len() < MAX_CANDIDATES {
        let value: Vec<u8> = picks
            .iter()
            .zip(choices)
            .flat_map(|(pick, options)| options.get(*pick).copied().unwrap_or_default())
            .copied()
            .collect();
        values.push(value);
        // The next combination; done when every position wrapped.
        let mut position = choices.len();
        loop {
            let Some(p) = position.checked_sub(1) else {
                return;
            };
            position = p;
            let (Some(pick), Some(options)) = (picks.get_mut(p), choices.get(p)) else {
                return;
            };
            *pick += 1;
            if *pick < options.len() {
                break;
            }
            *pick = 0;
        }
    }
}

/// Verifies credential cookies. Keys are derived once, at construction.
pub struct CredentialVerifier {
    cookies: Vec<CookieSpec>,
    proxy: ProxyTokenKeys,
    proxy_cookie: Arc<str>,
    database_sessions: bool,
    minting_v4: V4Key,
}

impl fmt::Debug for CredentialVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialVerifier")
            .field(
                "cookies",
                &self.cookies.iter().map(|c| &*c.name).collect::<Vec<_>>(),
            )
            .field("database_sessions", &self.database_sessions)
            .finish_non_exhaustive()
    }
}

impl CredentialVerifier {
    /// Derives every key.
    ///
    /// # Errors
    /// No secret, an empty secret, or an empty/repeated cookie name.
    pub fn new(config: &CredentialConfig) -> Result<Self, CredentialConfigError> {
        let (first, rest) = config
            .secrets
            .split_first()
            .ok_or(CredentialConfigError::NoSecret)?;
        if let Some(i) = config.secrets.iter().position(|s| s.expose().is_empty()) {
            return Err(CredentialConfigError::EmptySecret(i));
        }
        let mut cookies: Vec<CookieSpec> = Vec::with_capacity(config.session_cookies.len());
        for cookie in &config.session_cookies {
            if cookie.name.is_empty()
                || cookie.name == PROXY_TOKEN_COOKIE
                || cookies.iter().any(|c| *c.name == *cookie.name)
            {
                return Err(CredentialConfigError::BadCookieName(cookie.name.clone()));
            }
            let keys = match cookie.format {
                SessionFormat::NextauthV4 => {
                    Keys::V4(config.secrets.iter().map(V4Key::derive).collect())
                }
                SessionFormat::AuthjsV5 => Keys::V5(
                    config
                        .secrets
                        .iter()
                        .map(|s| V5Key::derive(s, &cookie.name))
                        .collect(),
                ),
            };
            let decrypted = (config.decrypted_sessions > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(config.decrypted_sessions)
                    .time_to_live(DECRYPTED_SESSION_TTL)
                    .build()
            });
            cookies.push(CookieSpec {
                name: Arc::from(cookie.name.as_str()),
                keys,
                decrypted,
            });
        }
        Ok(Self {
            cookies,
            proxy: ProxyTokenKeys::new(first, rest),
            proxy_cookie: Arc::from(PROXY_TOKEN_COOKIE),
            database_sessions: config.database_sessions,
            minting_v4: V4Key::derive(first),
        })
    }

    /// Inspects a raw `Cookie` header (bytes as received; several fields joined by `"; "`) at
    /// `now` (unix seconds).
    ///
    /// Every cookie under a credential name is a candidate, wherever it stands: each proxy token,
    /// each whole session cookie, and each way the session chunks can be put together, so that a
    /// junk cookie of the same name (which a pod can plant) neither shadows nor locks out the
    /// real one. The first valid credential wins (proxy tokens, then session cookies in
    /// configured order); else database session tokens, to be looked up; else the first
    /// rejection; else [`Outcome::Missing`].
    ///
    /// Stripped ([`Inspection::forwardable_cookie_header`]): every proxy token; every session
    /// cookie that is the dashboard's (it decrypts under a configured secret, or is a database
    /// session token); every chunk unless the chunks form exactly one foreign, well-formed token
    /// (`.0` to `.n`, each once). Candidates beyond [`MAX_CANDIDATES`] of one name are stripped
    /// untried.
    pub fn inspect(&self, cookie_header: impl AsRef<[u8]>, now: i64) -> Inspection {
        let header = cookie_header.as_ref();
        let mut found: Vec<Found<'_>> = Vec::new();
        let mut segments = 0;
        for (index, segment) in cookies::segments(header).enumerate() {
            segments = index + 1;
            let Some(pair) = segment.pair else { continue };
            if let Some(m) = cookies::match_name(pair.name, &self.proxy_cookie) {
                found.push(Found {
                    index,
                    what: What::Proxy(m),
                    value: pair.value,
                });
            }
            for (spec, cookie) in self.cookies.iter().enumerate() {
                if let Some(m) = cookies::match_name(pair.name, &cookie.name) {
                    found.push(Found {
                        index,
                        what: What::Session(spec, m),
                        value: pair.value,
                    });
                }
            }
        }
        if found.is_empty() {
            return Inspection {
                verification: Verification::Decided(Outcome::Missing),
                stripped: Vec::new(),
                segments,
            };
        }
        let mut choice = Choice::default();
        let mut stripped = Vec::new();
        self.inspect_proxy_tokens(&found, now, &mut choice, &mut stripped);
        for (spec, cookie) in self.cookies.iter().enumerate() {
            self.inspect_session_cookies(cookie, spec, &found, now, &mut choice, &mut stripped);
        }
        stripped.sort_unstable();
        stripped.dedup();
        Inspection {
            verification: choice.verdict(),
            stripped,
            segments,
        }
    }

    /// Every `pinacle-proxy-token` (and any chunk-like name of it) is stripped; each whole one is
    /// tried.
    fn inspect_proxy_tokens(
        &self,
        found: &[Found<'_>],
        now: i64,
        choice: &mut Choice,
        stripped: &mut Vec<usize>,
    ) {
        let mut tried = 0;
        for f in found {
            let What::Proxy(m) = f.what else { continue };
            stripped.push(f.index);
            if m != NameMatch::Whole || tried == MAX_CANDIDATES {
                continue;
            }
            tried += 1;
            let outcome = match std::str::from_utf8(f.value) {
                Ok(token) => self.verify_proxy_token(token, now),
                Err(_) => Outcome::Invalid {
                    presented: self.proxy_presented(),
                    reason: InvalidReason::Malformed,
                },
            };
            choice.consider(Verification::Decided(outcome));
        }
    }

    /// The whole cookies and the chunks of one session cookie name.
    fn inspect_session_cookies(
        &self,
        cookie: &CookieSpec,
        spec: usize,
        found: &[Found<'_>],
        now: i64,
        choice: &mut Choice,
        stripped: &mut Vec<usize>,
    ) {
        let mut chunks: Vec<(Option<u32>, usize, &[u8])> = Vec::new();
        let mut tried = 0;
        for f in found {
            let What::Session(s, m) = f.what else {
                continue;
            };
            if s != spec {
                continue;
            }
            match m {
                NameMatch::Chunk(number) => chunks.push((number, f.index, f.value)),
                NameMatch::Whole if tried == MAX_CANDIDATES => stripped.push(f.index),
                NameMatch::Whole => {
                    tried += 1;
                    let (verification, ours) = self.verify_session_bytes(cookie, f.value, now);
                    if ours {
                        stripped.push(f.index);
                    }
                    choice.consider(verification);
                }
            }
        }
        if chunks.is_empty() {
            return;
        }
        let whole = attributed(&mut chunks);
        if let Some(value) = &whole {
            let (verification, ours) = self.verify_session_bytes(cookie, value, now);
            // Forwarded only as a whole, well-formed token under a key we do not have (a pod
            // app's own): a library chunks only values too long for one cookie, and a part of a
            // dashboard token (a chunk missing, or junk behind it) never passes the length checks.
            let foreign_token = !ours
                && chunks.len() >= 2
                && matches!(
                    verification,
                    Verification::Decided(Outcome::Invalid {
                        reason: InvalidReason::WrongSecret | InvalidReason::TamperedOrWrongSecret,
                        ..
                    })
                );
            let usable = matches!(
                verification,
                Verification::Decided(Outcome::Valid(_)) | Verification::DatabaseSessions(_)
            );
            choice.consider(verification);
            if foreign_token {
                return;
            }
            if usable {
                stripped.extend(chunks.iter().map(|(_, index, _)| *index));
                return;
            }
        }
        // Chunks that do not make one usable token: none is forwarded, and every other way to
        // put them together is tried (a real set may have junk behind it or beside it).
        stripped.extend(chunks.iter().map(|(_, index, _)| *index));
        for value in arrangements(&chunks) {
            if whole.as_ref() != Some(&value) {
                let (verification, _) = self.verify_session_bytes(cookie, &value, now);
                choice.consider(verification);
            }
        }
    }

    fn proxy_presented(&self) -> Presented {
        Presented {
            kind: CredentialKind::ProxyToken,
            cookie: self.proxy_cookie.clone(),
        }
    }

    /// Verifies a proxy token presented outside a cookie (the `token` parameter of the
    /// `/pinacle-proxy-callback`), at `now`.
    pub fn verify_proxy_token(&self, token: &str, now: i64) -> Outcome {
        let presented = self.proxy_presented();
        let invalid = |reason| Outcome::Invalid {
            presented: presented.clone(),
            reason,
        };
        match self.proxy.verify(token, now) {
            TokenCheck::Valid {
                user,
                scope,
                expires_at,
            } => Outcome::Valid(Principal {
                user_id: user,
                presented,
                expires_at: Some(expires_at),
                impersonated_by: None,
                scope: Some(scope),
                claims: Claims(Default::default()),
            }),
            TokenCheck::Expired { user } => Outcome::Expired {
                presented,
                user_id: user,
                claims: None,
            },
            TokenCheck::Malformed => invalid(InvalidReason::Malformed),
            TokenCheck::UnsupportedAlgorithm => invalid(InvalidReason::UnsupportedAlgorithm),
            TokenCheck::BadSignature => invalid(InvalidReason::TamperedOrWrongSecret),
            TokenCheck::BadClaims => invalid(InvalidReason::BadClaims),
        }
    }

    /// [`Self::verify_session`] of a value as received: one that is not UTF-8 is no token of
    /// the dashboard's.
    fn verify_session_bytes(
        &self,
        spec: &CookieSpec,
        value: &[u8],
        now: i64,
    ) -> (Verification, bool) {
        match std::str::from_utf8(value) {
            Ok(value) => self.verify_session(spec, value, now),
            Err(_) => {
                let presented = Presented {
                    kind: spec.kind(),
                    cookie: spec.name.clone(),
                };
                let reason = InvalidReason::Malformed;
                (
                    Verification::Decided(Outcome::Invalid { presented, reason }),
                    false,
                )
            }
        }
    }

    /// Returns the verdict and whether the cookie is the dashboard's (decrypts with our keys, or
    /// is a database session token).
    fn verify_session(&self, spec: &CookieSpec, value: &str, now: i64) -> (Verification, bool) {
        let presented = Presented {
            kind: spec.kind(),
            cookie: spec.name.clone(),
        };
        let invalid =
            |presented, reason| Verification::Decided(Outcome::Invalid { presented, reason });
        if !value.contains('.') {
            if self.database_sessions && is_session_token(value) {
                let presented = Presented {
                    kind: CredentialKind::DatabaseSession,
                    cookie: spec.name.clone(),
                };
                let token = SessionToken(Arc::from(value));
                let candidate = SessionCandidate { presented, token };
                return (Verification::DatabaseSessions(vec![candidate]), true);
            }
            return (invalid(presented, InvalidReason::Malformed), false);
        }
        let remembered = spec.decrypted.as_ref().and_then(|cache| cache.get(value));
        let claims = match remembered {
            Some(claims) => claims,
            None => match decrypt(spec, value) {
                Ok(claims) => {
                    let claims = Arc::new(claims);
                    if let Some(cache) = &spec.decrypted {
                        cache.insert(Arc::from(value), claims.clone());
                    }
                    claims
                }
                Err((reason, ours)) => return (invalid(presented, reason), ours),
            },
        };
        let verification = match claims.check(now) {
            ClaimCheck::Valid {
                user,
                impersonated_by,
                expires_at,
            } => Verification::Decided(Outcome::Valid(Principal {
                user_id: user,
                presented,
                expires_at,
                impersonated_by,
                scope: None,
                claims: Claims::clone(&claims),
            })),
            ClaimCheck::Expired { user } => Verification::Decided(Outcome::Expired {
                presented,
                user_id: user,
                claims: Some(Claims::clone(&claims)),
            }),
            ClaimCheck::NotYetValid => invalid(presented, InvalidReason::NotYetValid),
            ClaimCheck::NoSubject => invalid(presented, InvalidReason::NoSubject),
            ClaimCheck::BadTimeClaim => invalid(presented, InvalidReason::BadClaims),
        };
        (verification, true)
    }

    /// Mints a next-auth v4 session cookie value (JWE dir + A256GCM) with the first secret.
    /// For development and tests: the dashboard mints real ones.
    ///
    /// # Errors
    /// Only if the system random source fails.
    pub fn mint_session_v4(&self, claims: &Claims) -> Result<String, MintError> {
        crate::mint::session_v4(&self.minting_v4, claims)
    }

    /// Mints a proxy token with the first secret, as the dashboard's `/api/proxy-auth` does.
    ///
    /// # Errors
    /// Only if the claims cannot be serialised.
    pub fn mint_proxy_token(&self, claims: &ProxyTokenClaims) -> Result<String, MintError> {
        self.proxy.mint(claims).map_err(|_| MintError)
    }

    /// A new proxy token for the same user, pod and port as a verified one (`principal` must
    /// hold a proxy token's scope), valid from `iat` to `exp`, marked for an embedded cookie
    /// when `embed`. `None` for a principal without a scope.
    pub fn reissue_proxy_token(
        &self,
        principal: &Principal,
        iat: i64,
        exp: i64,
        embed: bool,
    ) -> Option<String> {
        let scope = principal.scope.as_ref()?;
        let claims = ProxyTokenClaims {
            user_id: principal.user_id.as_str().to_owned(),
            pod_id: scope.pod_id.as_str().to_owned(),
            pod_slug: scope.pod_slug.as_str().to_owned(),
            target_port: scope.target_port,
            iat,
            exp,
        };
        self.proxy.mint_marked(&claims, embed).ok()
    }

    /// The renewal of a proxy token past half its life: a fresh token (full lifetime from
    /// `now`, the same mark), or `None` for any other credential or a token still young.
    pub fn renewal(&self, principal: &Principal, now: i64) -> Option<(String, bool)> {
        let scope = principal.scope.as_ref()?;
        let expires_at = principal.expires_at?;
        if principal.presented.kind != CredentialKind::ProxyToken
            || expires_at.saturating_sub(now) > crate::proxy_token::PROXY_TOKEN_LIFETIME_SECS / 2
        {
            return None;
        }
        let token = self.reissue_proxy_token(
            principal,
            now,
            now + crate::proxy_token::PROXY_TOKEN_LIFETIME_SECS,
            scope.embed,
        )?;
        Some((token, scope.embed))
    }
}

/// Decrypts a session cookie and parses its claims; on failure, why, and whether the cookie is
/// still the dashboard's (it decrypted, or failed authentication under a known key id).
fn decrypt(spec: &CookieSpec, value: &str) -> Result<Claims, (InvalidReason, bool)> {
    let parsed = jwe::parse(value).map_err(|e| (jwe_reason(e), false))?;
    let plaintext = match &spec.keys {
        Keys::V4(keys) => first_decrypting(keys, |k| k.decrypt(&parsed)),
        Keys::V5(keys) => match parsed.kid.as_deref() {
            Some(kid) => match keys.iter().find(|k| k.kid == kid) {
                Some(key) => key.decrypt(&parsed).map_err(|e| match e {
                    JweError::AuthenticationFailed => InvalidReason::Tampered,
                    other => jwe_reason(other),
                }),
                None => Err(InvalidReason::WrongSecret),
            },
            None => first_decrypting(keys, |k| k.decrypt(&parsed)),
        },
    }
    .map_err(|reason| (reason, reason == InvalidReason::Tampered))?;
    serde_json::from_slice(&plaintext)
        .map(Claims)
        .map_err(|_| (InvalidReason::Malformed, true))
}

/// A token could not be minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("could not mint a token")]
pub struct MintError;

fn first_decrypting<K>(
    keys: &[K],
    decrypt: impl Fn(&K) -> Result<Vec<u8>, JweError>,
) -> Result<Vec<u8>, InvalidReason> {
    let mut reason = InvalidReason::TamperedOrWrongSecret;
    for key in keys {
        match decrypt(key) {
            Ok(plaintext) => return Ok(plaintext),
            Err(JweError::AuthenticationFailed) => {}
            Err(other) => reason = jwe_reason(other),
        }
    }
    Err(reason)
}

fn jwe_reason(e: JweError) -> InvalidReason {
    match e {
        JweError::Malformed(_) => InvalidReason::Malformed,
        JweError::UnsupportedAlgorithm => InvalidReason::UnsupportedAlgorithm,
        JweError::AuthenticationFailed => InvalidReason::TamperedOrWrongSecret,
    }
}

/// Database session tokens are UUIDs or hex (next-auth's generators); accept the URL-safe set.
fn is_session_token(value: &str) -> bool {
    (16..=255).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
