//! Configuration: the TOML file model, environment overrides, and the validated [`IngressConfig`].
//!
//! Precedence: `PINACLE_INGRESS_<KEY>` variables over the file over defaults. The dashboard's
//! own variables work unchanged: `NEXTAUTH_URL` (over `dashboard_url`), `DATABASE_URL`,
//! `NEXTAUTH_SECRET`/`AUTH_SECRET` (see [`crate::secrets`]). Unknown keys are errors and every
//! problem is reported at once, each naming its key or variable.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pinacle_authz::{AuthorizerConfig, Secret, SessionCookie};
use serde::Deserialize;

use crate::host::BaseDomain;
use crate::secrets::secrets_from_env;
use crate::telemetry::LogFormat;

/// The prefix of every override variable.
pub const ENV_PREFIX: &str = "PINACLE_INGRESS_";

/// The embedded demo directory (`config/directory.example.toml`): used when neither
/// `DATABASE_URL` nor `directory_file` is set.
pub const DEMO_DIRECTORY: &str = include_str!("../../config/directory.example.toml");

/// The file model. Every key is optional; see `config/ingress.example.toml` for each one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `address:port` to listen on for HTTP.
    pub listen: Option<String>,
    /// The dashboard's public URL (`NEXTAUTH_URL` overrides it).
    pub dashboard_url: Option<String>,
    /// `host:port` of the dashboard (Next.js) for every non-pod host.
    pub dashboard_upstream: Option<String>,
    /// Domains pod hosts live under; default: the dashboard URL's host.
    pub base_domains: Option<Vec<String>>,
    /// Domain used in the `Host` sent to pods; default: the base domain the request came in on.
    pub upstream_domain: Option<String>,
    /// A host on which `/_pod/<slug>/<port>/...` reaches that pod (unset: off).
    pub path_routing_host: Option<String>,
    /// A TOML pod directory used when `DATABASE_URL` is not set.
    pub directory_file: Option<PathBuf>,
    /// Response headers removed from pod responses (so the dashboard may frame them).
    pub strip_response_headers: Option<Vec<String>>,
    /// `same-pod` (default) or `deny`: how pod hosts treat CORS preflights ([`crate::cors`]).
    pub cors_preflight: Option<String>,
    /// Origins besides the pod itself and the dashboard that may frame pod pages.
    pub frame_ancestors: Option<Vec<String>>,
    /// Pod ports whose CORS preflights go to the pod unauthenticated whatever `cors_preflight`
    /// (strings, as every list here: `["8080"]`).
    pub cors_pass_ports: Option<Vec<String>>,
    /// Worker threads.
    pub threads: Option<usize>,
    /// Connecting to a pod or the dashboard.
    pub upstream_connect_timeout: Option<String>,
    /// Longest silence while waiting for an upstream's response (not for WebSockets).
    pub upstream_read_timeout: Option<String>,
    /// How long an idle pooled upstream connection is kept.
    pub upstream_idle_timeout: Option<String>,
    /// Longest silence on a WebSocket (either way) before it is closed.
    pub websocket_idle_timeout: Option<String>,
    /// Longest silence while reading a request body from the client.
    pub client_read_timeout: Option<String>,
    /// Longest a client may take to send a whole request head (slow clients get 408).
    pub request_header_timeout: Option<String>,
    /// Longest a directory (database) query may take.
    pub directory_query_timeout: Option<String>,
    /// How long an authorization "allow" is cached.
    pub authz_allow_ttl: Option<String>,
    /// How long a denial or an unavailable pod is cached.
    pub authz_deny_ttl: Option<String>,
    /// How long after it expired an allow is still honoured while the directory cannot answer
    /// (`0s`: never).
    pub authz_stale_if_error: Option<String>,
    /// Listen for the directory's change notifications (Postgres `LISTEN pinacle_authz`).
    pub directory_notifications: Option<bool>,
    /// Look opaque session cookie values up as database session tokens (the dashboard's
    /// database strategy; default true).
    pub database_sessions: Option<bool>,
    /// Seconds in-flight requests get after SIGTERM before the process exits.
    pub shutdown_grace_period: Option<String>,
    /// `address:port` of the admin listener (`/healthz`, `/readyz`, `/metrics`), or `off`.
    pub admin_listen: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// What is logged, as `RUST_LOG` directives (`info`, `warn,pinacle_ingress=debug`);
    /// `RUST_LOG`, when set, wins.
    pub log_filter: Option<String>,
    /// Addresses or CIDR ranges of proxies in front of the ingress, whose `X-Forwarded-For` and
    /// `X-Request-Id` are believed.
    pub trusted_proxies: Option<Vec<String>>,
    /// Largest request head (request line and headers) accepted, in bytes.
    pub max_request_header_bytes: Option<usize>,
    /// Most requests (WebSocket tunnels included) handled at once; more get 503.
    pub max_concurrent_requests: Option<usize>,
    /// Most client connections open at once (idle keep-alive ones included); more get 503.
    pub max_connections: Option<usize>,
    /// Whether bodiless HTTP/1.1 GET/HEAD requests (any route) are served by the ingress's own plain
    /// path (true) or by Pingora's proxy loop like everything else (false).
    pub plain_path: Option<bool>,
    /// `address:port` for HTTPS (needs `tls_cert_file` and `tls_key_file`).
    pub tls_listen: Option<String>,
    /// PEM certificate chain (the wildcard certificate).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// More certificates, chosen by SNI (`[[tls_certificates]]` with `cert_file`, `key_file`).
    pub tls_certificates: Option<Vec<CertificateFile>>,
    /// With TLS on: whether the plain `listen` redirects to https (health paths excepted).
    pub http_redirect_to_https: Option<bool>,
    /// Unix socket for the zero-downtime hand-over between an old and a new process.
    pub upgrade_sock: Option<PathBuf>,
    /// The control plane's base URL (`https://dashboard.example/api/ingress`): Start, Stop, wake
    /// on request and activity reports ([`crate::control`]); unset: all of them off.
    pub control_url: Option<String>,
    /// The HS256 secret the control plane verifies our tokens with (at least 32 bytes).
    pub control_secret: Option<String>,
    /// A file holding `control_secret` (one trailing newline removed).
    pub control_secret_file: Option<PathBuf>,
    /// PEM certificates trusted for an https `control_url` besides the system's roots.
    pub control_ca_file: Option<PathBuf>,
    /// Longest one call to the control plane may take, connect to last byte.
    pub control_timeout: Option<String>,
    /// Whether a navigation to a stopped pod starts it.
    pub wake_on_request: Option<bool>,
    /// How often pods that carried traffic are reported to the control plane (`off`: never).
    pub activity_interval: Option<String>,
    /// `address:port` where agents of servers behind NAT connect (`pinacle-agent`); TLS when
    /// the ingress has certificates. Unset: no agents.
    pub agent_listen: Option<String>,
    /// `[api]`: credentials for machines (bearer JWTs, HMAC-signed requests).
    pub api: Option<ApiFile>,
    /// `[rate_limits]`: token buckets and daily quotas.
    pub rate_limits: Option<RateLimitsFile>,
}

/// `[api]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// A JWKS file (RS256, ES256, EdDSA keys); re-read on SIGHUP.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL: fetched at start, every 5 minutes, and on an unknown `kid` (at most once per
    /// `jwks_refresh_interval`).
    pub jwks_url: Option<String>,
    /// Longest one JWKS fetch may take.
    pub jwks_timeout: Option<String>,
    /// The shortest time between two fetches on unknown key ids.
    pub jwks_refresh_interval: Option<String>,
    /// HS256 secrets (at least 32 bytes each).
    pub hs256_secrets: Option<Vec<String>>,
    /// Files each holding one HS256 secret.
    pub hs256_secret_files: Option<Vec<PathBuf>>,
    /// Required `aud` (default `pinacle-ingress`).
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock leeway for `exp` and `nbf` (default 30s).
    pub leeway: Option<String>,
    /// HMAC clients (`[[clients]]` with `id`, `secret` or `secret_file`, `user_id`).
    pub hmac_clients_file: Option<PathBuf>,
    /// How far an HMAC timestamp may be from now (default 5m).
    pub hmac_clock_tolerance: Option<String>,
}

