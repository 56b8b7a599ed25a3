//! Test support shared by this crate's and the ingress's tests (feature `testing`): a directory
//! wrapper that counts and can slow down lookups, and helpers that seed the dashboard's tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;

use crate::credentials::SessionToken;
use crate::directory::{DirectoryError, PodDirectory, SessionRecord};
use crate::ids::{PodSlug, UserId};
use crate::pod::PodCandidate;

/// Counts `pods_by_slug` calls and optionally delays each (to make concurrent misses overlap).
#[derive(Debug)]
pub struct CountingDirectory {
    inner: Arc<dyn PodDirectory>,
    delay: Duration,
    pod_lookups: AtomicUsize,
}

impl CountingDirectory {
    /// Wraps `inner`; each pod lookup first waits `delay`.
    pub fn new(inner: Arc<dyn PodDirectory>, delay: Duration) -> Self {
        Self {
            inner,
            delay,
            pod_lookups: AtomicUsize::new(0),
        }
    }

    /// How many pod lookups reached the wrapped directory.
    pub fn pod_lookups(&self) -> usize {
        self.pod_lookups.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl PodDirectory for CountingDirectory {
    async fn pods_by_slug(
        &self,
        slug: &PodSlug,
        user: &UserId,
    ) -> Result<Vec<PodCandidate>, DirectoryError> {
        self.pod_lookups.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.pods_by_slug(slug, user).await
    }
    async fn session(&self, token: &SessionToken) -> Result<Option<SessionRecord>, DirectoryError> {
        self.inner.session(token).await
    }
    async fn user_exists(&self, user: &UserId) -> Result<bool, DirectoryError> {
        self.inner.user_exists(user).await
    }
    async fn ping(&self) -> Result<(), DirectoryError> {
        self.inner.ping().await
    }
}

/// A pod row to insert.
#[derive(Debug, Clone)]
pub struct PodSeed<'a> {
    /// `pod.id`
    pub id: &'a str,
    /// `pod.slug`
    pub slug: &'a str,
    /// `pod.owner_id`
    pub owner_id: &'a str,
    /// `pod.team_id`
    pub team_id: &'a str,
    /// `pod.server_id`
    pub server_id: Option<&'a str>,
    /// `pod.status`
    pub status: &'a str,
    /// `pod.ports` (raw text)
    pub ports: Option<&'a str>,
    /// Seconds before now for `created_at`.
    pub age_secs: f64,
}

/// Inserts rows into the dashboard's tables.
#[derive(Debug, Clone, Copy)]
pub struct Seed<'a>(pub &'a PgPool);

