//! The block pool: reference counts, the prefix cache index, LRU eviction and the event buffer.

use std::collections::HashMap;
use std::fmt;

use crate::error::KvError;
use crate::hash::BlockHash;

/// Index of a KV block in the pool (and in the engine's KV tensors, which this crate never sees).
///
/// `u32` halves the bookkeeping against `usize` and is plenty: 4 billion blocks of 16 tokens is far beyond any GPU.
pub type BlockId = u32;

/// Sizes of a [`BlockPool`], all fixed at start-up: the pool never grows, so memory use is known before the first
/// request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockPoolConfig {
    /// Number of KV blocks, at least 1 and at most `u32::MAX` (a [`BlockId`] must name each one).
    pub n_blocks: usize,
    /// Tokens per block, at least 1. The pool itself only reports it; callers use it to cut token ids into blocks.
    pub block_size: usize,
    /// Bound on events buffered between [`BlockPool::drain_events`] calls, at least 1. When the buffer is full the
    /// pool drops it and records a single [`KvEvent::Cleared`], so a slow consumer costs accuracy, never memory.
    pub events_max: usize,
}

/// A change to the set of cached blocks, published so routers can track which prefixes a worker holds.
///
/// Events are only about *cached* (hashed) blocks; allocations and releases of uncached blocks are private to the
/// engine and produce none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// `block` now holds the tokens whose chained hash is `hash`; `parent` is the previous block's hash (`None` for a
    /// first block), so a consumer can tell where in a prefix tree the block sits.
    Stored {
        /// Chained hash of the block's tokens.
        hash: BlockHash,
        /// Hash of the preceding block of the sequence; `None` for its first block.
        parent: Option<BlockHash>,
        /// The block that holds it.
        block: BlockId,
    },
    /// The cached block `block` holding `hash` was evicted; its KV is about to be overwritten.
    Removed {
        /// Hash the block held.
        hash: BlockHash,
        /// The block that held it.
        block: BlockId,
    },
    /// Events were lost because the buffer overflowed: the consumer must forget everything it knows about this pool
    /// and rebuild from the events that follow. Blocks cached before the overflow are no longer announced, which only
    /// makes a router under-estimate this worker's prefix hits.
    Cleared,
}

/// The bookkeeping of a paged KV cache: which blocks are free, which are in use by how many sequences, and which hold
/// cached prefixes that can be reused or evicted.
///
/// Each block is always in exactly one of three states:
/// - **free**: never used, or released without a hash; on the free stack;
/// - **in use**: refcount > 0, held by one or more sequences (cached or not);
/// - **evictable**: cached (hashed) with refcount 0; on the LRU list, reusable by a prefix hit until an allocation
///   evicts it.
///
/// Every operation costs O(1) or O(length of its input): the free stack is a `Vec`, the LRU list is intrusive
/// (prev/next ids stored per block), and the cache index is a `HashMap`. The pool is owned by one thread (the
/// engine's scheduler), so nothing here is synchronised.
///
/// Misuse (releasing an unreferenced block, naming a block out of range) is an engine bug and panics.
pub struct BlockPool {
    block_size: usize,
    events_max: usize,
    /// Per-block state, indexed by [`BlockId`].
    blocks: Vec<BlockMeta>,
    /// Free blocks, used as a stack: the most recently freed block is reused first, which keeps the touched part of
    /// the KV memory small when the pool is mostly idle.
    free: Vec<BlockId>,
    /// Least recently released evictable block (evicted first), or [`NIL`].
    lru_head: BlockId,
    /// Most recently released evictable block, or [`NIL`].
    lru_tail: BlockId,
    lru_len: usize,
    /// Hash → the block that is its cache entry. Default (SipHash) hashing on purpose: the keys derive from user
    /// tokens through a public function, so a pass-through hasher would let crafted prompts collide buckets.
    cache: HashMap<BlockHash, BlockId>,
    n_in_use: usize,
    events: Vec<KvEvent>,
}

