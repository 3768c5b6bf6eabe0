//! Continuous batching: which sequences run in the next step, and how many of their tokens.
//!
//! The scheduler owns the waiting and running queues and the sequences' KV blocks; it knows nothing of tensors or
//! threads, so every decision is a plain function of its state and the block pool's, testable on its own.
//!
//! Admission is bounded by free KV blocks: a sequence is admitted only when the blocks for its whole known sequence
//! (prompt, plus tokens generated before a preemption) can be had, so a started prefill never stalls for memory.
//! Decode growth that finds no block preempts the newest running sequence, whose blocks are released and which is
//! recomputed later (its prefix is usually still in the prefix cache).

use std::collections::{HashMap, VecDeque};

use cleave_kv::{BlockHash, BlockId, BlockPool, block_hashes, hash_block};

/// Which work a step carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerPolicy {
    /// A new prompt's whole prefill runs in a step of its own, before running decodes continue: the classic
    /// behaviour, whose decode stalls disaggregation removes.
    PrefillFirst {
        /// Prompt tokens admitted into one step (a single longer prompt still runs, alone).
        batch_tokens_max: usize,
    },
    /// Every step carries every running decode plus at most `chunk_tokens` prompt tokens (Sarathi-style).
    Chunked { chunk_tokens: usize },
}

impl SchedulerPolicy {
    pub fn parse(name: &str, tokens: usize) -> Result<Self, String> {
        if tokens == 0 {
            return Err("the scheduler's token budget must be positive".into());
        }
        match name {
            "prefill-first" => Ok(Self::PrefillFirst {
                batch_tokens_max: tokens,
            }),
            "chunked" => Ok(Self::Chunked { chunk_tokens: tokens }),
            other => Err(format!("unknown scheduler policy {other:?} (prefill-first, chunked)")),
        }
    }
}

pub type SeqId = u64;

/// The scheduler's view of one sequence.
#[derive(Debug)]
pub struct SeqState {
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose K and V are in the cache.
    pub n_computed: usize,
    /// Blocks covering the sequence, in order.
    pub blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks registered so far.
    pub hashes: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache at (the last) admission.
    pub n_cached_tokens: usize,
}

impl SeqState {
    pub fn new(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            n_computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            n_cached_tokens: 0,
        }
    }

    fn n_remaining(&self) -> usize {
        self.tokens.len() - self.n_computed
    }
}

/// One sequence's part of a step: compute `tokens[n_computed .. n_computed + n_new]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    pub n_new: usize,
}

pub struct Scheduler {
    policy: SchedulerPolicy,
    prefix_caching: bool,
    running_max: usize,
    pub(crate) seqs: HashMap<SeqId, SeqState>,
    /// Waiting sequences, oldest (or preempted) first.
    waiting: VecDeque<SeqId>,
    /// Running sequences in admission order; the newest is preempted first.
    running: Vec<SeqId>,
    n_preemptions: u64,
}

impl Scheduler {
    pub fn new(policy: SchedulerPolicy, prefix_caching: bool, running_max: usize) -> Self {
        Self {
            policy,
            prefix_caching,
            running_max: running_max.max(1),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            n_preemptions: 0,
        }
    }

    pub fn add(&mut self, id: SeqId, tokens: Vec<u32>) {
        self.seqs.insert(id, SeqState::new(tokens));
        self.waiting.push_back(id);
    }

    /// Adds a sequence as running with all but its last token's KV already in its blocks — without computing it.
    /// For decode benchmarks only, where step time does not depend on the cached values. False if the blocks
    /// cannot be had.
    pub fn add_assume_computed(&mut self, id: SeqId, tokens: Vec<u32>, pool: &mut BlockPool) -> bool {
        let n_blocks = tokens.len().div_ceil(pool.block_size());
        let Some(blocks) = pool.allocate_n(n_blocks) else {
            return false;
        };
        let n_computed = tokens.len() - 1;
        self.seqs.insert(
            id,
            SeqState {
                tokens,
                n_computed,
                blocks,
                hashes: Vec::new(),
                n_cached_tokens: 0,
            },
        );
        self.running.push(id);
        true
    }

