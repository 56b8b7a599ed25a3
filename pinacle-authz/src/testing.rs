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
    async fn agents(&self) -> Result<Vec<crate::AgentRegistration>, DirectoryError> {
        self.inner.agents().await
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

    /// Pods of `ada`'s team `t1` (see [`Self::people`]) on `server`, created a minute ago:
    /// `(id, slug, status, nginx-proxy port)` each.
    pub async fn team_pods(
        &self,
        server: &str,
        pods: &[(&str, &str, &str, u16)],
    ) -> Result<(), sqlx::Error> {
        for (id, slug, status, port) in pods {
            let ports = ports_json(*port);
            self.pod(&PodSeed {
                id,
                slug,
                owner_id: "ada",
                team_id: "t1",
                server_id: Some(server),
                status,
                ports: Some(&ports),
                age_secs: 60.0,
            })
            .await?;
        }
        Ok(())
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

/// A credential fixture made by the real next-auth, @auth/core and jsonwebtoken packages
/// (`pinacle-authz/tests/fixtures/nextauth/<name>`; each file names its generator and the
/// library versions that checked every case).
///
/// # Panics
/// When the file is missing or is not JSON (test code).
#[allow(clippy::panic)]
pub fn nextauth_fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nextauth")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A next-auth v4 session cookie value for `user` (`sub` and `id`; `email` is
/// `<user>@example.test`), valid from `now` for
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
    let claims = serde_json::json!({"sub": user, "id": user, "email": format!("{user}@example.test"),
        "iat": now, "exp": now + ttl_secs});
    let map = claims.as_object().cloned().unwrap_or_default();
    verifier
        .mint_session_v4(&crate::Claims(map))
        .expect("minting needs only randomness")
}

/// Generated `Cookie` headers mixing a user's real credentials with what a hostile pod can plant
/// (same-named junk, stray chunks, a foreign app's own session cookie), for property tests of
/// credential stripping at every layer.
pub mod hostile_cookies {
    use proptest::prelude::*;

    /// The credentials a case is built from.
    #[derive(Debug, Clone)]
    pub struct Material {
        /// The session cookie name (e.g. `next-auth.session-token`).
        pub name: String,
        /// A valid dashboard session cookie value.
        pub dashboard: String,
        /// A session cookie value made by a pod app with its own secret.
        pub foreign: String,
        /// A valid proxy token.
        pub proxy_token: String,
    }

    /// One cookie in a generated header.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Crumb {
        /// The dashboard's cookie, whole (optionally in double quotes).
        Dashboard {
            /// Whether the value is quoted.
            quoted: bool,
        },
        /// Chunk `.0` or `.1` of the dashboard's cookie (split at the case's split point).
        DashboardChunk(u8),
        /// A junk value under the session cookie name.
        Junk,
        /// A junk chunk with this index.
        JunkChunk(u8),
        /// A pod app's own session cookie under the same name (another secret).
        Foreign,
        /// The valid proxy token.
        ProxyToken,
        /// A junk proxy token.
        JunkProxyToken,
        /// An unrelated cookie (`theme=dark`, a non-ASCII one, a nameless segment).
        Other(u8),
    }

    /// A generated header: cookies in order, blanks around separators, how many `Cookie`
    /// fields it is sent in.
    #[derive(Debug, Clone)]
    pub struct Case {
        /// The cookies, in order.
        pub crumbs: Vec<Crumb>,
        /// Where the dashboard's value is split into chunks (a fraction in 1/256).
        pub split: u8,
        /// The separator flavour between cookies (`"; "`, `";"`, `" ;  "`, `";\t"`).
        pub separator: u8,
        /// Into how many `Cookie` fields the cookies are spread (1 to 3).
        pub fields: u8,
    }

    const OTHERS: [&str; 4] = ["theme=dark", "name=José", "app=\"q=1\"", "flag"];

    fn crumb() -> impl Strategy<Value = Crumb> {
        prop_oneof![
            any::<bool>().prop_map(|quoted| Crumb::Dashboard { quoted }),
            (0u8..2).prop_map(Crumb::DashboardChunk),
            Just(Crumb::Junk),
            (0u8..4).prop_map(Crumb::JunkChunk),
            Just(Crumb::Foreign),
            Just(Crumb::ProxyToken),
            Just(Crumb::JunkProxyToken),
            (0u8..4).prop_map(Crumb::Other),
        ]
    }

    /// Any case: up to 8 cookies.
    pub fn case() -> impl Strategy<Value = Case> {
        (
            proptest::collection::vec(crumb(), 0..8),
            any::<u8>(),
            0u8..4,
            1u8..4,
        )
            .prop_map(|(crumbs, split, separator, fields)| Case {
                crumbs,
                split,
                separator,
                fields,
            })
    }

    impl Case {
        fn split_at(&self, value: &str) -> usize {
            (value.len() * usize::from(self.split.max(1)) / 256).clamp(1, value.len() - 1)
        }

        fn text(&self, crumb: &Crumb, m: &Material) -> String {
            let name = &m.name;
            let cut = self.split_at(&m.dashboard);
            let (head, tail) = m.dashboard.split_at(cut);
            match crumb {
                Crumb::Dashboard { quoted: true } => format!("{name}=\"{}\"", m.dashboard),
                Crumb::Dashboard { quoted: false } => format!("{name}={}", m.dashboard),
                Crumb::DashboardChunk(0) => format!("{name}.0={head}"),
                Crumb::DashboardChunk(_) => format!("{name}.1={tail}"),
                Crumb::Junk => format!("{name}=junk"),
                Crumb::JunkChunk(i) => format!("{name}.{i}=junk{i}"),
                Crumb::Foreign => format!("{name}={}", m.foreign),
                Crumb::ProxyToken => format!("pinacle-proxy-token={}", m.proxy_token),
                Crumb::JunkProxyToken => "pinacle-proxy-token=junk".to_owned(),
                Crumb::Other(i) => OTHERS[usize::from(*i) % OTHERS.len()].to_owned(),
            }
        }

        /// The `Cookie` field values to send (at least one, possibly empty).
        pub fn fields(&self, m: &Material) -> Vec<String> {
            let separator = ["; ", ";", " ;  ", ";\t"][usize::from(self.separator) % 4];
            let per_field = self.crumbs.len().div_ceil(usize::from(self.fields)).max(1);
            let mut fields: Vec<String> = self
                .crumbs
                .chunks(per_field)
                .map(|crumbs| {
                    crumbs
                        .iter()
                        .map(|c| self.text(c, m))
                        .collect::<Vec<_>>()
                        .join(separator)
                })
                .collect();
            if fields.is_empty() {
                fields.push(String::new());
            }
            fields
        }

        /// The fields joined as one header, as an HTTP/2 or HTTP/1 proxy joins them.
        pub fn joined(&self, m: &Material) -> String {
            self.fields(m).join("; ")
        }

        /// Whether a credential that must authenticate is present: the dashboard's whole cookie,
        /// both of its chunks, or the valid proxy token.
        pub fn authenticates(&self) -> bool {
            let has = |c: &Crumb| self.crumbs.contains(c);
            has(&Crumb::Dashboard { quoted: true })
                || has(&Crumb::Dashboard { quoted: false })
                || has(&Crumb::ProxyToken)
                || (has(&Crumb::DashboardChunk(0)) && has(&Crumb::DashboardChunk(1)))
        }

        /// Byte strings that must never reach a pod: the dashboard's value, the proxy token, and
        /// the first and last 24 bytes of each of the dashboard's chunks past the JWE header
        /// (which every v4 token shares, the pod app's own included).
        pub fn secrets(&self, m: &Material) -> Vec<String> {
            let value = &m.dashboard;
            let cut = self.split_at(value);
            let header_end = value.find("..").map_or(0, |i| i + 2);
            let mut secrets = vec![value.clone(), m.proxy_token.clone()];
            for (start, end) in [(0, cut), (cut, value.len())] {
                let part = &value[start.max(header_end)..end.max(header_end)];
                if part.len() >= 24 {
                    secrets.push(part[..24].to_owned());
                    secrets.push(part[part.len() - 24..].to_owned());
                }
            }
            secrets
        }

        /// The cookies that must reach the pod unchanged, in order: unrelated ones and the pod
        /// app's own session cookie.
        pub fn kept(&self, m: &Material) -> Vec<String> {
            self.crumbs
                .iter()
                .filter(|c| matches!(c, Crumb::Other(_) | Crumb::Foreign))
                .map(|c| self.text(c, m))
                .collect()
        }
    }
}
