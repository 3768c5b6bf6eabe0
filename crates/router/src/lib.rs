//! The routing decision of cleave as a plain data structure: which decode worker gets a request, given what each
//! worker has cached and how loaded it is, and which prefill worker computes its prompt.
//!
//! The frontend embeds it (and a standalone router process can wrap it): it feeds the router the workers' KV events
//! and load reports and asks it for a decision per request. This crate knows nothing of HTTP, async runtimes,
//! models or tensors; it sees worker ids, token ids, [`cleave_kv::BlockHash`]es and [`cleave_kv::KvEvent`]s, so it
//! is tested and benchmarked without any of them.
//!
//! # Types and how they connect
//! - [`KvIndex`] tracks which [`WorkerId`] holds which cached KV block, from the [`cleave_kv::KvEvent`]s each worker
//!   publishes (`Stored`, `Removed`, `Cleared`), and answers [`KvIndex::overlaps`]: for each worker, how many leading
//!   blocks of a request it already holds ([`OverlapScores`]). It is a prefix tree keyed by the chained block hash,
//!   bounded by [`KvIndexConfig`].
//! - [`Router`] holds the index, every registered worker's [`Role`] and latest [`WorkerLoad`], and a
//!   [`RouterConfig`]. [`Router::pick_decode_worker`] hashes the prompt with [`cleave_kv::block_hashes`] (the same
//!   function the engine registers blocks under), scores every decode candidate and returns a [`Decision`];
//!   [`Router::pick_prefill_worker`] picks the prefill worker with the shortest queue.
//! - [`RouterError`] is returned for an invalid configuration or worker table change; a decision itself cannot fail
//!   (no candidate gives `None`).
//!
//! # The score
//! For a request of `request_blocks` full blocks, each decode candidate `w` (role `Decode` or `Aggregated`) gets
//!
//! ```text
//! score(w) = overlap_weight * cached_blocks(w) / request_blocks
//!          - load_weight * load(w)
//! load(w)  = ( active_blocks(w) / total_blocks(w)
//!            + queued_prefill_tokens(w) / max over candidates v of queued_prefill_tokens(v) ) / 2
//! ```
//!
//! (the cached share is 0 for a request shorter than one block, the queue share is 0 when no candidate has a
//! queue, and a worker that has not reported `total_blocks` yet is assumed to have the largest capacity reported).
//!
//! Why this shape: the cached share is the fraction of the prompt whose prefill the worker can skip, which is what
//! prefix-aware routing buys. KV usage predicts whether the worker can admit the request without preempting others
//! and how large its decode batches (and so its inter-token latency) already are; the prefill queue predicts the
//! time to first token when the prompt is prefilled locally. Tokens queued have no natural capacity to divide by,
//! so the queue is measured against the longest one among candidates. Each term lies in `[0, 1]` (KV usage can
//! exceed 1 briefly through the optimistic update below), so the two weights compare directly: with both at 1, a
//! request fully cached on a worker is worth exactly the difference between an idle worker and one with a full KV
//! pool and the longest prefill queue.
//!
//! At `temperature` 0 the highest score wins, ties going to the lower load, then to the lower worker id. Above 0
//! the worker is drawn from `softmax(score / temperature)` with a seeded SplitMix64 generator, so identical
//! requests spread instead of herding onto one worker and a run can be replayed. Between two load reports the
//! router raises the chosen worker's `active_blocks` by the blocks the request will allocate
//! ([`Router::pick_decode_worker_for_hashes`] says exactly how much), so a burst of requests spreads even at
//! temperature 0.
//!
//! # Example
//! ```
//! use cleave_kv::{KvEvent, block_hashes};
//! use cleave_router::{Role, Router, RouterConfig, WorkerId, WorkerLoad};
//!
//! let mut router = Router::new(RouterConfig::new(4))?;
//! let (a, b) = (WorkerId(1), WorkerId(2));
//! for worker in [a, b] {
//!     router.add_worker(worker, Role::Decode)?;
//!     let load = WorkerLoad { active_blocks: 10, total_blocks: 100, queued_prefill_tokens: 0, running_requests: 1 };
//!     router.report_load(worker, load);
//! }
//!
//! // Worker b announces that it cached the first two blocks of a 10-token prompt (block size 4).
//! let prompt: Vec<u32> = (0..10).collect();
//! let hashes = block_hashes(&prompt, 4);
//! router.apply_kv_event(b, &KvEvent::Stored { hash: hashes[0], parent: None, block: 0 });
//! router.apply_kv_event(b, &KvEvent::Stored { hash: hashes[1], parent: Some(hashes[0]), block: 1 });
//! assert_eq!(router.index().overlaps(&hashes).get(b), 2);
//!
//! // Equal loads, so the cached prefix decides.
//! let decision = router.pick_decode_worker(&prompt).expect("there are decode workers");
//! assert_eq!((decision.worker, decision.cached_blocks, decision.request_blocks), (b, 2, 2));
//! // b's load now includes the request: 1 uncached (partial) block plus 1 for decode growth.
//! assert_eq!(router.load(b).unwrap().active_blocks, 12);
//! # Ok::<(), cleave_router::RouterError>(())
//! ```

mod error;
mod hasher;
mod index;
mod rng;
mod router;
mod worker_set;

pub use error::RouterError;
pub use index::{IndexStats, KvIndex, KvIndexConfig, OverlapScores, WorkerId};
pub use router::{Decision, Role, Router, RouterConfig, WorkerLoad};
