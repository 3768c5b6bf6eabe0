//! Block pool behaviour: allocation, prefix reuse, LRU eviction, registration, events and misuse.

use cleave_kv::{BlockHash, BlockId, BlockPool, BlockPoolConfig, KvError, KvEvent, block_hashes};

fn pool(n_blocks: usize, block_size: usize) -> BlockPool {
    BlockPool::new(BlockPoolConfig {
        n_blocks,
        block_size,
        events_max: 1024,
    })
    .expect("valid config")
}

/// Allocates one block per hash, registers each under its chained hash and returns the block table.
fn fill_and_register(pool: &mut BlockPool, hashes: &[BlockHash]) -> Vec<BlockId> {
    let blocks = pool.allocate_n(hashes.len()).expect("room for the sequence");
    for (i, (&block, &hash)) in blocks.iter().zip(hashes).enumerate() {
        let parent = i.checked_sub(1).map(|p| hashes[p]);
        assert!(pool.register(block, hash, parent));
    }
    blocks
}

#[test]
fn invalid_configs_are_errors_naming_the_value() {
    let config = |n_blocks, block_size, events_max| BlockPoolConfig {
        n_blocks,
        block_size,
        events_max,
    };
    assert_eq!(BlockPool::new(config(0, 16, 8)).unwrap_err(), KvError::ZeroBlocks);
    assert_eq!(BlockPool::new(config(8, 0, 8)).unwrap_err(), KvError::ZeroBlockSize);
    assert_eq!(BlockPool::new(config(8, 16, 0)).unwrap_err(), KvError::ZeroEventsMax);
    assert!(KvError::ZeroBlocks.to_string().contains("n_blocks is 0"));
    assert!(KvError::ZeroBlockSize.to_string().contains("block_size is 0"));
    assert!(KvError::ZeroEventsMax.to_string().contains("events_max is 0"));
}

#[test]
#[cfg(target_pointer_width = "64")]
fn more_blocks_than_u32_ids_is_an_error() {
    let n_blocks = u32::MAX as usize + 1;
    let err = BlockPool::new(BlockPoolConfig {
        n_blocks,
        block_size: 16,
        events_max: 8,
    })
    .unwrap_err();
    assert_eq!(err, KvError::TooManyBlocks { n_blocks });
    assert!(err.to_string().contains("4294967296"), "{err}");
}

#[test]
fn a_new_pool_has_every_block_available() {
    let pool = pool(10, 16);
    assert_eq!((pool.n_blocks(), pool.block_size()), (10, 16));
    assert_eq!((pool.n_available(), pool.n_in_use(), pool.n_cached()), (10, 0, 0));
    pool.debug_check_invariants();
}

#[test]
fn allocate_until_empty_then_none() {
    let mut pool = pool(3, 4);
    let blocks: Vec<_> = (0..3).map(|_| pool.allocate().expect("block available")).collect();
    assert_eq!(blocks, [0, 1, 2]);
    assert_eq!(pool.allocate(), None);
    assert_eq!((pool.n_available(), pool.n_in_use()), (0, 3));
    pool.release(1);
    assert_eq!(pool.allocate(), Some(1));
    pool.debug_check_invariants();
}

#[test]
fn allocate_n_is_all_or_nothing() {
    let mut pool = pool(4, 4);
    // An evictable cached block counts as available, and a failed allocate_n must not evict it.
    let hashes = block_hashes(&[1, 2, 3, 4], 4);
    let cached = fill_and_register(&mut pool, &hashes);
    pool.release_all(&cached);
    let held = pool.allocate_n(2).expect("2 of 4 available");
    assert_eq!(pool.allocate_n(3), None);
    assert_eq!((pool.n_available(), pool.n_in_use(), pool.n_cached()), (2, 2, 1));
    assert_eq!(pool.cached_prefix_len(&hashes), 1);
    pool.drain_events();
    assert_eq!(pool.allocate_n(2).map(|b| b.len()), Some(2));
    assert_eq!(
        pool.drain_events(),
        [KvEvent::Removed {
            hash: hashes[0],
            block: cached[0]
        }]
    );
    assert_eq!(pool.allocate_n(0), Some(vec![]));
    pool.release_all(&held);
    pool.debug_check_invariants();
}

