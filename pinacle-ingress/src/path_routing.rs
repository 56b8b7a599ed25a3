//! Path-based routing, for setups without wildcard DNS (seed 000's `/ws/<name>/`): on the one
//! host `path_routing_host`, `/_pod/<slug>/<port>/...` reaches that pod's port with the prefix
//! removed. Pure.
//!
//! The trade-off, plainly: every pod served this way shares one origin, so one pod's scripts
//! can read another's pages and cookies on that host; apps that use absolute paths need their
//! base path set to the prefix. Pod hosts (`localhost-<port>-pod-<slug>.<domain>`) keep each
//! pod's port on an origin of its own and need neither.

use pinacle_authz::PodSlug;

use crate::host::PodHost;

/// What every routed path starts with.
pub const PREFIX: &str = "/_pod/";

/// Where a path on the path-routing host belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRoute {
    /// Not `/_pod/<slug>/<port>...`.
    NotAPod,
    /// `/_pod/<slug>/<port>` without the slash: go to the slash form.
    AddSlash,
    /// A pod's port.
    Pod {
        /// The pod and port (base domain 0).
        pod: PodHost,
        /// `/_pod/<slug>/<port>`, without the trailing slash.
        prefix: String,
        /// The path the pod gets (starts with `/`).
        rest: String,
    },
}

/// Routes a path (without the query).
pub fn route(path: &str) -> PathRoute {
    let Some(after) = path.strip_prefix(PREFIX) else {
        return PathRoute::NotAPod;
    };
    let Some((slug, after_slug)) = after.split_once('/') else {
        return PathRoute::NotAPod;
    };
    let (port_text, rest) = match after_slug.find('/') {
        Some(i) => (&after_slug[..i], Some(&after_slug[i..])),
        None => (after_slug, None),
    };
    let port = match port_text.parse::<u16>() {
        Ok(p) if p > 0 && port_text.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return PathRoute::NotAPod,
    };
    let Ok(slug) = PodSlug::parse(&slug.to_ascii_lowercase()) else {
        return PathRoute::NotAPod;
    };
    let Some(rest) = rest else {
        return PathRoute::AddSlash;
    };
    PathRoute::Pod {
        prefix: format!("{PREFIX}{}/{port}", slug.as_str()),
        pod: PodHost {
            port,
            slug,
            base: 0,
        },
        rest: rest.to_owned(),
    }
}

/// Whether `host` (a `Host` header, any case, port ignored) is `configured`.
pub fn is_routing_host(host: &str, configured: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.trim_end_matches('.').eq_ignore_ascii_case(configured)
}

/// A `Location` the pod sent, with the prefix put back when it is a path on this host
/// (`/login`); `None` for anything else (absolute URLs, `//host`, relative paths), which passes
/// as it is.
pub fn prefixed_location(prefix: &str, location: &[u8]) -> Option<Vec<u8>> {
    if location.first() != Some(&b'/') || location.get(1) == Some(&b'/') {
        return None;
    }
    let mut out = Vec::with_capacity(prefix.len() + location.len());
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(location);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_a_pod_and_port_and_the_rest() {
        let PathRoute::Pod { pod, prefix, rest } = route("/_pod/Demo/5173/src/main.js") else {
            panic!("a pod path")
        };
        assert_eq!((pod.slug.as_str(), pod.port), ("demo", 5173));
        assert_eq!(prefix, "/_pod/demo/5173");
        assert_eq!(rest, "/src/main.js");
        assert!(matches!(route("/_pod/demo/5173/"), PathRoute::Pod { rest, .. } if rest == "/"));
        assert_eq!(route("/_pod/demo/5173"), PathRoute::AddSlash);
        for not in [
            "/",
            "/_pod/",
            "/_pod/demo",
            "/_pod/demo/",
            "/_pod/demo/0/",
            "/_pod/demo/70000/",
            "/_pod/demo/+80/",
            "/_pod/de_mo/80/",
            "/_podx/demo/80/",
            "/other",
        ] {
            assert_eq!(route(not), PathRoute::NotAPod, "{not}");
        }
    }

    #[test]
    fn locations_on_this_host_get_the_prefix_back() {
        let p = "/_pod/demo/3000";
        assert_eq!(
            prefixed_location(p, b"/login?next=%2F"),
            Some(b"/_pod/demo/3000/login?next=%2F".to_vec())
        );
        assert_eq!(prefixed_location(p, b"//evil.example/"), None);
        assert_eq!(prefixed_location(p, b"https://a.example/"), None);
        assert_eq!(prefixed_location(p, b"relative"), None);
    }

    #[test]
    fn the_routing_host_is_matched_without_port_or_case() {
        assert!(is_routing_host("Pods.Example.com:8443", "pods.example.com"));
        assert!(is_routing_host("pods.example.com.", "pods.example.com"));
        assert!(!is_routing_host("x.pods.example.com", "pods.example.com"));
    }
}
