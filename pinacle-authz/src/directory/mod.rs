//! The pod directory: where pods, team memberships, servers and database sessions are looked up.
//! Two implementations: [`PostgresDirectory`] (the dashboard's database) and [`FileDirectory`]
//! (a TOML file, the embedded default for running without a database).

mod file;
mod postgres;

pub use file::{FileDirectory, FileDirectoryError};
pub use postgres::{PostgresDirectory, PostgresOptions};

use async_trait::async_trait;
use thiserror::Error;

use crate::credentials::SessionToken;
use crate::ids::{PodSlug, UserId};
use crate::pod::PodCandidate;

/// A database session row (`session`), as the ingress needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// `"userId"`
    pub user_id: UserId,
    /// `expires`, unix milliseconds (UTC).
    pub expires_at_ms: i64,
}

/// A server's registered agent (`pinacle_agent`): the ingress reaches that server only through
/// the agent's tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRegistration {
    /// `server.id`.
    pub server_id: String,
    /// `server.ip_address`: the address pods of this server are published on.
    pub ip_address: String,
    /// Lowercase hex SHA-256 of the agent's secret.
    pub secret_sha256: String,
}

/// The directory could not answer: the caller must not treat this as a denial.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirectoryError {
    /// The backend could not be reached (connection refused, pool exhausted or closed).
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// A query took longer than allowed.
    #[error("directory query timed out")]
    Timeout,
    /// The backend answered with an error or data we cannot read.
    #[error("directory query failed: {0}")]
    Query(String),
}

/// Looks up what authorization needs. Implementations must be cheap to share across tasks.
#[async_trait]
pub trait PodDirectory: Send + Sync + std::fmt::Debug + 'static {
    /// Every non-archived pod with `slug`, with whether `user` is a joined member of its team.
    ///
    /// # Errors
    /// [`DirectoryError`] when the backend cannot answer.
    async fn pods_by_slug(
        &self,
        slug: &PodSlug,
        user: &UserId,
    ) -> Result<Vec<PodCandidate>, DirectoryError>;

    /// The database session with this token, if any.
    ///
    /// # Errors
    /// [`DirectoryError`] when the backend cannot answer.
    async fn session(&self, token: &SessionToken) -> Result<Option<SessionRecord>, DirectoryError>;

    /// Whether a `"user"` row with this id exists.
    ///
    /// # Errors
    /// [`DirectoryError`] when the backend cannot answer.
    async fn user_exists(&self, user: &UserId) -> Result<bool, DirectoryError>;

    /// Whether the backend answers at all (readiness).
    ///
    /// # Errors
    /// [`DirectoryError`] when it does not.
    async fn ping(&self) -> Result<(), DirectoryError>;

    /// Every registered agent, with its server's address (none by default: a directory
    /// without agents).
    ///
    /// # Errors
    /// [`DirectoryError`] when the backend cannot answer.
    async fn agents(&self) -> Result<Vec<AgentRegistration>, DirectoryError> {
        Ok(Vec::new())
    }
}
