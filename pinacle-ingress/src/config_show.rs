//! The effective configuration as an operator reads it: `pinacle-ingress config show` (every
//! key in TOML, secrets redacted, like `nginx -T`) and the one-line summary `check-config` and
//! the startup log give of what will run. Pure.

use std::fmt::Write;

use crate::config::{DirectorySource, IngressConfig};

/// What will run, in one line: version, listeners, TLS, admin, directory, dashboard.
pub fn summary(c: &IngressConfig) -> String {
    format!(
        "pinacle-ingress {}: listen {}, tls {}, admin {}, directory {}, dashboard {} ({}), base domains {}",
        crate::LONG_VERSION,
        c.listen,
        c.tls
            .as_ref()
            .map_or_else(|| "off".to_owned(), |t| t.listen.to_string()),
        c.admin_listen
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        directory(&c.directory),
        c.dashboard_upstream,
        c.dashboard_url,
        c.base_domains
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The directory in words, a database URL with its password redacted.
pub fn directory_words(source: &DirectorySource) -> String {
    directory(source)
}

fn directory(source: &DirectorySource) -> String {
    match source {
        DirectorySource::Postgres(url) => {
            let text = String::from_utf8_lossy(url.expose()).into_owned();
            format!("postgres {}", redact_url(&text))
        }
        DirectorySource::File(path) => format!("file {}", path.display()),
        DirectorySource::EmbeddedDemo => "embedded-demo".to_owned(),
    }
}

/// A URL with its password (and any query, which may carry one) replaced.
fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("REDACTED"));
            }
            if url.query().is_some() {
                url.set_query(Some("REDACTED"));
            }
            url.to_string()
        }
        Err(_) => "(unparsable, redacted)".to_owned(),
    }
}

fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.into_iter().map(quoted).collect();
    format!("[{}]", items.join(", "))
}

fn duration(d: std::time::Duration) -> String {
    quoted(&humantime::format_duration(d).to_string())
}

/// Every key with its effective value (file, environment and defaults applied), as TOML that
/// `check-config` accepts; secrets appear only as a count, a database password as `REDACTED`.
pub fn render(c: &IngressConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}", summary(c));
    let _ = writeln!(
        out,
        "# secrets: {} configured (NEXTAUTH_SECRET / AUTH_SECRET*, values redacted)",
        c.secrets.len()
    );
    let _ = writeln!(
        out,
        "# session cookies read: {}",
        c.session_cookies
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let DirectorySource::Postgres(_) = c.directory {
        let _ = writeln!(out, "# DATABASE_URL: {}", directory(&c.directory));
    }
    let lines = key_values(c);
    for (key, value) in lines {
        if value.is_empty() {
            let _ = writeln!(out, "# {key} = (unset)");
        } else {
            let _ = writeln!(out, "{key} = {value}");
        }
    }
    render_tls(c, &mut out);
    out
}