#[test]
fn a_second_sequence_reuses_the_cached_prefix() {
    let mut pool = pool(8, 4);
    let prompt_a: Vec<u32> = (0..12).collect();
    let mut prompt_b = prompt_a[..8].to_vec();
    prompt_b.extend([100, 101, 102, 103]);
    let hashes_a = block_hashes(&prompt_a, 4);
    let hashes_b = block_hashes(&prompt_b, 4);

    let blocks_a = fill_and_register(&mut pool, &hashes_a);
    assert_eq!(pool.cached_prefix_len(&hashes_b), 2);
    let reused = pool.acquire_cached_prefix(&hashes_b);
    assert_eq!(reused, blocks_a[..2]);
    assert_eq!(pool.refcount(blocks_a[0]), 2);
    assert_eq!(pool.refcount(blocks_a[2]), 1);
    assert_eq!(pool.n_in_use(), 3);

    // Once A is gone, B still holds the shared blocks; A's last block becomes evictable but stays cached.
    pool.release_all(&blocks_a);
    assert_eq!(pool.refcount(blocks_a[0]), 1);
    assert_eq!((pool.n_in_use(), pool.n_cached(), pool.n_available()), (2, 3, 6));
    assert_eq!(pool.acquire_cached_prefix(&hashes_a), blocks_a);
    pool.debug_check_invariants();
}

#[test]
fn prefix_matching_stops_at_the_first_miss() {
    let mut pool = pool(8, 2);
    let hashes = block_hashes(&[1, 2, 3, 4, 5, 6], 2);
    let blocks = fill_and_register(&mut pool, &hashes);
    pool.release_all(&blocks);
    // Evict the middle block: the last one is still cached but unreachable.
    pool.acquire_cached_prefix(&hashes); // take all three off the LRU list ...
    pool.release(blocks[1]); // ... and put back only the middle one
    let mut fresh = pool.allocate_n(6).expect("5 free + 1 evictable");
    assert_eq!(pool.cached_prefix_len(&hashes), 1);
    assert_eq!(pool.acquire_cached_prefix(&hashes), [blocks[0]]);
    fresh.extend([blocks[0], blocks[0], blocks[2]]);
    pool.release_all(&fresh);
    assert_eq!((pool.n_in_use(), pool.n_available()), (0, 8));
    pool.debug_check_invariants();
}

#[test]
fn eviction_takes_the_least_recently_released_block_first() {
    let mut pool = pool(3, 1);
    let hashes = block_hashes(&[10, 20, 30], 1);
    let blocks = fill_and_register(&mut pool, &hashes);
    pool.drain_events();
    // Release order 1, 0, 2: that is the eviction order.
    pool.release(blocks[1]);
    pool.release(blocks[0]);
    pool.release(blocks[2]);
    // Re-acquiring block 0 and releasing it again makes it the most recently released.
    assert_eq!(pool.acquire_cached_prefix(&hashes[..1]), [blocks[0]]);
    pool.release(blocks[0]);

    let order: Vec<_> = (0..3).map(|_| pool.allocate().expect("evictable block")).collect();
    assert_eq!(order, [blocks[1], blocks[2], blocks[0]]);
    assert_eq!(
        pool.drain_events(),
        [
            KvEvent::Removed {
                hash: hashes[1],
                block: blocks[1]
            },
            KvEvent::Removed {
                hash: hashes[2],
                block: blocks[2]
            },
            KvEvent::Removed {
                hash: hashes[0],
                block: blocks[0]
            },
        ]
    );
    assert_eq!(pool.n_cached(), 0);
    pool.debug_check_invariants();
}

#[test]
fn free_blocks_are_used_before_cached_ones_are_evicted() {
    let mut pool = pool(3, 1);
    let hashes = block_hashes(&[10], 1);
    let cached = fill_and_register(&mut pool, &hashes);
    pool.release_all(&cached);
    let fresh = pool.allocate_n(2).expect("2 free blocks");
    assert!(!fresh.contains(&cached[0]));
    assert_eq!(pool.cached_prefix_len(&hashes), 1);
}

#[test]
fn release_all_releases_the_last_block_first_so_prefixes_are_evicted_from_the_tail() {
    let mut pool = pool(3, 1);
    let hashes = block_hashes(&[1, 2, 3], 1);
    let blocks = fill_and_register(&mut pool, &hashes);
    pool.release_all(&blocks);
    let evicted = pool.allocate().expect("evictable block");
    assert_eq!(evicted, blocks[2]);
    assert_eq!(pool.cached_prefix_len(&hashes), 2);
}

