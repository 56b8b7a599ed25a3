//! The dashboard's Postgres database, read through sqlx with compile-time checked queries.
//! Every query is bounded: pool acquire timeout, server-side statement timeout, and a client-side
//! deadline; errors are mapped to [`DirectoryError`] and never leak SQL to callers.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{DirectoryError, PodDirectory, SessionRecord};
use crate::credentials::SessionToken;
use crate::ids::{PodId, PodSlug, UserId};
use crate::pod::{PodCandidate, PodStatus};

/// Pool and timeout settings. Keep the timeouts below the request budget.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections held.
    pub max_connections: u32,
    /// Longest wait for a pooled connection (and to connect).
    pub acquire_timeout: Duration,
    /// Longest a query may run, enforced by the server and by the client.
    pub query_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(2),
            query_timeout: Duration::from_secs(2),
        }
    }
}

/// Most pods sharing one slug that are considered (newest first).
const MAX_SLUG_CANDIDATES: i64 = 50;

/// A [`PodDirectory`] over the dashboard's database.
#[derive(Debug, Clone)]
pub struct PostgresDirectory {
    pool: PgPool,
    query_timeout: Duration,
}

impl PostgresDirectory {
    /// Builds a lazily connecting pool for `url` (`DATABASE_URL`).
    ///
    /// # Errors
    /// [`DirectoryError::Unavailable`] when the URL cannot be parsed.
    pub fn connect_lazy(url: &str, options: &PostgresOptions) -> Result<Self, DirectoryError> {
        let connect: PgConnectOptions = url.parse().map_err(|_| {
            DirectoryError::Unavailable("DATABASE_URL is not a valid Postgres URL".into())
        })?;
        let statement_ms = options.query_timeout.as_millis().to_string();
        let connect = connect
            .application_name("pinacle-ingress")
            .options([("statement_timeout", statement_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self::from_pool(pool, options.query_timeout))
    }

    /// Wraps an existing pool (tests, embedding services).
    pub fn from_pool(pool: PgPool, query_timeout: Duration) -> Self {
        Self {
            pool,
            query_timeout,
        }
    }

    /// The pool, e.g. for running migrations.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn bounded<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DirectoryError> {
        match tokio::time::timeout(self.query_timeout, query).await {
            Ok(result) => result.map_err(map_error),
            Err(_) => Err(DirectoryError::Timeout),
        }
    }
}

fn map_error(e: sqlx::Error) -> DirectoryError {
    match e {
        sqlx::Error::PoolTimedOut => DirectoryError::Timeout,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => DirectoryError::Unavailable(e.to_string()),
        // 57014: query_canceled (statement_timeout).
        sqlx::Error::Database(ref db) if db.code().as_deref() == Some("57014") => {
            DirectoryError::Timeout
        }
        other => DirectoryError::Query(other.to_string()),
    }
}

#[async_trait]
impl PodDirectory for PostgresDirectory {
    #[tracing::instrument(level = "debug", skip_all, fields(slug = %slug))]
    async fn pods_by_slug(
        &self,
        slug: &PodSlug,
        user: &UserId,
    ) -> Result<Vec<PodCandidate>, DirectoryError> {
        let rows = self
            .bounded(
                sqlx::query!(
                    r#"
                    SELECT p.id, p.slug, p.owner_id AS "owner_id?", p.status AS "status?",
                           p.ports AS "ports?", s.ip_address AS "server_address?",
                           (EXTRACT(EPOCH FROM p.created_at) * 1000)::int8 AS "created_at_ms!",
                           EXISTS (
                               SELECT 1 FROM team_member tm
                               WHERE tm.team_id = p.team_id AND tm.user_id = $2
                           ) AS "requester_is_member!"
                    FROM pod p
                    LEFT JOIN server s ON s.id = p.server_id
                    WHERE p.slug = $1 AND p.archived_at IS NULL
                    ORDER BY p.created_at DESC, p.id DESC
                    LIMIT $3
                    "#,
                    slug.as_str(),
                    user.as_str(),
                    MAX_SLUG_CANDIDATES,
                )
                .fetch_all(&self.pool),
            )
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok(PodCandidate {
                    id: PodId::new(&r.id).map_err(|e| DirectoryError::Query(e.to_string()))?,
                    slug: PodSlug::parse(&r.slug)
                        .map_err(|e| DirectoryError::Query(e.to_string()))?,
                    owner_id: r.owner_id.as_deref().and_then(|o| UserId::new(o).ok()),
                    status: PodStatus::parse(r.status.as_deref().unwrap_or("")),
                    server_address: r.server_address,
                    ports_json: r.ports,
                    created_at_ms: r.created_at_ms,
                    requester_is_member: r.requester_is_member,
                })
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn session(&self, token: &SessionToken) -> Result<Option<SessionRecord>, DirectoryError> {
        let row = self
            .bounded(
                sqlx::query!(
                    r#"
                    SELECT "userId" AS user_id,
                           (EXTRACT(EPOCH FROM expires) * 1000)::int8 AS "expires_at_ms!"
                    FROM session WHERE "sessionToken" = $1
                    "#,
                    token.expose(),
                )
                .fetch_optional(&self.pool),
            )
            .await?;
        row.map(|r| {
            Ok(SessionRecord {
                user_id: UserId::new(&r.user_id)
                    .map_err(|e| DirectoryError::Query(e.to_string()))?,
                expires_at_ms: r.expires_at_ms,
            })
        })
        .transpose()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(user = %user))]
    async fn user_exists(&self, user: &UserId) -> Result<bool, DirectoryError> {
        self.bounded(
            sqlx::query_scalar!(
                r#"SELECT EXISTS (SELECT 1 FROM "user" WHERE id = $1) AS "exists!""#,
                user.as_str()
            )
            .fetch_one(&self.pool),
        )
        .await
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        self.bounded(sqlx::query_scalar!(r#"SELECT 1 AS "one!""#).fetch_one(&self.pool))
            .await
            .map(|_| ())
    }

    async fn agents(&self) -> Result<Vec<super::AgentRegistration>, DirectoryError> {
        // A runtime query: `pinacle_agent` is the ingress's own table (migration 0003), absent
        // from a dashboard database that never ran it, which then simply has no agents.
        let rows: Result<Vec<(String, String, String)>, DirectoryError> = self
            .bounded(
                sqlx::query_as(
                    "SELECT a.server_id, s.ip_address, a.secret_sha256 \
                     FROM pinacle_agent a JOIN server s ON s.id = a.server_id",
                )
                .fetch_all(&self.pool),
            )
            .await;
        match rows {
            Ok(rows) => Ok(rows
                .into_iter()
                .map(
                    |(server_id, ip_address, secret_sha256)| super::AgentRegistration {
                        server_id,
                        ip_address,
                        secret_sha256,
                    },
                )
                .collect()),
            Err(DirectoryError::Query(message)) if message.contains("pinacle_agent") => {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }
}
