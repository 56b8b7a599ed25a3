//! Credentials from a `Cookie` header -> an [`Outcome`]: which cookie was presented, whether it is
//! valid, expired, invalid (and why) or missing. Pure: no I/O, the clock is a parameter.
//! Database session tokens and impersonation targets are resolved later by the
//! [`Authenticator`](crate::Authenticator), which owns the directory.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::claims::{ClaimCheck, Claims};
use crate::cookies;
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

/// The pure verdict on a `Cookie` header.
#[derive(Debug, Clone, PartialEq)]
pub enum Verification {
    /// Decided without the directory (though a valid impersonation still needs the target checked).
    Decided(Outcome),
    /// A session cookie holds an opaque token: look it up in the directory.
    DatabaseSession {
        /// The cookie it came in.
        presented: Presented,
        /// The token.
        token: SessionToken,
    },
}

/// The verdict plus which credential cookies in the header are the dashboard's (to strip).
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// The best credential found.
    pub verification: Verification,
    /// Base names of cookies that belong to the dashboard or to us: never forward them.
    pub credential_cookies: Vec<Arc<str>>,
}

impl Inspection {
    /// The `Cookie` header to forward upstream: every credential cookie (and its chunks) removed,
    /// everything else byte-for-byte. `None` when nothing is left.
    pub fn forwardable_cookie_header(&self, header: &str) -> Option<String> {
        if self.credential_cookies.is_empty() {
            return Some(header.to_owned());
        }
        cookies::strip(header, |name| {
            self.credential_cookies
                .iter()
                .any(|base| cookies::is_cookie_or_chunk(name, base))
        })
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

    /// Inspects a raw `Cookie` header at `now` (unix seconds).
    ///
    /// The proxy token is preferred, then session cookies in configured order; the first valid
    /// (or database) credential wins, else the first rejection, else [`Outcome::Missing`].
    pub fn inspect(&self, cookie_header: &str, now: i64) -> Inspection {
        let mut best: Option<Verification> = None;
        let mut first_rejection: Option<Verification> = None;
        let mut credential_cookies = Vec::new();

        let mut consider = |v: Verification| {
            let usable = matches!(
                v,
                Verification::Decided(Outcome::Valid(_)) | Verification::DatabaseSession { .. }
            );
            if usable {
                best.get_or_insert(v);
            } else {
                first_rejection.get_or_insert(v);
            }
        };

        if let Some(token) = cookies::pairs(cookie_header)
            .find(|p| p.name == &*self.proxy_cookie)
            .map(|p| p.value)
        {
            credential_cookies.push(self.proxy_cookie.clone());
            consider(Verification::Decided(self.verify_proxy_token(token, now)));
        }
        for spec in &self.cookies {
            let Some(value) = cookies::reassemble(cookie_header, &spec.name) else {
                continue;
            };
            let (verification, ours) = self.verify_session(spec, &value, now);
            if ours {
                credential_cookies.push(spec.name.clone());
            }
            consider(verification);
        }
        Inspection {
            verification: best
                .or(first_rejection)
                .unwrap_or(Verification::Decided(Outcome::Missing)),
            credential_cookies,
        }
    }

    /// Verifies a proxy token presented outside a cookie (the `token` parameter of the
    /// `/pinacle-proxy-callback`), at `now`.
    pub fn verify_proxy_token(&self, token: &str, now: i64) -> Outcome {
        let presented = Presented {
            kind: CredentialKind::ProxyToken,
            cookie: self.proxy_cookie.clone(),
        };
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

    /// Returns the verdict and whether the cookie is the dashboard's (decrypts with our keys, or
    /// is a database session token).
    fn verify_session(&self, spec: &CookieSpec, value: &str, now: i64) -> (Verification, bool) {
        let kind = match spec.keys {
            Keys::V4(_) => CredentialKind::NextauthV4,
            Keys::V5(_) => CredentialKind::AuthjsV5,
        };
        let presented = Presented {
            kind,
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
                return (Verification::DatabaseSession { presented, token }, true);
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
