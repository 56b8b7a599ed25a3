//! What the directory knows about a pod, and the pure step from a pod record to the address of
//! its nginx (`<server ip_address>:<nginx-proxy external port>`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::ids::{PodId, PodSlug, UserId};

/// The name of the `pod.ports` entry that publishes the pod's nginx on its server.
pub const NGINX_PROXY_PORT_NAME: &str = "nginx-proxy";

/// `pod.status` as the dashboard writes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PodStatus {
    /// `creating`
    Creating,
    /// `provisioning`
    Provisioning,
    /// `starting`
    Starting,
    /// `running`
    Running,
    /// `stopping`
    Stopping,
    /// `stopped`
    Stopped,
    /// `error`
    Error,
    /// `deleting`
    Deleting,
    /// Anything else, kept verbatim.
    Other(String),
}

impl PodStatus {
    /// Reads a status string.
    pub fn parse(value: &str) -> Self {
        match value {
            "creating" => Self::Creating,
            "provisioning" => Self::Provisioning,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "error" => Self::Error,
            "deleting" => Self::Deleting,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The status string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Creating => "creating",
            Self::Provisioning => "provisioning",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
            Self::Deleting => "deleting",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for PodStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One non-archived pod with the given slug, and what the directory knows about the asking user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCandidate {
    /// `pod.id`
    pub id: PodId,
    /// `pod.slug`
    pub slug: PodSlug,
    /// `pod.owner_id`
    pub owner_id: Option<UserId>,
    /// `pod.status`
    pub status: PodStatus,
    /// The `ip_address` of the pod's server, when it has one.
    pub server_address: Option<String>,
    /// `pod.ports`, the raw JSON text.
    pub ports_json: Option<String>,
    /// `pod.created_at` in unix milliseconds (newest wins among shared slugs).
    pub created_at_ms: i64,
    /// Whether the asking user has a joined (`user_id` set) `team_member` row for the pod's team.
    pub requester_is_member: bool,
}

/// Why an authorized pod cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UnavailableReason {
    /// The pod's status is not `running`.
    NotRunning,
    /// No server assigned (`server_id` NULL or dangling).
    NoServer,
    /// The server's `ip_address` is not an IP address.
    BadServerAddress,
    /// `pod.ports` is not the expected JSON array.
    MalformedPorts,
    /// `pod.ports` has no usable `nginx-proxy` entry.
    NoNginxProxyPort,
}

impl UnavailableReason {
    /// The stable name used in responses and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotRunning => "not_running",
            Self::NoServer => "no_server",
            Self::BadServerAddress => "bad_server_address",
            Self::MalformedPorts => "malformed_ports",
            Self::NoNginxProxyPort => "no_nginx_proxy_port",
        }
    }
}

#[derive(Deserialize)]
struct PortEntry {
    name: Option<String>,
    external: Option<serde_json::Value>,
}

/// The external port of the `nginx-proxy` entry in `pod.ports`.
///
/// # Errors
/// [`UnavailableReason::MalformedPorts`] when the text is not a JSON array of objects,
/// [`UnavailableReason::NoNginxProxyPort`] when no entry is named `nginx-proxy` with a port in
/// 1..=65535 (numbers or numeric strings).
pub fn nginx_proxy_port(ports_json: Option<&str>) -> Result<u16, UnavailableReason> {
    let text = ports_json.ok_or(UnavailableReason::NoNginxProxyPort)?;
    let entries: Vec<PortEntry> =
        serde_json::from_str(text).map_err(|_| UnavailableReason::MalformedPorts)?;
    entries
        .iter()
        .filter(|e| e.name.as_deref() == Some(NGINX_PROXY_PORT_NAME))
        .find_map(|e| match e.external.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or(UnavailableReason::NoNginxProxyPort)
}

/// Where the pod's nginx listens, or why it cannot be reached.
///
/// # Errors
/// Any [`UnavailableReason`]: not running, no server, bad address, bad or missing port.
pub fn upstream_of(pod: &PodCandidate) -> Result<SocketAddr, UnavailableReason> {
    if pod.status != PodStatus::Running {
        return Err(UnavailableReason::NotRunning);
    }
    let address = pod
        .server_address
        .as_deref()
        .ok_or(UnavailableReason::NoServer)?;
    let ip: IpAddr = address
        .trim()
        .parse()
        .map_err(|_| UnavailableReason::BadServerAddress)?;
    Ok(SocketAddr::new(
        ip,
        nginx_proxy_port(pod.ports_json.as_deref())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_proxy_port_is_found_or_typed() {
        let ok = r#"[{"name":"app","internal":3000,"external":30002},{"name":"nginx-proxy","internal":80,"external":30001,"protocol":"tcp"}]"#;
        assert_eq!(nginx_proxy_port(Some(ok)), Ok(30001));
        assert_eq!(
            nginx_proxy_port(Some(r#"[{"name":"nginx-proxy","external":"30005"}]"#)),
            Ok(30005)
        );
        assert_eq!(
            nginx_proxy_port(Some("{not json")),
            Err(UnavailableReason::MalformedPorts)
        );
        assert_eq!(
            nginx_proxy_port(Some(r#"{"a":1}"#)),
            Err(UnavailableReason::MalformedPorts)
        );
        assert_eq!(
            nginx_proxy_port(Some("[]")),
            Err(UnavailableReason::NoNginxProxyPort)
        );
        assert_eq!(
            nginx_proxy_port(Some(r#"[{"name":"nginx-proxy","external":70000}]"#)),
            Err(UnavailableReason::NoNginxProxyPort)
        );
        assert_eq!(
            nginx_proxy_port(None),
            Err(UnavailableReason::NoNginxProxyPort)
        );
    }
}
