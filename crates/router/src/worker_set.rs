//! The set of workers holding one block: a few slots inline, a bitset once it is shared widely.
//!
//! Most indexed blocks are the unique tails of conversations, held by one worker; a few (system prompts, few-shot
//! examples) are held by hundreds. Inline storage keeps the common case at 16 bytes with no allocation; the bitset
//! makes membership O(1) and lets the overlap walk intersect a whole shared prefix word by word.

/// How many worker slots fit inline. With `u32` slots, a one-byte tag and a one-byte length this fills 16 bytes,
/// the same as the boxed variant, so the inline case costs nothing extra.
const INLINE_MAX: usize = 3;
/// A bitset shrinks back to inline storage at this size, one below [`INLINE_MAX`], so a block whose holder count
/// oscillates around the threshold does not allocate and free on every event.
const SHRINK_AT: usize = INLINE_MAX - 1;

/// Workers (by dense index slot) that hold one block. Never empty while it is in the index.
#[derive(Clone, Debug)]
pub(crate) enum WorkerSet {
    /// Up to [`INLINE_MAX`] slots, unordered; the first `len` entries of `slots` are valid.
    Inline { len: u8, slots: [u32; INLINE_MAX] },
    /// Any number of slots.
    Bits(Box<BitSet>),
}

/// Memory per index entry is the point of the inline layout; keep it from growing by accident.
const _: () = assert!(size_of::<WorkerSet>() == 16);

/// A growable bitset over worker slots with its population count.
#[derive(Clone, Debug)]
pub(crate) struct BitSet {
    pub(crate) count: u32,
    /// Bit `slot % 64` of word `slot / 64`; words past the end are zero.
    pub(crate) words: Vec<u64>,
}

impl WorkerSet {
    /// The set holding only `slot`.
    pub(crate) fn one(slot: u32) -> Self {
        Self::Inline {
            len: 1,
            slots: [slot, 0, 0],
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Inline { len, .. } => usize::from(*len),
            Self::Bits(bits) => bits.count as usize,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub(crate) fn contains(&self, slot: u32) -> bool {
        match self {
            Self::Inline { len, slots } => slots[..usize::from(*len)].contains(&slot),
            Self::Bits(bits) => bit_test(&bits.words, slot),
        }
    }

    /// Adds `slot`; returns whether it was absent.
    pub(crate) fn insert(&mut self, slot: u32) -> bool {
        match self {
            Self::Inline { len, slots } => {
                let n = usize::from(*len);
                if slots[..n].contains(&slot) {
                    return false;
                }
                if n < INLINE_MAX {
                    slots[n] = slot;
                    *len += 1;
                    return true;
                }
                let mut bits = BitSet {
                    count: 0,
                    words: Vec::new(),
                };
                for &held in slots.iter().chain([slot].iter()) {
                    bits.insert(held);
                }
                *self = Self::Bits(Box::new(bits));
                true
            }
            Self::Bits(bits) => bits.insert(slot),
        }
    }

    /// Removes `slot`; returns whether it was present.
    pub(crate) fn remove(&mut self, slot: u32) -> bool {
        match self {
            Self::Inline { len, slots } => {
                let n = usize::from(*len);
                let Some(pos) = slots[..n].iter().position(|&held| held == slot) else {
                    return false;
                };
                slots[pos] = slots[n - 1];
                *len -= 1;
                true
            }
            Self::Bits(bits) => {
                if !bits.remove(slot) {
                    return false;
                }
                if bits.count as usize <= SHRINK_AT {
                    let mut slots = [0u32; INLINE_MAX];
                    let mut len = 0u8;
                    for_each_bit(&bits.words, |held| {
                        slots[usize::from(len)] = held;
                        len += 1;
                    });
                    *self = Self::Inline { len, slots };
                }
                true
            }
        }
    }

    /// Heap bytes owned by this set (the inline variant owns none).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Self::Inline { .. } => 0,
            Self::Bits(bits) => size_of::<BitSet>() + bits.words.capacity() * size_of::<u64>(),
        }
    }
}

impl BitSet {
    fn insert(&mut self, slot: u32) -> bool {
        let (word, bit) = split(slot);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let absent = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.count += u32::from(absent);
        absent
    }

    fn remove(&mut self, slot: u32) -> bool {
        let (word, bit) = split(slot);
        let Some(w) = self.words.get_mut(word) else {
            return false;
        };
        let present = *w & bit != 0;
        *w &= !bit;
        self.count -= u32::from(present);
        present
    }
}

/// Word index and bit mask of `slot`.
#[inline]
fn split(slot: u32) -> (usize, u64) {
    ((slot / 64) as usize, 1u64 << (slot % 64))
}

#[inline]
pub(crate) fn bit_test(words: &[u64], slot: u32) -> bool {
    let (word, bit) = split(slot);
    words.get(word).is_some_and(|w| w & bit != 0)
}

#[inline]
pub(crate) fn bit_clear(words: &mut [u64], slot: u32) {
    let (word, bit) = split(slot);
    if let Some(w) = words.get_mut(word) {
        *w &= !bit;
    }
}

/// Calls `f` with every set bit's slot, in increasing order.
#[inline]
pub(crate) fn for_each_bit(words: &[u64], mut f: impl FnMut(u32)) {
    for (word_idx, &word) in words.iter().enumerate() {
        for_each_bit_in_word(word_idx, word, &mut f);
    }
}

/// Calls `f` with the slot of every set bit of `word`, which is word `word_idx` of a bitset.
#[inline]
pub(crate) fn for_each_bit_in_word(word_idx: usize, mut word: u64, f: &mut impl FnMut(u32)) {
    while word != 0 {
        let bit = word.trailing_zeros();
        f(word_idx as u32 * 64 + bit);
        word &= word - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(set: &WorkerSet) -> Vec<u32> {
        let mut out: Vec<u32> = (0..300).filter(|&s| set.contains(s)).collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn grows_into_a_bitset_and_shrinks_back_with_hysteresis() {
        let mut set = WorkerSet::one(7);
        assert!(!set.insert(7));
        for slot in [200, 3] {
            assert!(set.insert(slot));
        }
        assert!(matches!(set, WorkerSet::Inline { len: 3, .. }));
        assert!(set.insert(64));
        assert!(matches!(set, WorkerSet::Bits(_)));
        assert_eq!(members(&set), [3, 7, 64, 200]);
        assert!(set.remove(200));
        assert!(!set.remove(200));
        assert!(
            matches!(set, WorkerSet::Bits(_)),
            "3 members stay a bitset (hysteresis)"
        );
        assert!(set.remove(3));
        assert!(matches!(set, WorkerSet::Inline { len: 2, .. }));
        assert_eq!(members(&set), [7, 64]);
        assert!(set.remove(7) && set.remove(64));
        assert!(set.is_empty());
        assert!(!set.remove(1000), "removing from an empty set is a no-op");
    }
}
