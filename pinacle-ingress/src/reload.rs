//! Reloading on SIGHUP: the configuration file and `PINACLE_INGRESS_*` are read and validated
//! again; what can change while running is applied to the requests that follow; what cannot
//! (listeners, threads, secrets, the directory's source, ...) is logged as needing a restart
//! with `--upgrade` and keeps its running value; an invalid configuration changes nothing. The
//! certificates and the directory file are read again each time.
//!
//! [`merge`] (which keys changed, and the configuration to run) is pure; [`Reloader::reload`]
//! applies it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pinacle_authz::Authorizer;

use crate::config::IngressConfig;
use crate::config_show;
use crate::connections::Limits;
use crate::directory::ReloadableFile;
use crate::proxy::State;
use crate::telemetry::Metrics;
use crate::tls::CertStore;

/// Keys whose new value only a restart (`serve --upgrade`) puts into effect.
pub const RESTART_KEYS: [&str; 18] = [
    "listen",
    "tls_listen",
    "tls_cert_file",
    "tls_key_file",
    "tls_certificates",
    "admin_listen",
    "agent_listen",
    "threads",
    "upgrade_sock",
    "dashboard_url",
    "log_format",
    "shutdown_grace_period",
    "directory_query_timeout",
    "upstream_idle_timeout",
    "secrets",
    "directory",
    "directory_notifications",
    "database_sessions",
];

/// What a reload changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// Changed keys applied now.
    pub applied: Vec<String>,
    /// Changed keys that need a restart (their running values are kept).
    pub restart: Vec<String>,
}

/// The configuration as comparable `key = value` pairs (secrets as a count, paths and URLs
/// redacted as `config show` prints them).
fn comparable(c: &IngressConfig) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = config_show::key_values(c).into_iter().collect();
    map.insert("secrets".to_owned(), secret_fingerprint(c));
    map.insert(
        "directory".to_owned(),
        config_show::directory_words(&c.directory),
    );
    map
}

/// Tells whether the secrets changed without keeping or printing them.
fn secret_fingerprint(c: &IngressConfig) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for secret in &c.secrets {
        secret.expose().hash(&mut hasher);
    }
    format!("{} ({:x})", c.secrets.len(), hasher.finish())
}

/// Which keys changed from `running` to `loaded`, and the configuration to run: `loaded` with
/// the running values of [`RESTART_KEYS`].
pub fn merge(running: &IngressConfig, loaded: IngressConfig) -> (Merge, IngressConfig) {
    let (before, after) = (comparable(running), comparable(&loaded));
    let mut changed: Vec<String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(before.keys().filter(|k| !after.contains_key(*k)).cloned())
        .collect();
    changed.sort();
    changed.dedup();
    let restart_key = |k: &String| {
        RESTART_KEYS
            .iter()
            .any(|r| k == r || k.starts_with(&format!("{r}.")))
    };
    let (restart, applied): (Vec<String>, Vec<String>) = changed.into_iter().partition(restart_key);
    let mut next = loaded;
    next.listen = running.listen;
    next.tls = match (&running.tls, &next.tls) {
        (Some(old), Some(new)) => Some(crate::config::TlsConfig {
            redirect_http: new.redirect_http,
            ..old.clone()
        }),
        (old, _) => old.clone(),
    };
    next.admin_listen = running.admin_listen;
    next.threads = running.threads;
    next.upgrade_sock = running.upgrade_sock.clone();
    next.dashboard_url = running.dashboard_url.clone();
    next.dashboard_https = running.dashboard_https;
    next.session_cookies = running.session_cookies.clone();
    next.database_sessions = running.database_sessions;
    next.log_format = running.log_format;
    next.timeouts.shutdown_grace = running.timeouts.shutdown_grace;
    next.timeouts.directory_query = running.timeouts.directory_query;
    next.timeouts.upstream_idle = running.timeouts.upstream_idle;
    next.secrets = running.secrets.clone();
    next.directory = running.directory.clone();
    (Merge { applied, restart }, next)
}

