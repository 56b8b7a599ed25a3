//! Cross-origin requests to pod hosts, as on localhost: a browser page on one port of a pod (a
//! Vite front end on 5173) calling another (an API on 8080), or the dashboard calling a pod.
//! Their preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) carry no
//! cookies, so without this they would get 401. Pure.
//!
//! - `cors_preflight = "same-pod"` (default): the ingress answers a preflight itself when its
//!   origin is the dashboard's or another port of the same pod (204 with the grant); any other
//!   origin gets 403 `cors-refused` and no grant. Credentialed responses to those origins get
//!   `Access-Control-Allow-Origin` / `-Credentials` when the pod set none.
//! - `cors_preflight = "deny"`: every preflight gets 403 and nothing is added to responses.
//! - `cors_preflight = "pass"` (or the port in `cors_pass_ports`): preflights go to the pod
//!   unauthenticated, for apps with their own CORS policy; nothing is added to responses.

use http::HeaderMap;

use crate::host::{self, BaseDomain, PodHost, Route};

/// How pod hosts treat cross-origin requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CorsMode {
    /// Grant the dashboard and the same pod's other ports.
    #[default]
    SamePod,
    /// Grant nothing.
    Deny,
    /// Pass preflights to the pod unauthenticated (apps with their own CORS policy); the pod's
    /// answer is relayed, credentials are never forwarded.
    Pass,
}

impl CorsMode {
    /// From the configuration's word.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "same-pod" => Some(Self::SamePod),
            "deny" => Some(Self::Deny),
            "pass" => Some(Self::Pass),
            _ => None,
        }
    }

    /// The configuration's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SamePod => "same-pod",
            Self::Deny => "deny",
            Self::Pass => "pass",
        }
    }
}

/// A preflight's request: what it asks to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// The `Origin`.
    pub origin: String,
    /// `Access-Control-Request-Method`.
    pub method: String,
    /// `Access-Control-Request-Headers`, when sent.
    pub headers: Option<String>,
}

/// Whether a request is a CORS preflight.
pub fn is_preflight(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The preflight's request if it is well formed (a method token, a list of header-name tokens);
/// `None` otherwise (refused, never echoed).
pub fn preflight(headers: &HeaderMap) -> Option<Preflight> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = text(http::header::ORIGIN)?;
    let method = text(http::header::ACCESS_CONTROL_REQUEST_METHOD)?.trim();
    if !is_token(method) {
        return None;
    }
    let requested = match text(http::header::ACCESS_CONTROL_REQUEST_HEADERS) {
        None => None,
        Some(list) => {
            let names: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect();
            if !names.iter().all(|n| is_token(n)) {
                return None;
            }
            (!names.is_empty()).then(|| names.join(", "))
        }
    };
    Some(Preflight {
        origin: origin.to_owned(),
        method: method.to_owned(),
        headers: requested,
    })
}

/// Whether `origin` may be granted on `pod`: the dashboard's origin, or an `http`/`https`
/// origin whose host is the same pod (any port) under the same base domain.
pub fn origin_allowed(
    origin: &str,
    pod: &PodHost,
    bases: &[BaseDomain],
    dashboard_origin: &str,
) -> bool {
    if origin.eq_ignore_ascii_case(dashboard_origin) {
        return true;
    }
    let Some(authority) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return false;
    }
    matches!(host::route(authority, bases), Route::Pod(other) if other.slug == pod.slug && other.base == pod.base)
}

/// The origin (`scheme://host[:port]`, lowercase, the scheme's default port dropped) of a URL;
/// `None` if it has none.
pub fn origin_of(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    match parsed.origin() {
        url::Origin::Tuple(..) => Some(parsed.origin().ascii_serialization()),
        url::Origin::Opaque(_) => None,
    }
}

/// An RFC 9110 token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bases() -> Vec<BaseDomain> {
        vec![
            BaseDomain::parse("pinacle.test").unwrap(),
            BaseDomain::parse("other.test").unwrap(),
        ]
    }

    fn pod(slug: &str, port: u16) -> PodHost {
        let Route::Pod(p) = host::route(
            &format!("localhost-{port}-pod-{slug}.pinacle.test"),
            &bases(),
        ) else {
            panic!("a pod host")
        };
        p
    }

    #[test]
    fn the_same_pod_on_any_port_and_the_dashboard_are_allowed_nothing_else() {
        let demo = pod("demo", 8080);
        let dashboard = "https://app.pinacle.test";
        let allowed = |o: &str| origin_allowed(o, &demo, &bases(), dashboard);
        assert!(allowed("https://localhost-5173-pod-demo.pinacle.test"));
        assert!(allowed("http://localhost-5173-pod-demo.pinacle.test:8443"));
        assert!(allowed("https://LOCALHOST-3000-POD-DEMO.pinacle.test"));
        assert!(allowed("https://app.pinacle.test"));
        for refused in [
            "https://localhost-5173-pod-other.pinacle.test",
            "https://localhost-5173-pod-demo.other.test",
            "https://evil.test",
            "null",
            "ftp://localhost-5173-pod-demo.pinacle.test",
            "https://user@localhost-5173-pod-demo.pinacle.test",
            "https://localhost-5173-pod-demo.pinacle.test/path",
            "https://localhost-5173-pod-demo.pinacle.test.evil.test",
            "https://",
        ] {
            assert!(!allowed(refused), "{refused}");
        }
    }

    #[test]
    fn preflights_are_read_strictly() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let h = headers(&[
            ("origin", "https://a.test"),
            ("access-control-request-method", "PUT"),
            (
                "access-control-request-headers",
                "content-type,x-custom , authorization",
            ),
        ]);
        assert!(is_preflight(&http::Method::OPTIONS, &h));
        assert!(!is_preflight(&http::Method::GET, &h));
        assert_eq!(
            preflight(&h),
            Some(Preflight {
                origin: "https://a.test".into(),
                method: "PUT".into(),
                headers: Some("content-type, x-custom, authorization".into()),
            })
        );
        let bad = headers(&[
            ("origin", "https://a.test"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "x\"y"),
        ]);
        assert_eq!(preflight(&bad), None);
        let bad_method = headers(&[
            ("origin", "https://a.test"),
            ("access-control-request-method", "P T"),
        ]);
        assert_eq!(preflight(&bad_method), None);
    }

    #[test]
    fn origins_of_urls() {
        assert_eq!(
            origin_of("https://App.Pinacle.test:443/dashboard").as_deref(),
            Some("https://app.pinacle.test")
        );
        assert_eq!(
            origin_of("http://pinacle.test:3000").as_deref(),
            Some("http://pinacle.test:3000")
        );
        assert_eq!(origin_of("not a url"), None);
    }
}
