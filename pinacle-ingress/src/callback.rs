//! `/pinacle-proxy-callback` on a pod host, pure: the dashboard's `/api/proxy-auth` sends the
//! browser here with a proxy token; we set it as a host-only cookie and send the browser on to
//! `return_url` when that is a path on this host (anything else goes to `/`).
//! Also the inverse trip: the `/api/proxy-auth` URL a navigation without credentials goes to.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use pinacle_authz::{CredentialVerifier, Outcome, PROXY_TOKEN_COOKIE, PROXY_TOKEN_LIFETIME_SECS};

use crate::host::PodHost;

/// The callback's path.
pub const CALLBACK_PATH: &str = "/pinacle-proxy-callback";

/// The callback's query, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CallbackQuery {
    /// `token`
    pub token: Option<String>,
    /// `embed=true`
    pub embed: bool,
    /// `return_url`, as sent.
    pub return_url: Option<String>,
}

impl CallbackQuery {
    /// Parses the query string (without `?`); the first of repeated keys wins.
    pub fn parse(query: &str) -> Self {
        let mut parsed = Self::default();
        let (mut seen_embed, mut seen_token) = (false, false);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "token" if !seen_token => {
                    seen_token = true;
                    parsed.token = Some(value.into_owned()).filter(|t| !t.is_empty());
                }
                "embed" if !seen_embed => {
                    seen_embed = true;
                    parsed.embed = value == "true";
                }
                "return_url" if parsed.return_url.is_none() => {
                    parsed.return_url = Some(value.into_owned());
                }
                _ => {}
            }
        }
        parsed
    }
}

/// The callback's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackAnswer {
    /// 302 to `location`, setting `set_cookie`.
    SetCookie {
        /// The `Set-Cookie` value.
        set_cookie: String,
        /// Where to go next (a path on this host).
        location: String,
    },
    /// 400 `{"error":"Missing token parameter"}`
    MissingToken,
    /// 401 `{"error":"Invalid or expired token"}`
    InvalidToken,
    /// 403 `{"error":"Token does not match requested pod/port"}`
    WrongPod,
}

/// Decides the callback. `secure` is whether the request arrived over https (or the dashboard's
/// URL is https): browsers refuse `Secure` cookies set over plain http.
///
/// `path_scope` is the path prefix the pod is served under (`/_pod/<slug>/<port>` on the
/// path-routing host, empty on pod hosts): the cookie is scoped to it and the return path lives
/// under it.
pub fn answer(
    verifier: &CredentialVerifier,
    pod: &PodHost,
    query: &CallbackQuery,
    secure: bool,
    now: i64,
    path_scope: &str,
) -> CallbackAnswer {
    let Some(token) = query.token.as_deref() else {
        return CallbackAnswer::MissingToken;
    };
    let principal = match verifier.verify_proxy_token(token, now) {
        Outcome::Valid(principal) => principal,
        _ => return CallbackAnswer::InvalidToken,
    };
    let Some(scope) = &principal.scope else {
        return CallbackAnswer::InvalidToken;
    };
    if scope.pod_slug != pod.slug || scope.target_port != pod.port {
        return CallbackAnswer::WrongPod;
    }
    // An embedded cookie holds the same token marked `embed` (same user, pod, port and expiry),
    // so that its renewal keeps the embedding attributes.
    let reissued = query.embed.then(|| {
        verifier.reissue_proxy_token(&principal, now, principal.expires_at.unwrap_or(now), true)
    });
    let token = reissued.flatten().unwrap_or_else(|| token.to_owned());
    CallbackAnswer::SetCookie {
        set_cookie: proxy_token_cookie(&token, query.embed, secure, path_scope),
        location: format!(
            "{path_scope}{}",
            safe_return_path(query.return_url.as_deref())
        ),
    }
}

/// The `Set-Cookie` value for a proxy token: host-only, `HttpOnly`, 900 s; `SameSite=Lax` with
/// `Secure` over https, or for embedding `SameSite=None; Secure; Partitioned` (which only works
/// over https, as browsers require).
///
/// `scope`: the path prefix it is limited to (`Path=<scope>/`; empty for pod hosts).
pub fn proxy_token_cookie(token: &str, embed: bool, secure: bool, scope: &str) -> String {
    let mut cookie = format!(
        "{PROXY_TOKEN_COOKIE}={token}; Path={scope}/; Max-Age={PROXY_TOKEN_LIFETIME_SECS}; HttpOnly"
    );
    if embed {
        cookie.push_str("; Secure; SameSite=None; Partitioned");
    } else {
        if secure {
            cookie.push_str("; Secure");
        }
        cookie.push_str("; SameSite=Lax");
    }
    cookie
}

