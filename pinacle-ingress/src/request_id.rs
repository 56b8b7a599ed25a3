//! Request ids: unique within a process and unlikely to repeat across restarts (a random
//! 64-bit prefix per process and a counter), cheap to make on the hot path. 24 hex digits: 16
//! of prefix and the counter's low 32 bits; each time those wrap (every 2^32 requests) the
//! prefix moves on by an odd multiple of the counter's high bits, a bijection, so no id repeats
//! within a process.

use std::sync::atomic::{AtomicU64, Ordering};

/// Makes request ids.
#[derive(Debug)]
pub struct RequestIds {
    /// The prefix as 16 hex digits (formatted once: `format!` costs ~1k instructions a request).
    prefix: String,
    /// The prefix's value, for the ids after the counter's low 32 bits wrapped.
    prefix_value: u64,
    counter: AtomicU64,
}

/// An odd constant (2^64 / golden ratio): multiplying by it permutes the 64-bit values.
const SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

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
            prefix_value: prefix,
            counter: AtomicU64::new(0),
        }
    }

    /// A generator whose counter starts at `n` (tests of the wrap).
    #[cfg(test)]
    fn starting_at(prefix: u64, n: u64) -> Self {
        let ids = Self::with_prefix(prefix);
        ids.counter.store(n, Ordering::Relaxed);
        ids
    }

    /// The next id: 24 lowercase hex digits.
    pub fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(24);
        match n >> 32 {
            0 => id.push_str(&self.prefix),
            high => push_hex(&mut id, self.prefix_value ^ high.wrapping_mul(SPREAD), 16),
        }
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

    #[test]
    fn ids_do_not_repeat_when_the_low_bits_wrap() {
        let first = RequestIds::with_prefix(7).next_id();
        // The 2^32nd id and its neighbours: low digits repeat, the prefix does not.
        let ids = RequestIds::starting_at(7, (1 << 32) - 1);
        let (before, after, next) = (ids.next_id(), ids.next_id(), ids.next_id());
        assert_eq!(&before[16..], "ffffffff");
        assert_eq!(&after[16..], "00000000");
        assert_ne!(after, first);
        assert_ne!(&after[..16], &before[..16]);
        assert_eq!(&after[..16], &next[..16]);
        assert_eq!(after.len(), 24);
        // And again at the next wrap.
        let ids = RequestIds::starting_at(7, 2 << 32);
        assert_ne!(ids.next_id(), after);
    }
}
