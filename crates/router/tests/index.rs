//! `KvIndex`: overlap counting, the three events, worker removal and the bounds.

use cleave_kv::{BlockHash, KvEvent, block_hashes};
use cleave_router::{KvIndex, KvIndexConfig, WorkerId};

const BLOCK_SIZE: usize = 4;

/// Block hashes of a prompt of `n_blocks` blocks whose tokens are `first_token, first_token + 1, ...`.
fn chain(first_token: u32, n_blocks: usize) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (first_token..).take(n_blocks * BLOCK_SIZE).collect();
    block_hashes(&tokens, BLOCK_SIZE)
}

fn stored(hashes: &[BlockHash], i: usize) -> KvEvent {
    KvEvent::Stored {
        hash: hashes[i],
        parent: i.checked_sub(1).map(|p| hashes[p]),
        block: i as u32,
    }
}

fn removed(hash: BlockHash) -> KvEvent {
    KvEvent::Removed { hash, block: 0 }
}

fn store_blocks(index: &mut KvIndex, worker: WorkerId, hashes: &[BlockHash], blocks: impl IntoIterator<Item = usize>) {
    for i in blocks {
        index.apply(worker, &stored(hashes, i));
    }
}

/// `(worker id, leading blocks)` for every worker with at least one.
fn scores(index: &KvIndex, hashes: &[BlockHash]) -> Vec<(u64, usize)> {
    index.overlaps(hashes).iter().map(|(w, n)| (w.0, n)).collect()
}

#[test]
fn overlap_counts_leading_blocks_per_worker_and_stops_at_the_first_gap() {
    let request = chain(0, 6);
    let mut index = KvIndex::default();
    store_blocks(&mut index, WorkerId(1), &request, 0..4);
    store_blocks(&mut index, WorkerId(2), &request, 0..2);
    store_blocks(&mut index, WorkerId(3), &request, [0, 1, 3, 4, 5]); // lacks block 2
    store_blocks(&mut index, WorkerId(4), &request, 1..6); // lacks block 0
    store_blocks(&mut index, WorkerId(5), &request, 0..6);

    assert_eq!(scores(&index, &request), [(1, 4), (2, 2), (3, 2), (5, 6)]);
    let overlaps = index.overlaps(&request);
    assert_eq!((overlaps.get(WorkerId(4)), overlaps.get(WorkerId(99))), (0, 0));

    // A shorter request is capped at its own length.
    assert_eq!(scores(&index, &request[..3]), [(1, 3), (2, 2), (3, 2), (5, 3)]);
}

#[test]
fn a_request_diverging_from_a_cached_chain_matches_only_the_shared_blocks() {
    let cached = chain(0, 6);
    let mut index = KvIndex::default();
    store_blocks(&mut index, WorkerId(1), &cached, 0..6);

    // Same first 2 blocks (8 tokens), different third: every later hash differs because hashes are chained.
    let mut tokens: Vec<u32> = (0..24).collect();
    tokens[9] = 1000;
    let request = block_hashes(&tokens, BLOCK_SIZE);
    assert_eq!(request[..2], cached[..2]);
    assert_eq!(scores(&index, &request), [(1, 2)]);

    // Nothing shared: no worker listed.
    assert!(index.overlaps(&chain(500, 6)).is_empty());
    assert!(index.overlaps(&[]).is_empty());
}

#[test]
fn a_block_shared_by_many_workers_counts_each_of_them() {
    // 300 workers each hold a prefix of length worker % 7 of one chain: the shared blocks become bitsets.
    let request = chain(0, 6);
    let mut index = KvIndex::default();
    for w in 0..300u64 {
        store_blocks(&mut index, WorkerId(w), &request, 0..(w % 7) as usize);
    }
    let overlaps = index.overlaps(&request);
    for w in 0..300u64 {
        assert_eq!(overlaps.get(WorkerId(w)), ((w % 7) as usize).min(6), "worker {w}");
    }
    assert_eq!(overlaps.len(), 300 - 300usize.div_ceil(7));
}