/// `[rate_limits]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsFile {
    /// Per user, API clients.
    pub api_per_user: Option<LimitFile>,
    /// Per pod, API clients.
    pub api_per_pod: Option<LimitFile>,
    /// Per user, browsers.
    pub browser_per_user: Option<LimitFile>,
    /// Per client address, directory lookups before sign-in (`"off"` to turn off).
    pub lookups_per_client: Option<LimitOrOff>,
    /// `redis://host:port/db`: buckets shared by every gateway (unset: in memory).
    pub redis_url: Option<String>,
    /// A file holding `redis_url` (it may carry a password).
    pub redis_url_file: Option<PathBuf>,
    /// Longest one Redis check may take (default 50ms).
    pub redis_timeout: Option<String>,
}

/// A limit, or `"off"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LimitOrOff {
    /// `{ burst = .., per_second = .. }`.
    Limit(LimitFile),
    /// `"off"`.
    Word(String),
}

/// `{ burst = 10, per_second = 5, daily = 200000 }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitFile {
    /// Bucket size.
    pub burst: u32,
    /// Refill per second.
    pub per_second: f64,
    /// Requests per UTC day.
    pub daily: Option<u64>,
}

/// A certificate and its key (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    List,
    Count,
    Flag,
    /// Not settable from the environment (arrays of tables).
    FileOnly,
    /// A table (`[api]`), not settable from the environment.
    Table,
}

/// Every key, its type, for unknown-key reports and environment overrides.
const KEYS: &[(&str, Kind)] = &[
    ("listen", Kind::Text),
    ("dashboard_url", Kind::Text),
    ("dashboard_upstream", Kind::Text),
    ("base_domains", Kind::List),
    ("upstream_domain", Kind::Text),
    ("path_routing_host", Kind::Text),
    ("directory_file", Kind::Text),
    ("strip_response_headers", Kind::List),
    ("cors_preflight", Kind::Text),
    ("frame_ancestors", Kind::List),
    ("cors_pass_ports", Kind::List),
    ("threads", Kind::Count),
    ("upstream_connect_timeout", Kind::Text),
    ("upstream_read_timeout", Kind::Text),
    ("upstream_idle_timeout", Kind::Text),
    ("websocket_idle_timeout", Kind::Text),
    ("client_read_timeout", Kind::Text),
    ("request_header_timeout", Kind::Text),
    ("directory_query_timeout", Kind::Text),
    ("authz_allow_ttl", Kind::Text),
    ("authz_deny_ttl", Kind::Text),
    ("authz_stale_if_error", Kind::Text),
    ("directory_notifications", Kind::Flag),
    ("database_sessions", Kind::Flag),
    ("shutdown_grace_period", Kind::Text),
    ("admin_listen", Kind::Text),
    ("log_format", Kind::Text),
    ("log_filter", Kind::Text),
    ("trusted_proxies", Kind::List),
    ("max_request_header_bytes", Kind::Count),
    ("max_concurrent_requests", Kind::Count),
    ("max_connections", Kind::Count),
    ("tls_listen", Kind::Text),
    ("tls_cert_file", Kind::Text),
    ("tls_key_file", Kind::Text),
    ("tls_certificates", Kind::FileOnly),
    ("http_redirect_to_https", Kind::Flag),
    ("plain_path", Kind::Flag),
    ("upgrade_sock", Kind::Text),
    ("control_url", Kind::Text),
    ("control_secret", Kind::Text),
    ("control_secret_file", Kind::Text),
    ("control_ca_file", Kind::Text),
    ("control_timeout", Kind::Text),
    ("wake_on_request", Kind::Flag),
    ("activity_interval", Kind::Text),
    ("agent_listen", Kind::Text),
    ("api", Kind::Table),
    ("rate_limits", Kind::Table),
];

/// Where pods, users and sessions come from.
#[derive(Debug, Clone)]
pub enum DirectorySource {
    /// The dashboard's Postgres (`DATABASE_URL`).
    Postgres(Secret),
    /// A TOML file.
    File(PathBuf),
    /// [`DEMO_DIRECTORY`].
    EmbeddedDemo,
}

impl DirectorySource {
    /// `postgres`, `file` or `embedded-demo` (logs, `check-config`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::File(_) => "file",
            Self::EmbeddedDemo => "embedded-demo",
        }
    }
}

/// Timeouts, all bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect to an upstream.
    pub upstream_connect: Duration,
    /// Silence while waiting for an upstream's response.
    pub upstream_read: Duration,
    /// Idle pooled upstream connection.
    pub upstream_idle: Duration,
    /// Silence on a WebSocket tunnel.
    pub websocket_idle: Duration,
    /// Silence while reading a request body.
    pub client_read: Duration,
    /// A whole request head, from its first byte (from the connection's start for the first).
    pub request_header: Duration,
    /// One directory query.
    pub directory_query: Duration,
    /// In-flight work after SIGTERM.
    pub shutdown_grace: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// HTTP listener.
    pub listen: SocketAddr,
    /// The dashboard's public URL, without a trailing slash.
    pub dashboard_url: String,
    /// Whether the dashboard URL is https (secure cookie names, `Secure` on callback cookies).
    pub dashboard_https: bool,
    /// Where non-pod hosts go.
    pub dashboard_upstream: SocketAddr,
    /// Pod host suffixes.
    pub base_domains: Vec<BaseDomain>,
    /// Fixed upstream domain, if any.
    pub upstream_domain: Option<BaseDomain>,
    /// The host for path-based routing ([`crate::path_routing`]), if any.
    pub path_routing_host: Option<BaseDomain>,
    /// The pod directory.
    pub directory: DirectorySource,
    /// Lowercase header names removed from pod responses.
    pub strip_response_headers: Vec<String>,
    /// How pod hosts treat CORS preflights.
    pub cors: crate::cors::CorsMode,
    /// Ports whose preflights pass to the pod.
    pub cors_pass_ports: Vec<u16>,
    /// The dashboard's origin (`scheme://host[:port]`), granted CORS and framing on pods.
    pub dashboard_origin: String,
    /// Extra origins that may frame pod pages (`frame_ancestors`).
    pub frame_ancestors: Vec<String>,
    /// The `Content-Security-Policy` every pod response gets: `frame-ancestors 'self'`, the
    /// dashboard's origin and `frame_ancestors`.
    pub frame_policy: http::HeaderValue,
    /// Worker threads.
    pub threads: usize,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Authorization cache.
    pub authorizer: AuthorizerConfig,
    /// Dashboard secrets, newest first.
    pub secrets: Vec<Secret>,
    /// Session cookie names to accept (picked by the dashboard URL's scheme).
    pub session_cookies: Vec<SessionCookie>,
    /// Admin listener, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter directives (`RUST_LOG` syntax; `RUST_LOG` wins when set).
    pub log_filter: String,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Largest request head accepted (431 above).
    pub max_request_header_bytes: usize,
    /// Most requests in flight (503 above).
    pub max_concurrent_requests: usize,
    /// Most client connections open (503 and close above).
    pub max_connections: usize,
    /// Serve bodiless HTTP/1.1 GET/HEAD (any route) on the plain engine (else all on Pingora's).
    pub plain_path: bool,
    /// Listen for change notifications when the directory is Postgres.
    pub directory_notifications: bool,
    /// Opaque session cookie values are database session tokens, looked up in the directory.
    pub database_sessions: bool,
    /// HTTPS, if configured.
    pub tls: Option<TlsConfig>,
    /// The hand-over socket for `serve --upgrade`.
    pub upgrade_sock: PathBuf,
    /// The control plane (Start, Stop, wake, activity), if configured.
    pub control: Option<ControlConfig>,
    /// Where agents connect, if anywhere.
    pub agent_listen: Option<SocketAddr>,
    /// Machine credentials (`[api]`; none: `Authorization` is never ours).
    pub api: Option<Arc<crate::api_auth::ApiConfig>>,
    /// Rate limits and quotas (`[rate_limits]`).
    pub rate_limits: crate::rate_limit::RateLimits,
}

