//! A directory read from one TOML file: the same data as the database, for running without one.

use std::collections::HashMap;
use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{DirectoryError, PodDirectory, SessionRecord};
use crate::credentials::SessionToken;
use crate::ids::{IdError, PodId, PodSlug, UserId};
use crate::pod::{PodCandidate, PodStatus};

/// The file format. Field names follow the database columns.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    #[serde(default)]
    users: Vec<UserRow>,
    #[serde(default)]
    servers: Vec<ServerRow>,
    #[serde(default)]
    teams: Vec<TeamRow>,
    #[serde(default)]
    team_members: Vec<TeamMemberRow>,
    #[serde(default)]
    pods: Vec<PodRow>,
    #[serde(default)]
    sessions: Vec<SessionRow>,
    #[serde(default)]
    agents: Vec<AgentRow>,
}

/// `[[agents]]`: a server's registered agent (`pinacle-ingress agent register` prints it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentRow {
    server_id: String,
    secret_sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
// Descriptive columns (name, email, ...) are accepted so the file mirrors the tables;
// authorization does not read them.
#[allow(dead_code)]
struct UserRow {
    id: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
// Descriptive columns (name, email, ...) are accepted so the file mirrors the tables;
// authorization does not read them.
#[allow(dead_code)]
struct ServerRow {
    id: String,
    ip_address: String,
    #[serde(default)]
    hostname: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
// Descriptive columns (name, email, ...) are accepted so the file mirrors the tables;
// authorization does not read them.
#[allow(dead_code)]
struct TeamRow {
    id: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
// Descriptive columns (name, email, ...) are accepted so the file mirrors the tables;
// authorization does not read them.
#[allow(dead_code)]
struct TeamMemberRow {
    team_id: String,
    /// Absent while the invitation is pending: such a row grants nothing.
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    role: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortRow {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    internal: Option<u16>,
    external: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
// Descriptive columns (name, email, ...) are accepted so the file mirrors the tables;
// authorization does not read them.
#[allow(dead_code)]
struct PodRow {
    id: String,
    slug: String,
    #[serde(default)]
    name: Option<String>,
    owner_id: String,
    team_id: String,
    #[serde(default)]
    server_id: Option<String>,
    status: String,
    #[serde(default)]
    ports: Vec<PortRow>,
    #[serde(default)]
    archived: bool,
    /// Unix seconds; the newest pod wins among pods sharing a slug.
    #[serde(default)]
    created_at: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionRow {
    token: String,
    user_id: String,
    /// Unix seconds.
    expires: i64,
}

/// The file could not be used as a directory.
#[derive(Debug, Error)]
pub enum FileDirectoryError {
    /// The file could not be read.
    #[error("cannot read directory file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("directory file {path} is invalid: {message}")]
    Parse {
        /// The path.
        path: String,
        /// What is wrong, with the location.
        message: String,
    },
    /// A row refers to something that is not there, or holds an invalid value.
    #[error("directory file {path}: {problems:?}")]
    Invalid {
        /// The path.
        path: String,
        /// Every problem found.
        problems: Vec<String>,
    },
}

/// A directory held in memory, loaded from a TOML file (see `config/directory.example.toml`).
#[derive(Debug, Clone)]
pub struct FileDirectory {
    /// Non-archived pods by slug, with their team id.
    pods: HashMap<PodSlug, Vec<(PodCandidate, String)>>,
    /// Joined memberships: (team id, user id).
    members: Vec<(String, UserId)>,
    sessions: HashMap<String, SessionRecord>,
    users: Vec<UserId>,
    agents: Vec<super::AgentRegistration>,
}

impl FileDirectory {
    /// Reads and validates a directory file.
    ///
    /// # Errors
    /// Unreadable file, invalid TOML, or rows that are invalid or refer to missing rows.
    pub fn load(path: &Path) -> Result<Self, FileDirectoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileDirectoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates a directory from TOML text; `origin` names it in errors.
    ///
    /// # Errors
    /// Invalid TOML, or rows that are invalid or refer to missing rows.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, FileDirectoryError> {
        let model: FileModel = toml::from_str(text).map_err(|e| FileDirectoryError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        build(model).map_err(|problems| FileDirectoryError::Invalid {
            path: origin.to_owned(),
            problems,
        })
    }
}

fn build(model: FileModel) -> Result<FileDirectory, Vec<String>> {
    let mut problems = Vec::new();
    let mut note = |what: String, r: Result<(), IdError>| {
        if let Err(e) = r {
            problems.push(format!("{what}: {e}"));
        }
    };
    let users: Vec<UserId> = model
        .users
        .iter()
        .filter_map(|u| {
            let r = UserId::new(&u.id);
            note(format!("users id {:?}", u.id), r.clone().map(|_| ()));
            r.ok()
        })
        .collect();
    let user_known = |id: &str| users.iter().any(|u| u.as_str() == id);
    let team_known = |id: &str| model.teams.iter().any(|t| t.id == id);
    let servers: HashMap<&str, &ServerRow> =
        model.servers.iter().map(|s| (s.id.as_str(), s)).collect();

    let mut members = Vec::new();
    for m in &model.team_members {
        if !team_known(&m.team_id) {
            problems.push(format!("team_members: unknown team_id {:?}", m.team_id));
        }
        if let Some(uid) = &m.user_id {
            match UserId::new(uid) {
                Ok(u) if user_known(uid) => members.push((m.team_id.clone(), u)),
                _ => problems.push(format!("team_members: unknown user_id {uid:?}")),
            }
        }
    }

    let mut pods: HashMap<PodSlug, Vec<(PodCandidate, String)>> = HashMap::new();
    for p in &model.pods {
        let (id, slug) = match (PodId::new(&p.id), PodSlug::parse(&p.slug)) {
            (Ok(id), Ok(slug)) => (id, slug),
            (id, slug) => {
                problems.push(format!(
                    "pods {:?}: {}",
                    p.id,
                    [id.err(), slug.err()]
                        .into_iter()
                        .flatten()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                continue;
            }
        };
        if !user_known(&p.owner_id) {
            problems.push(format!(
                "pods {:?}: unknown owner_id {:?}",
                p.id, p.owner_id
            ));
        }
        if !team_known(&p.team_id) {
            problems.push(format!("pods {:?}: unknown team_id {:?}", p.id, p.team_id));
        }
        let server = match &p.server_id {
            Some(sid) => match servers.get(sid.as_str()) {
                Some(s) => Some(s.ip_address.clone()),
                None => {
                    problems.push(format!("pods {:?}: unknown server_id {sid:?}", p.id));
                    None
                }
            },
            None => None,
        };
        if p.archived {
            continue;
        }
        let candidate = PodCandidate {
            id,
            slug: slug.clone(),
            owner_id: UserId::new(&p.owner_id).ok(),
            status: PodStatus::parse(&p.status),
            server_address: server,
            ports_json: serde_json::to_string(&p.ports).ok(),
            created_at_ms: p.created_at.saturating_mul(1000),
            requester_is_member: false,
        };
        pods.entry(slug)
            .or_default()
            .push((candidate, p.team_id.clone()));
    }

    let mut sessions = HashMap::new();
    for s in &model.sessions {
        match UserId::new(&s.user_id) {
            Ok(u) if user_known(&s.user_id) => {
                sessions.insert(
                    s.token.clone(),
                    SessionRecord {
                        user_id: u,
                        expires_at_ms: s.expires.saturating_mul(1000),
                    },
                );
            }
            _ => problems.push(format!("sessions: unknown user_id {:?}", s.user_id)),
        }
    }
    let mut agents = Vec::new();
    for a in &model.agents {
        let hex = a.secret_sha256.len() == 64
            && a.secret_sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match servers.get(a.server_id.as_str()) {
            _ if !hex => problems.push(format!(
                "agents {:?}: secret_sha256 must be 64 lowercase hex digits",
                a.server_id
            )),
            Some(server) => agents.push(super::AgentRegistration {
                server_id: a.server_id.clone(),
                ip_address: server.ip_address.clone(),
                secret_sha256: a.secret_sha256.clone(),
            }),
            None => problems.push(format!("agents: unknown server_id {:?}", a.server_id)),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(FileDirectory {
        pods,
        members,
        sessions,
        users,
        agents,
    })
}

#[async_trait]
impl PodDirectory for FileDirectory {
    async fn agents(&self) -> Result<Vec<super::AgentRegistration>, DirectoryError> {
        Ok(self.agents.clone())
    }

    async fn pods_by_slug(
        &self,
        slug: &PodSlug,
        user: &UserId,
    ) -> Result<Vec<PodCandidate>, DirectoryError> {
        Ok(self
            .pods
            .get(slug)
            .map(|pods| {
                pods.iter()
                    .map(|(pod, team)| PodCandidate {
                        requester_is_member: self
                            .members
                            .iter()
                            .any(|(t, u)| t == team && u == user),
                        ..pod.clone()
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn session(&self, token: &SessionToken) -> Result<Option<SessionRecord>, DirectoryError> {
        Ok(self.sessions.get(token.expose()).cloned())
    }

    async fn user_exists(&self, user: &UserId) -> Result<bool, DirectoryError> {
        Ok(self.users.contains(user))
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangling_references_are_all_reported() {
        let text = r#"
            [[users]]
            id = "u1"
            [[pods]]
            id = "p1"
            slug = "Bad Slug"
            owner_id = "u1"
            team_id = "t1"
            status = "running"
            [[pods]]
            id = "p2"
            slug = "ok"
            owner_id = "ghost"
            team_id = "t1"
            server_id = "s9"
            status = "running"
        "#;
        match FileDirectory::from_toml(text, "inline") {
            Err(FileDirectoryError::Invalid { problems, .. }) => {
                assert_eq!(problems.len(), 4, "{problems:?}");
            }
            other => unreachable!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn agents_name_a_known_server_and_a_sha256() {
        let hash = "a".repeat(64);
        let text = format!(
            "[[servers]]\nid = \"s1\"\nip_address = \"192.0.2.1\"\n\
             [[agents]]\nserver_id = \"s1\"\nsecret_sha256 = \"{hash}\"\n"
        );
        let directory =
            FileDirectory::from_toml(&text, "inline").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            directory.agents().await,
            Ok(vec![crate::AgentRegistration {
                server_id: "s1".into(),
                ip_address: "192.0.2.1".into(),
                secret_sha256: hash,
            }])
        );
        for bad in [
            "[[agents]]\nserver_id = \"nope\"\nsecret_sha256 = \"aa\"",
            "[[servers]]\nid = \"s1\"\nip_address = \"1.2.3.4\"\n[[agents]]\nserver_id = \"s1\"\nsecret_sha256 = \"NOT-HEX\"",
        ] {
            assert!(
                matches!(
                    FileDirectory::from_toml(bad, "inline"),
                    Err(FileDirectoryError::Invalid { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(matches!(
            FileDirectory::from_toml("[[users]]\nid = \"u\"\nrole = \"x\"\n", "inline"),
            Err(FileDirectoryError::Parse { .. })
        ));
    }
}