#[test]
fn removed_event_cuts_the_workers_prefix_at_that_block() {
    let request = chain(0, 5);
    let mut index = KvIndex::default();
    store_blocks(&mut index, WorkerId(1), &request, 0..5);
    store_blocks(&mut index, WorkerId(2), &request, 0..5);

    index.apply(WorkerId(1), &removed(request[2]));
    assert_eq!(scores(&index, &request), [(1, 2), (2, 5)]);

    // Re-storing the block restores the whole prefix (blocks 3 and 4 were kept).
    index.apply(WorkerId(1), &stored(&request, 2));
    assert_eq!(scores(&index, &request), [(1, 5), (2, 5)]);

    let before = index.stats();
    index.apply(WorkerId(1), &removed(chain(900, 1)[0]));
    index.apply(WorkerId(7), &removed(request[0]));
    let after = index.stats();
    assert_eq!(after.removed_unknown, before.removed_unknown + 2);
    assert_eq!(after.n_indexed_blocks, before.n_indexed_blocks);
}

#[test]
fn removing_the_last_holder_drops_the_node() {
    let request = chain(0, 3);
    let mut index = KvIndex::default();
    store_blocks(&mut index, WorkerId(1), &request, 0..3);
    store_blocks(&mut index, WorkerId(2), &request, 0..1);
    assert_eq!((index.stats().n_unique_blocks, index.stats().n_indexed_blocks), (3, 4));
    for &hash in &request {
        index.apply(WorkerId(1), &removed(hash));
    }
    assert_eq!((index.stats().n_unique_blocks, index.stats().n_indexed_blocks), (1, 1));
    assert_eq!(scores(&index, &request), [(2, 1)]);
}

#[test]
fn cleared_forgets_everything_of_that_worker_only() {
    let request = chain(0, 4);
    let mut index = KvIndex::default();
    store_blocks(&mut index, WorkerId(1), &request, 0..4);
    store_blocks(&mut index, WorkerId(2), &request, 0..3);
    index.apply(WorkerId(1), &KvEvent::Cleared);
    assert_eq!(scores(&index, &request), [(2, 3)]);
    assert_eq!(index.n_blocks_of(WorkerId(1)), 0);
    assert_eq!(index.stats().n_unique_blocks, 3);

    // The worker announces again after the overflow; its later removals of pre-overflow blocks are harmless.
    store_blocks(&mut index, WorkerId(1), &request, 0..2);
    index.apply(WorkerId(1), &removed(request[3]));
    assert_eq!(scores(&index, &request), [(1, 2), (2, 3)]);
    assert_eq!(index.stats().removed_unknown, 1);
}

#[test]
fn remove_worker_forgets_its_blocks_and_frees_its_slot_for_another() {
    let request = chain(0, 4);
    let mut index = KvIndex::default();
    store_blocks(&mut index, WorkerId(1), &request, 0..4);
    store_blocks(&mut index, WorkerId(2), &request, 0..2);
    assert!(index.remove_worker(WorkerId(1)));
    assert!(!index.remove_worker(WorkerId(1)));
    assert_eq!(scores(&index, &request), [(2, 2)]);
    assert_eq!(index.stats().n_workers, 1);
    assert_eq!(index.stats().n_unique_blocks, 2);

    // A new worker may reuse the freed slot; it must not inherit anything.
    index.apply(WorkerId(3), &stored(&request, 0));
    assert_eq!(scores(&index, &request), [(2, 2), (3, 1)]);
}