/// The control plane's settings ([`crate::control`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// The base URL, without a trailing slash.
    pub url: String,
    /// The HS256 secret of our tokens (and the key the CSRF tokens derive from).
    pub secret: Secret,
    /// Extra trusted roots for https.
    pub ca_file: Option<PathBuf>,
    /// One call, connect to last byte.
    pub timeout: Duration,
    /// A navigation to a stopped pod starts it.
    pub wake_on_request: bool,
    /// How often activity is reported (`None`: never).
    pub activity_interval: Option<Duration>,
}

/// HTTPS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Certificates: the first is the default, the others are chosen by SNI.
    pub certificates: Vec<CertificateFile>,
    /// Whether the cleartext listener (`listen`) redirects to https.
    pub redirect_http: bool,
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key (or variable) at fault.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError(pub Vec<Problem>);

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
    }
}

/// Reads the file (when given), applies the environment and validates.
///
/// # Errors
/// Every problem, each naming its key.
pub fn load(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<IngressConfig, ConfigError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![problem(
                path.display().to_string(),
                format!("cannot read: {e}"),
            )])
        })?,
        None => String::new(),
    };
    let origin = file.map_or_else(|| "<defaults>".to_owned(), |p| p.display().to_string());
    from_toml(&text, &origin, env)
}

/// Parses TOML text, applies the environment and validates.
///
/// # Errors
/// Every problem, each naming its key.
pub fn from_toml(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<IngressConfig, ConfigError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError(vec![problem(origin, e.to_string())]))?;
    let mut problems: Vec<Problem> = table
        .keys()
        .filter(|k| !KEYS.iter().any(|(known, _)| *known == k.as_str()))
        .map(|k| problem(k.as_str(), "unknown key"))
        .collect();
    table.retain(|k, _| KEYS.iter().any(|(known, _)| *known == k));
    apply_env(&mut table, env, &mut problems);
    drop_mistyped(&mut table, &mut problems);
    let file = match FileConfig::deserialize(toml::Value::Table(table)) {
        Ok(file) => file,
        Err(e) => {
            problems.push(problem(origin, e.to_string()));
            return Err(ConfigError(problems));
        }
    };
    validate(&file, env, problems)
}

/// Reports every key whose value has the wrong type (all of them, where deserialising would
/// stop at the first) and removes it, so that the rest is still checked.
fn drop_mistyped(table: &mut toml::Table, problems: &mut Vec<Problem>) {
    use toml::Value;
    table.retain(|key, value| {
        let Some((_, kind)) = KEYS.iter().find(|(known, _)| *known == key) else {
            return true;
        };
        let (ok, expected) = match kind {
            Kind::Text => (value.is_str(), "a string"),
            Kind::List => (
                value
                    .as_array()
                    .is_some_and(|items| items.iter().all(Value::is_str)),
                "a list of strings",
            ),
            Kind::Count => (value.as_integer().is_some_and(|n| n >= 0), "a whole number"),
            Kind::Flag => (value.is_bool(), "true or false"),
            Kind::FileOnly => (
                value
                    .as_array()
                    .is_some_and(|items| items.iter().all(Value::is_table)),
                "a list of tables ([[...]])",
            ),
            Kind::Table => (value.is_table(), "a table ([...])"),
        };
        if !ok {
            problems.push(problem(
                key.to_owned(),
                format!("must be {expected}, not {}", value.type_str()),
            ));
        }
        ok
    });
}

/// The `PINACLE_INGRESS_*` variables among `names` that name no key (a typo would otherwise be
/// ignored silently).
pub fn unknown_env_vars<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Problem> {
    names
        .into_iter()
        .filter_map(|name| {
            let key = name.strip_prefix(ENV_PREFIX)?;
            let known = KEYS.iter().any(|(k, _)| k.eq_ignore_ascii_case(key));
            (!known).then(|| problem(name, "unknown variable: no such key"))
        })
        .collect()
}

fn apply_env(
    table: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    for (key, kind) in KEYS {
        let var = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase());
        let Some(value) = env(&var) else { continue };
        let value = match kind {
            Kind::Text => toml::Value::String(value),
            Kind::List => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
            Kind::Count => match value.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => {
                    problems.push(problem(var, format!("{value:?} is not a whole number")));
                    continue;
                }
            },
            Kind::Flag => match value.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
                "0" | "false" | "no" | "off" => toml::Value::Boolean(false),
                _ => {
                    problems.push(problem(var, format!("{value:?} is not true or false")));
                    continue;
                }
            },
            Kind::FileOnly | Kind::Table => {
                problems.push(problem(var, "can only be set in the configuration file"));
                continue;
            }
        };
        table.insert((*key).to_owned(), value);
    }
}

fn duration(
    key: &str,
    value: Option<&String>,
    default: Duration,
    problems: &mut Vec<Problem>,
) -> Duration {
    let Some(text) = value else { return default };
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            problems.push(problem(key, "must be longer than zero"));
            default
        }
        Err(e) => {
            problems.push(problem(
                key,
                format!("{text:?} is not a duration like 30s or 1h ({e})"),
            ));
            default
        }
    }
}

/// The shortest accepted control-plane secret: HS256 keys shorter than the hash are weak
/// (RFC 7518 §3.2).
pub const MIN_CONTROL_SECRET_BYTES: usize = 32;

/// `control_*`, `wake_on_request`, `activity_interval`: all or nothing around `control_url`.
fn control_config(file: &FileConfig, problems: &mut Vec<Problem>) -> Option<ControlConfig> {
    let secret = match (&file.control_secret, &file.control_secret_file) {
        (Some(_), Some(_)) => {
            problems.push(problem(
                "control_secret_file",
                "set together with control_secret: keep one",
            ));
            None
        }
        (Some(text), None) => Some(("control_secret", text.clone())),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => {
                let text = text.strip_suffix('\n').unwrap_or(&text);
                let text = text.strip_suffix('\r').unwrap_or(text);
                Some(("control_secret_file", text.to_owned()))
            }
            Err(e) => {
                problems.push(problem(
                    "control_secret_file",
                    format!("cannot read {}: {e}", path.display()),
                ));
                None
            }
        },
        (None, None) => None,
    };
    let Some(url_text) = file.control_url.as_deref().filter(|u| !u.is_empty()) else {
        for (key, set) in [
            ("control_secret", file.control_secret.is_some()),
            ("control_secret_file", file.control_secret_file.is_some()),
            ("control_ca_file", file.control_ca_file.is_some()),
            ("wake_on_request", file.wake_on_request == Some(true)),
        ] {
            if set {
                problems.push(problem(key, "set without control_url"));
            }
        }
        return None;
    };
    let url = match url::Url::parse(url_text) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.query().is_none()
                && u.fragment().is_none()
                && u.username().is_empty()
                && u.password().is_none() =>
        {
            Some(u.as_str().trim_end_matches('/').to_owned())
        }
        _ => {
            problems.push(problem(
                "control_url",
                format!(
                    "{url_text:?} is not an http(s) URL without credentials, query or fragment"
                ),
            ));
            None
        }
    };
    let secret = match secret {
        Some((key, text)) if text.len() < MIN_CONTROL_SECRET_BYTES => {
            problems.push(problem(
                key,
                format!("must be at least {MIN_CONTROL_SECRET_BYTES} bytes (HS256 key)"),
            ));
            None
        }
        Some((_, text)) => Some(Secret::new(text)),
        None => {
            if file.control_secret_file.is_none() {
                problems.push(problem(
                    "control_secret",
                    "control_url needs control_secret or control_secret_file",
                ));
            }
            None
        }
    };
    if let Some(path) = &file.control_ca_file
        && let Err(e) = std::fs::metadata(path)
    {
        problems.push(problem(
            "control_ca_file",
            format!("cannot read {}: {e}", path.display()),
        ));
    }
    let timeout = duration(
        "control_timeout",
        file.control_timeout.as_ref(),
        defaults::CONTROL_TIMEOUT,
        problems,
    );
    if timeout > Duration::from_secs(60) {
        problems.push(problem("control_timeout", "must be at most 60s"));
    }
    let activity_interval = match file.activity_interval.as_deref().map(str::trim) {
        Some("off" | "0") => None,
        _ => {
            let interval = duration(
                "activity_interval",
                file.activity_interval.as_ref(),
                defaults::ACTIVITY_INTERVAL,
                problems,
            );
            if interval < Duration::from_secs(1) {
                problems.push(problem("activity_interval", "must be at least 1s (or off)"));
            }
            Some(interval)
        }
    };
    Some(ControlConfig {
        url: url?,
        secret: secret?,
        ca_file: file.control_ca_file.clone(),
        timeout,
        wake_on_request: file.wake_on_request.unwrap_or(false),
        activity_interval,
    })
}

