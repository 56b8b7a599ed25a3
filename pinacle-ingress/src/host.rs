//! The `Host` header -> where the request belongs: a pod port, the dashboard, or a malformed pod
//! host. Pure; case-insensitive; an optional `:port` suffix is ignored.
//!
//! Pod hosts are `localhost-<port>-pod-<slug>.<base>` and the legacy
//! `localhost-<port>.pod-<slug>.<base>`, for any configured base domain.

use pinacle_authz::PodSlug;

/// A configured base domain (lowercase, no leading dot, no port), e.g. `pinacle.dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseDomain(String);

impl BaseDomain {
    /// Parses a base domain: DNS labels of `[a-z0-9-]`, case folded, at most 253 characters.
    ///
    /// # Errors
    /// A human-readable description of what is wrong.
    pub fn parse(value: &str) -> Result<Self, String> {
        let domain = value.trim().trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() || domain.len() > 253 {
            return Err(format!("{value:?} is not a domain name"));
        }
        let labels_ok = domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !labels_ok {
            return Err(format!(
                "{value:?} is not a domain name (labels of a-z, 0-9 and '-')"
            ));
        }
        Ok(Self(domain))
    }

    /// The domain text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A pod host, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodHost {
    /// The port inside the pod.
    pub port: u16,
    /// The pod's slug.
    pub slug: PodSlug,
    /// Index into the configured base domains of the one the host ended with.
    pub base: usize,
}

/// Where a request belongs, by its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A port of a pod.
    Pod(PodHost),
    /// A pod host whose port is not in 1..=65535 (the digits as written).
    BadPort(String),
    /// A pod-shaped host whose slug cannot be a slug (too long, or empty).
    BadSlug,
    /// Anything else: the dashboard's.
    Dashboard,
}

/// Routes a `Host` header value (or `:authority`) against the base domains.
pub fn route(host: &str, bases: &[BaseDomain]) -> Route {
    let name = strip_port(host.trim()).trim_end_matches('.');
    // Hostnames are ASCII; anything else cannot be a pod host.
    if !name.is_ascii() {
        return Route::Dashboard;
    }
    let lower;
    let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        lower = name.to_ascii_lowercase();
        lower.as_str()
    } else {
        name
    };
    for (index, base) in bases.iter().enumerate() {
        let Some(prefix) = name
            .strip_suffix(base.as_str())
            .and_then(|p| p.strip_suffix('.'))
        else {
            continue;
        };
        if let Some(route) = route_prefix(prefix, index) {
            return route;
        }
    }
    Route::Dashboard
}

/// `localhost-<port>-pod-<slug>` or `localhost-<port>.pod-<slug>`; `None` when not pod-shaped.
fn route_prefix(prefix: &str, base: usize) -> Option<Route> {
    let rest = prefix.strip_prefix("localhost-")?;
    let digits_end = rest.bytes().position(|b| !b.is_ascii_digit())?;
    let (digits, rest) = rest.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let slug = rest
        .strip_prefix("-pod-")
        .or_else(|| rest.strip_prefix(".pod-"))?;
    if slug.contains('.') {
        return None;
    }
    let port = match digits.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => u16::try_from(p).ok()?,
        _ => return Some(Route::BadPort(digits.to_owned())),
    };
    Some(match PodSlug::parse(slug) {
        Ok(slug) => Route::Pod(PodHost { port, slug, base }),
        Err(_) => Route::BadSlug,
    })
}

/// Removes a trailing `:digits` (an IPv6 literal in brackets keeps its colons).
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) && !host[..i].contains(':') =>
        {
            &host[..i]
        }
        Some(i) if host.starts_with('[') && host[..i].ends_with(']') => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bases() -> Vec<BaseDomain> {
        vec![
            BaseDomain::parse("pinacle.dev").unwrap(),
            BaseDomain::parse("localhost").unwrap(),
        ]
    }

    fn pod(port: u16, slug: &str, base: usize) -> Route {
        Route::Pod(PodHost {
            port,
            slug: PodSlug::parse(slug).unwrap(),
            base,
        })
    }

    #[test]
    fn both_forms_any_case_any_base_with_or_without_port() {
        let b = bases();
        assert_eq!(
            route("localhost-8726-pod-my-project.pinacle.dev", &b),
            pod(8726, "my-project", 0)
        );
        assert_eq!(
            route("LOCALHOST-8726-POD-My-Project.Pinacle.DEV:443", &b),
            pod(8726, "my-project", 0)
        );
        assert_eq!(
            route("localhost-3000-pod-my-project.localhost:3000", &b),
            pod(3000, "my-project", 1)
        );
        assert_eq!(
            route("localhost-5173.pod-app.pinacle.dev", &b),
            pod(5173, "app", 0)
        );
        assert_eq!(route("localhost-1-pod-a.pinacle.dev.", &b), pod(1, "a", 0));
    }

    #[test]
    fn ports_out_of_range_are_bad_ports_with_their_digits() {
        let b = bases();
        for digits in ["0", "65536", "99999999999999999999", "00000"] {
            assert_eq!(
                route(&format!("localhost-{digits}-pod-x.pinacle.dev"), &b),
                Route::BadPort(digits.to_owned()),
                "{digits}"
            );
        }
        assert_eq!(
            route("localhost-065535-pod-x.pinacle.dev", &b),
            pod(65535, "x", 0)
        );
    }

    #[test]
    fn everything_else_is_the_dashboard() {
        let b = bases();
        for host in [
            "pinacle.dev",
            "www.pinacle.dev",
            "localhost-pod-x.pinacle.dev",
            "localhost-80-pod-x.example.com",
            "localhost-80-pod-x.sub.pinacle.dev",
            "xlocalhost-80-pod-x.pinacle.dev",
            "localhost-80-pod-x.evilpinacle.dev",
            "localhost-80-pods-x.pinacle.dev",
            "localhost-80x-pod-x.pinacle.dev",
            "127.0.0.1:8080",
            "[::1]:8080",
            "",
            "localhost-80-pod-é.pinacle.dev",
        ] {
            assert_eq!(route(host, &b), Route::Dashboard, "{host}");
        }
    }

    #[test]
    fn an_impossible_slug_is_not_forwarded_anywhere() {
        let long = "a".repeat(101);
        assert_eq!(
            route(&format!("localhost-80-pod-{long}.pinacle.dev"), &bases()),
            Route::BadSlug
        );
        assert_eq!(
            route("localhost-80-pod-.pinacle.dev", &bases()),
            Route::BadSlug
        );
        assert_eq!(
            route("localhost-80-pod-a_b.pinacle.dev", &bases()),
            Route::BadSlug
        );
    }

    #[test]
    fn base_domains_are_validated_and_folded() {
        assert_eq!(
            BaseDomain::parse("Pinacle.Dev.").unwrap().as_str(),
            "pinacle.dev"
        );
        assert!(BaseDomain::parse("").is_err());
        assert!(BaseDomain::parse("a..b").is_err());
        assert!(BaseDomain::parse("pinacle.dev:443").is_err());
        assert!(BaseDomain::parse("*.pinacle.dev").is_err());
    }
}