    /// Adds a sequence whose prompt KV another worker computes ("parked": neither waiting nor running). Its blocks
    /// are allocated now, reusing cached prefix blocks. Returns the number of leading blocks already cached and all
    /// its blocks, or `None` (nothing allocated) when the pool cannot hold it.
    pub fn add_parked(&mut self, id: SeqId, tokens: Vec<u32>, pool: &mut BlockPool) -> Option<(usize, Vec<BlockId>)> {
        let block_size = pool.block_size();
        let n_tokens = tokens.len();
        let hashes = if self.prefix_caching {
            block_hashes(&tokens[..n_tokens - 1], block_size)
        } else {
            Vec::new()
        };
        let cached = pool.acquire_cached_prefix(&hashes);
        let Some(fresh) = pool.allocate_n(n_tokens.div_ceil(block_size) - cached.len()) else {
            pool.release_all(&cached);
            return None;
        };
        let n_cached = cached.len();
        let mut seq = SeqState::new(tokens);
        seq.n_cached_tokens = n_cached * block_size;
        seq.n_computed = seq.n_cached_tokens;
        seq.hashes = hashes[..n_cached].to_vec();
        seq.blocks = cached;
        seq.blocks.extend(fresh);
        let blocks = seq.blocks.clone();
        self.seqs.insert(id, seq);
        Some((n_cached, blocks))
    }

    /// A parked sequence whose whole KV has arrived starts decoding: it joins the running sequences with every
    /// token computed, and its full blocks enter the prefix cache.
    pub fn unpark_computed(&mut self, id: SeqId, pool: &mut BlockPool) {
        let Some(seq) = self.seqs.get(&id) else { return };
        let n_new = seq.tokens.len() - seq.n_computed;
        self.complete(&[Scheduled { id, n_new }], pool);
        self.running.push(id);
    }

    /// A parked sequence whose remote prefill failed is prefilled here instead: its blocks are released and it goes
    /// first in the waiting queue (its prefix is usually still cached).
    pub fn unpark_to_waiting(&mut self, id: SeqId, pool: &mut BlockPool) {
        if self.seqs.contains_key(&id) {
            self.reset(id, pool);
            self.waiting.push_front(id);
        }
    }

