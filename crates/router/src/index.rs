//! [`KvIndex`]: which worker holds which cached KV block, and how much of a request's prefix each one holds.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use cleave_kv::{BlockHash, KvEvent};

use crate::hasher::{FastMap, FastSet, SeededState};
use crate::worker_set::{WorkerSet, bit_clear, bit_test, for_each_bit, for_each_bit_in_word};

/// A worker's identity as the router knows it (assigned by discovery; only equality and order matter here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

/// Limits of a [`KvIndex`]. Both bound memory; neither can make a routing decision wrong, only less informed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvIndexConfig {
    /// Most `(worker, block)` entries held at once, summed over workers (a block cached on 3 workers counts 3).
    /// A `Stored` event beyond it is dropped and counted in [`IndexStats::stored_dropped`]. At ~50 bytes per entry
    /// (see `docs/benchmarks.md`), the default of 4 Mi entries is ~200 MiB.
    pub indexed_blocks_max: usize,
    /// Most workers with index state at once. Events of a worker beyond it are dropped and counted in
    /// [`IndexStats::events_dropped`].
    pub workers_max: usize,
    /// Distinct blocks the node table is sized for at creation (default 0: grow on demand). The table grows by
    /// doubling, and a doubling rehashes every entry in one event's time: ~25 ms at a million distinct blocks on
    /// the 2-vCPU dev machine, during which no decision is made. A frontend that cannot afford that stall while the
    /// index warms up reserves what it expects to reach (~25 bytes per reserved block, paid up front).
    pub reserved_unique_blocks: usize,
}

impl Default for KvIndexConfig {
    fn default() -> Self {
        Self {
            indexed_blocks_max: 1 << 22,
            workers_max: 4096,
            reserved_unique_blocks: 0,
        }
    }
}

/// Counters and sizes of a [`KvIndex`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Workers with index state.
    pub n_workers: usize,
    /// Distinct block hashes held by at least one worker.
    pub n_unique_blocks: usize,
    /// `(worker, block)` entries: the quantity bounded by [`KvIndexConfig::indexed_blocks_max`].
    pub n_indexed_blocks: usize,
    /// `Stored` events refused because the index was full.
    pub stored_dropped: u64,
    /// `Removed` events for blocks the index did not hold for that worker (announced before a `Cleared`, or whose
    /// `Stored` was dropped): harmless, counted to make a lossy event path visible.
    pub removed_unknown: u64,
    /// Events refused because [`KvIndexConfig::workers_max`] workers already had state.
    pub events_dropped: u64,
}

/// For each worker, how many leading blocks of one request it holds. Only workers with at least one are listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlapScores {
    /// Sorted by worker id; counts are at least 1.
    scores: Vec<(WorkerId, u32)>,
}

impl OverlapScores {
    /// Leading blocks of the request that `worker` holds (0 if none, or if the worker is unknown).
    pub fn get(&self, worker: WorkerId) -> usize {
        match self.scores.binary_search_by_key(&worker, |&(w, _)| w) {
            Ok(pos) => self.scores[pos].1 as usize,
            Err(_) => 0,
        }
    }

    /// `(worker, leading blocks held)` for every worker holding at least the first block, by increasing worker id.
    pub fn iter(&self) -> impl Iterator<Item = (WorkerId, usize)> + '_ {
        self.scores.iter().map(|&(w, n)| (w, n as usize))
    }

    /// Number of workers holding at least the request's first block.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// Whether no worker holds the request's first block.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }
}

