//! What the client wants, from its request headers (pure): a browser navigation (which may be
//! redirected to sign in and shown HTML pages), a WebSocket upgrade, or anything else (fetch/XHR,
//! scripts, curl), which gets JSON.

use http::{HeaderMap, Method, header};

/// How a request should be answered when the ingress answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Intent {
    /// A top-level or frame navigation by a browser.
    pub navigation: bool,
    /// A WebSocket (or other HTTP/1.1) upgrade.
    pub upgrade: bool,
}

/// Classifies a request. A navigation is a GET/HEAD that is not an upgrade and either says
/// `Sec-Fetch-Mode: navigate` or, when the browser sends no `Sec-Fetch-Mode` (Chromium over
/// plain http to these hosts sends none), accepts `text/html`.
pub fn classify(method: &Method, headers: &HeaderMap) -> Intent {
    let upgrade = headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let reads = *method == Method::GET || *method == Method::HEAD;
    let navigation = reads
        && !upgrade
        && match headers.get("sec-fetch-mode") {
            Some(mode) => mode.as_bytes().eq_ignore_ascii_case(b"navigate"),
            None => headers
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.to_ascii_lowercase().contains("text/html")),
        };
    Intent {
        navigation,
        upgrade,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn navigations() {
        let chrome_http = headers(&[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")]);
        assert!(classify(&Method::GET, &chrome_http).navigation);
        let chrome_https = headers(&[("sec-fetch-mode", "navigate"), ("accept", "*/*")]);
        assert!(classify(&Method::GET, &chrome_https).navigation);
        assert!(classify(&Method::HEAD, &chrome_https).navigation);
    }

    #[test]
    fn not_navigations() {
        let fetch_html = headers(&[("sec-fetch-mode", "cors"), ("accept", "text/html")]);
        assert!(!classify(&Method::GET, &fetch_html).navigation);
        assert!(!classify(&Method::GET, &headers(&[("accept", "application/json")])).navigation);
        assert!(!classify(&Method::GET, &headers(&[])).navigation);
        assert!(!classify(&Method::POST, &headers(&[("accept", "text/html")])).navigation);
    }

    #[test]
    fn upgrades() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("accept", "text/html"),
        ]);
        assert_eq!(
            classify(&Method::GET, &ws),
            Intent {
                navigation: false,
                upgrade: true
            }
        );
        assert!(!classify(&Method::GET, &headers(&[("upgrade", "websocket")])).upgrade);
    }
}