/// Every key but TLS with its effective value as TOML text (empty: unset).
pub fn key_values(c: &IngressConfig) -> Vec<(String, String)> {
    let t = &c.timeouts;
    let mut lines: Vec<(&str, String)> = vec![
        ("listen", quoted(&c.listen.to_string())),
        ("dashboard_url", quoted(&c.dashboard_url)),
        (
            "dashboard_upstream",
            quoted(&c.dashboard_upstream.to_string()),
        ),
        (
            "base_domains",
            list(c.base_domains.iter().map(|d| d.as_str())),
        ),
        (
            "directory_file",
            match &c.directory {
                DirectorySource::File(path) => quoted(&path.display().to_string()),
                _ => String::new(),
            },
        ),
        (
            "upstream_domain",
            c.upstream_domain
                .as_ref()
                .map(|d| quoted(d.as_str()))
                .unwrap_or_default(),
        ),
        (
            "path_routing_host",
            c.path_routing_host
                .as_ref()
                .map(|d| quoted(d.as_str()))
                .unwrap_or_default(),
        ),
        (
            "strip_response_headers",
            list(c.strip_response_headers.iter().map(String::as_str)),
        ),
        ("cors_preflight", quoted(c.cors.as_str())),
        (
            "cors_pass_ports",
            format!(
                "[{}]",
                c.cors_pass_ports
                    .iter()
                    .map(|p| format!("\"{p}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "frame_ancestors",
            list(c.frame_ancestors.iter().map(String::as_str)),
        ),
        ("threads", c.threads.to_string()),
        ("upstream_connect_timeout", duration(t.upstream_connect)),
        ("upstream_read_timeout", duration(t.upstream_read)),
        ("upstream_idle_timeout", duration(t.upstream_idle)),
        ("websocket_idle_timeout", duration(t.websocket_idle)),
        ("client_read_timeout", duration(t.client_read)),
        ("request_header_timeout", duration(t.request_header)),
        ("directory_query_timeout", duration(t.directory_query)),
        ("authz_allow_ttl", duration(c.authorizer.allow_ttl)),
        ("authz_deny_ttl", duration(c.authorizer.deny_ttl)),
        (
            "authz_stale_if_error",
            duration(c.authorizer.stale_if_error),
        ),
        ("shutdown_grace_period", duration(t.shutdown_grace)),
        (
            "admin_listen",
            quoted(
                &c.admin_listen
                    .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            ),
        ),
        (
            "log_format",
            quoted(match c.log_format {
                crate::telemetry::LogFormat::Text => "text",
                crate::telemetry::LogFormat::Json => "json",
            }),
        ),
        ("log_filter", quoted(&c.log_filter)),
        (
            "trusted_proxies",
            list(
                c.trusted_proxies
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str),
            ),
        ),
        (
            "max_request_header_bytes",
            c.max_request_header_bytes.to_string(),
        ),
        (
            "max_concurrent_requests",
            c.max_concurrent_requests.to_string(),
        ),
        ("max_connections", c.max_connections.to_string()),
        ("plain_path", c.plain_path.to_string()),
        (
            "directory_notifications",
            c.directory_notifications.to_string(),
        ),
        ("database_sessions", c.database_sessions.to_string()),
        (
            "upgrade_sock",
            quoted(&c.upgrade_sock.display().to_string()),
        ),
    ];
    let control = c.control.as_ref();
    lines.extend([
        (
            "control_url",
            control.map(|c| quoted(&c.url)).unwrap_or_default(),
        ),
        (
            "control_secret",
            control.map(|_| quoted("REDACTED")).unwrap_or_default(),
        ),
        (
            "control_ca_file",
            control
                .and_then(|c| c.ca_file.as_ref())
                .map(|p| quoted(&p.display().to_string()))
                .unwrap_or_default(),
        ),
        (
            "control_timeout",
            control.map(|c| duration(c.timeout)).unwrap_or_default(),
        ),
        (
            "wake_on_request",
            control
                .map(|c| c.wake_on_request.to_string())
                .unwrap_or_default(),
        ),
        (
            "activity_interval",
            control
                .map(|c| c.activity_interval.map_or_else(|| quoted("off"), duration))
                .unwrap_or_default(),
        ),
    ]);
    lines.push((
        "agent_listen",
        c.agent_listen
            .map(|a| quoted(&a.to_string()))
            .unwrap_or_default(),
    ));
    lines.push(("api", c.api.as_deref().map(api_table).unwrap_or_default()));
    lines.push(("rate_limits", rate_limits_table(&c.rate_limits)));
    if let Some(tls) = &c.tls {
        lines.push(("tls_listen", quoted(&tls.listen.to_string())));
        lines.push(("http_redirect_to_https", tls.redirect_http.to_string()));
        let files: Vec<String> = tls
            .certificates
            .iter()
            .map(|f| format!("{}:{}", f.cert_file.display(), f.key_file.display()))
            .collect();
        lines.push(("tls_certificates", list(files.iter().map(String::as_str))));
    }
    lines.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `[api]` as an inline table; secrets as `REDACTED`, with how many keys and clients were
/// loaded in a comment-free form (`jwks_file` keys are re-read on reload).
fn api_table(api: &crate::api_auth::ApiConfig) -> String {
    let mut parts = vec![
        format!("audience = {}", quoted(&api.audience)),
        format!("leeway = {}", duration(api.leeway)),
        format!("jwks_timeout = {}", duration(api.jwks_timeout)),
        format!(
            "jwks_refresh_interval = {}",
            duration(api.jwks_refresh_interval)
        ),
        format!("hmac_clock_tolerance = {}", duration(api.hmac_tolerance)),
    ];
    if let Some(iss) = &api.issuer {
        parts.push(format!("issuer = {}", quoted(iss)));
    }
    if let Some(path) = &api.jwks_file {
        parts.push(format!(
            "jwks_file = {}",
            quoted(&path.display().to_string())
        ));
    }
    if let Some(url) = &api.jwks_url {
        parts.push(format!("jwks_url = {}", quoted(url)));
    }
    if !api.hs256.is_empty() {
        parts.push(format!(
            "hs256_secrets = [{}]",
            vec![quoted("REDACTED"); api.hs256.len()].join(", ")
        ));
    }
    if let Some(path) = &api.hmac_clients_file {
        parts.push(format!(
            "hmac_clients_file = {}",
            quoted(&path.display().to_string())
        ));
    }
    format!("{{ {} }}", parts.join(", "))
}

/// `[rate_limits]` as an inline table, the Redis URL's password redacted.
fn rate_limits_table(r: &crate::rate_limit::RateLimits) -> String {
    let limit = |name: &str, l: Option<crate::rate_limit::Limit>| {
        l.map(|l| {
            let daily = l
                .daily
                .map(|d| format!(", daily = {d}"))
                .unwrap_or_default();
            format!(
                "{name} = {{ burst = {}, per_second = {}{daily} }}",
                l.burst, l.per_second
            )
        })
    };
    let mut parts: Vec<String> = [
        limit("api_per_user", r.api_per_user),
        limit("api_per_pod", r.api_per_pod),
        limit("browser_per_user", r.browser_per_user),
        Some(
            limit("lookups_per_client", r.lookups_per_client)
                .unwrap_or_else(|| "lookups_per_client = \"off\"".to_owned()),
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let Some(url) = &r.redis_url {
        parts.push(format!(
            "redis_url = {}",
            quoted(&redact_url(&String::from_utf8_lossy(url.expose())))
        ));
    }
    parts.push(format!("redis_timeout = {}", duration(r.redis_timeout)));
    format!("{{ {} }}", parts.join(", "))
}

fn render_tls(c: &IngressConfig, out: &mut String) {
    match &c.tls {
        None => {
            let _ = writeln!(out, "# tls_listen = (unset: no HTTPS)");
        }
        Some(tls) => {
            let _ = writeln!(out, "tls_listen = {}", quoted(&tls.listen.to_string()));
            let _ = writeln!(out, "http_redirect_to_https = {}", tls.redirect_http);
            for (i, cert) in tls.certificates.iter().enumerate() {
                let (cert_key, key_key) = if i == 0 {
                    ("tls_cert_file", "tls_key_file")
                } else {
                    ("cert_file", "key_file")
                };
                if i == 1 {
                    let _ = writeln!(out);
                }
                if i > 0 {
                    let _ = writeln!(out, "[[tls_certificates]]");
                }
                let _ = writeln!(
                    out,
                    "{cert_key} = {}\n{key_key} = {}",
                    quoted(&cert.cert_file.display().to_string()),
                    quoted(&cert.key_file.display().to_string())
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)], text: &str) -> IngressConfig {
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        crate::config::from_toml(text, "t", &|k| env.get(k).cloned()).unwrap()
    }

    #[test]
    fn the_effective_configuration_round_trips_and_hides_secrets() {
        let c = config(
            &[
                ("NEXTAUTH_SECRET", "very-secret-value"),
                (
                    "DATABASE_URL",
                    "postgres://ingress:hunter2@db.internal/pinacle?sslpassword=x",
                ),
            ],
            "threads = 3\nupstream_read_timeout = \"90s\"\nbase_domains = [\"pinacle.dev\"]\n",
        );
        let text = render(&c);
        assert!(
            !text.contains("very-secret-value") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(!text.contains("sslpassword=x"), "{text}");
        assert!(
            text.contains("postgres://ingress:REDACTED@db.internal/pinacle"),
            "{text}"
        );
        assert!(
            text.contains("threads = 3\n") && text.contains("upstream_read_timeout = \"1m 30s\"\n")
        );
        // What it prints is a configuration that loads to the same values.
        let again = config(&[("NEXTAUTH_SECRET", "s")], &text);
        assert_eq!(again.threads, 3);
        assert_eq!(again.timeouts, c.timeouts);
        assert_eq!(again.base_domains, c.base_domains);
        assert_eq!(again.max_connections, c.max_connections);
    }

    #[test]
    fn the_summary_says_what_will_run() {
        let c = config(
            &[("NEXTAUTH_SECRET", "s")],
            "directory_file = \"/etc/pinacle/dir.toml\"",
        );
        let line = summary(&c);
        for part in [
            "listen 127.0.0.1:8080",
            "tls off",
            "admin 127.0.0.1:9180",
            "directory file /etc/pinacle/dir.toml",
            "(commit ",
        ] {
            assert!(line.contains(part), "{part} not in {line}");
        }
    }
}