/// Which workers hold which cached KV blocks, built from the workers' [`KvEvent`]s; answers "how many leading blocks
/// of this request does each worker already have".
///
/// # Shape: a prefix tree keyed by chained hashes, stored flat
/// A block's [`BlockHash`] is chained: it names the block's tokens *and every block before it*. So a node of the
/// prefix tree over requests is fully named by its hash, and the map `hash → workers holding it` *is* the tree: the
/// edge to a node's parent is implied by the key (the parent is the unique block whose hash the child's was chained
/// on). Walking a request from the root is then one lookup per request block, exactly what a walk through explicit
/// per-node children maps would do, without storing those maps (~40 bytes per edge) or the intermediate nodes no
/// worker holds any more. A worker counts for the first `k` blocks of a request iff it holds all of blocks
/// `0..k`, which is also what its engine can reuse (`BlockPool::acquire_cached_prefix` stops at the first miss).
///
/// # Events
/// - `Stored { hash, .. }` adds the worker to `hash`'s node, creating the node if needed. `parent` is not needed to
///   place it (see above). A block whose parent the index does not hold for that worker is stored all the same: the
///   worker may hold the parent although the index missed it (its `Stored` was dropped by the bound, or was sent
///   before a `Cleared`), and such an orphan only counts in [`overlaps`](Self::overlaps) once every block before it
///   is known for that worker again, so it can never inflate a score.
/// - `Removed { hash, .. }` removes the worker from the node; a node with no workers left is dropped.
/// - `Cleared` forgets everything the worker holds (its engine lost events and will only announce what follows).
///
/// Events are idempotent per `(worker, hash)`: the engine announces each hash at most once per worker until it is
/// removed, and a repeat is ignored.
///
/// # Bounds
/// At most [`KvIndexConfig::indexed_blocks_max`] `(worker, block)` entries: beyond that a `Stored` is dropped and
/// counted. The index then believes the worker holds less than it does, so the router under-estimates that
/// worker's overlap and at worst sends a request where its prefix must be recomputed: slower, never wrong.
///
/// # Cost
/// [`overlaps`](Self::overlaps) does one hash lookup per request block until no worker is left, and intersects
/// the set of still-matching workers with each block's holders: a word-wise AND of bitsets while many workers
/// match (a prompt cached on all 1,000 workers costs 16 words per block), a check per surviving worker once few
/// do. Events cost O(1) each; `Cleared` and [`remove_worker`](Self::remove_worker) cost O(blocks the worker holds).
#[derive(Clone, Debug)]
pub struct KvIndex {
    config: KvIndexConfig,
    /// Block hash → the slots of the workers holding it. Never holds an empty set.
    nodes: FastMap<BlockHash, WorkerSet>,
    /// Per dense slot, the worker using it; `None` for a free slot. Slots keep bitsets small and dense.
    slots: Vec<Option<WorkerBlocks>>,
    /// Free slots, lowest first (reusing low slots keeps the bitsets short).
    free_slots: BinaryHeap<Reverse<u32>>,
    slot_of: FastMap<WorkerId, u32>,
    n_indexed_blocks: usize,
    stored_dropped: u64,
    removed_unknown: u64,
    events_dropped: u64,
}

/// What the index knows about one worker.
#[derive(Clone, Debug)]
struct WorkerBlocks {
    id: WorkerId,
    /// Every hash the worker holds, to undo them on `Cleared` or removal without scanning all nodes.
    hashes: FastSet<BlockHash>,
}

/// Reusable buffers for [`KvIndex::walk`], so a routing decision allocates nothing once warmed up.
#[derive(Clone, Debug, Default)]
pub(crate) struct WalkScratch {
    /// Output: `(slot, leading blocks held)` for every slot holding at least the first block, in no order.
    pub(crate) matched: Vec<(u32, u32)>,
    list: Vec<u32>,
    kept: Vec<u32>,
    bits: Vec<u64>,
}

/// How the walk currently holds the set of workers that matched every block so far.
#[derive(Clone, Copy)]
enum Active {
    /// `scratch.list`: a few slots.
    List,
    /// `scratch.bits`: a bitset.
    Bits,
}

impl KvIndex {
    /// An empty index.
    pub fn new(config: KvIndexConfig) -> Self {
        Self {
            config,
            nodes: FastMap::with_capacity_and_hasher(config.reserved_unique_blocks, SeededState::new()),
            slots: Vec::new(),
            free_slots: BinaryHeap::new(),
            slot_of: FastMap::with_hasher(SeededState::new()),
            n_indexed_blocks: 0,
            stored_dropped: 0,
            removed_unknown: 0,
            events_dropped: 0,
        }
    }

    /// The limits this index was made with.
    pub fn config(&self) -> &KvIndexConfig {
        &self.config
    }

    /// Applies one KV event published by `worker` (see the type's docs for each event's effect).
    pub fn apply(&mut self, worker: WorkerId, event: &KvEvent) {
        match *event {
            KvEvent::Stored { hash, .. } => {
                let Some(slot) = self.slot_or_insert(worker) else {
                    self.events_dropped += 1;
                    return;
                };
                self.store(slot, hash);
            }
            KvEvent::Removed { hash, .. } => match self.slot_of.get(&worker) {
                Some(&slot) => self.remove(slot, hash),
                None => self.removed_unknown += 1,
            },
            KvEvent::Cleared => {
                if let Some(&slot) = self.slot_of.get(&worker) {
                    self.clear(slot);
                }
            }
        }
    }

    /// Forgets `worker` and every block it holds (it died or left). Returns whether it was known.
    pub fn remove_worker(&mut self, worker: WorkerId) -> bool {
        let Some(slot) = self.slot_of.remove(&worker) else {
            return false;
        };
        self.clear(slot);
        self.slots[slot as usize] = None;
        self.free_slots.push(Reverse(slot));
        true
    }

