//! [`Router`]: picks the decode worker for a request by cached prefix and load, and the prefill worker by queue.

use cleave_kv::{BlockHash, KvEvent, block_hashes};

use crate::error::RouterError;
use crate::index::{KvIndex, KvIndexConfig, WalkScratch, WorkerId};
use crate::rng::SplitMix64;

/// What a worker does, as registered with [`Router::add_worker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Decodes; its prompt KV is prefilled remotely or, when cheaper, locally. A decode candidate; its KV events
    /// are indexed.
    Decode,
    /// Only prefills, for decode workers. Picked by [`Router::pick_prefill_worker`]; its KV events are not indexed
    /// (prefill workers are chosen by queue length alone).
    Prefill,
    /// Prefills and decodes its own requests. A decode candidate like [`Role::Decode`]; not offered as a prefill
    /// worker for other decode workers' requests.
    Aggregated,
}

impl Role {
    fn decodes(self) -> bool {
        matches!(self, Self::Decode | Self::Aggregated)
    }
}

/// A worker's load, as it reports it. The router keeps the latest report per worker; each report overwrites the
/// previous one (and the router's optimistic additions since, see [`Router::pick_decode_worker`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    /// KV blocks in use by running requests.
    pub active_blocks: u64,
    /// KV blocks the worker has in all. 0 means "not reported yet": the router then assumes the largest capacity
    /// any decode worker reported.
    pub total_blocks: u64,
    /// Prompt tokens waiting to be prefilled on this worker.
    pub queued_prefill_tokens: u64,
    /// Requests running. Not part of the score (`active_blocks` already grows with every running request's
    /// context); kept for metrics and later policies.
    pub running_requests: u32,
}

/// How the router scores decode workers. Build one with [`RouterConfig::new`] and adjust the fields.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    /// Tokens per KV block; must equal the workers' engine block size, or no hash will ever match.
    pub block_size: usize,
    /// Weight of the cached fraction of the request in the score (≥ 0). Default 1.
    pub overlap_weight: f64,
    /// Weight of the worker's normalized load in the score (≥ 0). Default 1.
    pub load_weight: f64,
    /// 0 picks the best score (ties by lower load, then lower worker id); above 0 samples
    /// `softmax(score / temperature)`, so identical requests spread instead of herding. Default 0.
    pub temperature: f64,
    /// Seed of the sampling RNG: the same seed and the same calls give the same decisions. Default 0.
    pub seed: u64,
    /// Limits of the prefix index (and of the number of workers).
    pub index: KvIndexConfig,
}

impl RouterConfig {
    /// The defaults for workers with `block_size`-token KV blocks: overlap and load weighted equally,
    /// deterministic (temperature 0), seed 0, default index limits.
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            overlap_weight: 1.0,
            load_weight: 1.0,
            temperature: 0.0,
            seed: 0,
            index: KvIndexConfig::default(),
        }
    }

    fn validate(&self) -> Result<(), RouterError> {
        if self.block_size == 0 {
            return Err(RouterError::ZeroBlockSize);
        }
        for (name, value) in [
            ("overlap_weight", self.overlap_weight),
            ("load_weight", self.load_weight),
            ("temperature", self.temperature),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(RouterError::InvalidParameter { name, value });
            }
        }
        Ok(())
    }
}

/// The outcome of [`Router::pick_decode_worker`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The chosen decode worker.
    pub worker: WorkerId,
    /// Leading blocks of the request the index believes `worker` holds (it may hold more; never fewer unless
    /// they were evicted since, which the engine handles by recomputing).
    pub cached_blocks: usize,
    /// Full blocks of the request (`tokens / block_size`).
    pub request_blocks: usize,
    /// The worker's score (see the crate docs for the formula).
    pub score: f64,
}

/// The routing decision as a data structure: registered workers and their roles, their latest load reports and a
/// [`KvIndex`] of what the decode workers have cached.
///
/// Single-threaded and synchronous: a frontend owns it in one task (or behind one lock) and feeds it workers'
/// events and load reports between decisions. Nothing here blocks, and a decision allocates nothing once the
/// buffers are warm, except the prompt's hashes in [`pick_decode_worker`](Self::pick_decode_worker) (a caller that
/// already hashed the prompt, as the frontend does for the engine, uses
/// [`pick_decode_worker_for_hashes`](Self::pick_decode_worker_for_hashes)). A decision costs O(request blocks +
/// decode workers): every candidate's load is part of its score.
#[derive(Clone, Debug)]
pub struct Router {
    config: RouterConfig,
    index: KvIndex,
    /// Sorted by id, so scans visit workers in id order (ties resolve to the lowest id) and lookups are binary
    /// searches.
    workers: Vec<RouterWorker>,
    rng: SplitMix64,
    scratch: Scratch,
}