/// "No block" in the LRU links. Never a valid id: ids are below `n_blocks`, which is at most `u32::MAX`.
const NIL: BlockId = BlockId::MAX;

#[derive(Clone, Copy, Debug)]
struct BlockMeta {
    /// Number of sequences holding this block.
    refcount: u32,
    /// The chained hash this block is the cache entry for, if any.
    hash: Option<BlockHash>,
    /// LRU neighbours towards the head (older) and tail (newer); [`NIL`] when not on the list or at its end.
    prev: BlockId,
    next: BlockId,
}

impl BlockPool {
    /// Creates a pool of `config.n_blocks` free blocks.
    ///
    /// Allocates the per-block bookkeeping up front (32 bytes of state plus 4 on the free stack per block, so ~3.6 MB
    /// for 100k blocks); afterwards only the cache index (bounded by `n_blocks`) and the event buffer (bounded by
    /// `events_max`) grow.
    pub fn new(config: BlockPoolConfig) -> Result<Self, KvError> {
        let BlockPoolConfig {
            n_blocks,
            block_size,
            events_max,
        } = config;
        if n_blocks == 0 {
            return Err(KvError::ZeroBlocks);
        }
        if u32::try_from(n_blocks).is_err() {
            return Err(KvError::TooManyBlocks { n_blocks });
        }
        if block_size == 0 {
            return Err(KvError::ZeroBlockSize);
        }
        if events_max == 0 {
            return Err(KvError::ZeroEventsMax);
        }
        let meta = BlockMeta {
            refcount: 0,
            hash: None,
            prev: NIL,
            next: NIL,
        };
        // Reversed so that block 0 is allocated first: deterministic, and easy to read in tests and logs.
        // The cast is lossless: n_blocks <= u32::MAX was checked above.
        let free = (0..n_blocks as BlockId).rev().collect();
        Ok(Self {
            block_size,
            events_max,
            blocks: vec![meta; n_blocks],
            free,
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            cache: HashMap::new(),
            n_in_use: 0,
            events: Vec::new(),
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total number of blocks, whatever their state.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that an allocation could get now: free blocks plus cached blocks with refcount 0 (evictable).
    ///
    /// This is the admission budget: evictable blocks count because an allocation evicts them on demand.
    pub fn n_available(&self) -> usize {
        self.free.len() + self.lru_len
    }

    /// Blocks currently referenced by at least one sequence.
    pub fn n_in_use(&self) -> usize {
        self.n_in_use
    }

    /// Cached (hashed) blocks, referenced or not.
    pub fn n_cached(&self) -> usize {
        self.cache.len()
    }

    /// Every cached block and the hash it holds, in no particular order: the snapshot a new subscriber to this pool's
    /// events starts from.
    pub fn cached_blocks(&self) -> impl Iterator<Item = (BlockHash, BlockId)> + '_ {
        self.cache.iter().map(|(&hash, &block)| (hash, block))
    }

    /// Allocates a fresh, uncached block with refcount 1, or `None` when every block is in use.
    ///
    /// Takes a free block first, so cached prefixes survive as long as possible; otherwise evicts the least recently
    /// released cached block with refcount 0 and emits [`KvEvent::Removed`] for it.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let block = self.lru_pop_front()?;
                self.evict(block);
                block
            }
        };
        let meta = &mut self.blocks[block as usize];
        debug_assert!(
            meta.refcount == 0 && meta.hash.is_none(),
            "allocated block {block} was not free: {meta:?}"
        );
        meta.refcount = 1;
        self.n_in_use += 1;
        Some(block)
    }

    /// Allocates `n` blocks, or none at all when fewer than `n` are available.
    ///
    /// All-or-nothing so that an admission that cannot fit leaves no trace: no half-allocated sequence to undo and
    /// no cached block evicted for nothing.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.n_available() {
            return None;
        }
        let blocks = (0..n)
            .map(|_| self.allocate().expect("n_available() counted this block"))
            .collect();
        Some(blocks)
    }

    /// Length of the longest prefix of `hashes` whose blocks are cached, without taking references.
    ///
    /// For estimates (how much of a prompt would be reused here); the answer holds only until the next allocation,
    /// which may evict. To actually reuse the blocks, use [`acquire_cached_prefix`](Self::acquire_cached_prefix).
    pub fn cached_prefix_len(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|hash| self.cache.contains_key(hash)).count()
    }

    /// Takes a reference on the cached blocks of the longest cached prefix of `hashes` and returns their ids, in order.
    ///
    /// Each block's refcount goes up by one; a block at refcount 0 leaves the LRU list, so it can no longer be
    /// evicted. That is also what marks it recently used: it re-enters the LRU list at the newest end when its last
    /// reference is released. The match stops at the first miss, because a block's KV is only valid after its whole
    /// prefix.
    pub fn acquire_cached_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut blocks = Vec::new();
        for hash in hashes {
            let Some(&block) = self.cache.get(hash) else { break };
            self.add_ref(block);
            blocks.push(block);
        }
        blocks
    }

    /// Records that `block` (referenced, and just filled) holds the tokens whose chained hash is `hash`, the block
    /// after the one with hash `parent`.
    ///
    /// If another block already holds `hash` (two sequences computed the same prefix concurrently), the existing
    /// entry stays, since other sequences may be about to hit it, and `block` stays uncached: it returns to the free
    /// list when released. Returns `false` then. Otherwise `block` becomes the cache entry, [`KvEvent::Stored`] is
    /// emitted, and it returns `true`.
    ///
    /// # Panics
    /// If `block` is out of range or has refcount 0: only a block a sequence holds can have just been filled.
    /// Registering a block that is already registered is also a programmer error; it panics in debug builds and is
    /// ignored (returns `false`) in release builds, which keeps the pool consistent.
    pub fn register(&mut self, block: BlockId, hash: BlockHash, parent: Option<BlockHash>) -> bool {
        let meta = self.meta(block);
        assert!(
            meta.refcount > 0,
            "BlockPool::register: block {block} has refcount 0; only a held block can be registered"
        );
        debug_assert!(
            meta.hash.is_none(),
            "BlockPool::register: block {block} is already registered as {:?}",
            meta.hash
        );
        if meta.hash.is_some() || self.cache.contains_key(&hash) {
            return false;
        }
        self.cache.insert(hash, block);
        self.blocks[block as usize].hash = Some(hash);
        self.push_event(KvEvent::Stored { hash, parent, block });
        true
    }

    /// Drops one reference to `block`.
    ///
    /// At refcount 0 a cached block becomes evictable at the most recently released end of the LRU list (its KV stays
    /// reusable until an allocation needs the room); an uncached one returns to the free list.
    ///
    /// # Panics
    /// If `block` is out of range or its refcount is already 0: a double release is an engine bug that would
    /// otherwise hand the same KV memory to two sequences.
    pub fn release(&mut self, block: BlockId) {
        let meta = self.meta(block);
        assert!(
            meta.refcount > 0,
            "BlockPool::release: block {block} has refcount 0 (released more often than allocated or acquired)"
        );
        let refcount = meta.refcount - 1;
        let cached = meta.hash.is_some();
        self.blocks[block as usize].refcount = refcount;
        if refcount > 0 {
            return;
        }
        self.n_in_use -= 1;
        if cached {
            self.lru_push_back(block);
        } else {
            self.free.push(block);
        }
    }

    /// Releases each of `blocks` once (a sequence's whole block table), **last block first**.
    ///
    /// The reverse order makes a sequence's later blocks older in the LRU list than its earlier ones, so eviction eats
    /// prefixes from their tails. Evicting a first block would make every cached block after it unreachable, since
    /// prefix matching stops at the first miss.
    pub fn release_all(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            self.release(block);
        }
    }

    /// Number of references held on `block` (for tests and assertions).
    ///
    /// # Panics
    /// If `block` is out of range.
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.meta(block).refcount
    }

    /// Takes the buffered events, oldest first. At most `events_max` of them; a [`KvEvent::Cleared`] among them
    /// means events were dropped at that point.
    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Evicts every evictable cached block, least recently released first, emitting [`KvEvent::Removed`] for each.
    ///
    /// Cached blocks still in use stay cached: their owners rely on them. For tests and the "reset prefix cache"
    /// admin operation; costs O(number of evictable blocks).
    pub fn clear_cache(&mut self) {
        while let Some(block) = self.lru_pop_front() {
            self.evict(block);
            self.free.push(block);
        }
    }

    /// Checks every structural invariant and panics with a description of the first one broken.
    ///
    /// O(n_blocks): for tests (after every operation of a randomized run) and debugging, never the serving path.
    /// Checks that every block is in exactly one of {free list, LRU list, in use}, that the counters match, that the
    /// LRU links are consistent, and that the cache index and the per-block hashes agree.
    pub fn debug_check_invariants(&self) {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Place {
            Unseen,
            Free,
            Lru,
            InUse,
        }
        let n_blocks = self.blocks.len();
        let mut places = vec![Place::Unseen; n_blocks];

        for &block in &self.free {
            let i = block as usize;
            assert!(
                i < n_blocks,
                "free list holds block {block}, out of range (n_blocks {n_blocks})"
            );
            assert_eq!(places[i], Place::Unseen, "block {block} is on the free list twice");
            places[i] = Place::Free;
            let meta = &self.blocks[i];
            assert!(
                meta.refcount == 0 && meta.hash.is_none(),
                "free block {block} is not clean: {meta:?}"
            );
            assert!(
                meta.prev == NIL && meta.next == NIL,
                "free block {block} has LRU links: {meta:?}"
            );
        }

        let mut prev = NIL;
        let mut block = self.lru_head;
        let mut lru_len = 0;
        while block != NIL {
            let i = block as usize;
            assert!(
                i < n_blocks,
                "LRU list holds block {block}, out of range (n_blocks {n_blocks})"
            );
            assert_ne!(places[i], Place::Lru, "LRU list has a cycle through block {block}");
            assert_eq!(
                places[i],
                Place::Unseen,
                "block {block} is on both the LRU and the free list"
            );
            places[i] = Place::Lru;
            let meta = &self.blocks[i];
            assert!(
                meta.refcount == 0 && meta.hash.is_some(),
                "LRU block {block} is not evictable: {meta:?}"
            );
            assert_eq!(meta.prev, prev, "LRU block {block} has a wrong prev link");
            lru_len += 1;
            prev = block;
            block = meta.next;
        }
        assert_eq!(self.lru_tail, prev, "LRU tail is not the last block of the list");
        assert_eq!(self.lru_len, lru_len, "LRU length counter is wrong");

        let mut n_in_use = 0;
        let mut n_hashed = 0;
        for (i, meta) in self.blocks.iter().enumerate() {
            if meta.refcount > 0 {
                assert_eq!(places[i], Place::Unseen, "block {i} is in use and also {:?}", places[i]);
                places[i] = Place::InUse;
                assert!(
                    meta.prev == NIL && meta.next == NIL,
                    "in-use block {i} has LRU links: {meta:?}"
                );
                n_in_use += 1;
            }
            assert_ne!(
                places[i],
                Place::Unseen,
                "block {i} is leaked: refcount 0 but neither free nor evictable"
            );
            if let Some(hash) = meta.hash {
                n_hashed += 1;
                assert_eq!(
                    self.cache.get(&hash),
                    Some(&(i as BlockId)),
                    "block {i} holds {hash:?}, the index disagrees"
                );
            }
        }
        assert_eq!(self.n_in_use, n_in_use, "in-use counter is wrong");
        assert_eq!(
            self.n_available() + self.n_in_use(),
            n_blocks,
            "available + in use != n_blocks"
        );
        // Each index entry names a distinct block holding that hash (checked above from the blocks' side); equal counts
        // make the two a bijection.
        assert_eq!(
            self.cache.len(),
            n_hashed,
            "cache index has entries for blocks that do not hold them"
        );
        assert!(
            self.events.len() <= self.events_max,
            "event buffer exceeds events_max {}",
            self.events_max
        );
    }

    /// The state of `block`, with a clear panic for an id out of range (an engine bug).
    fn meta(&self, block: BlockId) -> &BlockMeta {
        let n_blocks = self.blocks.len();
        self.blocks
            .get(block as usize)
            .unwrap_or_else(|| panic!("BlockPool: block {block} is out of range (n_blocks {n_blocks})"))
    }

    /// Takes one more reference on a cached block, pulling it off the LRU list if it was evictable.
    fn add_ref(&mut self, block: BlockId) {
        if self.blocks[block as usize].refcount == 0 {
            self.lru_unlink(block);
            self.n_in_use += 1;
        }
        let meta = &mut self.blocks[block as usize];
        meta.refcount = meta
            .refcount
            .checked_add(1)
            .expect("BlockPool: refcount overflow (u32::MAX references)");
    }

    /// Drops `block`'s cache entry, announcing it. The caller decides where the block goes next.
    fn evict(&mut self, block: BlockId) {
        let hash = self.blocks[block as usize]
            .hash
            .take()
            .expect("an evictable block is cached");
        let removed = self.cache.remove(&hash);
        debug_assert_eq!(removed, Some(block), "cache index disagreed with block {block}");
        self.push_event(KvEvent::Removed { hash, block });
    }

    /// Buffers `event`; when the buffer is full, replaces it (and `event`) with one [`KvEvent::Cleared`].
    fn push_event(&mut self, event: KvEvent) {
        if self.events.len() >= self.events_max {
            self.events.clear();
            self.events.push(KvEvent::Cleared);
        } else {
            self.events.push(event);
        }
    }

    /// Appends `block` at the newest end of the LRU list.
    fn lru_push_back(&mut self, block: BlockId) {
        let tail = self.lru_tail;
        let meta = &mut self.blocks[block as usize];
        debug_assert!(meta.prev == NIL && meta.next == NIL, "block {block} is already linked");
        meta.prev = tail;
        meta.next = NIL;
        if tail == NIL {
            self.lru_head = block;
        } else {
            self.blocks[tail as usize].next = block;
        }
        self.lru_tail = block;
        self.lru_len += 1;
    }

    /// Removes `block` from anywhere in the LRU list.
    fn lru_unlink(&mut self, block: BlockId) {
        let BlockMeta { prev, next, .. } = self.blocks[block as usize];
        if prev == NIL {
            debug_assert_eq!(
                self.lru_head, block,
                "unlinking block {block}, which is not on the LRU list"
            );
            self.lru_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let meta = &mut self.blocks[block as usize];
        meta.prev = NIL;
        meta.next = NIL;
        self.lru_len -= 1;
    }

    /// Removes and returns the least recently released evictable block.
    fn lru_pop_front(&mut self) -> Option<BlockId> {
        let block = self.lru_head;
        if block == NIL {
            return None;
        }
        self.lru_unlink(block);
        Some(block)
    }
}

/// A summary rather than the per-block tables, which may hold 100k+ entries.
impl fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockPool")
            .field("n_blocks", &self.n_blocks())
            .field("block_size", &self.block_size)
            .field("n_in_use", &self.n_in_use)
            .field("n_available", &self.n_available())
            .field("n_cached", &self.n_cached())
            .field("n_events", &self.events.len())
            .finish()
    }
}