/// `[api]`, its files read.
fn api_config(file: &ApiFile, problems: &mut Vec<Problem>) -> Option<crate::api_auth::ApiConfig> {
    use crate::api_auth::{HmacClients, KeySet};
    let before = problems.len();
    let file_keys = match &file.jwks_file {
        Some(path) => KeySet::load(path)
            .map_err(|m| {
                problems.push(problem("api.jwks_file", format!("{}: {m}", path.display())))
            })
            .unwrap_or_default(),
        None => KeySet::default(),
    };
    let jwks_url = file
        .jwks_url
        .as_ref()
        .and_then(|u| match url::Url::parse(u) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
                Some(u.clone())
            }
            _ => {
                problems.push(problem(
                    "api.jwks_url",
                    format!("{u:?} is not an http(s) URL"),
                ));
                None
            }
        });
    let mut hs256: Vec<Secret> = Vec::new();
    for text in file.hs256_secrets.iter().flatten() {
        hs256.push(Secret::new(text.clone()));
    }
    for path in file.hs256_secret_files.iter().flatten() {
        match std::fs::read_to_string(path) {
            Ok(t) => hs256.push(Secret::new(t.trim_end_matches(['\r', '\n']).to_owned())),
            Err(e) => problems.push(problem(
                "api.hs256_secret_files",
                format!("cannot read {}: {e}", path.display()),
            )),
        }
    }
    if hs256.iter().any(|s| s.expose().len() < 32) {
        problems.push(problem(
            "api.hs256_secrets",
            "each must be at least 32 bytes",
        ));
    }
    let clients = match &file.hmac_clients_file {
        Some(path) => HmacClients::load(path)
            .map_err(|m| {
                problems.push(problem(
                    "api.hmac_clients_file",
                    format!("{}: {m}", path.display()),
                ));
            })
            .unwrap_or_default(),
        None => HmacClients::default(),
    };
    if file_keys.is_empty() && jwks_url.is_none() && hs256.is_empty() && clients.is_empty() {
        problems.push(problem(
            "api",
            "names no keys, secrets or clients (jwks_file, jwks_url, hs256_secrets, \
             hmac_clients_file)",
        ));
    }
    let d = |key: &str, value: &Option<String>, default, problems: &mut Vec<Problem>| {
        duration(key, value.as_ref(), default, problems)
    };
    let config = crate::api_auth::ApiConfig {
        audience: file
            .audience
            .clone()
            .unwrap_or_else(|| "pinacle-ingress".to_owned()),
        issuer: file.issuer.clone(),
        leeway: match file.leeway.as_deref() {
            Some("0" | "0s") => Duration::ZERO,
            _ => d(
                "api.leeway",
                &file.leeway,
                Duration::from_secs(30),
                problems,
            ),
        },
        jwks_file: file.jwks_file.clone(),
        file_keys: Arc::new(file_keys),
        jwks_url,
        jwks_timeout: d(
            "api.jwks_timeout",
            &file.jwks_timeout,
            Duration::from_secs(2),
            problems,
        ),
        jwks_refresh_interval: d(
            "api.jwks_refresh_interval",
            &file.jwks_refresh_interval,
            Duration::from_secs(60),
            problems,
        ),
        hs256,
        hmac_clients_file: file.hmac_clients_file.clone(),
        clients: Arc::new(clients),
        hmac_tolerance: d(
            "api.hmac_clock_tolerance",
            &file.hmac_clock_tolerance,
            Duration::from_secs(300),
            problems,
        ),
    };
    (problems.len() == before).then_some(config)
}

/// `[rate_limits]`.
fn rate_limits_config(
    file: Option<&RateLimitsFile>,
    problems: &mut Vec<Problem>,
) -> crate::rate_limit::RateLimits {
    let Some(file) = file else {
        return crate::rate_limit::RateLimits {
            redis_timeout: Duration::from_millis(50),
            lookups_per_client: Some(crate::rate_limit::DEFAULT_LOOKUPS_PER_CLIENT),
            ..Default::default()
        };
    };
    let limit = |key: &str, l: Option<LimitFile>, problems: &mut Vec<Problem>| {
        let l = l?;
        if l.burst == 0 || !(l.per_second > 0.0 && l.per_second.is_finite()) || l.daily == Some(0) {
            problems.push(problem(
                format!("rate_limits.{key}"),
                "burst, per_second and daily must be above zero",
            ));
            return None;
        }
        Some(crate::rate_limit::Limit {
            burst: l.burst,
            per_second: l.per_second,
            daily: l.daily,
        })
    };
    let redis_url = match (&file.redis_url, &file.redis_url_file) {
        (Some(_), Some(_)) => {
            problems.push(problem(
                "rate_limits.redis_url_file",
                "set together with redis_url",
            ));
            None
        }
        (Some(u), None) => Some(u.clone()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| {
                problems.push(problem(
                    "rate_limits.redis_url_file",
                    format!("cannot read {}: {e}", path.display()),
                ));
            })
            .ok(),
        (None, None) => None,
    };
    let redis_url = redis_url.and_then(|u| match url::Url::parse(&u) {
        Ok(url) if matches!(url.scheme(), "redis" | "rediss") => Some(Secret::new(u)),
        _ => {
            problems.push(problem("rate_limits.redis_url", "is not a redis:// URL"));
            None
        }
    });
    crate::rate_limit::RateLimits {
        api_per_user: limit("api_per_user", file.api_per_user, problems),
        api_per_pod: limit("api_per_pod", file.api_per_pod, problems),
        browser_per_user: limit("browser_per_user", file.browser_per_user, problems),
        lookups_per_client: match &file.lookups_per_client {
            None => Some(crate::rate_limit::DEFAULT_LOOKUPS_PER_CLIENT),
            Some(LimitOrOff::Word(w)) if w == "off" => None,
            Some(LimitOrOff::Word(_)) => {
                problems.push(problem(
                    "rate_limits.lookups_per_client",
                    "must be { burst = .., per_second = .. } or \"off\"",
                ));
                None
            }
            Some(LimitOrOff::Limit(l)) => limit("lookups_per_client", Some(*l), problems),
        },
        redis_url,
        redis_timeout: duration(
            "rate_limits.redis_timeout",
            file.redis_timeout.as_ref(),
            Duration::from_millis(50),
            problems,
        ),
    }
}

/// A limit counted in units: at least 1.
fn count_limit(
    key: &str,
    value: Option<usize>,
    default: usize,
    problems: &mut Vec<Problem>,
) -> usize {
    match value {
        Some(0) => {
            problems.push(problem(key, "must be at least 1"));
            default
        }
        Some(n) => n,
        None => default,
    }
}