/// Everything a reload touches.
pub struct Reloader {
    /// Reads and validates the configuration as `serve` did at start.
    pub load: Box<dyn Fn() -> Result<IngressConfig, String> + Send + Sync>,
    /// The proxy's state (its configuration).
    pub state: Arc<State>,
    /// The connection gate's limits.
    pub limits: Arc<ArcSwap<Limits>>,
    /// The authorization cache (its lifetimes; emptied when the directory file changes).
    pub authorizer: Arc<Authorizer>,
    /// The certificates, when TLS is on.
    pub certs: Option<Arc<CertStore>>,
    /// The directory file, when the directory is one.
    pub file: Option<Arc<ReloadableFile>>,
    /// Where reloads are counted.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// One reload, logged and counted by result (`applied` or `rejected`).
    pub fn reload(&self) {
        let loaded = match (self.load)() {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(problems = %e, "reload: invalid configuration; keeping the running one");
                self.metrics.reload("rejected");
                return;
            }
        };
        let running = self.state.current_config();
        let (merge, next) = merge(&running, loaded);
        if let Some(certs) = &self.certs
            && let Err(e) = certs.reload()
        {
            tracing::error!(error = %e, "reload: certificates could not be read; keeping the current ones");
        }
        let mut forget = false;
        if let Some(file) = &self.file {
            match file.reload() {
                Ok(()) => forget = true,
                Err(e) => {
                    tracing::error!(error = %e, "reload: the directory file could not be read; keeping the current one")
                }
            }
        }
        self.limits.store(Arc::new(Limits {
            max_connections: next.max_connections,
            request_header_timeout: next.timeouts.request_header,
        }));
        let ttls = (next.authorizer.allow_ttl, next.authorizer.deny_ttl);
        let ttls_changed = ttls != (running.authorizer.allow_ttl, running.authorizer.deny_ttl);
        self.authorizer
            .set_ttls(ttls.0, ttls.1, forget || ttls_changed);
        self.authorizer
            .set_stale_if_error(next.authorizer.stale_if_error);
        if next.log_filter != running.log_filter
            && !crate::telemetry::set_log_filter(&next.log_filter)
        {
            tracing::warn!("reload: RUST_LOG is set, so log_filter does not apply");
        }
        self.state.reconfigure(Arc::new(next));
        tracing::info!(changed = %merge.applied.join(","), "reload: configuration applied");
        if !merge.restart.is_empty() {
            tracing::warn!(
                keys = %merge.restart.join(","),
                "reload: these changes take effect only after a restart (serve --upgrade); their running values stay"
            );
        }
        self.metrics.reload("applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> IngressConfig {
        crate::config::from_toml(text, "t", &|k| {
            (k == "NEXTAUTH_SECRET").then(|| "s".to_owned())
        })
        .unwrap()
    }

    #[test]
    fn live_keys_apply_and_the_others_keep_their_running_value() {
        let running = config("listen = \"127.0.0.1:8080\"\nthreads = 2\nmax_connections = 10\n");
        let loaded = config(
            "listen = \"127.0.0.1:9999\"\nthreads = 4\nmax_connections = 20\n\
             strip_response_headers = [\"x-a\"]\nupstream_read_timeout = \"2m\"\n",
        );
        let (merge, next) = merge(&running, loaded);
        assert_eq!(
            merge.applied,
            vec![
                "max_connections",
                "strip_response_headers",
                "upstream_read_timeout"
            ]
        );
        assert_eq!(merge.restart, vec!["listen", "threads"]);
        assert_eq!(next.listen, running.listen);
        assert_eq!(next.threads, 2);
        assert_eq!(next.max_connections, 20);
        assert_eq!(
            next.timeouts.upstream_read,
            std::time::Duration::from_secs(120)
        );
        let (unchanged, _) = super::merge(&running, running.clone());
        assert_eq!(
            unchanged,
            Merge {
                applied: vec![],
                restart: vec![]
            }
        );
    }
}
