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
//! - [`cookies`]: the `Cookie` header as bytes: its segments, credential names and chunks, the
//!   header without chosen segments.
//! - [`credentials`]: NextAuth v4 and Auth.js v5 JWE session cookies, database session tokens and
//!   Pinacle's proxy token, verified at an injected `now`.
//! - [`directory`]: the [`PodDirectory`] trait, over Postgres or a TOML file.
//! - [`rule`]: the owner-or-team rule and the choice among pods sharing a slug.
//! - [`Authorizer`]: the moka cache in front of the directory.
//!
//! # Example: verify a session cookie, then authorize its user
//!
//! A service that receives the dashboard's cookies checks who sent them and whether they may
//! reach a pod. (A real service reads the dashboard's Postgres with [`PostgresDirectory`]; the
//! cookie comes from the request; here both are made on the spot.)
//!
//! ```
//! use std::sync::Arc;
//! use pinacle_authz::{
//!     Authorizer, AuthorizerConfig, Claims, CredentialConfig, CredentialVerifier, Decision,
//!     FileDirectory, Outcome, PodSlug, Secret,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Every secret the dashboard accepts (NEXTAUTH_SECRET, then older ones during a rotation).
//! let verifier = CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new(
//!     "the-dashboards-nextauth-secret",
//! )]))?;
//!
//! // A next-auth v4 session cookie, as the dashboard sets it.
//! let now = 1_767_225_600;
//! let claims = serde_json::json!({"sub": "user_ada", "id": "user_ada", "exp": now + 3600});
//! let cookie = verifier.mint_session_v4(&Claims(claims.as_object().cloned().unwrap_or_default()))?;
//! let header = format!("theme=dark; next-auth.session-token={cookie}");
//!
//! // Who is this? (Pure: no I/O; `now` is a parameter.)
//! let inspection = verifier.inspect(&header, now);
//! // What may go on to an untrusted backend: everything but the credentials.
//! let forwarded = inspection.forwardable_cookie_header(header.as_bytes());
//! assert_eq!(forwarded.as_deref(), Some(&b"theme=dark"[..]));
//!
//! let directory = FileDirectory::from_toml(
//!     r#"
//!     [[users]]
//!     id = "user_ada"
//!     [[teams]]
//!     id = "team_ada"
//!     [[servers]]
//!     id = "server_1"
//!     ip_address = "10.0.0.7"
//!     [[pods]]
//!     id = "pod_1"
//!     slug = "demo"
//!     owner_id = "user_ada"
//!     team_id = "team_ada"
//!     server_id = "server_1"
//!     status = "running"
//!     ports = [{ name = "nginx-proxy", internal = 80, external = 30001, protocol = "tcp" }]
//!     "#,
//!     "example",
//! )?;
//! let authorizer = Authorizer::new(Arc::new(directory), &AuthorizerConfig::default());
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! runtime.block_on(async {
//!     // Database sessions and impersonation need the directory: `resolve` finishes the job.
//!     let Outcome::Valid(principal) = authorizer.resolve(inspection.verification, now).await?
//!     else {
//!         panic!("the cookie is valid");
//!     };
//!     let decision = authorizer.authorize(&principal.user_id, &PodSlug::parse("demo")?).await?;
//!     let Decision::Allow { upstream, .. } = decision else {
//!         panic!("the owner may reach her pod");
//!     };
//!     assert_eq!(upstream.to_string(), "10.0.0.7:30001");
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod authorizer;
mod claims;
pub mod cookies;
pub mod credentials;
pub mod directory;
mod ids;
mod jwe;
pub mod live;
mod mint;
pub mod pod;
mod proxy_token;
pub mod rule;
mod secret;
#[cfg(feature = "testing")]
pub mod testing;

pub use authorizer::{Authorizer, AuthorizerConfig, CacheLookup};
pub use claims::{CLOCK_TOLERANCE_SECS, Claims, NotANumber};
pub use credentials::{
    CredentialConfig, CredentialConfigError, CredentialKind, CredentialVerifier,
    DECRYPTED_SESSION_TTL, DEFAULT_DECRYPTED_SESSIONS, Inspection, InvalidReason, MAX_CANDIDATES,
    MintError, Outcome, PROXY_TOKEN_COOKIE, Presented, Principal, SessionCandidate, SessionCookie,
    SessionFormat, SessionToken, Verification,
};
pub use directory::{
    AgentRegistration, DirectoryError, FileDirectory, FileDirectoryError, PodDirectory,
    PostgresDirectory, PostgresOptions, SessionRecord,
};
pub use ids::{IdError, PodId, PodSlug, UserId};
pub use pod::{PodCandidate, PodStatus, UnavailableReason};
pub use proxy_token::{PROXY_TOKEN_LIFETIME_SECS, ProxyScope, ProxyTokenClaims};
pub use rule::{Decision, DenyReason};
pub use secret::Secret;

/// The migrations in `migrations/` (the compatible subset of the dashboard's schema), embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