#[test]
fn a_block_stored_before_its_parent_counts_once_the_parent_arrives() {
    let request = chain(0, 3);
    let mut index = KvIndex::default();
    // The parent is unknown to the index (its event was lost): the child is kept but cannot be reached yet.
    index.apply(WorkerId(1), &stored(&request, 1));
    assert!(index.overlaps(&request).is_empty());
    assert_eq!(index.n_blocks_of(WorkerId(1)), 1);
    index.apply(WorkerId(1), &stored(&request, 0));
    assert_eq!(scores(&index, &request), [(1, 2)]);
}

#[test]
fn repeated_stored_events_are_idempotent() {
    let request = chain(0, 2);
    let mut index = KvIndex::default();
    for _ in 0..3 {
        store_blocks(&mut index, WorkerId(1), &request, 0..2);
    }
    assert_eq!(index.stats().n_indexed_blocks, 2);
    index.apply(WorkerId(1), &removed(request[1]));
    assert_eq!(scores(&index, &request), [(1, 1)]);
}

#[test]
fn stored_events_beyond_the_bound_are_dropped_and_counted() {
    let request = chain(0, 4);
    let config = KvIndexConfig {
        indexed_blocks_max: 5,
        ..KvIndexConfig::default()
    };
    let mut index = KvIndex::new(config);
    store_blocks(&mut index, WorkerId(1), &request, 0..4);
    store_blocks(&mut index, WorkerId(2), &request, 0..4); // only block 0 fits
    let stats = index.stats();
    assert_eq!((stats.n_indexed_blocks, stats.stored_dropped), (5, 3));
    // The dropped blocks make worker 2 look like it holds less than it does: an under-estimate.
    assert_eq!(scores(&index, &request), [(1, 4), (2, 1)]);

    // A repeat of a held block is not a new entry, so it is not dropped.
    index.apply(WorkerId(2), &stored(&request, 0));
    assert_eq!(index.stats().stored_dropped, 3);

    // Room freed by a removal is usable again.
    index.apply(WorkerId(1), &removed(request[3]));
    index.apply(WorkerId(2), &stored(&request, 1));
    assert_eq!(scores(&index, &request), [(1, 3), (2, 2)]);
    assert_eq!(index.stats().n_indexed_blocks, 5);
}

#[test]
fn events_of_workers_beyond_workers_max_are_dropped_and_counted() {
    let request = chain(0, 1);
    let config = KvIndexConfig {
        workers_max: 2,
        ..KvIndexConfig::default()
    };
    let mut index = KvIndex::new(config);
    for w in 1..=3 {
        index.apply(WorkerId(w), &stored(&request, 0));
    }
    assert_eq!(scores(&index, &request), [(1, 1), (2, 1)]);
    assert_eq!(index.stats().events_dropped, 1);
    index.remove_worker(WorkerId(1));
    index.apply(WorkerId(3), &stored(&request, 0));
    assert_eq!(scores(&index, &request), [(2, 1), (3, 1)]);
}

#[test]
fn heap_estimate_grows_with_the_index_and_shrinks_after_clearing() {
    let mut index = KvIndex::default();
    let empty = index.heap_bytes_estimate();
    let request = chain(0, 1000);
    store_blocks(&mut index, WorkerId(1), &request, 0..1000);
    let full = index.heap_bytes_estimate();
    // At least the entry itself (8-byte key + 16-byte worker set) and the worker's copy of the hash.
    assert!(full - empty >= 1000 * (24 + 8), "{empty} -> {full} bytes");
    index.apply(WorkerId(1), &KvEvent::Cleared);
    assert!(index.heap_bytes_estimate() < full);
}

#[test]
fn reserved_unique_blocks_are_allocated_up_front() {
    let config = KvIndexConfig {
        reserved_unique_blocks: 10_000,
        ..KvIndexConfig::default()
    };
    let reserved = KvIndex::new(config).heap_bytes_estimate();
    // At least one 24-byte entry and its control byte per reserved block.
    assert!(reserved >= 10_000 * 25, "{reserved} bytes");
    assert!(KvIndex::default().heap_bytes_estimate() < 1_000);
}
