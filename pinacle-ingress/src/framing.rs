//! HTTP/1.1 message rules every engine applies the same way (RFC 9110 §7.6.1, §8.6; RFC 9112
//! §6.3): what a `Content-Length` says, which response fields are the hop's own (fixed ones
//! and those a `Connection` field nominates), and the one writer of the response heads we write
//! ourselves ([`status_line`], [`field`], [`response_head`]: the plain path's relayed heads,
//! our answers outside Pingora, a tunnel's `101` or refusal). Pure.

/// Starts an HTTP/1.1 response head in `out`: `HTTP/1.1 <status> <reason>`.
pub fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    let mut code = itoa::Buffer::new();
    for part in [
        b"HTTP/1.1 ",
        code.format(status).as_bytes(),
        b" ",
        reason,
        b"\r\n",
    ] {
        out.extend_from_slice(part);
    }
}

/// One field line of a head.
pub fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for part in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(part);
    }
}

/// A whole response head: the status line with the canonical reason, every field in order,
/// the blank line.
pub fn response_head<'a>(
    status: http::StatusCode,
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    status_line(
        &mut out,
        status.as_u16(),
        status.canonical_reason().unwrap_or("").as_bytes(),
    );
    for (name, value) in fields {
        field(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A `Content-Length` that cannot be relied on: not digits, or values that disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid content-length")]
pub struct BadLength;

/// The length the `Content-Length` field values say, `None` without any. Each value may be a
/// comma-separated list (`5, 5`); every element must be plain digits and all must be equal.
///
/// # Errors
/// [`BadLength`] for `+5`, `5a`, an empty element, an overflow, or disagreeing values.
pub fn content_length<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<u64>, BadLength> {
    let mut length = None;
    for value in values {
        for element in value.split(|b| *b == b',') {
            let digits = element.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(BadLength);
            }
            let n = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or(BadLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(BadLength);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Response fields that belong to one hop whatever `Connection` says.
const RESPONSE_HOP: [&[u8]; 3] = [b"connection", b"keep-alive", b"proxy-connection"];

/// Request fields about this hop's framing and connection (RFC 9110 §7.6.1, RFC 9112 §6):
/// never passed on as received. `Connection` and `Upgrade` are not listed: an upgrade keeps
/// them (they are the switch), and every other request has its `Upgrade` removed before.
const REQUEST_HOP: [&[u8]; 6] = [
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"content-length",
];

/// Whether a request field is the hop's own (any case): the tunnel drops these when it opens
/// an upgrade upstream, and the plain path leaves any request that has one to Pingora, which
/// frames bodies itself.
pub fn is_request_hop(name: &[u8]) -> bool {
    REQUEST_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The names a response's `Connection` values nominate (lowercase not required; compared
/// without case).
pub fn nominated<'a>(connection: impl IntoIterator<Item = &'a [u8]>) -> Vec<&'a [u8]> {
    connection
        .into_iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether an upstream response field is the hop's own and so never relayed: `Connection`,
/// `Keep-Alive`, `Proxy-Connection`, or a field `nominated` by `Connection` (for a `101`,
/// `Upgrade` and `Connection` are the switch itself and are kept).
pub fn is_response_hop(name: &[u8], nominated: &[&[u8]], switching: bool) -> bool {
    if switching
        && (name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"connection"))
    {
        return false;
    }
    RESPONSE_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
        || nominated.iter().any(|n| n.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn length(values: &[&str]) -> Result<Option<u64>, BadLength> {
        content_length(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn content_lengths_are_digits_and_agree() {
        assert_eq!(length(&[]), Ok(None));
        assert_eq!(length(&["5"]), Ok(Some(5)));
        assert_eq!(length(&[" 5 "]), Ok(Some(5)));
        assert_eq!(length(&["5, 5"]), Ok(Some(5)));
        assert_eq!(length(&["5", "5,5"]), Ok(Some(5)));
        for bad in [
            &["+5"][..],
            &["-5"],
            &["5a"],
            &[""],
            &["5,"],
            &["5, 6"],
            &["5", "6"],
            &["0x5"],
            &["99999999999999999999999"],
        ] {
            assert_eq!(length(bad), Err(BadLength), "{bad:?}");
        }
    }

    #[test]
    fn request_hop_fields_are_matched_in_any_case() {
        for name in [
            "Keep-Alive",
            "TE",
            "transfer-encoding",
            "Content-Length",
            "Trailer",
        ] {
            assert!(is_request_hop(name.as_bytes()), "{name}");
        }
        for name in ["connection", "upgrade", "host", "cookie"] {
            assert!(!is_request_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn hop_fields_include_the_nominated_ones() {
        let named = nominated([&b"X-Internal, keep-alive"[..], b" close "]);
        assert_eq!(named, vec![&b"X-Internal"[..], b"keep-alive", b"close"]);
        assert!(is_response_hop(b"x-internal", &named, false));
        assert!(is_response_hop(b"Keep-Alive", &[], false));
        assert!(is_response_hop(b"connection", &[], false));
        assert!(!is_response_hop(b"x-app", &named, false));
        assert!(!is_response_hop(b"upgrade", &[], true));
        assert!(!is_response_hop(b"connection", &[], true));
        assert!(is_response_hop(b"keep-alive", &[], true));
    }
}