    /// For each worker, the number of leading blocks of the request (`hashes`, its chained block hashes from the
    /// first block on) that it holds; a worker stops counting at the first block it lacks.
    ///
    /// O(`hashes.len()` + workers matching), see the type's docs. Allocates the result; the router uses an internal
    /// variant that reuses buffers.
    pub fn overlaps(&self, hashes: &[BlockHash]) -> OverlapScores {
        let mut scratch = WalkScratch::default();
        self.walk(hashes, &mut scratch);
        let mut scores: Vec<(WorkerId, u32)> = scratch
            .matched
            .iter()
            .map(|&(slot, n)| (self.worker_at(slot), n))
            .collect();
        scores.sort_unstable();
        OverlapScores { scores }
    }

    /// Blocks the index holds for `worker` (0 if unknown).
    pub fn n_blocks_of(&self, worker: WorkerId) -> usize {
        self.slot_of
            .get(&worker)
            .map_or(0, |&slot| self.worker_blocks(slot).hashes.len())
    }

    /// Counters and sizes.
    pub fn stats(&self) -> IndexStats {
        IndexStats {
            n_workers: self.slot_of.len(),
            n_unique_blocks: self.nodes.len(),
            n_indexed_blocks: self.n_indexed_blocks,
            stored_dropped: self.stored_dropped,
            removed_unknown: self.removed_unknown,
            events_dropped: self.events_dropped,
        }
    }

    /// An estimate of the heap bytes the index owns, from its tables' capacities (hashbrown stores one control
    /// byte per bucket besides the entry). Excludes allocator overhead; the benchmark also measures RSS. Visits
    /// every node, O(distinct blocks): for an occasional metrics scrape, not for every decision.
    pub fn heap_bytes_estimate(&self) -> usize {
        let node_entry = size_of::<(BlockHash, WorkerSet)>() + 1;
        let nodes = self.nodes.capacity() * node_entry + self.nodes.values().map(WorkerSet::heap_bytes).sum::<usize>();
        let per_worker: usize = self
            .slots
            .iter()
            .flatten()
            .map(|w| w.hashes.capacity() * (size_of::<BlockHash>() + 1))
            .sum();
        let slots = self.slots.capacity() * size_of::<Option<WorkerBlocks>>()
            + self.slot_of.capacity() * (size_of::<(WorkerId, u32)>() + 1);
        nodes + per_worker + slots
    }

    /// The slot of `worker`, giving it one if it has none and the worker limit allows.
    pub(crate) fn slot_or_insert(&mut self, worker: WorkerId) -> Option<u32> {
        if let Some(&slot) = self.slot_of.get(&worker) {
            return Some(slot);
        }
        if self.slot_of.len() >= self.config.workers_max {
            return None;
        }
        let blocks = WorkerBlocks {
            id: worker,
            hashes: FastSet::with_hasher(SeededState::new()),
        };
        let slot = match self.free_slots.pop() {
            Some(Reverse(slot)) => {
                self.slots[slot as usize] = Some(blocks);
                slot
            }
            None => {
                let slot = u32::try_from(self.slots.len()).expect("workers_max keeps slots far below u32::MAX");
                self.slots.push(Some(blocks));
                slot
            }
        };
        self.slot_of.insert(worker, slot);
        Some(slot)
    }

    /// One past the highest slot in use or ever used: the length of a dense per-slot array.
    pub(crate) fn slot_capacity(&self) -> usize {
        self.slots.len()
    }