impl Seed<'_> {
    /// A user with email `<id>@example.test`.
    pub async fn user(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"INSERT INTO "user" (id, name, email) VALUES ($1::text, $1::text, $1::text || '@example.test')"#,
            id
        )
        .execute(self.0)
        .await
        .map(drop)
    }

    /// A team owned by `owner` (the owner also gets a joined member row, as the dashboard does).
    pub async fn team(&self, id: &str, owner: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "INSERT INTO team (id, name, slug, owner_id) VALUES ($1, $1, $1, $2)",
            id,
            owner
        )
        .execute(self.0)
        .await?;
        self.member(team_member_id(id, owner).as_str(), id, Some(owner), "owner")
            .await
    }

    /// A `team_member` row; `user = None` is a pending invitation.
    pub async fn member(
        &self,
        id: &str,
        team: &str,
        user: Option<&str>,
        role: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"INSERT INTO team_member (id, team_id, user_id, email, role, invited_at, joined_at)
               VALUES ($1, $2, $3, $1 || '@example.test', $4, now(),
                       CASE WHEN $3::text IS NULL THEN NULL ELSE now() END)"#,
            id,
            team,
            user,
            role
        )
        .execute(self.0)
        .await
        .map(drop)
    }

    /// Removes `user` from `team`.
    pub async fn remove_member(&self, team: &str, user: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "DELETE FROM team_member WHERE team_id = $1 AND user_id = $2",
            team,
            user
        )
        .execute(self.0)
        .await
        .map(drop)
    }

    /// A server at `ip`.
    pub async fn server(&self, id: &str, ip: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "INSERT INTO server (id, hostname, ip_address, status) VALUES ($1, $1, $2, 'online')",
            id,
            ip
        )
        .execute(self.0)
        .await
        .map(drop)
    }

    /// A pod.
    pub async fn pod(&self, pod: &PodSeed<'_>) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"INSERT INTO pod (id, name, slug, owner_id, team_id, server_id, status, ports, created_at)
               VALUES ($1, $2::text, $2::text, $3, $4, $5, $6, $7, now() - make_interval(secs => $8))"#,
            pod.id,
            pod.slug,
            pod.owner_id,
            pod.team_id,
            pod.server_id,
            pod.status,
            pod.ports,
            pod.age_secs
        )
        .execute(self.0)
        .await
        .map(drop)
    }

    /// The people every test world shares: users `ada`, `bob`, `eve` and `mal`; team `t1`
    /// owned by `ada`; `bob` a joined member, `eve` a pending invitee, `mal` a stranger.
    pub async fn people(&self) -> Result<(), sqlx::Error> {
        for u in ["ada", "bob", "eve", "mal"] {
            self.user(u).await?;
        }
        self.team("t1", "ada").await?;
        self.member("tm_bob", "t1", Some("bob"), "member").await?;
        self.member("tm_eve", "t1", None, "member").await
    }

    /// Sets `pod.status`.
    pub async fn set_pod_status(&self, id: &str, status: &str) -> Result<(), sqlx::Error> {
        sqlx::query!("UPDATE pod SET status = $2 WHERE id = $1", id, status)
            .execute(self.0)
            .await
            .map(drop)
    }

    /// Archives a pod.
    pub async fn archive_pod(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query!("UPDATE pod SET archived_at = now() WHERE id = $1", id)
            .execute(self.0)
            .await
            .map(drop)
    }

    /// A database session expiring at `expires_ms` (unix milliseconds, UTC).
    pub async fn session(
        &self,
        token: &str,
        user: &str,
        expires_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"INSERT INTO session ("sessionToken", "userId", expires)
               VALUES ($1, $2, to_timestamp($3::float8 / 1000) AT TIME ZONE 'UTC')"#,
            token,
            user,
            expires_ms as f64
        )
        .execute(self.0)
        .await
        .map(drop)
    }
}

fn team_member_id(team: &str, user: &str) -> String {
    format!("tm_{team}_{user}")
}

/// `pod.ports` text with the nginx-proxy entry on `external`.
pub fn ports_json(external: u16) -> String {
    format!(r#"[{{"name":"nginx-proxy","internal":80,"external":{external},"protocol":"tcp"}}]"#)
}

/// A file directory (TOML) with one owner, one team, one server at 127.0.0.1 and running pods
/// `(id, slug, nginx-proxy external port)`, all owned by `owner`.
pub fn owner_directory_toml(owner: &str, pods: &[(&str, &str, u16)]) -> String {
    let mut text = format!(
        "[[users]]\nid = \"{owner}\"\nemail = \"{owner}@example.test\"\n\n\
         [[teams]]\nid = \"team\"\n\n[[servers]]\nid = \"server\"\nip_address = \"127.0.0.1\"\n"
    );
    for (id, slug, port) in pods {
        text.push_str(&format!(
            "\n[[pods]]\nid = \"{id}\"\nslug = \"{slug}\"\nowner_id = \"{owner}\"\n\
             team_id = \"team\"\nserver_id = \"server\"\nstatus = \"running\"\n\
             ports = [{{ name = \"nginx-proxy\", internal = 80, external = {port}, protocol = \"tcp\" }}]\n"
        ));
    }
    text
}

/// A next-auth v4 session cookie value for `user` (`sub` and `id`), valid from `now` for
/// `ttl_secs`, encrypted with `secret`.
///
/// # Panics
/// Only on an empty secret (test code).
#[allow(clippy::expect_used)]
pub fn session_cookie_value(secret: &str, user: &str, now: i64, ttl_secs: i64) -> String {
    use crate::credentials::{CredentialConfig, CredentialVerifier};
    let verifier =
        CredentialVerifier::new(&CredentialConfig::with_secrets(vec![crate::Secret::new(
            secret.to_owned(),
        )]))
        .expect("a non-empty secret");
    let claims = serde_json::json!({"sub": user, "id": user, "iat": now, "exp": now + ttl_secs});
    let map = claims.as_object().cloned().unwrap_or_default();
    verifier
        .mint_session_v4(&crate::Claims(map))
        .expect("minting needs only randomness")
}