#[test]
fn registering_a_duplicate_hash_keeps_the_existing_entry() {
    let mut pool = pool(4, 4);
    let hashes = block_hashes(&[1, 2, 3, 4], 4);
    // Two sequences computed the same block concurrently.
    let [first, second] = [pool.allocate().expect("free"), pool.allocate().expect("free")];
    assert!(pool.register(first, hashes[0], None));
    assert!(!pool.register(second, hashes[0], None));
    assert_eq!(pool.n_cached(), 1);
    assert_eq!(
        pool.drain_events(),
        [KvEvent::Stored {
            hash: hashes[0],
            parent: None,
            block: first
        }]
    );

    // The loser is uncached: it goes back to the free list, with no event.
    pool.release(second);
    pool.release(first);
    assert_eq!(pool.acquire_cached_prefix(&hashes), [first]);
    assert_eq!(pool.drain_events(), []);
    assert_eq!((pool.n_cached(), pool.n_in_use(), pool.n_available()), (1, 1, 3));
    pool.debug_check_invariants();
}

#[test]
fn stored_events_carry_the_parent_hash() {
    let mut pool = pool(4, 2);
    let hashes = block_hashes(&[1, 2, 3, 4], 2);
    let blocks = fill_and_register(&mut pool, &hashes);
    assert_eq!(
        pool.drain_events(),
        [
            KvEvent::Stored {
                hash: hashes[0],
                parent: None,
                block: blocks[0]
            },
            KvEvent::Stored {
                hash: hashes[1],
                parent: Some(hashes[0]),
                block: blocks[1]
            },
        ]
    );
    assert_eq!(pool.drain_events(), []);
}

#[test]
fn event_overflow_drops_the_buffer_and_records_one_cleared() {
    let mut pool = BlockPool::new(BlockPoolConfig {
        n_blocks: 16,
        block_size: 1,
        events_max: 3,
    })
    .expect("valid");
    let tokens: Vec<u32> = (0..10).collect();
    let hashes = block_hashes(&tokens, 1);
    let blocks = fill_and_register(&mut pool, &hashes[..3]);
    assert_eq!(pool.drain_events().len(), 3);

    // 3 fit; the 4th overflows, replacing all of them with Cleared; later events follow it.
    let more = pool.allocate_n(5).expect("room");
    for (i, &block) in more.iter().enumerate() {
        pool.register(block, hashes[3 + i], Some(hashes[2 + i]));
    }
    assert_eq!(
        pool.drain_events(),
        [
            KvEvent::Cleared,
            KvEvent::Stored {
                hash: hashes[7],
                parent: Some(hashes[6]),
                block: more[4]
            }
        ]
    );
    pool.release_all(&blocks);
    pool.release_all(&more);
    pool.debug_check_invariants();
}

#[test]
fn clear_cache_evicts_only_unreferenced_cached_blocks() {
    let mut pool = pool(4, 1);
    let hashes = block_hashes(&[1, 2, 3], 1);
    let blocks = fill_and_register(&mut pool, &hashes);
    pool.release(blocks[2]);
    pool.release(blocks[1]);
    pool.drain_events();
    pool.clear_cache();
    assert_eq!(
        pool.drain_events(),
        [
            KvEvent::Removed {
                hash: hashes[2],
                block: blocks[2]
            },
            KvEvent::Removed {
                hash: hashes[1],
                block: blocks[1]
            }
        ]
    );
    assert_eq!((pool.n_cached(), pool.n_in_use(), pool.n_available()), (1, 1, 3));
    assert_eq!(pool.cached_prefix_len(&hashes), 1);
    pool.debug_check_invariants();
}

#[test]
#[should_panic(expected = "block 0 has refcount 0")]
fn releasing_an_unreferenced_block_panics() {
    let mut pool = pool(2, 4);
    let block = pool.allocate().expect("free");
    pool.release(block);
    pool.release(block);
}

#[test]
#[should_panic(expected = "block 5 is out of range")]
fn releasing_a_block_out_of_range_panics() {
    pool(2, 4).release(5);
}

#[test]
#[should_panic(expected = "has refcount 0; only a held block can be registered")]
fn registering_an_unreferenced_block_panics() {
    pool(2, 4).register(0, BlockHash(1), None);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "already registered")]
fn registering_a_block_twice_panics_in_debug_builds() {
    let mut pool = pool(2, 4);
    let block = pool.allocate().expect("free");
    pool.register(block, BlockHash(1), None);
    pool.register(block, BlockHash(2), None);
}

/// xorshift64: deterministic, dependency-free randomness for the model-based test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A sequence as the engine would hold it: a block table, the hashes of its full blocks, and how many of those
/// blocks have been registered (computed) so far.
struct Seq {
    blocks: Vec<BlockId>,
    hashes: Vec<BlockHash>,
    n_registered: usize,
}