    /// True for a sequence added with [`Scheduler::add_parked`] and not yet unparked.
    pub fn is_parked(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id) && !self.running.contains(&id) && !self.waiting.contains(&id)
    }

    pub fn seq(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    /// Prompt tokens still to be computed by waiting and running sequences (a decoding sequence has none): the
    /// prefill work queued on this engine.
    pub fn queued_prefill_tokens(&self) -> usize {
        self.waiting
            .iter()
            .chain(&self.running)
            .filter_map(|id| self.seqs.get(id))
            .map(|seq| if seq.n_remaining() > 1 { seq.n_remaining() } else { 0 })
            .sum()
    }

    pub fn n_preemptions(&self) -> u64 {
        self.n_preemptions
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Removes a sequence wherever it is and releases its blocks at once.
    pub fn remove(&mut self, id: SeqId, pool: &mut BlockPool) -> bool {
        let Some(seq) = self.seqs.remove(&id) else { return false };
        pool.release_all(&seq.blocks);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        true
    }

    /// Decides the next step. Allocates the blocks it needs; may preempt.
    pub fn schedule(&mut self, pool: &mut BlockPool) -> Vec<Scheduled> {
        match self.policy {
            SchedulerPolicy::PrefillFirst { batch_tokens_max } => {
                let mut step = Vec::new();
                let mut budget = batch_tokens_max;
                while let Some(admitted) = self.admit_next(pool, step.is_empty()) {
                    let n_new = self.seqs[&admitted].n_remaining();
                    if !step.is_empty() && n_new > budget {
                        // Admitted but does not fit this step's budget: it runs first in the next prefill step.
                        self.unadmit(admitted, pool);
                        break;
                    }
                    budget = budget.saturating_sub(n_new);
                    step.push(Scheduled { id: admitted, n_new });
                }
                if step.is_empty() {
                    step = self.schedule_decodes(pool);
                }
                step
            }
            SchedulerPolicy::Chunked { chunk_tokens } => {
                let mut step = self.schedule_decodes(pool);
                let mut budget = chunk_tokens;
                // Prefills already under way continue first, oldest first.
                for &id in &self.running {
                    let seq = &self.seqs[&id];
                    if budget > 0 && seq.n_remaining() > 1 {
                        let n_new = seq.n_remaining().min(budget);
                        budget -= n_new;
                        step.push(Scheduled { id, n_new });
                    }
                }
                while budget > 0 {
                    let Some(id) = self.admit_next(pool, false) else { break };
                    let n_new = self.seqs[&id].n_remaining().min(budget);
                    budget -= n_new;
                    step.push(Scheduled { id, n_new });
                }
                step
            }
        }
    }

    /// After the backend computed a step: advances each sequence and registers its newly full blocks in the prefix
    /// cache.
    pub fn complete(&mut self, step: &[Scheduled], pool: &mut BlockPool) {
        let block_size = pool.block_size();
        for s in step {
            let Some(seq) = self.seqs.get_mut(&s.id) else { continue };
            seq.n_computed += s.n_new;
            if !self.prefix_caching {
                continue;
            }
            while seq.hashes.len() < seq.n_computed / block_size {
                let i = seq.hashes.len();
                let parent = seq.hashes.last().copied();
                let hash = hash_block(parent, &seq.tokens[i * block_size..(i + 1) * block_size]);
                pool.register(seq.blocks[i], hash, parent);
                seq.hashes.push(hash);
            }
        }
    }

    /// Appends a sampled token to a sequence (its KV is computed in the next step).
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Every running sequence in its decode phase gets one token and, when that token starts a new block, a block —
    /// preempting the newest sequences when the pool is empty.
    fn schedule_decodes(&mut self, pool: &mut BlockPool) -> Vec<Scheduled> {
        let block_size = pool.block_size();
        let mut step = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            if seq.n_remaining() != 1 {
                i += 1;
                continue;
            }
            let blocks_needed = seq.tokens.len().div_ceil(block_size);
            let mut preempted_self = false;
            while self.seqs[&id].blocks.len() < blocks_needed {
                if let Some(block) = pool.allocate() {
                    self.seqs
                        .get_mut(&id)
                        .expect("running sequence exists")
                        .blocks
                        .push(block);
                } else {
                    let victim = *self.running.last().expect("running is not empty");
                    self.preempt(victim, pool);
                    if victim == id {
                        preempted_self = true;
                        break;
                    }
                }
            }
            if !preempted_self {
                step.push(Scheduled { id, n_new: 1 });
                i += 1;
            }
        }
        step
    }

    /// Admits the oldest waiting sequence if its blocks can be had (reusing cached prefix blocks). `alone` relaxes
    /// the reserve kept for running sequences' decode growth (used when nothing else could run).
    fn admit_next(&mut self, pool: &mut BlockPool, alone: bool) -> Option<SeqId> {
        if self.running.len() >= self.running_max {
            return None;
        }
        let &id = self.waiting.front()?;
        let block_size = pool.block_size();
        let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
        debug_assert!(seq.blocks.is_empty() && seq.n_computed == 0);
        let n_tokens = seq.tokens.len();
        // At least one token must be computed to produce logits, so a fully cached prompt recomputes its last block.
        let hashes = if self.prefix_caching {
            block_hashes(&seq.tokens[..n_tokens - 1], block_size)
        } else {
            Vec::new()
        };
        let cached = pool.acquire_cached_prefix(&hashes);
        let n_new_blocks = n_tokens.div_ceil(block_size) - cached.len();
        let reserve = if alone && self.running.is_empty() {
            0
        } else {
            self.running.len()
        };
        let fresh = (pool.n_available() >= n_new_blocks + reserve)
            .then(|| pool.allocate_n(n_new_blocks))
            .flatten();
        let Some(fresh) = fresh else {
            pool.release_all(&cached);
            return None;
        };
        seq.n_computed = cached.len() * block_size;
        seq.n_cached_tokens = seq.n_computed;
        seq.hashes = hashes[..cached.len()].to_vec();
        seq.blocks = cached;
        seq.blocks.extend(fresh);
        self.waiting.pop_front();
        self.running.push(id);
        Some(id)
    }

    /// Undoes an admission that did not make it into the step.
    fn unadmit(&mut self, id: SeqId, pool: &mut BlockPool) {
        self.running.retain(|&r| r != id);
        self.reset(id, pool);
        self.waiting.push_front(id);
    }

    fn preempt(&mut self, id: SeqId, pool: &mut BlockPool) {
        tracing::debug!(seq = id, "preempting: KV cache full; will recompute");
        self.n_preemptions += 1;
        self.unadmit(id, pool);
    }

    fn reset(&mut self, id: SeqId, pool: &mut BlockPool) {
        let seq = self.seqs.get_mut(&id).expect("sequence exists");
        pool.release_all(&seq.blocks);
        seq.blocks.clear();
        seq.hashes.clear();
        seq.n_computed = 0;
    }
}
