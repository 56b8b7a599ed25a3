//! The pod's nginx description: the serde file model (JSON or TOML) and its validation into a
//! [`PodNginx`] that can only hold renderable values.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

/// The file model, as written by the dashboard or an operator. Every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodNginxFile {
    /// Port nginx listens on inside the pod (published on the server). Default 80.
    #[serde(default = "defaults::listen_port")]
    pub listen_port: u32,
    /// Port used when the Host header names none. Default 3000.
    #[serde(default = "defaults::default_port")]
    pub default_port: u32,
    /// `X-Forwarded-Proto` sent to services: `https` (default) or `http`.
    #[serde(default = "defaults::forwarded_proto")]
    pub forwarded_proto: String,
    /// When present, only these ports are routed; others get a 404 page naming the port.
    #[serde(default)]
    pub allowed_ports: Option<Vec<u32>>,
    /// Addresses or CIDR ranges of the ingress, trusted to set `X-Forwarded-For`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Read/send timeout towards services (human form: `7d`, `1h 30m`). Default `7d`.
    #[serde(default = "defaults::proxy_timeout")]
    pub proxy_timeout: String,
    /// Connect timeout towards services. Default `10s`.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: String,
    /// Path answered on any Host without touching a service. Default `/__pinacle/health`.
    #[serde(default = "defaults::health_path")]
    pub health_path: String,
    /// Where nginx keeps its pid, logs and temporary files.
    #[serde(default)]
    pub runtime: RuntimeFile,
}

/// Paths nginx writes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    /// Default `/run/nginx.pid`.
    #[serde(default = "defaults::pid_path")]
    pub pid_path: String,
    /// Default `/var/log/nginx/error.log`.
    #[serde(default = "defaults::error_log")]
    pub error_log: String,
    /// Default `/var/log/nginx/access.log`; `off` disables it.
    #[serde(default = "defaults::access_log")]
    pub access_log: String,
    /// Directory for request/response temporary files. Default `/var/lib/nginx`.
    #[serde(default = "defaults::temp_dir")]
    pub temp_dir: String,
}

impl Default for RuntimeFile {
    fn default() -> Self {
        Self {
            pid_path: defaults::pid_path(),
            error_log: defaults::error_log(),
            access_log: defaults::access_log(),
            temp_dir: defaults::temp_dir(),
        }
    }
}

impl Default for PodNginxFile {
    fn default() -> Self {
        Self {
            listen_port: defaults::listen_port(),
            default_port: defaults::default_port(),
            forwarded_proto: defaults::forwarded_proto(),
            allowed_ports: None,
            trusted_proxies: Vec::new(),
            proxy_timeout: defaults::proxy_timeout(),
            connect_timeout: defaults::connect_timeout(),
            health_path: defaults::health_path(),
            runtime: RuntimeFile::default(),
        }
    }
}

mod defaults {
    pub fn listen_port() -> u32 {
        80
    }
    pub fn default_port() -> u32 {
        3000
    }
    pub fn forwarded_proto() -> String {
        "https".into()
    }
    pub fn proxy_timeout() -> String {
        "7d".into()
    }
    pub fn connect_timeout() -> String {
        "10s".into()
    }
    pub fn health_path() -> String {
        "/__pinacle/health".into()
    }
    pub fn pid_path() -> String {
        "/run/nginx.pid".into()
    }
    pub fn error_log() -> String {
        "/var/log/nginx/error.log".into()
    }
    pub fn access_log() -> String {
        "/var/log/nginx/access.log".into()
    }
    pub fn temp_dir() -> String {
        "/var/lib/nginx".into()
    }
}

/// One problem with the input, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field, e.g. `allowed_ports[2]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A validated description: every value is safe to put in an nginx config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNginx {
    pub(crate) listen_port: u16,
    pub(crate) default_port: u16,
    pub(crate) forwarded_proto: &'static str,
    pub(crate) allowed_ports: Option<BTreeSet<u16>>,
    pub(crate) trusted_proxies: Vec<String>,
    pub(crate) proxy_timeout_secs: u64,
    pub(crate) connect_timeout_secs: u64,
    pub(crate) health_path: String,
    pub(crate) pid_path: String,
    pub(crate) error_log: String,
    pub(crate) access_log: String,
    pub(crate) temp_dir: String,
}

const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