#[test]
fn random_operations_keep_invariants_and_leak_nothing() {
    const N_BLOCKS: usize = 48;
    const BLOCK_SIZE: usize = 4;
    const N_OPS: usize = 20_000;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut pool = BlockPool::new(BlockPoolConfig {
        n_blocks: N_BLOCKS,
        block_size: BLOCK_SIZE,
        events_max: 1 << 20,
    })
    .expect("valid config");
    // A few shared "system prompts" so that prefixes collide and get reused.
    let bases: Vec<Vec<u32>> = (0..4).map(|b| (0..32).map(|i| b * 1000 + i).collect()).collect();
    let mut seqs: Vec<Seq> = Vec::new();
    // The cache as a router sees it, rebuilt from events only.
    let mut announced: std::collections::HashMap<BlockHash, BlockId> = std::collections::HashMap::new();
    let (mut n_hits, mut n_duplicates, mut n_evictions) = (0, 0, 0);

    for _ in 0..N_OPS {
        match rng.below(10) {
            // Admit a sequence: shared prefix of random length, random tail, reuse what is cached.
            0..=3 => {
                let base = &bases[rng.below(bases.len())];
                let mut tokens = base[..rng.below(base.len() + 1)].to_vec();
                let n_tail = rng.below(12);
                tokens.extend((0..n_tail).map(|_| rng.below(3) as u32));
                if tokens.is_empty() {
                    continue;
                }
                let hashes = block_hashes(&tokens, BLOCK_SIZE);
                let n_cached = pool.cached_prefix_len(&hashes);
                let mut blocks = pool.acquire_cached_prefix(&hashes);
                assert_eq!(blocks.len(), n_cached);
                n_hits += n_cached;
                let n_new = tokens.len().div_ceil(BLOCK_SIZE) - n_cached;
                let available = pool.n_available();
                match pool.allocate_n(n_new) {
                    Some(fresh) => {
                        blocks.extend(fresh);
                        seqs.push(Seq {
                            blocks,
                            hashes,
                            n_registered: n_cached,
                        });
                    }
                    None => {
                        assert!(n_new > available);
                        pool.release_all(&blocks);
                    }
                }
            }
            // Compute some blocks of a sequence and register them (possibly losing to a concurrent duplicate).
            4..=6 if !seqs.is_empty() => {
                let seq_idx = rng.below(seqs.len());
                let seq = &mut seqs[seq_idx];
                let n_to = (seq.n_registered + 1 + rng.below(3)).min(seq.hashes.len());
                for i in seq.n_registered..n_to {
                    let parent = i.checked_sub(1).map(|p| seq.hashes[p]);
                    let was_cached = pool.cached_prefix_len(&seq.hashes[i..=i]) == 1;
                    let stored = pool.register(seq.blocks[i], seq.hashes[i], parent);
                    assert_eq!(stored, !was_cached);
                    n_duplicates += usize::from(!stored);
                }
                seq.n_registered = seq.n_registered.max(n_to);
            }
            // Finish (or cancel) a sequence.
            7 | 8 if !seqs.is_empty() => {
                let seq_idx = rng.below(seqs.len());
                let seq = seqs.swap_remove(seq_idx);
                pool.release_all(&seq.blocks);
            }
            // The admin "reset prefix cache", rarely.
            9 if rng.below(50) == 0 => pool.clear_cache(),
            _ => {}
        }
        pool.debug_check_invariants();

        // The refcount of every block equals the number of sequences holding it.
        let mut held = [0u32; N_BLOCKS];
        for seq in &seqs {
            for &block in &seq.blocks {
                held[block as usize] += 1;
            }
        }
        for (block, &n) in held.iter().enumerate() {
            assert_eq!(pool.refcount(block as BlockId), n, "refcount of block {block}");
        }

        // Replaying the events reproduces the cache.
        for event in pool.drain_events() {
            match event {
                KvEvent::Stored { hash, block, .. } => {
                    assert_eq!(announced.insert(hash, block), None, "{hash:?} stored twice");
                }
                KvEvent::Removed { hash, block } => {
                    n_evictions += 1;
                    assert_eq!(announced.remove(&hash), Some(block), "{hash:?} removed but not stored");
                }
                KvEvent::Cleared => panic!("the event buffer is large enough never to overflow here"),
            }
        }
        assert_eq!(announced.len(), pool.n_cached());
        for hash in announced.keys() {
            assert_eq!(pool.cached_prefix_len(std::slice::from_ref(hash)), 1);
        }
    }
    // The run must have exercised the interesting paths, or it proves little.
    assert!(
        n_hits > 5000 && n_duplicates > 50 && n_evictions > 1000,
        "{n_hits} {n_duplicates} {n_evictions}"
    );

    for seq in seqs.drain(..) {
        pool.release_all(&seq.blocks);
    }
    pool.debug_check_invariants();
    assert_eq!((pool.n_available(), pool.n_in_use()), (N_BLOCKS, 0));
}