fn socket_addr(key: &str, text: &str, problems: &mut Vec<Problem>) -> Option<SocketAddr> {
    let text = text.trim();
    let stripped = text
        .strip_prefix("http://")
        .unwrap_or(text)
        .trim_end_matches('/');
    match stripped.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Some(addr),
        Ok(None) | Err(_) => {
            problems.push(problem(
                key,
                format!("{text:?} is not an address:port that resolves"),
            ));
            None
        }
    }
}

/// Defaults (see the README's configuration table).
pub mod defaults {
    use std::time::Duration;

    /// `listen`
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// `dashboard_url`
    pub const DASHBOARD_URL: &str = "http://localhost:3000";
    /// `dashboard_upstream`
    pub const DASHBOARD_UPSTREAM: &str = "127.0.0.1:3000";
    /// `strip_response_headers`
    pub const STRIP_RESPONSE_HEADERS: &[&str] = &["x-frame-options", "cross-origin-opener-policy"];
    /// `upstream_connect_timeout`
    pub const UPSTREAM_CONNECT: Duration = Duration::from_secs(5);
    /// `upstream_read_timeout`: dev servers may compile for minutes before the first byte.
    pub const UPSTREAM_READ: Duration = Duration::from_secs(300);
    /// `upstream_idle_timeout`: below nginx's 75 s keepalive so we never reuse a closing one.
    pub const UPSTREAM_IDLE: Duration = Duration::from_secs(60);
    /// `websocket_idle_timeout`: a silent VS Code tab stays connected for a day.
    pub const WEBSOCKET_IDLE: Duration = Duration::from_secs(24 * 3600);
    /// `client_read_timeout`
    pub const CLIENT_READ: Duration = Duration::from_secs(60);
    /// `request_header_timeout`: nginx's `client_header_timeout` is 60 s; a browser sends a
    /// head in one packet, so half of that is generous.
    pub const REQUEST_HEADER: Duration = Duration::from_secs(30);
    /// `directory_query_timeout`: well below the request budget.
    pub const DIRECTORY_QUERY: Duration = Duration::from_secs(2);
    /// `shutdown_grace_period`
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// `admin_listen`
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9180";
    /// `max_request_header_bytes`: nginx's default large_client_header_buffers (4 x 8k) doubled.
    pub const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
    /// `max_concurrent_requests`
    pub const MAX_CONCURRENT_REQUESTS: usize = 20_000;
    /// `max_connections`: browsers keep idle connections open, so well above the requests.
    pub const MAX_CONNECTIONS: usize = 50_000;
    /// `upgrade_sock`: the unit's `RuntimeDirectory`, never a world-writable place such as
    /// `/tmp` (another user could sit on the socket and receive the listening sockets).
    pub const UPGRADE_SOCK: &str = "/run/pinacle-ingress/upgrade.sock";
    /// `control_timeout`.
    pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
    /// `activity_interval`.
    pub const ACTIVITY_INTERVAL: Duration = Duration::from_secs(60);
}

