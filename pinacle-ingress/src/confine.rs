//! A pod's answers, confined to the pod's own host.
//!
//! Every pod host is a subdomain of the base domain the dashboard and every other user's pods
//! share, so a browser lets a pod set a cookie for that whole domain (`Domain=pinacle.io`):
//! untrusted code in one pod could then plant cookies on the dashboard (a session of the
//! attacker's, or enough large cookies that the victim's requests exceed the header limit) and
//! on every other pod. So the `Domain` attribute of a pod's cookies is removed, which makes
//! each a host-only cookie of the pod's host, as `localhost` development expects (a cookie an
//! app sets for `Domain=localhost` would be refused by the browser on the pod's host anyway).
//! A pod may also neither set nor clear the ingress's own `pinacle-proxy-token`. Everything
//! else is kept byte for byte. No crate does this edit: the `cookie` crate parses and
//! re-serialises, which would change attributes it does not know and refuse non-UTF-8 bytes.
//!
//! For the same reason a pod's `Clear-Site-Data` is dropped: browsers clear cookies for the
//! whole site (the registrable domain), so one pod could sign its user out of the dashboard and
//! every other pod.

use pinacle_authz::PROXY_TOKEN_COOKIE;
use pingora::http::ResponseHeader;

/// What becomes of one `Set-Cookie` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confined {
    /// Forwarded as it is (no `Domain` attribute; the common case, no allocation).
    Keep,
    /// Forwarded as this: the value without its `Domain` attributes.
    Rewritten(Vec<u8>),
    /// Not forwarded: it names the ingress's own cookie.
    Drop,
}

/// The field a pod may not send: its reach is the whole site ([`crate::confine`]).
pub const SITE_WIDE: &str = "clear-site-data";

/// Confines one `Set-Cookie` value (RFC 6265 §5.2: the name-value pair up to the first `;`,
/// then `;`-separated attributes whose names are matched without case and around whitespace).
pub fn set_cookie(value: &[u8]) -> Confined {
    let mut parts = value.split(|b| *b == b';');
    let pair = parts.next().unwrap_or_default();
    let name = pair
        .iter()
        .position(|b| *b == b'=')
        .map_or(&b""[..], |eq| pair[..eq].trim_ascii());
    if name == PROXY_TOKEN_COOKIE.as_bytes()
        || name
            .strip_prefix(PROXY_TOKEN_COOKIE.as_bytes())
            .is_some_and(|rest| rest.first() == Some(&b'.'))
    {
        return Confined::Drop;
    }
    if !parts.clone().any(is_domain) {
        return Confined::Keep;
    }
    let mut out = pair.to_vec();
    for attribute in parts.filter(|a| !is_domain(a)) {
        out.push(b';');
        out.extend_from_slice(attribute);
    }
    Confined::Rewritten(out)
}

/// Confines a pod's response head that Pingora writes (its HTTP/1 and HTTP/2 loop, a tunnel's
/// `101` or refusal): every `Set-Cookie` ([`set_cookie`]; the field is rewritten only when one
/// changes), and no [`SITE_WIDE`] field.
///
/// # Errors
/// Pingora's, when the head cannot take a field.
pub fn apply(header: &mut ResponseHeader) -> pingora::Result<()> {
    if header.headers.contains_key(SITE_WIDE) {
        header.remove_header(SITE_WIDE);
    }
    let changes = header
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .any(|v| set_cookie(v.as_bytes()) != Confined::Keep);
    if !changes {
        return Ok(());
    }
    let kept: Vec<http::HeaderValue> = header
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| match set_cookie(v.as_bytes()) {
            Confined::Keep => Some(v.clone()),
            Confined::Rewritten(value) => http::HeaderValue::from_bytes(&value).ok(),
            Confined::Drop => None,
        })
        .collect();
    header.remove_header(&http::header::SET_COOKIE);
    for value in kept {
        header.append_header(http::header::SET_COOKIE, value)?;
    }
    Ok(())
}

/// Whether one attribute (the bytes between two `;`) is `Domain`, with or without a value.
fn is_domain(attribute: &[u8]) -> bool {
    let name = attribute
        .iter()
        .position(|b| *b == b'=')
        .map_or(attribute, |eq| &attribute[..eq]);
    name.trim_ascii().eq_ignore_ascii_case(b"domain")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(value: &str) -> String {
        match set_cookie(value.as_bytes()) {
            Confined::Keep => value.to_owned(),
            Confined::Rewritten(v) => String::from_utf8(v).unwrap(),
            Confined::Drop => "(dropped)".to_owned(),
        }
    }

    #[test]
    fn domain_attributes_go_and_everything_else_stays_byte_for_byte() {
        for (given, expected) in [
            ("a=1; Domain=pinacle.io; Path=/", "a=1; Path=/"),
            ("a=1;domain=.pinacle.io", "a=1"),
            (
                "a=1; Path=/; DOMAIN = pinacle.io ; HttpOnly",
                "a=1; Path=/; HttpOnly",
            ),
            ("a=1; Domain; Secure", "a=1; Secure"),
            ("a=1; Domain=x; Domain=y; SameSite=Lax", "a=1; SameSite=Lax"),
            // The value is never read as attributes, nor is an attribute's value.
            ("domain=pinacle.io; Path=/", "domain=pinacle.io; Path=/"),
            ("a=x; Path=/domain=y", "a=x; Path=/domain=y"),
            ("theme=dark; Max-Age=60", "theme=dark; Max-Age=60"),
            ("__Host-id=1; Path=/; Secure", "__Host-id=1; Path=/; Secure"),
            (
                "next-auth.session-token=abc; Path=/",
                "next-auth.session-token=abc; Path=/",
            ),
            ("pinacle-proxy-token-like=1", "pinacle-proxy-token-like=1"),
        ] {
            assert_eq!(rewritten(given), expected, "{given}");
        }
        assert_eq!(set_cookie(b"theme=dark; Path=/"), Confined::Keep);
        // Bytes that are not UTF-8 or ASCII are kept.
        assert_eq!(
            set_cookie(b"n=Jos\xc3\xa9\xff; Domain=pinacle.io; Secure"),
            Confined::Rewritten(b"n=Jos\xc3\xa9\xff; Secure".to_vec())
        );
    }

    #[test]
    fn the_ingress_own_cookie_is_never_set_by_a_pod() {
        for given in [
            "pinacle-proxy-token=forged",
            " pinacle-proxy-token =x; Max-Age=0",
            "pinacle-proxy-token.0=chunk",
        ] {
            assert_eq!(set_cookie(given.as_bytes()), Confined::Drop, "{given}");
        }
    }
}
