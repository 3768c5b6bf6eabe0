//! A fast, per-instance seeded hasher for the index's maps (keys are block hashes and worker ids, both `u64`).
//!
//! std's default SipHash costs ~20 ns per `u64`; a routing decision looks up one map entry per request block and
//! every KV event does two, so that would be most of the budget. The keys are already well mixed (block hashes are
//! `xxh3_64` outputs) but they derive from token ids that clients choose, and `xxh3` with its default secret is not
//! keyed: an unkeyed identity or fixed-multiply hash would let a client who precomputes colliding prompts pile
//! entries into one probe sequence. So each map gets a random seed (taken from std's `RandomState`, which the OS
//! seeds) and hashes with one folded 64×64→128-bit multiply, the construction foldhash and ahash use for integers.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

/// `HashMap` with [`SeededState`].
pub(crate) type FastMap<K, V> = HashMap<K, V, SeededState>;
/// `HashSet` with [`SeededState`].
pub(crate) type FastSet<K> = HashSet<K, SeededState>;

/// An odd 64-bit constant with well-spread bits (the fractional part of the golden ratio).
const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// Builds [`SeededHasher`]s that all start from one random seed.
#[derive(Clone, Debug)]
pub(crate) struct SeededState {
    seed: u64,
}

impl SeededState {
    /// A state with a fresh random seed.
    pub(crate) fn new() -> Self {
        // `RandomState::new` is OS-seeded once per thread and advanced on every call, so hashing a constant through it
        // gives each map a different, unpredictable seed without a dependency on an RNG crate.
        Self {
            seed: RandomState::new().hash_one(MULTIPLIER),
        }
    }
}

impl Default for SeededState {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for SeededState {
    type Hasher = SeededHasher;

    fn build_hasher(&self) -> SeededHasher {
        SeededHasher { state: self.seed }
    }
}

/// Folded-multiply hasher; `write_u64` is the fast path (what `BlockHash` and `WorkerId` derive to).
#[derive(Clone, Debug)]
pub(crate) struct SeededHasher {
    state: u64,
}

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by this crate's keys; kept correct for any other key type.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.state = folded_multiply(self.state ^ value, MULTIPLIER);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.state
    }
}

/// The 128-bit product of `a` and `b`, high half XOR low half: every input bit reaches both the low bits (the
/// bucket index) and the high bits (hashbrown's 7-bit tag).
#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_between_states_and_hashes_are_stable_within_one() {
        let (a, b) = (SeededState::new(), SeededState::new());
        assert_ne!(a.seed, b.seed);
        assert_eq!(a.hash_one(42u64), a.hash_one(42u64));
        assert_ne!(a.hash_one(42u64), a.hash_one(43u64));
    }

    #[test]
    fn consecutive_keys_spread_over_low_and_high_bits() {
        let state = SeededState::new();
        let hashes: Vec<u64> = (0..4096u64).map(|k| state.hash_one(k)).collect();
        let low: HashSet<u64> = hashes.iter().map(|h| h & 0xfff).collect();
        let high: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        // 4096 keys into 4096 low-bit buckets: a good hash fills about 1 - 1/e of them.
        assert!(low.len() > 2300, "only {} distinct low 12-bit values", low.len());
        assert_eq!(high.len(), 128, "the 7-bit tags are not all used");
    }
}