fn validate(
    file: &FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
    mut problems: Vec<Problem>,
) -> Result<IngressConfig, ConfigError> {
    let listen = socket_addr(
        "listen",
        file.listen.as_deref().unwrap_or(defaults::LISTEN),
        &mut problems,
    );
    let dashboard_upstream = socket_addr(
        "dashboard_upstream",
        file.dashboard_upstream
            .as_deref()
            .unwrap_or(defaults::DASHBOARD_UPSTREAM),
        &mut problems,
    );

    let (url_key, url_text) = match env("NEXTAUTH_URL").filter(|v| !v.is_empty()) {
        Some(v) => ("NEXTAUTH_URL", v),
        None => (
            "dashboard_url",
            file.dashboard_url
                .clone()
                .unwrap_or_else(|| defaults::DASHBOARD_URL.to_owned()),
        ),
    };
    let (dashboard_url, dashboard_https, dashboard_host) = match url::Url::parse(&url_text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
            let host = u.host_str().unwrap_or_default().to_owned();
            let https = u.scheme() == "https";
            (u.as_str().trim_end_matches('/').to_owned(), https, host)
        }
        _ => {
            problems.push(problem(
                url_key,
                format!("{url_text:?} is not an http(s) URL"),
            ));
            (String::new(), false, String::new())
        }
    };

    let base_domains: Vec<BaseDomain> = match &file.base_domains {
        Some(list) if list.is_empty() => {
            problems.push(problem("base_domains", "must name at least one domain"));
            Vec::new()
        }
        Some(list) => list
            .iter()
            .filter_map(|d| {
                BaseDomain::parse(d)
                    .map_err(|m| problems.push(problem("base_domains", m)))
                    .ok()
            })
            .collect(),
        None if dashboard_host.is_empty() => Vec::new(),
        None => match BaseDomain::parse(&dashboard_host) {
            Ok(d) => vec![d],
            Err(m) => {
                problems.push(problem(
                    "base_domains",
                    format!("not set, and the dashboard host cannot be one: {m}"),
                ));
                Vec::new()
            }
        },
    };
    let upstream_domain = file.upstream_domain.as_deref().and_then(|d| {
        BaseDomain::parse(d)
            .map_err(|m| problems.push(problem("upstream_domain", m)))
            .ok()
    });

    let path_routing_host = file.path_routing_host.as_deref().and_then(|d| {
        let host = BaseDomain::parse(d)
            .map_err(|m| problems.push(problem("path_routing_host", m)))
            .ok()?;
        let dashboard_host = url::Url::parse(&dashboard_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        if dashboard_host.as_deref() == Some(host.as_str()) {
            problems.push(problem(
                "path_routing_host",
                "must not be the dashboard's host: pod code would run on the dashboard's origin",
            ));
            return None;
        }
        Some(host)
    });

    let database_url = env("DATABASE_URL").filter(|v| !v.is_empty()).or_else(|| {
        let path = env("DATABASE_URL_FILE").filter(|v| !v.is_empty())?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_owned()),
            Err(e) => {
                problems.push(problem(
                    "DATABASE_URL_FILE",
                    format!("cannot read {path}: {e}"),
                ));
                None
            }
        }
    });
    let directory = match database_url {
        Some(url) => DirectorySource::Postgres(Secret::new(url)),
        None => match &file.directory_file {
            Some(path) => DirectorySource::File(path.clone()),
            None => DirectorySource::EmbeddedDemo,
        },
    };

    let strip_response_headers = file
        .strip_response_headers
        .clone()
        .unwrap_or_else(|| {
            defaults::STRIP_RESPONSE_HEADERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        })
        .into_iter()
        .filter_map(|name| match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h.as_str().to_owned()),
            Err(_) => {
                problems.push(problem(
                    "strip_response_headers",
                    format!("{name:?} is not a header name"),
                ));
                None
            }
        })
        .collect();

    let cors = match file.cors_preflight.as_deref() {
        None => crate::cors::CorsMode::default(),
        Some(word) => crate::cors::CorsMode::parse(word).unwrap_or_else(|| {
            problems.push(problem(
                "cors_preflight",
                format!("{word:?} is not one of \"same-pod\", \"deny\", \"pass\""),
            ));
            crate::cors::CorsMode::default()
        }),
    };
    let cors_pass_ports: Vec<u16> = file
        .cors_pass_ports
        .clone()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| match p.trim().parse::<u16>() {
            Ok(port) if port > 0 => Some(port),
            _ => {
                problems.push(problem(
                    "cors_pass_ports",
                    format!("{p:?} is not a port (1..=65535)"),
                ));
                None
            }
        })
        .collect();
    let dashboard_origin =
        crate::cors::origin_of(&dashboard_url).unwrap_or_else(|| dashboard_url.clone());
    let frame_ancestors: Vec<String> = file
        .frame_ancestors
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| match crate::cors::origin_of(&o) {
            Some(origin) if o.trim_end_matches('/') == origin || o == origin => Some(origin),
            _ => {
                problems.push(problem(
                    "frame_ancestors",
                    format!("{o:?} is not an origin like https://workbench.example"),
                ));
                None
            }
        })
        .collect();
    let frame_policy = std::iter::once(format!("frame-ancestors 'self' {dashboard_origin}"))
        .chain(frame_ancestors.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let frame_policy = http::HeaderValue::from_str(&frame_policy).unwrap_or_else(|_| {
        problems.push(problem(
            "dashboard_url",
            "its origin cannot be written in a Content-Security-Policy",
        ));
        http::HeaderValue::from_static("frame-ancestors 'self'")
    });

    let threads = match file.threads {
        Some(0) => {
            problems.push(problem("threads", "must be at least 1"));
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };

    let d = |key: &str, value: &Option<String>, default, problems: &mut Vec<Problem>| {
        duration(key, value.as_ref(), default, problems)
    };
    let timeouts = Timeouts {
        upstream_connect: d(
            "upstream_connect_timeout",
            &file.upstream_connect_timeout,
            defaults::UPSTREAM_CONNECT,
            &mut problems,
        ),
        upstream_read: d(
            "upstream_read_timeout",
            &file.upstream_read_timeout,
            defaults::UPSTREAM_READ,
            &mut problems,
        ),
        upstream_idle: d(
            "upstream_idle_timeout",
            &file.upstream_idle_timeout,
            defaults::UPSTREAM_IDLE,
            &mut problems,
        ),
        websocket_idle: d(
            "websocket_idle_timeout",
            &file.websocket_idle_timeout,
            defaults::WEBSOCKET_IDLE,
            &mut problems,
        ),
        client_read: d(
            "client_read_timeout",
            &file.client_read_timeout,
            defaults::CLIENT_READ,
            &mut problems,
        ),
        request_header: d(
            "request_header_timeout",
            &file.request_header_timeout,
            defaults::REQUEST_HEADER,
            &mut problems,
        ),
        directory_query: d(
            "directory_query_timeout",
            &file.directory_query_timeout,
            defaults::DIRECTORY_QUERY,
            &mut problems,
        ),
        shutdown_grace: d(
            "shutdown_grace_period",
            &file.shutdown_grace_period,
            defaults::SHUTDOWN_GRACE,
            &mut problems,
        ),
    };
    let authz_defaults = AuthorizerConfig::default();
    let authorizer = AuthorizerConfig {
        allow_ttl: d(
            "authz_allow_ttl",
            &file.authz_allow_ttl,
            authz_defaults.allow_ttl,
            &mut problems,
        ),
        deny_ttl: d(
            "authz_deny_ttl",
            &file.authz_deny_ttl,
            authz_defaults.deny_ttl,
            &mut problems,
        ),
        // Zero is allowed here: it turns stale-if-error off.
        stale_if_error: match file.authz_stale_if_error.as_deref().map(str::trim) {
            Some(text)
                if text == "0" || humantime::parse_duration(text).is_ok_and(|d| d.is_zero()) =>
            {
                Duration::ZERO
            }
            _ => d(
                "authz_stale_if_error",
                &file.authz_stale_if_error,
                authz_defaults.stale_if_error,
                &mut problems,
            ),
        },
        ..authz_defaults
    };

    let secrets = match secrets_from_env(env) {
        Ok(s) if s.is_empty() => {
            problems.push(problem(
                "NEXTAUTH_SECRET",
                "not set: the ingress needs the dashboard's secret (NEXTAUTH_SECRET, AUTH_SECRET or \
                 a *_FILE variant) to read session cookies",
            ));
            Vec::new()
        }
        Ok(s) => s,
        Err(e) => {
            problems.push(problem("NEXTAUTH_SECRET", e.to_string()));
            Vec::new()
        }
    };

    let session_cookies = session_cookies_for(dashboard_https);

    let admin_listen = match file
        .admin_listen
        .as_deref()
        .unwrap_or(defaults::ADMIN_LISTEN)
    {
        "off" | "" => None,
        text => socket_addr("admin_listen", text, &mut problems),
    };
    let log_format = match file.log_format.as_deref().map(LogFormat::parse) {
        None => LogFormat::Text,
        Some(Ok(f)) => f,
        Some(Err(m)) => {
            problems.push(problem("log_format", m));
            LogFormat::Text
        }
    };
    let log_filter = file.log_filter.clone().unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
        problems.push(problem("log_filter", e.to_string()));
    }
    let trusted_proxies = file
        .trusted_proxies
        .iter()
        .flatten()
        .filter_map(|text| {
            IpNet::parse(text)
                .map_err(|m| problems.push(problem("trusted_proxies", m)))
                .ok()
        })
        .collect();
    let max_request_header_bytes = match file.max_request_header_bytes {
        Some(n) if n < 1024 => {
            problems.push(problem("max_request_header_bytes", "must be at least 1024"));
            defaults::MAX_REQUEST_HEADER_BYTES
        }
        Some(n) if n > 1_000_000 => {
            problems.push(problem(
                "max_request_header_bytes",
                "must be at most 1000000 (Pingora's own limit)",
            ));
            defaults::MAX_REQUEST_HEADER_BYTES
        }
        Some(n) => n,
        None => defaults::MAX_REQUEST_HEADER_BYTES,
    };
    let max_concurrent_requests = count_limit(
        "max_concurrent_requests",
        file.max_concurrent_requests,
        defaults::MAX_CONCURRENT_REQUESTS,
        &mut problems,
    );
    let max_connections = count_limit(
        "max_connections",
        file.max_connections,
        defaults::MAX_CONNECTIONS,
        &mut problems,
    );
    let tls = tls_config(file, &mut problems);
    if timeouts.directory_query >= timeouts.upstream_read {
        problems.push(problem(
            "directory_query_timeout",
            "must be shorter than upstream_read_timeout (the request budget)",
        ));
    }
    let control = control_config(file, &mut problems);
    let api = file
        .api
        .as_ref()
        .and_then(|a| api_config(a, &mut problems))
        .map(Arc::new);
    let rate_limits = rate_limits_config(file.rate_limits.as_ref(), &mut problems);
    let agent_listen = file
        .agent_listen
        .as_deref()
        .and_then(|a| socket_addr("agent_listen", a, &mut problems));
    let upgrade_sock = file
        .upgrade_sock
        .clone()
        .unwrap_or_else(|| PathBuf::from(defaults::UPGRADE_SOCK));

    match (listen, dashboard_upstream) {
        (Some(listen), Some(dashboard_upstream)) if problems.is_empty() => Ok(IngressConfig {
            listen,
            dashboard_url,
            dashboard_https,
            dashboard_upstream,
            base_domains,
            upstream_domain,
            path_routing_host,
            directory,
            strip_response_headers,
            cors,
            cors_pass_ports,
            dashboard_origin,
            frame_ancestors,
            frame_policy,
            threads,
            timeouts,
            authorizer,
            secrets,
            session_cookies,
            admin_listen,
            log_format,
            log_filter,
            trusted_proxies,
            max_request_header_bytes,
            max_concurrent_requests,
            max_connections,
            control,
            api,
            rate_limits,
            agent_listen,
            plain_path: file.plain_path.unwrap_or(true),
            directory_notifications: file.directory_notifications.unwrap_or(true),
            database_sessions: file.database_sessions.unwrap_or(true),
            tls,
            upgrade_sock,
        }),
        _ => Err(ConfigError(problems)),
    }
}