    /// Fills `scratch.matched` with `(slot, leading blocks held)` for every worker holding `hashes[0]`.
    ///
    /// The set of workers that matched every block so far only shrinks. While it is large it is a bitset ANDed
    /// word by word with each block's holders (those that drop out are read off `old & !holders`); once it is no
    /// bigger than the bitset has words, it becomes a list checked member by member. Either way the walk ends at the
    /// first block no active worker holds.
    pub(crate) fn walk(&self, hashes: &[BlockHash], scratch: &mut WalkScratch) {
        let WalkScratch {
            matched,
            list,
            kept,
            bits,
        } = scratch;
        matched.clear();
        let Some((first, rest)) = hashes.split_first() else {
            return;
        };
        let Some(first_set) = self.nodes.get(first) else {
            return;
        };
        let mut active = match first_set {
            WorkerSet::Inline { len, slots } => {
                list.clear();
                list.extend_from_slice(&slots[..usize::from(*len)]);
                Active::List
            }
            WorkerSet::Bits(set) => {
                bits.clear();
                bits.extend_from_slice(&set.words);
                Active::Bits
            }
        };
        // Every active worker holds blocks 0..depth.
        let mut depth = 1u32;
        for hash in rest {
            let Some(holders) = self.nodes.get(hash) else {
                break;
            };
            match (active, holders) {
                (Active::List, _) => {
                    list.retain(|&slot| {
                        let keep = holders.contains(slot);
                        if !keep {
                            matched.push((slot, depth));
                        }
                        keep
                    });
                    if list.is_empty() {
                        return;
                    }
                }
                (Active::Bits, WorkerSet::Inline { len, slots }) => {
                    // At most INLINE_MAX survive: move them out of the bitset, then everyone left in it dropped out.
                    kept.clear();
                    for &slot in &slots[..usize::from(*len)] {
                        if bit_test(bits, slot) {
                            kept.push(slot);
                            bit_clear(bits, slot);
                        }
                    }
                    for_each_bit(bits, |slot| matched.push((slot, depth)));
                    std::mem::swap(list, kept);
                    active = Active::List;
                    if list.is_empty() {
                        return;
                    }
                }
                (Active::Bits, WorkerSet::Bits(set)) => {
                    let mut count = 0u32;
                    for (word_idx, word) in bits.iter_mut().enumerate() {
                        let held = set.words.get(word_idx).copied().unwrap_or(0);
                        let dropped = *word & !held;
                        if dropped != 0 {
                            for_each_bit_in_word(word_idx, dropped, &mut |slot| matched.push((slot, depth)));
                        }
                        *word &= held;
                        count += word.count_ones();
                    }
                    if count == 0 {
                        return;
                    }
                    active = if count as usize <= bits.len() {
                        list.clear();
                        for_each_bit(bits, |slot| list.push(slot));
                        Active::List
                    } else {
                        Active::Bits
                    };
                }
            }
            depth += 1;
        }
        match active {
            Active::List => matched.extend(list.iter().map(|&slot| (slot, depth))),
            Active::Bits => for_each_bit(bits, |slot| matched.push((slot, depth))),
        }
    }

    fn worker_at(&self, slot: u32) -> WorkerId {
        self.worker_blocks(slot).id
    }

    fn worker_blocks(&self, slot: u32) -> &WorkerBlocks {
        self.slots[slot as usize]
            .as_ref()
            .expect("slots reachable from slot_of or a node are in use")
    }

    fn store(&mut self, slot: u32, hash: BlockHash) {
        let worker = self.slots[slot as usize]
            .as_mut()
            .expect("slot_of points at a used slot");
        if worker.hashes.contains(&hash) {
            return;
        }
        if self.n_indexed_blocks >= self.config.indexed_blocks_max {
            self.stored_dropped += 1;
            return;
        }
        worker.hashes.insert(hash);
        self.n_indexed_blocks += 1;
        match self.nodes.get_mut(&hash) {
            Some(holders) => {
                let inserted = holders.insert(slot);
                debug_assert!(inserted, "node and worker set disagree on {hash:?}");
            }
            None => {
                self.nodes.insert(hash, WorkerSet::one(slot));
            }
        }
    }

    fn remove(&mut self, slot: u32, hash: BlockHash) {
        let worker = self.slots[slot as usize]
            .as_mut()
            .expect("slot_of points at a used slot");
        if !worker.hashes.remove(&hash) {
            self.removed_unknown += 1;
            return;
        }
        self.n_indexed_blocks -= 1;
        Self::remove_from_node(&mut self.nodes, slot, hash);
    }

    /// Forgets every block of the worker in `slot`, keeping the slot.
    fn clear(&mut self, slot: u32) {
        let worker = self.slots[slot as usize]
            .as_mut()
            .expect("slot_of points at a used slot");
        // Take the set rather than draining it, so a worker that held a million blocks gives that memory back.
        let hashes = std::mem::replace(&mut worker.hashes, FastSet::with_hasher(SeededState::new()));
        self.n_indexed_blocks -= hashes.len();
        for hash in hashes {
            Self::remove_from_node(&mut self.nodes, slot, hash);
        }
    }

    fn remove_from_node(nodes: &mut FastMap<BlockHash, WorkerSet>, slot: u32, hash: BlockHash) {
        let holders = nodes.get_mut(&hash).expect("a hash a worker holds has a node");
        let removed = holders.remove(slot);
        assert!(
            removed,
            "node for {hash:?} lacks slot {slot} that the worker's set lists"
        );
        if holders.is_empty() {
            nodes.remove(&hash);
        }
    }
}

impl Default for KvIndex {
    fn default() -> Self {
        Self::new(KvIndexConfig::default())
    }
}
