//! The `Cookie` request header as bytes: its segments, the names credential cookies and their
//! chunks go by, and the header left after removing chosen segments. Pure, no allocation but
//! the output.
//!
//! Bytes, not `str`: user agents send back whatever servers set (RFC 6265 §5.4), and apps set
//! non-ASCII values (`name=José`), so one odd pair must neither hide the others nor be altered.

use std::borrow::Cow;

/// One `;`-separated segment of a `Cookie` header, trimmed of spaces and tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// The segment exactly as it stood (without the separating `;` and surrounding blanks).
    pub raw: &'a [u8],
    /// Its `name=value` pair, when it has an `=` and a non-empty name.
    pub pair: Option<CookiePair<'a>>,
}

/// One `name=value` pair of a `Cookie` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookiePair<'a> {
    /// The cookie name, trimmed of spaces and tabs.
    pub name: &'a [u8],
    /// The value, trimmed, with one pair of surrounding double quotes removed.
    pub value: &'a [u8],
}

fn is_blank(b: &u8) -> bool {
    *b == b' ' || *b == b'\t'
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !is_blank(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_blank(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// The non-empty segments of a `Cookie` header, in order. A segment's position in this
/// iteration is its index for [`without_segments`].
pub fn segments(header: &[u8]) -> impl Iterator<Item = Segment<'_>> {
    raw_segments(header).map(|raw| {
        let pair = raw.iter().position(|b| *b == b'=').and_then(|eq| {
            let name = trim(raw.get(..eq).unwrap_or_default());
            let value = trim(raw.get(eq + 1..).unwrap_or_default());
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            (!name.is_empty()).then_some(CookiePair { name, value })
        });
        Segment { raw, pair }
    })
}

/// The segments' bytes alone (no pair parsing: what removal needs).
fn raw_segments(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    header
        .split(|b| *b == b';')
        .map(trim)
        .filter(|raw| !raw.is_empty())
}

/// The `name=value` pairs of a `Cookie` header (segments without `=` are skipped, as browsers
/// and Node's `cookie` package do).
pub fn pairs(header: &[u8]) -> impl Iterator<Item = CookiePair<'_>> {
    segments(header).filter_map(|s| s.pair)
}

/// How a cookie name relates to a credential cookie's base name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameMatch {
    /// The base name itself.
    Whole,
    /// `<base>.<digits>`: a chunk, with its index when it fits a `u32` (a chunk whose index does
    /// not fit can never be placed, so it is never attributed).
    Chunk(Option<u32>),
}

/// Whether `name` is `base` or one of its chunks (`<base>.<digits>`, numbered as next-auth and
/// @auth/core number them: by the digits after the last dot).
pub fn match_name(name: &[u8], base: &str) -> Option<NameMatch> {
    let rest = name.strip_prefix(base.as_bytes())?;
    if rest.is_empty() {
        return Some(NameMatch::Whole);
    }
    let digits = rest.strip_prefix(b".")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let index = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok());
    Some(NameMatch::Chunk(index))
}

/// The header without the segments whose indices (in [`segments`] order) are in `remove`
/// (sorted, ascending); every other segment kept byte for byte, joined by `"; "`. The header
/// itself when nothing is removed; `None` when nothing is left (drop the field).
pub fn without_segments<'h>(header: &'h [u8], remove: &[usize]) -> Option<Cow<'h, [u8]>> {
    if remove.is_empty() {
        return raw_segments(header)
            .next()
            .is_some()
            .then_some(Cow::Borrowed(header));
    }
    let mut out = Vec::with_capacity(header.len());
    let mut skip = remove.iter().peekable();
    for (index, raw) in raw_segments(header).enumerate() {
        while skip.next_if(|r| **r < index).is_some() {}
        if skip.next_if_eq(&&index).is_some() {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(raw);
    }
    (!out.is_empty()).then_some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_and_values(header: &[u8]) -> Vec<(&[u8], &[u8])> {
        pairs(header).map(|p| (p.name, p.value)).collect()
    }

    #[test]
    fn pairs_trim_and_unquote() {
        let got = names_and_values(br#"a=1;  b="two" ;junk; =x; c=;	d = 4 "#);
        let want: Vec<(&[u8], &[u8])> =
            vec![(b"a", b"1"), (b"b", b"two"), (b"c", b""), (b"d", b"4")];
        assert_eq!(got, want);
    }

    #[test]
    fn a_non_ascii_pair_hides_nothing() {
        let header = "name=José; pinacle-proxy-token=t; é=ü".as_bytes();
        let got = names_and_values(header);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (&b"name"[..], "José".as_bytes()));
        assert_eq!(got[1], (&b"pinacle-proxy-token"[..], &b"t"[..]));
        // Raw bytes that are not UTF-8 at all are still one pair each.
        let raw = b"a=\xff\xfe; b=2";
        assert_eq!(names_and_values(raw)[1], (&b"b"[..], &b"2"[..]));
    }

    #[test]
    fn names_match_the_base_and_its_numbered_chunks() {
        assert_eq!(match_name(b"a.b", "a.b"), Some(NameMatch::Whole));
        assert_eq!(match_name(b"a.b.3", "a.b"), Some(NameMatch::Chunk(Some(3))));
        assert_eq!(
            match_name(b"a.b.007", "a.b"),
            Some(NameMatch::Chunk(Some(7)))
        );
        assert_eq!(
            match_name(b"a.b.99999999999999", "a.b"),
            Some(NameMatch::Chunk(None))
        );
        assert_eq!(match_name(b"a.b.", "a.b"), None);
        assert_eq!(match_name(b"a.b.-1", "a.b"), None);
        assert_eq!(match_name(b"a.bc.1", "a.b"), None);
        assert_eq!(match_name(b"a.bc", "a.b"), None);
        assert_eq!(match_name(b"A.B", "a.b"), None);
    }

    #[test]
    fn removal_keeps_the_rest_byte_for_byte() {
        let h = "theme=dark;s.0=AAA; s.1=BBB;  app=\"q=1\"; junk ;pinacle-proxy-token=t; n=José"
            .as_bytes();
        let kept = without_segments(h, &[1, 2, 5]).unwrap();
        assert_eq!(&*kept, "theme=dark; app=\"q=1\"; junk; n=José".as_bytes());
        assert_eq!(without_segments(b"s=1", &[0]), None);
        assert!(matches!(
            without_segments(b"a=1;b=2", &[]),
            Some(Cow::Borrowed(b"a=1;b=2"))
        ));
        assert_eq!(without_segments(b" ; ", &[]), None);
        // Indices past the end are ignored.
        assert_eq!(&*without_segments(b"a=1; b=2", &[1, 9]).unwrap(), b"a=1");
    }
}