fn tls_config(file: &FileConfig, problems: &mut Vec<Problem>) -> Option<TlsConfig> {
    let mut certificates = Vec::new();
    match (&file.tls_cert_file, &file.tls_key_file) {
        (Some(cert_file), Some(key_file)) => certificates.push(CertificateFile {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }),
        (None, None) => {}
        (Some(_), None) => problems.push(problem("tls_key_file", "tls_cert_file needs it")),
        (None, Some(_)) => problems.push(problem("tls_cert_file", "tls_key_file needs it")),
    }
    certificates.extend(file.tls_certificates.iter().flatten().cloned());
    let Some(listen) = &file.tls_listen else {
        if !certificates.is_empty() {
            problems.push(problem(
                "tls_listen",
                "certificates are set but not where to listen",
            ));
        }
        return None;
    };
    let listen = socket_addr("tls_listen", listen, problems)?;
    if certificates.is_empty() {
        problems.push(problem(
            "tls_cert_file",
            "tls_listen is set: a certificate and key are needed",
        ));
        return None;
    }
    // Named as the operator wrote them: the first pair may be tls_cert_file/tls_key_file,
    // the rest are [[tls_certificates]] entries (numbered from 1 in the file).
    let first_is_top_level = file.tls_cert_file.is_some();
    for (i, c) in certificates.iter().enumerate() {
        for (what, path) in [("cert_file", &c.cert_file), ("key_file", &c.key_file)] {
            if !path.is_file() {
                let key = match (i, first_is_top_level) {
                    (0, true) => format!("tls_{what}"),
                    (i, true) => format!("tls_certificates entry {i}: {what}"),
                    (i, false) => format!("tls_certificates entry {}: {what}", i + 1),
                };
                problems.push(problem(
                    key,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
    }
    Some(TlsConfig {
        listen,
        certificates,
        redirect_http: file.http_redirect_to_https.unwrap_or(false),
    })
}

/// An address or CIDR range (the `ipnet` crate's), as `trusted_proxies` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl IpNet {
    /// `10.0.0.0/8`, `fd00::/8` or a single address.
    ///
    /// # Errors
    /// A description of what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        text.parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(Self)
            .map_err(|_| format!("{text:?} is not an address or CIDR range"))
    }

    /// Whether `ip` is inside; an IPv4-mapped IPv6 address (a dual-stack listener's view of an
    /// IPv4 client) counts as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

/// The session cookie names the dashboard uses: `__Secure-` prefixed on https, plain on http
/// (both next-auth v4 and Auth.js v5 names).
pub fn session_cookies_for(https: bool) -> Vec<SessionCookie> {
    SessionCookie::defaults()
        .into_iter()
        .filter(|c| c.name.starts_with("__Secure-") == https)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const SECRET: (&str, &str) = ("NEXTAUTH_SECRET", "s3cret");

    #[test]
    fn every_type_error_is_reported_and_the_rest_still_checked() {
        let text = "threads = \"two\"\nlisten = 5\nbase_domains = \"one\"\n\
                    http_redirect_to_https = \"yes\"\nupstream_read_timeout = \"soon\"\n";
        let problems = from_toml(text, "t", &env(&[SECRET])).unwrap_err().0;
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "threads",
            "listen",
            "base_domains",
            "http_redirect_to_https",
            "upstream_read_timeout",
        ] {
            assert!(keys.contains(&key), "{key} not in {problems:?}");
        }
    }

    #[test]
    fn the_control_plane_is_all_or_nothing_around_control_url() {
        let c = from_toml("", "t", &env(&[SECRET])).unwrap();
        assert_eq!(c.control, None);
        let good = "control_url = \"https://dash.example/api/ingress/\"\n\
                    control_secret = \"0123456789abcdef0123456789abcdef\"\n";
        let c = from_toml(good, "t", &env(&[SECRET])).unwrap();
        let control = c.control.unwrap();
        assert_eq!(control.url, "https://dash.example/api/ingress");
        assert_eq!(control.timeout, Duration::from_secs(5));
        assert!(!control.wake_on_request);
        assert_eq!(control.activity_interval, Some(Duration::from_secs(60)));
        let off = format!("{good}activity_interval = \"off\"\nwake_on_request = true\n");
        let control = from_toml(&off, "t", &env(&[SECRET]))
            .unwrap()
            .control
            .unwrap();
        assert_eq!(control.activity_interval, None);
        assert!(control.wake_on_request);
        for (text, key) in [
            ("control_url = \"https://d.example\"", "control_secret"),
            (
                "control_secret = \"0123456789abcdef0123456789abcdef\"",
                "control_secret",
            ),
            ("wake_on_request = true", "wake_on_request"),
            (
                "control_url = \"https://d.example\"\ncontrol_secret = \"short\"",
                "control_secret",
            ),
            (
                "control_url = \"ftp://d.example\"\ncontrol_secret = \"0123456789abcdef0123456789abcdef\"",
                "control_url",
            ),
            (
                "control_url = \"https://user:pw@d.example\"\ncontrol_secret = \"0123456789abcdef0123456789abcdef\"",
                "control_url",
            ),
            (
                &format!("{good}activity_interval = \"500ms\""),
                "activity_interval",
            ),
            (
                &format!("{good}control_timeout = \"5m\""),
                "control_timeout",
            ),
            (
                &format!("{good}control_secret_file = \"/nonexistent\""),
                "control_secret_file",
            ),
        ] {
            let problems = from_toml(text, "t", &env(&[SECRET])).unwrap_err().0;
            assert!(
                problems.iter().any(|p| p.key == key),
                "{text}: {problems:?}"
            );
        }
        // The secret from a file, one trailing newline removed; never shown.
        let file = std::env::temp_dir().join(format!("control-secret-{}", std::process::id()));
        std::fs::write(&file, "0123456789abcdef0123456789abcdef\n").unwrap();
        let text = format!(
            "control_url = \"http://127.0.0.1:9/x\"\ncontrol_secret_file = \"{}\"",
            file.display()
        );
        let c = from_toml(&text, "t", &env(&[SECRET])).unwrap();
        std::fs::remove_file(&file).unwrap();
        let control = c.control.clone().unwrap();
        assert_eq!(control.secret.expose(), b"0123456789abcdef0123456789abcdef");
        assert!(!crate::config_show::render(&c).contains("0123456789abcdef"));
    }

    #[test]
    fn api_and_rate_limit_tables_are_checked_and_loaded() {
        let jwks = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/api/keys.jwks.json"
        );
        let text = format!(
            "[api]\njwks_file = \"{jwks}\"\nissuer = \"https://i.example\"\n\
             [rate_limits]\napi_per_user = {{ burst = 10, per_second = 5, daily = 200000 }}\n\
             redis_url = \"redis://:pw@127.0.0.1:6390/2\"\n"
        );
        let c = from_toml(&text, "t", &env(&[SECRET])).unwrap();
        let api = c.api.clone().unwrap();
        assert_eq!(api.audience, "pinacle-ingress");
        assert_eq!(api.file_keys.len(), 3);
        assert_eq!(api.hmac_tolerance, Duration::from_secs(300));
        let limit = c.rate_limits.api_per_user.unwrap();
        assert_eq!((limit.burst, limit.daily), (10, Some(200_000)));
        assert!(c.rate_limits.api_per_pod.is_none());
        assert_eq!(c.rate_limits.redis_timeout, Duration::from_millis(50));
        let shown = crate::config_show::render(&c);
        assert!(!shown.contains(":pw@"), "{shown}");
        assert!(shown.contains("api_per_user = { burst = 10, per_second = 5, daily = 200000 }"));
        // lookups_per_client is on by default, with or without [rate_limits]; "off" turns it off.
        let default = Some(crate::rate_limit::DEFAULT_LOOKUPS_PER_CLIENT);
        assert_eq!(c.rate_limits.lookups_per_client, default);
        let bare = from_toml("", "t", &env(&[SECRET])).unwrap();
        assert_eq!(bare.rate_limits.lookups_per_client, default);
        assert!(!bare.rate_limits.any());
        assert!(bare.database_sessions);
        let off = from_toml(
            "database_sessions = false\n[rate_limits]\nlookups_per_client = \"off\"",
            "t",
            &env(&[SECRET]),
        )
        .unwrap();
        assert_eq!(off.rate_limits.lookups_per_client, None);
        assert!(!off.database_sessions);
        let shown = crate::config_show::render(&off);
        assert!(shown.contains("lookups_per_client = \"off\""), "{shown}");
        assert!(shown.contains("database_sessions = false"), "{shown}");
        for (text, key) in [
            ("[api]\naudience = \"x\"", "api"),
            ("[api]\njwks_file = \"/nonexistent.json\"", "api.jwks_file"),
            ("[api]\nhs256_secrets = [\"short\"]", "api.hs256_secrets"),
            ("[api]\njwks_url = \"ftp://x\"", "api.jwks_url"),
            (
                "[rate_limits]\napi_per_pod = { burst = 0, per_second = 1 }",
                "rate_limits.api_per_pod",
            ),
            (
                "[rate_limits]\nbrowser_per_user = { burst = 5, per_second = 0 }",
                "rate_limits.browser_per_user",
            ),
            (
                "[rate_limits]\nlookups_per_client = \"never\"",
                "rate_limits.lookups_per_client",
            ),
            (
                "[rate_limits]\nlookups_per_client = { burst = 0, per_second = 1 }",
                "rate_limits.lookups_per_client",
            ),
            (
                "[rate_limits]\nredis_url = \"http://x\"",
                "rate_limits.redis_url",
            ),
            ("rate_limits = 5", "rate_limits"),
        ] {
            let problems = from_toml(text, "t", &env(&[SECRET])).unwrap_err().0;
            assert!(
                problems.iter().any(|p| p.key == key),
                "{text}: {problems:?}"
            );
        }
        let problems = from_toml(
            "",
            "t",
            &env(&[SECRET, ("PINACLE_INGRESS_RATE_LIMITS", "x")]),
        )
        .unwrap_err()
        .0;
        assert_eq!(problems[0].key, "PINACLE_INGRESS_RATE_LIMITS");
    }

    #[test]
    fn unknown_environment_variables_are_named() {
        let problems = unknown_env_vars([
            "PINACLE_INGRESS_LISTEN",
            "PINACLE_INGRESS_LISTNE",
            "NEXTAUTH_SECRET",
            "PINACLE_INGRESS_THREADS",
        ]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "PINACLE_INGRESS_LISTNE");
    }

    #[test]
    fn defaults_need_only_a_secret() {
        let c = from_toml("", "t", &env(&[SECRET])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.dashboard_url, "http://localhost:3000");
        assert!(!c.dashboard_https);
        assert_eq!(
            c.base_domains,
            vec![BaseDomain::parse("localhost").unwrap()]
        );
        assert!(matches!(c.directory, DirectorySource::EmbeddedDemo));
        // Never a world-writable directory: whoever binds it first gets the listening sockets.
        assert_eq!(
            c.upgrade_sock,
            std::path::Path::new("/run/pinacle-ingress/upgrade.sock")
        );
        assert_eq!(
            c.session_cookies
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["next-auth.session-token", "authjs.session-token"]
        );
        assert_eq!(c.timeouts.websocket_idle, Duration::from_secs(86_400));
        assert_eq!(
            c.strip_response_headers,
            ["x-frame-options", "cross-origin-opener-policy"]
        );
    }

    #[test]
    fn the_dashboards_environment_and_overrides_win() {
        let c = from_toml(
            "listen = \"127.0.0.1:1\"\nbase_domains = [\"file.test\"]\ndirectory_file = \"x.toml\"",
            "t",
            &env(&[
                SECRET,
                ("NEXTAUTH_URL", "https://Pinacle.dev/"),
                ("DATABASE_URL", "postgres://db/x"),
                ("PINACLE_INGRESS_LISTEN", "127.0.0.1:9999"),
                ("PINACLE_INGRESS_DASHBOARD_UPSTREAM", "127.0.0.1:4000"),
                ("PINACLE_INGRESS_BASE_DOMAINS", "pinacle.dev, pinacle.test"),
                ("PINACLE_INGRESS_THREADS", "3"),
                ("PINACLE_INGRESS_WEBSOCKET_IDLE_TIMEOUT", "2h"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.dashboard_upstream.port(), 4000);
        assert_eq!(c.dashboard_url, "https://pinacle.dev");
        assert!(c.dashboard_https);
        assert_eq!(c.base_domains.len(), 2);
        assert_eq!(c.threads, 3);
        assert_eq!(c.timeouts.websocket_idle, Duration::from_secs(7200));
        assert!(matches!(c.directory, DirectorySource::Postgres(_)));
        assert!(
            c.session_cookies
                .iter()
                .all(|c| c.name.starts_with("__Secure-"))
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = from_toml(
            "lisen = \"x\"\nlisten = \"nowhere\"\nthreads = 0\nupstream_read_timeout = \"soon\"\n\
             base_domains = [\"*.x\"]\nstrip_response_headers = [\"bad header\"]\ncolour = 1\n\
             max_connections = 0\nrequest_header_timeout = \"0s\"",
            "t",
            &env(&[("PINACLE_INGRESS_THREADS", "many")]),
        )
        .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "lisen",
            "colour",
            "PINACLE_INGRESS_THREADS",
            "listen",
            "threads",
            "upstream_read_timeout",
            "base_domains",
            "strip_response_headers",
            "NEXTAUTH_SECRET",
            "max_connections",
            "request_header_timeout",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn database_url_can_come_from_a_file() {
        let path = std::env::temp_dir().join(format!("pinacle-dburl-{}", std::process::id()));
        std::fs::write(&path, "postgres://u:pw@db/x\n").unwrap();
        let p = path.display().to_string();
        let c = from_toml("", "t", &env(&[SECRET, ("DATABASE_URL_FILE", p.as_str())])).unwrap();
        let DirectorySource::Postgres(url) = c.directory else {
            panic!("expected Postgres")
        };
        assert_eq!(url.expose(), b"postgres://u:pw@db/x");
        std::fs::remove_file(&path).unwrap();
        let err = from_toml(
            "",
            "t",
            &env(&[SECRET, ("DATABASE_URL_FILE", "/nonexistent")]),
        )
        .unwrap_err();
        assert_eq!(err.0[0].key, "DATABASE_URL_FILE");
    }

    #[test]
    fn cidr_ranges() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(
            IpNet::parse("::1")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert!(
            IpNet::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("nope").is_err());
    }

    #[test]
    fn tls_needs_a_listener_and_readable_pairs() {
        let err = from_toml(
            "tls_listen = \"127.0.0.1:8443\"\ntls_cert_file = \"/nonexistent.pem\"",
            "t",
            &env(&[SECRET]),
        )
        .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"tls_key_file"), "{keys:?}");
        let err = from_toml(
            "[[tls_certificates]]\ncert_file = \"/a\"\nkey_file = \"/b\"",
            "t",
            &env(&[SECRET, ("PINACLE_INGRESS_TLS_CERTIFICATES", "x")]),
        )
        .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"tls_listen"), "{keys:?}");
        assert!(
            keys.contains(&"PINACLE_INGRESS_TLS_CERTIFICATES"),
            "{keys:?}"
        );
    }

    #[test]
    fn unreadable_certificates_are_named_as_written() {
        let text = "tls_listen = \"127.0.0.1:8443\"\ntls_cert_file = \"/nonexistent.pem\"\n\
                    tls_key_file = \"/nonexistent.key\"\n\
                    [[tls_certificates]]\ncert_file = \"/other.pem\"\nkey_file = \"/other.key\"\n";
        let err = from_toml(text, "t", &env(&[SECRET])).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "tls_cert_file",
                "tls_key_file",
                "tls_certificates entry 1: cert_file",
                "tls_certificates entry 1: key_file"
            ]
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = from_toml("threads = \"two\"", "ingress.toml", &env(&[SECRET])).unwrap_err();
        assert_eq!(err.0[0].key, "threads");
        assert_eq!(err.0[0].message, "must be a whole number, not string");
    }
}
