//! Bookkeeping of a paged KV cache: which blocks are free, who holds which, and which hold reusable prompt prefixes.
//!
//! The engine stores attention keys and values in fixed-size *blocks* of `block_size` tokens; a sequence's KV is a
//! list of block ids (its block table). This crate decides which block ids a sequence gets and when a block's memory
//! may be reused. It knows nothing of models, tensors, async runtimes or networks, so it is testable in isolation and
//! usable by the engine's scheduler (which owns the pool, on one thread) and by routers in other processes (which
//! only need the hashes).
//!
//! # Types and how they connect
//! - [`BlockHash`] names a *full* block of tokens together with everything before it: [`hash_block`] chains a
//!   block's token ids onto its parent's hash, and [`block_hashes`] does it for a whole prompt. The function is a
//!   stable format, so a router recomputes the same hashes from token ids without asking the engine.
//! - [`BlockPool`] (sized by [`BlockPoolConfig`]) reference-counts [`BlockId`]s. A sequence first takes the blocks
//!   of its longest cached prefix ([`BlockPool::acquire_cached_prefix`]), allocates fresh blocks for the rest
//!   ([`BlockPool::allocate_n`]), and [`register`](BlockPool::register)s each block under its hash once it is full.
//!   When the sequence ends it [`release_all`](BlockPool::release_all)s its blocks: cached ones stay reusable until an
//!   allocation evicts them, least recently released first.
//! - [`KvEvent`]s (block stored, block removed, buffer overflowed) record every change to the set of cached blocks.
//!   The engine [`drain_events`](BlockPool::drain_events) and publishes them so routers can send requests where their
//!   prefix is already cached.
//! - [`KvError`] is returned only for an invalid configuration. Misusing the pool (a double release) is an engine bug
//!   and panics.
//!
//! # Example
//! Two requests share a prompt prefix; the second reuses the first one's blocks.
//! ```
//! use cleave_kv::{BlockPool, BlockPoolConfig, KvEvent, block_hashes};
//!
//! let mut pool = BlockPool::new(BlockPoolConfig { n_blocks: 8, block_size: 4, events_max: 64 })?;
//! let prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
//! let hashes = block_hashes(&prompt, pool.block_size()); // 2 full blocks; the last 2 tokens have no hash yet
//!
//! // First request: nothing cached, so allocate 3 blocks (2 full, 1 partial) and register the full ones after
//! // the engine has computed their KV.
//! assert!(pool.acquire_cached_prefix(&hashes).is_empty());
//! let blocks = pool.allocate_n(3).expect("the pool has room");
//! pool.register(blocks[0], hashes[0], None);
//! pool.register(blocks[1], hashes[1], Some(hashes[0]));
//! pool.release_all(&blocks); // request finished: the 2 full blocks stay cached, evictable
//! assert_eq!((pool.n_in_use(), pool.n_cached(), pool.n_available()), (0, 2, 8));
//!
//! // Second request with the same prefix: its first 2 blocks are reused, not recomputed.
//! let reused = pool.acquire_cached_prefix(&hashes);
//! assert_eq!(reused, blocks[..2]);
//! assert_eq!(pool.refcount(reused[0]), 1);
//!
//! // Routers learn what was cached from the events.
//! let events = pool.drain_events();
//! assert_eq!(events[0], KvEvent::Stored { hash: hashes[0], parent: None, block: blocks[0] });
//! # Ok::<(), cleave_kv::KvError>(())
//! ```

mod error;
mod hash;
mod pool;

pub use error::KvError;
pub use hash::{BlockHash, ROOT_PARENT_HASH, block_hashes, hash_block};
pub use pool::{BlockId, BlockPool, BlockPoolConfig, KvEvent};
