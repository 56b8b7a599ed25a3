//! The `Cookie` request header: scanning pairs, reassembling chunked session cookies, and removing
//! credential cookies before a request is forwarded. Pure string work, no allocation when possible.

use std::borrow::Cow;

/// One `name=value` pair of a `Cookie` header, with the raw text it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookiePair<'a> {
    /// The cookie name, trimmed.
    pub name: &'a str,
    /// The value, trimmed, with one pair of surrounding double quotes removed.
    pub value: &'a str,
    /// The pair exactly as it stood in the header (without the separating `;` and leading spaces).
    pub raw: &'a str,
}

/// Iterates the pairs of a `Cookie` header. Segments without `=` are skipped, as browsers and
/// Node's `cookie` package do.
pub fn pairs(header: &str) -> impl Iterator<Item = CookiePair<'_>> {
    header.split(';').filter_map(|segment| {
        let raw = segment.trim_matches(|c| c == ' ' || c == '\t');
        let (name, value) = raw.split_once('=')?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        Some(CookiePair { name, value, raw })
    })
}

/// The chunk index of `name` when it is `<base>.<digits>`.
pub fn chunk_index(name: &str, base: &str) -> Option<u32> {
    let suffix = name.strip_prefix(base)?.strip_prefix('.')?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    suffix.parse().ok()
}

/// Whether `name` is `base` itself or one of its chunks.
pub fn is_cookie_or_chunk(name: &str, base: &str) -> bool {
    name == base || chunk_index(name, base).is_some()
}

/// The value of cookie `base`, reassembled from `<base>.0`, `<base>.1`, ... (ordered by the
/// number after the last dot, as next-auth and @auth/core do) when chunks are present.
/// The first occurrence of a name wins (browsers send the most specific path first).
pub fn reassemble<'a>(header: &'a str, base: &str) -> Option<Cow<'a, str>> {
    let mut whole: Option<&'a str> = None;
    let mut chunks: Vec<(u32, &'a str)> = Vec::new();
    for pair in pairs(header) {
        if pair.name == base {
            whole.get_or_insert(pair.value);
        } else if let Some(index) = chunk_index(pair.name, base)
            && !chunks.iter().any(|(i, _)| *i == index)
        {
            chunks.push((index, pair.value));
        }
    }
    if chunks.is_empty() {
        return whole.map(Cow::Borrowed);
    }
    chunks.sort_unstable_by_key(|(index, _)| *index);
    let mut value = String::with_capacity(chunks.iter().map(|(_, v)| v.len()).sum());
    for (_, chunk) in chunks {
        value.push_str(chunk);
    }
    Some(Cow::Owned(value))
}

/// The header without the cookies for which `remove(name)` is true; every other pair is kept
/// byte-for-byte, joined by `"; "`. `None` when no pair is left (drop the header).
pub fn strip(header: &str, mut remove: impl FnMut(&str) -> bool) -> Option<String> {
    let mut out = String::with_capacity(header.len());
    for segment in header.split(';') {
        let raw = segment.trim_matches(|c| c == ' ' || c == '\t');
        if raw.is_empty() {
            continue;
        }
        let name = raw.split_once('=').map_or(raw, |(n, _)| n).trim();
        if remove(name) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(raw);
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_trim_and_unquote() {
        let got: Vec<_> = pairs(r#"a=1;  b="two" ;junk; =x; c="#)
            .map(|p| (p.name, p.value))
            .collect();
        assert_eq!(got, vec![("a", "1"), ("b", "two"), ("c", "")]);
    }

    #[test]
    fn chunks_are_ordered_by_number_not_position() {
        let h = "t.10=K; t.2=C; x=1; t.0=A; t.1=B";
        assert_eq!(reassemble(h, "t").as_deref(), Some("ABCK"));
        assert_eq!(reassemble("t=whole", "t").as_deref(), Some("whole"));
        assert_eq!(reassemble("tt=whole; t.x=1", "t"), None);
    }

    #[test]
    fn chunk_index_needs_digits_only() {
        assert_eq!(chunk_index("a.b.3", "a.b"), Some(3));
        assert_eq!(chunk_index("a.b.", "a.b"), None);
        assert_eq!(chunk_index("a.b.-1", "a.b"), None);
        assert_eq!(chunk_index("a.bc.1", "a.b"), None);
    }

    #[test]
    fn strip_keeps_others_byte_for_byte() {
        let h = "theme=dark;s.0=AAA; s.1=BBB;  app=\"q=1\"; pinacle-proxy-token=t";
        let out = strip(h, |n| {
            is_cookie_or_chunk(n, "s") || n == "pinacle-proxy-token"
        });
        assert_eq!(out.as_deref(), Some("theme=dark; app=\"q=1\""));
        assert_eq!(strip("s=1", |n| n == "s"), None);
    }
}
