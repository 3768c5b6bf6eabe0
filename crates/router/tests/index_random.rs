//! `KvIndex` against a naive reference (per worker a set of hashes; count leading blocks) over random event streams.
//!
//! The streams mimic engines: prompts that share prefixes (so blocks are held by many workers and the index's
//! bitsets grow and shrink), blocks stored in order and out of order, removals of held and unknown blocks, overflows
//! (`Cleared`), workers leaving, and a bound small enough to drop events.

use std::collections::{BTreeMap, BTreeSet};

use cleave_kv::{BlockHash, KvEvent, block_hashes};
use cleave_router::{KvIndex, KvIndexConfig, WorkerId};

const BLOCK_SIZE: usize = 2;
const N_BLOCKS: usize = 16;
const N_PROMPTS: usize = 12;
/// Enough workers that a shared block's bitset spans three words.
const N_WORKERS: u64 = 150;

/// SplitMix64, so a failure replays from the seed printed in the assertion.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The reference: what each worker holds, and the same bound rule as the index.
struct Naive {
    held: BTreeMap<u64, BTreeSet<BlockHash>>,
    indexed_blocks_max: usize,
    dropped: u64,
}

impl Naive {
    fn total(&self) -> usize {
        self.held.values().map(BTreeSet::len).sum()
    }

    fn apply(&mut self, worker: u64, event: &KvEvent) {
        match event {
            KvEvent::Stored { hash, .. } => {
                let total = self.total();
                let set = self.held.entry(worker).or_default();
                if set.contains(hash) {
                    return;
                }
                if total >= self.indexed_blocks_max {
                    self.dropped += 1;
                    return;
                }
                set.insert(*hash);
            }
            KvEvent::Removed { hash, .. } => {
                if let Some(set) = self.held.get_mut(&worker) {
                    set.remove(hash);
                }
            }
            KvEvent::Cleared => {
                if let Some(set) = self.held.get_mut(&worker) {
                    set.clear();
                }
            }
        }
    }

    fn overlaps(&self, request: &[BlockHash]) -> Vec<(u64, usize)> {
        self.held
            .iter()
            .map(|(&w, set)| (w, request.iter().take_while(|h| set.contains(h)).count()))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// Prompts forming a tree: each shares a random-length prefix with an earlier one, then goes its own way.
fn prompts(rng: &mut Rng) -> Vec<Vec<BlockHash>> {
    let n_tokens = N_BLOCKS * BLOCK_SIZE;
    let mut token_lists: Vec<Vec<u32>> = Vec::new();
    for p in 0..N_PROMPTS {
        let shared = if p == 0 {
            0
        } else {
            rng.below(N_BLOCKS + 1) * BLOCK_SIZE
        };
        let mut tokens: Vec<u32> = if p == 0 {
            Vec::new()
        } else {
            token_lists[rng.below(p)][..shared].to_vec()
        };
        tokens.extend((shared..n_tokens).map(|_| rng.next() as u32));
        token_lists.push(tokens);
    }
    token_lists.iter().map(|t| block_hashes(t, BLOCK_SIZE)).collect()
}

fn stored(hashes: &[BlockHash], i: usize) -> KvEvent {
    KvEvent::Stored {
        hash: hashes[i],
        parent: i.checked_sub(1).map(|p| hashes[p]),
        block: 0,
    }
}

fn run(seed: u64, n_ops: usize, indexed_blocks_max: usize) {
    let mut rng = Rng(seed);
    let prompts = prompts(&mut rng);
    let config = KvIndexConfig {
        indexed_blocks_max,
        workers_max: N_WORKERS as usize,
        ..KvIndexConfig::default()
    };
    let mut index = KvIndex::new(config);
    let mut naive = Naive {
        held: BTreeMap::new(),
        indexed_blocks_max,
        dropped: 0,
    };
    let (mut n_queries, mut widest_query) = (0, 0);
    for op in 0..n_ops {
        let worker = rng.next() % N_WORKERS;
        let prompt = &prompts[rng.below(N_PROMPTS)];
        let roll = rng.below(1000);
        let mut events = Vec::new();
        if roll < 350 {
            // An engine caching a prompt's blocks in order, usually from the first (a new prompt), sometimes from
            // some point on (a prompt extending a cached prefix).
            let from = if rng.below(4) == 0 { rng.below(N_BLOCKS) } else { 0 };
            let to = rng.below(N_BLOCKS + 1);
            events.extend((from..to).map(|i| stored(prompt, i)));
        } else if roll < 450 {
            events.push(stored(prompt, rng.below(N_BLOCKS)));
        } else if roll < 580 {
            // Usually a block the worker holds (eviction), sometimes one it does not.
            let held: Vec<BlockHash> = naive.held.get(&worker).into_iter().flatten().copied().collect();
            let hash = if !held.is_empty() && rng.below(10) < 8 {
                held[rng.below(held.len())]
            } else {
                prompt[rng.below(N_BLOCKS)]
            };
            events.push(KvEvent::Removed { hash, block: 0 });
        } else if roll < 588 {
            events.push(KvEvent::Cleared);
        } else if roll < 590 {
            index.remove_worker(WorkerId(worker));
            naive.held.remove(&worker);
        } else {
            // A query: a prefix of a prompt, sometimes diverging after it.
            let mut request = prompt[..rng.below(N_BLOCKS + 1)].to_vec();
            if rng.below(4) == 0 {
                request.extend(block_hashes(&[rng.next() as u32; BLOCK_SIZE * 3], BLOCK_SIZE));
            }
            let got: Vec<(u64, usize)> = index.overlaps(&request).iter().map(|(w, n)| (w.0, n)).collect();
            assert_eq!(got, naive.overlaps(&request), "seed {seed}, op {op}: overlaps differ");
            n_queries += 1;
            widest_query = widest_query.max(got.len());
        }
        for event in &events {
            index.apply(WorkerId(worker), event);
            naive.apply(worker, event);
        }
        if op % 97 == 0 {
            let stats = index.stats();
            let union: BTreeSet<BlockHash> = naive.held.values().flatten().copied().collect();
            assert_eq!(stats.n_indexed_blocks, naive.total(), "seed {seed}, op {op}");
            assert_eq!(stats.n_unique_blocks, union.len(), "seed {seed}, op {op}");
            assert_eq!(stats.stored_dropped, naive.dropped, "seed {seed}, op {op}");
        }
    }
    assert!(n_queries > n_ops / 5, "only {n_queries} queries");
    // The streams must reach the interesting states: blocks shared widely enough for multi-word bitsets, and (with
    // a bound) dropped events.
    let widest_min = if indexed_blocks_max == usize::MAX { 128 } else { 64 };
    assert!(
        widest_query > widest_min,
        "seed {seed}: at most {widest_query} workers matched a query"
    );
    assert!(
        indexed_blocks_max == usize::MAX || naive.dropped > 0,
        "seed {seed}: the bound never dropped"
    );
}

#[test]
fn overlaps_match_the_naive_reference_over_random_events() {
    for seed in 0..4 {
        run(seed, 20_000, usize::MAX);
    }
}

#[test]
fn overlaps_match_the_naive_reference_when_the_bound_drops_events() {
    for seed in 100..104 {
        run(seed, 20_000, 600);
    }
}
