//! Lowercase hex, as every digest and token of the ingress is written (CSRF tags, HMAC request
//! signatures, agent secrets and their SHA-256). Hand-written: two functions, and the crate
//! already parses the exact 64-digit form everywhere it reads one.

/// `bytes` as lowercase hex.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Exactly 64 lowercase hex digits as 32 bytes (a SHA-256 or HMAC-SHA256 written by
/// [`encode`]); anything else is `None`.
pub fn decode32(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let (hi, lo) = (value(*pair.first()?)?, value(*pair.get(1)?)?);
        *out.get_mut(i)? = hi << 4 | lo;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_anything_but_64_lowercase_digits() {
        let bytes: Vec<u8> = (0..32).map(|i| i * 8 + 1).collect();
        let text = encode(&bytes);
        assert_eq!(text.len(), 64);
        assert_eq!(decode32(&text).map(|b| b.to_vec()), Some(bytes));
        assert_eq!(encode(&[0x00, 0xff, 0x0a]), "00ff0a");
        assert!(decode32(&text.to_uppercase()).is_none());
        assert!(decode32(&text[..62]).is_none());
        assert!(decode32(&format!("{}zz", &text[..62])).is_none());
    }
}