impl PodNginxFile {
    /// Checks every field and reports every problem at once.
    ///
    /// # Errors
    /// The list of problems, each naming its field.
    pub fn validate(&self) -> Result<PodNginx, Vec<Problem>> {
        let mut problems = Vec::new();
        let listen_port = check_port(&mut problems, "listen_port", self.listen_port);
        let default_port = check_port(&mut problems, "default_port", self.default_port);
        let allowed_ports = self.allowed_ports.as_ref().map(|ports| {
            let mut set = BTreeSet::new();
            for (i, p) in ports.iter().enumerate() {
                let field = format!("allowed_ports[{i}]");
                let p = check_port(&mut problems, &field, *p);
                if !set.insert(p) {
                    push(&mut problems, &field, format!("port {p} is listed twice"));
                }
            }
            set
        });
        if let Some(set) = &allowed_ports {
            if set.is_empty() {
                push(
                    &mut problems,
                    "allowed_ports",
                    "must list at least one port (omit it to allow all)".into(),
                );
            } else if !set.contains(&default_port) {
                push(
                    &mut problems,
                    "default_port",
                    format!("{default_port} is not in allowed_ports"),
                );
            }
        }
        let forwarded_proto = match self.forwarded_proto.as_str() {
            "https" => "https",
            "http" => "http",
            other => {
                push(
                    &mut problems,
                    "forwarded_proto",
                    format!("{other:?} must be \"https\" or \"http\""),
                );
                "https"
            }
        };
        for (i, proxy) in self.trusted_proxies.iter().enumerate() {
            if !is_address_or_cidr(proxy) {
                push(
                    &mut problems,
                    &format!("trusted_proxies[{i}]"),
                    format!("{proxy:?} is not an IP address or CIDR range"),
                );
            }
        }
        let proxy_timeout_secs = check_timeout(&mut problems, "proxy_timeout", &self.proxy_timeout);
        let connect_timeout_secs =
            check_timeout(&mut problems, "connect_timeout", &self.connect_timeout);
        if !self.health_path.starts_with('/') || !is_config_safe(&self.health_path) {
            push(
                &mut problems,
                "health_path",
                format!(
                    "{:?} must be an absolute path of [A-Za-z0-9/._-]",
                    self.health_path
                ),
            );
        }
        for (field, value) in [
            ("runtime.pid_path", &self.runtime.pid_path),
            ("runtime.error_log", &self.runtime.error_log),
            ("runtime.access_log", &self.runtime.access_log),
            ("runtime.temp_dir", &self.runtime.temp_dir),
        ] {
            let off_ok = field == "runtime.access_log" && value == "off";
            if !off_ok && (!value.starts_with('/') || !is_config_safe(value)) {
                push(
                    &mut problems,
                    field,
                    format!("{value:?} must be an absolute path of [A-Za-z0-9/._-]"),
                );
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(PodNginx {
            listen_port,
            default_port,
            forwarded_proto,
            allowed_ports,
            trusted_proxies: self.trusted_proxies.clone(),
            proxy_timeout_secs,
            connect_timeout_secs,
            health_path: self.health_path.clone(),
            pid_path: self.runtime.pid_path.clone(),
            error_log: self.runtime.error_log.clone(),
            access_log: self.runtime.access_log.clone(),
            temp_dir: self.runtime.temp_dir.trim_end_matches('/').to_owned(),
        })
    }
}

fn push(problems: &mut Vec<Problem>, field: &str, message: String) {
    problems.push(Problem {
        field: field.to_owned(),
        message,
    });
}

fn check_port(problems: &mut Vec<Problem>, field: &str, value: u32) -> u16 {
    match u16::try_from(value) {
        Ok(p) if p != 0 => p,
        _ => {
            push(
                problems,
                field,
                format!("{value} is not a port (1..=65535)"),
            );
            1
        }
    }
}

fn check_timeout(problems: &mut Vec<Problem>, field: &str, text: &str) -> u64 {
    match humantime::parse_duration(text) {
        Ok(d) if d >= Duration::from_secs(1) && d <= MAX_TIMEOUT => d.as_secs(),
        Ok(_) => {
            push(
                problems,
                field,
                format!("{text:?} must be between 1s and 30d"),
            );
            1
        }
        Err(e) => {
            push(
                problems,
                field,
                format!("{text:?} is not a duration ({e}); write e.g. 30s, 10m, 7d"),
            );
            1
        }
    }
}

/// Characters that cannot break out of an nginx directive.
fn is_config_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'))
}

fn is_address_or_cidr(s: &str) -> bool {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.is_none_or(|l| l.parse::<u8>().is_ok_and(|l| l <= max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let v = PodNginxFile::default()
            .validate()
            .unwrap_or_else(|p| unreachable!("{p:?}"));
        assert_eq!(
            (v.listen_port, v.default_port, v.proxy_timeout_secs),
            (80, 3000, 7 * 24 * 3600)
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let file = PodNginxFile {
            listen_port: 0,
            default_port: 70000,
            forwarded_proto: "ftp".into(),
            allowed_ports: Some(vec![3000, 3000, 8726]),
            trusted_proxies: vec!["10.0.0.0/33".into(), "not-an-ip".into()],
            proxy_timeout: "forever".into(),
            connect_timeout: "0s".into(),
            health_path: "health; evil".into(),
            runtime: RuntimeFile {
                temp_dir: "/tmp/x y".into(),
                ..RuntimeFile::default()
            },
        };
        let problems = file.validate().err().unwrap_or_default();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "listen_port",
                "default_port",
                "allowed_ports[1]",
                "default_port",
                "forwarded_proto",
                "trusted_proxies[0]",
                "trusted_proxies[1]",
                "proxy_timeout",
                "connect_timeout",
                "health_path",
                "runtime.temp_dir",
            ],
            "{problems:?}"
        );
    }
}