/// `return_url` when it is a path on this host, else `/`. A path starts with one `/` (not `//`,
/// not `/\`, which browsers read as another host) and holds no control characters or backslashes.
pub fn safe_return_path(return_url: Option<&str>) -> String {
    match return_url {
        Some(url) if is_local_path(url) => url.to_owned(),
        _ => "/".to_owned(),
    }
}

fn is_local_path(url: &str) -> bool {
    let bytes = url.as_bytes();
    bytes.first() == Some(&b'/')
        && !matches!(bytes.get(1), Some(b'/' | b'\\'))
        && !bytes
            .iter()
            .any(|&b| b.is_ascii_control() || b == b'\\' || b == b' ')
}

/// The characters `encodeURIComponent` leaves alone: `A-Z a-z 0-9 - _ . ! ~ * ' ( )`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// `<dashboard>/api/proxy-auth?pod=<slug>&port=<port>&return_url=<path and query>`, each value
/// encoded as the dashboard's `encodeURIComponent` would. `dashboard` has no trailing slash.
pub fn sign_in_location(dashboard: &str, pod: &PodHost, path_and_query: &str) -> String {
    format!(
        "{dashboard}/api/proxy-auth?pod={}&port={}&return_url={}",
        utf8_percent_encode(pod.slug.as_str(), URI_COMPONENT),
        pod.port,
        utf8_percent_encode(path_and_query, URI_COMPONENT),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinacle_authz::{CredentialConfig, PodSlug, ProxyTokenClaims, Secret};

    const NOW: i64 = 1_800_000_000;

    fn verifier() -> CredentialVerifier {
        CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new(
            "callback-secret".to_owned(),
        )]))
        .unwrap()
    }

    fn host(slug: &str, port: u16) -> PodHost {
        PodHost {
            port,
            slug: PodSlug::parse(slug).unwrap(),
            base: 0,
        }
    }

    fn token(v: &CredentialVerifier, slug: &str, port: u16, exp: i64) -> String {
        v.mint_proxy_token(&ProxyTokenClaims {
            user_id: "user_ada".into(),
            pod_id: "pod_1".into(),
            pod_slug: slug.into(),
            target_port: port,
            iat: exp - 900,
            exp,
        })
        .unwrap()
    }

    fn query(q: &str) -> CallbackQuery {
        CallbackQuery::parse(q)
    }

    #[test]
    fn a_matching_token_sets_a_lax_cookie_and_returns_to_the_path() {
        let v = verifier();
        let t = token(&v, "demo", 3000, NOW + 900);
        let q = query(&format!("token={t}&return_url=%2Fdocs%3Fa%3D1"));
        assert_eq!(
            answer(&v, &host("demo", 3000), &q, false, NOW, ""),
            CallbackAnswer::SetCookie {
                set_cookie: format!(
                    "pinacle-proxy-token={t}; Path=/; Max-Age=900; HttpOnly; SameSite=Lax"
                ),
                location: "/docs?a=1".into(),
            }
        );
        let CallbackAnswer::SetCookie { set_cookie, .. } =
            answer(&v, &host("demo", 3000), &q, true, NOW, "")
        else {
            panic!("expected a cookie")
        };
        assert!(set_cookie.ends_with("; HttpOnly; Secure; SameSite=Lax"));
    }

    #[test]
    fn embed_gets_a_partitioned_none_cookie() {
        let v = verifier();
        let t = token(&v, "demo", 3000, NOW + 900);
        let CallbackAnswer::SetCookie {
            set_cookie,
            location,
        } = answer(
            &v,
            &host("demo", 3000),
            &query(&format!("token={t}&embed=true")),
            true,
            NOW,
            "",
        )
        else {
            panic!("expected a cookie")
        };
        assert!(set_cookie.ends_with("; HttpOnly; Secure; SameSite=None; Partitioned"));
        assert_eq!(location, "/");
        // The embedded cookie holds the same grant, marked for embedding, with the same expiry.
        let value = set_cookie
            .strip_prefix("pinacle-proxy-token=")
            .and_then(|rest| rest.split(';').next())
            .unwrap();
        let Outcome::Valid(principal) = v.verify_proxy_token(value, NOW) else {
            panic!("the embedded cookie's token verifies")
        };
        let scope = principal.scope.unwrap();
        assert!(scope.embed);
        assert_eq!(scope.pod_slug.as_str(), "demo");
        assert_eq!(principal.expires_at, Some(NOW + 900));
        assert_eq!(principal.user_id.as_str(), "user_ada");
    }

    #[test]
    fn a_token_past_half_its_life_is_renewed_with_its_mark() {
        let v = verifier();
        let principal = |t: &str| match v.verify_proxy_token(t, NOW) {
            Outcome::Valid(p) => p,
            other => panic!("{other:?}"),
        };
        // 450 s left: renewed; 451 s left: not yet.
        let old = principal(&token(&v, "demo", 3000, NOW + 450));
        let (fresh, embed) = v.renewal(&old, NOW).unwrap();
        assert!(!embed);
        let renewed = principal(&fresh);
        assert_eq!(renewed.expires_at, Some(NOW + 900));
        assert_eq!(renewed.scope, old.scope);
        assert!(
            v.renewal(&principal(&token(&v, "demo", 3000, NOW + 451)), NOW)
                .is_none()
        );
        // An embedded cookie's token renews as one.
        let marked = v
            .reissue_proxy_token(&old, NOW - 450, NOW + 100, true)
            .unwrap();
        let (fresh, embed) = v.renewal(&principal(&marked), NOW).unwrap();
        assert!(embed);
        assert!(principal(&fresh).scope.unwrap().embed);
    }

    #[test]
    fn errors_are_the_dashboards() {
        let v = verifier();
        let h = host("demo", 3000);
        assert_eq!(
            answer(&v, &h, &query(""), false, NOW, ""),
            CallbackAnswer::MissingToken
        );
        assert_eq!(
            answer(&v, &h, &query("token="), false, NOW, ""),
            CallbackAnswer::MissingToken
        );
        assert_eq!(
            answer(&v, &h, &query("token=abc"), false, NOW, ""),
            CallbackAnswer::InvalidToken
        );
        let expired = token(&v, "demo", 3000, NOW);
        assert_eq!(
            answer(&v, &h, &query(&format!("token={expired}")), false, NOW, ""),
            CallbackAnswer::InvalidToken
        );
        let other_port = token(&v, "demo", 3001, NOW + 900);
        assert_eq!(
            answer(
                &v,
                &h,
                &query(&format!("token={other_port}")),
                false,
                NOW,
                ""
            ),
            CallbackAnswer::WrongPod
        );
        let other_pod = token(&v, "demo2", 3000, NOW + 900);
        assert_eq!(
            answer(
                &v,
                &h,
                &query(&format!("token={other_pod}")),
                false,
                NOW,
                ""
            ),
            CallbackAnswer::WrongPod
        );
    }

    #[test]
    fn return_url_must_be_a_path_on_this_host() {
        for ok in ["/", "/a", "/a/b?c=d&e=%2F#frag", "/@evil.com"] {
            assert_eq!(safe_return_path(Some(ok)), ok);
        }
        for bad in [
            "https://evil.example/",
            "//evil.example/x",
            "/\\evil.example",
            "\\\\evil.example",
            "javascript:alert(1)",
            "/a\r\nSet-Cookie: x=1",
            "/a\tb",
            "evil.example",
            "",
        ] {
            assert_eq!(safe_return_path(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_return_path(None), "/");
    }

    #[test]
    fn sign_in_location_encodes_like_encode_uri_component() {
        assert_eq!(
            sign_in_location(
                "https://pinacle.dev",
                &host("my-pod", 8726),
                "/a b/?x=1&y=é~'()*!"
            ),
            "https://pinacle.dev/api/proxy-auth?pod=my-pod&port=8726\
             &return_url=%2Fa%20b%2F%3Fx%3D1%26y%3D%C3%A9~'()*!"
        );
    }
}
