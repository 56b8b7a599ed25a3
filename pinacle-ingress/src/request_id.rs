//! Request ids: unique within a process and unlikely to repeat across restarts (a random
//! 64-bit prefix per process and a counter), cheap to make on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};

/// Makes request ids.
#[derive(Debug)]
pub struct RequestIds {
    /// The prefix as 16 hex digits (formatted once: `format!` costs ~1k instructions a request).
    prefix: String,
    counter: AtomicU64,
}

impl RequestIds {
    /// A generator with a fresh random prefix (a fixed one if the system has no randomness).
    pub fn new() -> Self {
        Self::with_prefix(getrandom::u64().unwrap_or(0x5eed_5eed_5eed_5eed))
    }

    /// A generator with a given prefix (tests).
    pub fn with_prefix(prefix: u64) -> Self {
        let mut hex = String::with_capacity(16);
        push_hex(&mut hex, prefix, 16);
        Self {
            prefix: hex,
            counter: AtomicU64::new(0),
        }
    }

    /// The next id: 24 lowercase hex digits.
    pub fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(24);
        id.push_str(&self.prefix);
        push_hex(&mut id, n & 0xffff_ffff, 8);
        id
    }
}

/// Appends the low `digits` hex digits of `value`, zero-padded, lowercase.
fn push_hex(out: &mut String, value: u64, digits: u32) {
    for i in (0..digits).rev() {
        let nibble = u32::try_from((value >> (i * 4)) & 0xf).unwrap_or(0);
        out.push(char::from_digit(nibble, 16).unwrap_or('0'));
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_and_have_a_fixed_shape() {
        let ids = RequestIds::with_prefix(0xabc);
        let (a, b) = (ids.next_id(), ids.next_id());
        assert_ne!(a, b);
        assert_eq!(a, "0000000000000abc00000000");
        assert_eq!(b.len(), 24);
        let ids = RequestIds::with_prefix(0x0123_4567_89ab_cdef);
        assert_eq!(ids.next_id(), "0123456789abcdef00000000");
        assert_eq!(ids.next_id(), "0123456789abcdef00000001");
    }
}
