//! Request ids: unique within a process and unlikely to repeat across restarts (a random
//! 64-bit prefix per process and a counter), cheap to make on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};

/// Makes request ids.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    /// A generator with a fresh random prefix (a fixed one if the system has no randomness).
    pub fn new() -> Self {
        Self::with_prefix(getrandom::u64().unwrap_or(0x5eed_5eed_5eed_5eed))
    }

    /// A generator with a given prefix (tests).
    pub fn with_prefix(prefix: u64) -> Self {
        Self {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    /// The next id: 24 lowercase hex digits.
    pub fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.prefix, n & 0xffff_ffff)
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
    }
}