#[derive(Clone, Debug)]
struct RouterWorker {
    id: WorkerId,
    role: Role,
    /// The worker's slot in the index; `Some` exactly for decode candidates.
    slot: Option<u32>,
    load: WorkerLoad,
    /// `1 / load.total_blocks`, or 0 before the worker reports a capacity; kept so scoring multiplies instead of
    /// dividing per worker.
    per_capacity_block: f64,
}

/// Buffers reused across decisions.
#[derive(Clone, Debug, Default)]
struct Scratch {
    walk: WalkScratch,
    /// Leading blocks held, per index slot; all zero between decisions.
    cached_by_slot: Vec<u32>,
    candidates: Vec<Candidate>,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    /// Position in `Router::workers`.
    worker_idx: usize,
    cached_blocks: u32,
    score: f64,
    load: f64,
}

impl Router {
    /// A router with no workers.
    pub fn new(config: RouterConfig) -> Result<Self, RouterError> {
        config.validate()?;
        Ok(Self {
            index: KvIndex::new(config.index),
            rng: SplitMix64::new(config.seed),
            config,
            workers: Vec::new(),
            scratch: Scratch::default(),
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The prefix index (for stats and overlap queries).
    pub fn index(&self) -> &KvIndex {
        &self.index
    }

    /// Registers a worker with no load (until its first [`report_load`](Self::report_load)) and nothing cached.
    ///
    /// Register a worker before feeding its KV events: events of unknown workers are ignored.
    pub fn add_worker(&mut self, worker: WorkerId, role: Role) -> Result<(), RouterError> {
        let pos = match self.position(worker) {
            Ok(_) => return Err(RouterError::DuplicateWorker { worker }),
            Err(pos) => pos,
        };
        let workers_max = self.config.index.workers_max;
        if self.workers.len() >= workers_max {
            return Err(RouterError::TooManyWorkers { workers_max });
        }
        let slot = if role.decodes() {
            // The index only ever holds the router's decode workers, fewer than workers_max, so a slot is free.
            let slot = self.index.slot_or_insert(worker);
            assert!(slot.is_some(), "index has no slot for {worker} below workers_max");
            slot
        } else {
            None
        };
        self.workers.insert(
            pos,
            RouterWorker {
                id: worker,
                role,
                slot,
                load: WorkerLoad::default(),
                per_capacity_block: 0.0,
            },
        );
        Ok(())
    }

    /// Forgets a worker, its load and everything it cached (it died or left). Returns whether it was registered.
    pub fn remove_worker(&mut self, worker: WorkerId) -> bool {
        let Ok(pos) = self.position(worker) else {
            return false;
        };
        let removed = self.workers.remove(pos);
        if removed.slot.is_some() {
            self.index.remove_worker(worker);
        }
        true
    }

    /// The role `worker` was registered with, if it is registered.
    pub fn role(&self, worker: WorkerId) -> Option<Role> {
        self.position(worker).ok().map(|pos| self.workers[pos].role)
    }

    /// Registered workers, in id order.
    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, Role)> + '_ {
        self.workers.iter().map(|w| (w.id, w.role))
    }

    /// Feeds one of `worker`'s KV events to the index. Returns whether it was used: `false` for unregistered
    /// workers and for prefill workers, whose caches are not indexed.
    pub fn apply_kv_event(&mut self, worker: WorkerId, event: &KvEvent) -> bool {
        match self.position(worker) {
            Ok(pos) if self.workers[pos].slot.is_some() => {
                self.index.apply(worker, event);
                true
            }
            _ => false,
        }
    }

    /// Records `worker`'s latest load report, replacing the previous one. Returns whether the worker is registered.
    pub fn report_load(&mut self, worker: WorkerId, load: WorkerLoad) -> bool {
        match self.position(worker) {
            Ok(pos) => {
                let worker = &mut self.workers[pos];
                worker.load = load;
                worker.per_capacity_block = if load.total_blocks > 0 {
                    1.0 / load.total_blocks as f64
                } else {
                    0.0
                };
                true
            }
            Err(_) => false,
        }
    }

    /// The router's current view of `worker`'s load: its last report plus the optimistic additions since.
    pub fn load(&self, worker: WorkerId) -> Option<WorkerLoad> {
        self.position(worker).ok().map(|pos| self.workers[pos].load)
    }

    /// Picks the decode (or aggregated) worker for a request with prompt `token_ids`; `None` if there is none.
    ///
    /// Hashes the prompt's full blocks with [`cleave_kv::block_hashes`], then as
    /// [`pick_decode_worker_for_hashes`](Self::pick_decode_worker_for_hashes).
    pub fn pick_decode_worker(&mut self, token_ids: &[u32]) -> Option<Decision> {
        let hashes = block_hashes(token_ids, self.config.block_size);
        self.pick_decode_worker_for_hashes(&hashes, token_ids.len())
    }

    /// Picks the decode worker for a request of `n_tokens` prompt tokens whose full blocks hash to `hashes` (as
    /// [`cleave_kv::block_hashes`] computes them with this router's block size); `None` if there is no decode
    /// worker.
    ///
    /// Every decode candidate is scored (formula in the crate docs); at temperature 0 the best wins (ties: lower
    /// load, then lower id), otherwise one is sampled from `softmax(score / temperature)`.
    ///
    /// **Optimistic load update.** Load reports arrive every so often; between two, every identical request would
    /// see the same scores and go to the same worker. So the chosen worker's `active_blocks` is raised at once by
    /// the blocks the request will allocate there: its blocks not cached (`ceil(n_tokens / block_size) -
    /// cached_blocks`, the partial last block included) plus one for decode growth, which the engine reserves at
    /// admission. Reused cached blocks are not added: they are often already in use by the requests sharing the
    /// prefix. The worker's next [`report_load`](Self::report_load) replaces the estimate with the truth.
    ///
    /// # Panics
    /// If `hashes.len()` is not `n_tokens / block_size` (hashes of another prompt or block size: a caller bug).
    pub fn pick_decode_worker_for_hashes(&mut self, hashes: &[BlockHash], n_tokens: usize) -> Option<Decision> {
        let block_size = self.config.block_size;
        assert_eq!(
            hashes.len(),
            n_tokens / block_size,
            "pick_decode_worker_for_hashes: {} hashes for {n_tokens} tokens at block size {block_size}",
            hashes.len()
        );
        self.score_candidates(hashes);
        let chosen = if self.config.temperature > 0.0 {
            self.sample_candidate()
        } else {
            self.best_candidate()
        }?;
        let worker = &mut self.workers[chosen.worker_idx];
        let cached_blocks = chosen.cached_blocks as usize;
        let new_blocks = n_tokens.div_ceil(block_size) - cached_blocks + 1;
        worker.load.active_blocks = worker.load.active_blocks.saturating_add(new_blocks as u64);
        Some(Decision {
            worker: worker.id,
            cached_blocks,
            request_blocks: hashes.len(),
            score: chosen.score,
        })
    }

    /// Picks the prefill worker ([`Role::Prefill`]) with the fewest queued prefill tokens (ties: lower id) for a
    /// prompt of which `prefill_tokens` must be computed; `None` if there is none (the decode worker then prefills
    /// locally).
    ///
    /// Takes `&mut self` for the same reason as the decode pick: the chosen worker's `queued_prefill_tokens` is
    /// raised by `prefill_tokens` at once, so a burst between two load reports spreads over the prefill pool.
    pub fn pick_prefill_worker(&mut self, prefill_tokens: u64) -> Option<WorkerId> {
        let worker = self
            .workers
            .iter_mut()
            .filter(|w| w.role == Role::Prefill)
            // Workers are in id order and `min_by_key` keeps the first minimum: ties go to the lowest id.
            .min_by_key(|w| w.load.queued_prefill_tokens)?;
        worker.load.queued_prefill_tokens = worker.load.queued_prefill_tokens.saturating_add(prefill_tokens);
        Some(worker.id)
    }

    fn position(&self, worker: WorkerId) -> Result<usize, usize> {
        self.workers.binary_search_by_key(&worker, |w| w.id)
    }

    /// Fills `scratch.candidates` with every decode candidate's cached blocks, load and score.
    fn score_candidates(&mut self, hashes: &[BlockHash]) {
        let Scratch {
            walk,
            cached_by_slot,
            candidates,
        } = &mut self.scratch;
        self.index.walk(hashes, walk);
        cached_by_slot.resize(self.index.slot_capacity(), 0);
        for &(slot, n_blocks) in &walk.matched {
            cached_by_slot[slot as usize] = n_blocks;
        }

        // Normalizers over the candidates: the largest prefill queue, and the capacity assumed for workers that
        // have not reported theirs yet.
        let (mut queued_max, mut total_max) = (0u64, 0u64);
        for w in self.workers.iter().filter(|w| w.slot.is_some()) {
            queued_max = queued_max.max(w.load.queued_prefill_tokens);
            total_max = total_max.max(w.load.total_blocks);
        }
        // Reciprocals once per decision: the loop below runs per worker, and a division costs several multiplies.
        let norm = LoadNorm {
            per_queued_token: if queued_max > 0 { 1.0 / queued_max as f64 } else { 0.0 },
            per_fallback_block: 1.0 / total_max.max(1) as f64,
        };
        let per_request_block = if hashes.is_empty() {
            0.0
        } else {
            1.0 / hashes.len() as f64
        };

        candidates.clear();
        for (worker_idx, w) in self.workers.iter().enumerate() {
            let Some(slot) = w.slot else { continue };
            let cached_blocks = cached_by_slot[slot as usize];
            let load = norm.load(w);
            let cached_share = f64::from(cached_blocks) * per_request_block;
            // See the crate docs: score = overlap_weight * cached_share - load_weight * load.
            let score = self.config.overlap_weight * cached_share - self.config.load_weight * load;
            candidates.push(Candidate {
                worker_idx,
                cached_blocks,
                score,
                load,
            });
        }

        // Leave the per-slot array all zero for the next decision, touching only what this one set.
        for &(slot, _) in &walk.matched {
            cached_by_slot[slot as usize] = 0;
        }
    }

    /// The highest score; ties go to the lower load, then to the lower worker id (candidates are in id order, and a
    /// later candidate replaces the best only if strictly better).
    fn best_candidate(&self) -> Option<Candidate> {
        let mut best: Option<Candidate> = None;
        for &c in &self.scratch.candidates {
            let better = match best {
                None => true,
                Some(b) => c.score > b.score || (c.score == b.score && c.load < b.load),
            };
            if better {
                best = Some(c);
            }
        }
        best
    }

    /// A candidate drawn with probability `exp(score / temperature)`, normalized (computed relative to the best
    /// score so the exponentials cannot overflow).
    fn sample_candidate(&mut self) -> Option<Candidate> {
        let candidates = &self.scratch.candidates;
        let score_max = candidates.iter().map(|c| c.score).fold(f64::NEG_INFINITY, f64::max);
        let temperature = self.config.temperature;
        let weight = |c: &Candidate| ((c.score - score_max) / temperature).exp();
        let total: f64 = candidates.iter().map(weight).sum();
        let mut threshold = self.rng.next_f64() * total;
        for c in candidates {
            threshold -= weight(c);
            if threshold < 0.0 {
                return Some(*c);
            }
        }
        // Rounding can leave the threshold a hair above 0 after the last candidate; it is the one drawn.
        candidates.last().copied()
    }
}

/// What a worker's raw load is measured against.
struct LoadNorm {
    /// `1 / (the longest prefill queue among candidates)`, or 0 when no candidate has a queue.
    per_queued_token: f64,
    /// `1 / capacity` for a worker that has not reported one: the largest reported capacity (at least 1).
    per_fallback_block: f64,
}

impl LoadNorm {
    /// `load = (kv_usage + prefill_share) / 2`; see the crate docs.
    fn load(&self, worker: &RouterWorker) -> f64 {
        let load = &worker.load;
        let per_block = if worker.per_capacity_block > 0.0 {
            worker.per_capacity_block
        } else {
            self.per_fallback_block
        };
        let kv_usage = load.active_blocks as f64 * per_block;
        let prefill_share = load.queued_prefill_tokens as f64 * self.per_queued_token;
        0.5 * (kv_usage + prefill_share)
    }
}
