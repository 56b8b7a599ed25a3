//! `pinacle-authz` answers two questions for the Pinacle ingress and any Rust service that embeds
//! it: who is this browser, and may they reach this pod?
//!
//! Data flows one way:
//!
//! ```text
//! Cookie header --cookies--> credential cookies --credentials (pure)--> Verification
//!   --Authorizer::resolve (database sessions, impersonation)--> Outcome (Principal)
//! (user, pod slug) --Authorizer::authorize: cache -> directory -> rule (pure)--> Decision
//! ```
//!
//! - [`cookies`]: scanning the `Cookie` header, chunk reassembly, stripping credential cookies.
//! - [`credentials`]: NextAuth v4 and Auth.js v5 JWE session cookies, database session tokens and
//!   Pinacle's proxy token, verified at an injected `now`.
//! - [`directory`]: the [`PodDirectory`] trait, over Postgres or a TOML file.
//! - [`rule`]: the owner-or-team rule and the choice among pods sharing a slug.
//! - [`Authorizer`]: the moka cache in front of the directory.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod authorizer;
mod claims;
pub mod cookies;
pub mod credentials;
pub mod directory;
mod ids;
mod jwe;
mod mint;
pub mod pod;
mod proxy_token;
pub mod rule;
mod secret;
#[cfg(feature = "testing")]
pub mod testing;

pub use authorizer::{Authorizer, AuthorizerConfig, CacheLookup};
pub use claims::{CLOCK_TOLERANCE_SECS, Claims};
pub use credentials::{
    CredentialConfig, CredentialConfigError, CredentialKind, CredentialVerifier,
    DECRYPTED_SESSION_TTL, DEFAULT_DECRYPTED_SESSIONS, Inspection, InvalidReason, MAX_CANDIDATES,
    MintError, Outcome, PROXY_TOKEN_COOKIE, Presented, Principal, SessionCandidate, SessionCookie,
    SessionFormat, SessionToken, Verification,
};
pub use directory::{
    DirectoryError, FileDirectory, FileDirectoryError, PodDirectory, PostgresDirectory,
    PostgresOptions, SessionRecord,
};
pub use ids::{IdError, PodId, PodSlug, UserId};
pub use pod::{PodCandidate, PodStatus, UnavailableReason};
pub use proxy_token::{PROXY_TOKEN_LIFETIME_SECS, ProxyScope, ProxyTokenClaims};
pub use rule::{Decision, DenyReason};
pub use secret::Secret;

/// The migrations in `migrations/` (the compatible subset of the dashboard's schema), embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
