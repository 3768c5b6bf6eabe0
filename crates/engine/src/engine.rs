//! The engine: one model, one KV cache, one scheduler, driven step by step by its owner on one thread.
//!
//! `add_request` validates and queues; `step` schedules a batch, runs the forward pass, samples, detokenizes and
//! returns what each request produced; `cancel` frees a request's blocks at once. Workers wrap this loop with a
//! bounded inbox; tests and `cleave generate` drive it directly.

use std::collections::HashMap;

use cleave_kv::{BlockPool, BlockPoolConfig, KvEvent};

use crate::backend::{Backend, KvLayout, SeqSlice, StepBatch};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Model, validate_step};
use crate::presets::ResolvedModel;
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::{Scheduled, Scheduler, SchedulerPolicy, SeqId};
use crate::tokenizer::{IncrementalDecoder, StopCheck, StopStrings, Tokenizer};

mod remote_prefill;
pub use remote_prefill::{KvBlockChunk, RemotePrefill};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Memory for the KV cache; the number of blocks follows from the model's KV bytes per token.
    pub kv_cache_bytes: usize,
    /// On backends with their own memory (GPUs): size the KV cache as this fraction of the memory still free once
    /// the weights are loaded, instead of `kv_cache_bytes`.
    pub kv_cache_memory_fraction: Option<f64>,
    pub policy: SchedulerPolicy,
    pub prefix_caching: bool,
    /// Sequences decoding at once.
    pub running_max: usize,
    /// Requests queued beyond the running ones; `add_request` refuses more with [`Error::Overloaded`].
    pub waiting_max: usize,
    /// Buffered KV events before the buffer is dropped and consumers told to resync.
    pub kv_events_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_bytes: 256 << 20,
            kv_cache_memory_fraction: None,
            policy: SchedulerPolicy::Chunked { chunk_tokens: 512 },
            prefix_caching: true,
            running_max: 256,
            waiting_max: 4096,
            kv_events_max: 65_536,
        }
    }
}

/// What a request asks for besides its prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestParams {
    pub max_tokens: usize,
    /// EOS and stop tokens/strings are ignored until this many tokens are generated.
    pub min_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    /// Keep generating past EOS (stop token ids and strings still stop).
    pub ignore_eos: bool,
}

impl Default for RequestParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            min_tokens: 0,
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_tokens reached, or the model's context is full.
    Length,
    /// EOS, a stop token id or a stop string.
    Stop,
    Cancelled,
}

/// What one request produced in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub id: SeqId,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish: Option<FinishReason>,
    pub n_prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub n_cached_tokens: usize,
}

/// A finished request, as `generate` returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub n_prompt_tokens: usize,
    pub n_cached_tokens: usize,
}

impl Request {
    /// Ids this request may not produce now: EOS and stop tokens until `min_tokens`.
    fn banned(&self) -> &[u32] {
        if self.n_generated < self.params.min_tokens {
            &self.banned_early
        } else {
            &[]
        }
    }
}

struct Request {
    params: RequestParams,
    n_prompt: usize,
    n_generated: usize,
    sampler: Sampler,
    /// EOS and stop token ids: banned until `min_tokens` are generated.
    banned_early: Vec<u32>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
}

pub struct Engine<B: Backend> {
    backend: B,
    model: Model<B>,
    tokenizer: Tokenizer,
    cache: B::KvCache,
    layout: KvLayout,
    pool: BlockPool,
    scheduler: Scheduler,
    requests: HashMap<SeqId, Request>,
    config: EngineConfig,
    next_seed: u64,
    model_name: String,
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, resolved: ResolvedModel, config: EngineConfig) -> Result<Self> {
        let ResolvedModel {
            config: model_config,
            weights,
            tokenizer,
            name,
        } = resolved;
        if config.block_size == 0 {
            return Err(Error::InvalidRequest("block size must be positive".into()));
        }
        let started = std::time::Instant::now();
        let model = Model::load(&backend, model_config, weights.as_ref())?;
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "loaded the weights");
        // One block across all layers: a block id names the same slot in every layer.
        let block_bytes = backend.kv_block_bytes(&model.kv_layout(1, config.block_size)) * model.config.n_layers;
        let kv_cache_bytes = match (config.kv_cache_memory_fraction, backend.free_memory_bytes()) {
            (Some(fraction), Some(free)) => (free as f64 * fraction.clamp(0.0, 1.0)) as usize,
            _ => config.kv_cache_bytes,
        };
        let n_blocks = kv_cache_bytes / block_bytes;
        if n_blocks == 0 {
            return Err(Error::InvalidRequest(format!(
                "a KV cache of {kv_cache_bytes} bytes holds no block of {block_bytes} bytes; give it more memory"
            )));
        }
        let layout = model.kv_layout(n_blocks, config.block_size);
        let mut cache = backend.kv_cache(&layout)?;
        tracing::info!(n_blocks, block_bytes, "allocated the KV pool");
        let started = std::time::Instant::now();
        let warm_up_steps = backend.warm_up_steps();
        for step in &warm_up_steps {
            model.forward(&backend, &mut cache, step)?;
        }
        if !warm_up_steps.is_empty() {
            tracing::info!(
                steps = warm_up_steps.len(),
                seconds = started.elapsed().as_secs_f64(),
                "warmed up (decode graphs captured)"
            );
        }
        let pool = BlockPool::new(BlockPoolConfig {
            n_blocks,
            block_size: config.block_size,
            events_max: config.kv_events_max,
        })
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let scheduler = Scheduler::new(config.policy, config.prefix_caching, config.running_max);
        Ok(Self {
            backend,
            model,
            tokenizer,
            cache,
            layout,
            pool,
            scheduler,
            requests: HashMap::new(),
            config,
            next_seed: 0x5eed,
            model_name: name,
        })
    }

    /// The backend's GPU time by op since the last call (see [`Backend::take_op_profile`]).
    pub fn take_op_profile(&self) -> Vec<(String, f64)> {
        self.backend.take_op_profile()
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model.config
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    /// Bytes of one KV block of one layer on this engine's backend.
    pub fn kv_block_bytes(&self) -> usize {
        self.backend.kv_block_bytes(&self.layout)
    }

    pub fn block_pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        self.pool.drain_events()
    }

    pub fn n_waiting(&self) -> usize {
        self.scheduler.n_waiting()
    }

    pub fn n_running(&self) -> usize {
        self.scheduler.n_running()
    }

    /// Prompt tokens a new request would find in this engine's prefix cache (whole blocks; at least one token is
    /// always computed). Routers and the conditional-disaggregation decision use it.
    pub fn cached_prefix_tokens(&self, prompt_ids: &[u32]) -> usize {
        if !self.config.prefix_caching || prompt_ids.is_empty() {
            return 0;
        }
        let hashes = cleave_kv::block_hashes(&prompt_ids[..prompt_ids.len() - 1], self.config.block_size);
        self.pool.cached_prefix_len(&hashes) * self.config.block_size
    }

    /// Prompt tokens queued for prefill here (see [`crate::scheduler::Scheduler::queued_prefill_tokens`]).
    pub fn queued_prefill_tokens(&self) -> usize {
        self.scheduler.queued_prefill_tokens()
    }

    pub fn n_preemptions(&self) -> u64 {
        self.scheduler.n_preemptions()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.scheduler.is_empty()
    }

    /// Validates and queues a request. The error names the problem (prompt too long, token out of vocabulary...).
    pub fn add_request(&mut self, id: SeqId, prompt_ids: Vec<u32>, params: RequestParams) -> Result<()> {
        self.validate_request(id, &prompt_ids, &params)?;
        if self.scheduler.n_waiting() >= self.config.waiting_max {
            return Err(Error::Overloaded(format!(
                "{} requests are already waiting",
                self.scheduler.n_waiting()
            )));
        }
        self.track_request(id, prompt_ids.len(), params);
        self.scheduler.add(id, prompt_ids);
        Ok(())
    }

    /// Checks a request against the model and the KV cache; the error names the limit and the value given.
    fn validate_request(&self, id: SeqId, prompt_ids: &[u32], params: &RequestParams) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        let c = &self.model.config;
        if self.requests.contains_key(&id) {
            return bad(format!("request id {id} is already in use"));
        }
        if prompt_ids.is_empty() {
            return bad("the prompt is empty".into());
        }
        if let Some(&tok) = prompt_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return bad(format!(
                "prompt token id {tok} is outside the vocabulary of {} tokens",
                c.vocab_size
            ));
        }
        if params.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if params.min_tokens > params.max_tokens {
            return bad(format!(
                "min_tokens {} is greater than max_tokens {}",
                params.min_tokens, params.max_tokens
            ));
        }
        params.sampling.validate().map_err(Error::InvalidRequest)?;
        let n_total = prompt_ids.len().saturating_add(params.max_tokens);
        if n_total > c.max_context {
            return bad(format!(
                "prompt has {} tokens and max_tokens is {}: {} exceeds the model's context of {} tokens",
                prompt_ids.len(),
                params.max_tokens,
                n_total,
                c.max_context
            ));
        }
        let blocks_needed = n_total.div_ceil(self.config.block_size);
        if blocks_needed > self.pool.n_blocks() {
            return bad(format!(
                "the request needs {blocks_needed} KV blocks for {n_total} tokens; the cache has {}",
                self.pool.n_blocks()
            ));
        }
        Ok(())
    }

    /// Starts the per-request state (sampler, detokenizer, stop strings) of a validated request.
    fn track_request(&mut self, id: SeqId, n_prompt: usize, params: RequestParams) {
        self.next_seed = self
            .next_seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let eos = &self.model.config.eos_token_ids;
        let request = Request {
            n_prompt,
            n_generated: 0,
            sampler: Sampler::new(params.sampling.clone(), self.next_seed),
            banned_early: eos.iter().chain(&params.stop_token_ids).copied().collect(),
            decoder: IncrementalDecoder::default(),
            stops: StopStrings::new(params.stop.clone()),
            params,
        };
        self.requests.insert(id, request);
    }

    /// Adds a request whose prompt KV is taken as already computed (the blocks hold whatever they held): the next
    /// step decodes it at once. For decode benchmarks at long contexts only — its tokens are meaningless.
    pub fn add_request_for_decode_benchmark(
        &mut self,
        id: SeqId,
        prompt_ids: Vec<u32>,
        params: RequestParams,
    ) -> Result<()> {
        self.add_request(id, prompt_ids, params)?;
        let seq = self.scheduler.seq(id).expect("just added").tokens.clone();
        self.scheduler.remove(id, &mut self.pool);
        if !self.scheduler.add_assume_computed(id, seq, &mut self.pool) {
            self.requests.remove(&id);
            return Err(Error::Overloaded(
                "not enough free KV blocks for the benchmark sequence".into(),
            ));
        }
        Ok(())
    }

    /// Stops a request and frees its KV blocks at once. Returns its final output, or `None` for an unknown id.
    pub fn cancel(&mut self, id: SeqId) -> Option<RequestOutput> {
        let request = self.requests.remove(&id)?;
        let n_cached_tokens = self.scheduler.seq(id).map_or(0, |s| s.n_cached_tokens);
        self.scheduler.remove(id, &mut self.pool);
        Some(RequestOutput {
            id,
            token_ids: Vec::new(),
            text: String::new(),
            finish: Some(FinishReason::Cancelled),
            n_prompt_tokens: request.n_prompt,
            n_cached_tokens,
        })
    }

    /// Runs one batch. Returns an output for every request that produced a token or finished.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        self.run_step(false).map(|(outputs, _)| outputs)
    }

    /// [`Engine::step`], also returning the logits each output's token was sampled from: row `i` of the
    /// `(outputs, vocab)` matrix belongs to output `i`.
    pub fn step_with_logits(&mut self) -> Result<(Vec<RequestOutput>, Vec<f32>)> {
        self.run_step(true)
    }

    fn run_step(&mut self, want_logits: bool) -> Result<(Vec<RequestOutput>, Vec<f32>)> {
        let scheduled = self.scheduler.schedule(&mut self.pool);
        if scheduled.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (step, sampling_seqs) = self.build_step(&scheduled);
        validate_step(&step, &self.model.config, &self.layout)?;
        let logits = self.model.forward(&self.backend, &mut self.cache, &step)?;
        self.scheduler.complete(&scheduled, &mut self.pool);

        // A backend that samples on the device sends only token ids to the host; the host samples otherwise, and when
        // the caller wants the logits.
        let mut logits = logits;
        let device_tokens = if want_logits {
            None
        } else {
            let rows: Vec<_> = sampling_seqs
                .iter()
                .map(|id| {
                    let r = &self.requests[id];
                    r.sampler.row(r.banned())
                })
                .collect();
            self.backend.sample_tokens(&mut logits, &rows).transpose()?
        };
        let (tokens, host_logits) = match device_tokens {
            Some(tokens) => {
                for id in &sampling_seqs {
                    self.requests
                        .get_mut(id)
                        .expect("sampling request exists")
                        .sampler
                        .advance();
                }
                (tokens, Vec::new())
            }
            None => {
                let host = self.backend.to_host(&logits)?;
                let vocab = self.model.config.vocab_size;
                let tokens = sampling_seqs
                    .iter()
                    .enumerate()
                    .map(|(row, id)| {
                        let r = self.requests.get_mut(id).expect("sampling request exists");
                        let banned: &[u32] = if r.n_generated < r.params.min_tokens {
                            &r.banned_early
                        } else {
                            &[]
                        };
                        r.sampler.sample(&host[row * vocab..(row + 1) * vocab], banned)
                    })
                    .collect();
                (tokens, host)
            }
        };
        let mut outputs = Vec::with_capacity(sampling_seqs.len());
        for (id, token) in sampling_seqs.into_iter().zip(tokens) {
            let output = self.accept_token(id, token)?;
            if output.finish.is_some() {
                self.requests.remove(&id);
                self.scheduler.remove(id, &mut self.pool);
            }
            outputs.push(output);
        }
        Ok((outputs, host_logits))
    }

    /// Runs requests to completion (for the CLI, tests and benchmarks).
    pub fn generate(&mut self, prompts: Vec<(Vec<u32>, RequestParams)>) -> Result<Vec<Completion>> {
        let base = self.requests.keys().max().map_or(0, |m| m + 1) + (1 << 40);
        let mut done: Vec<Option<Completion>> = vec![None; prompts.len()];
        for (i, (ids, params)) in prompts.into_iter().enumerate() {
            self.add_request(base + i as u64, ids, params)?;
        }
        let mut partial: HashMap<SeqId, (Vec<u32>, String)> = HashMap::new();
        while done.iter().any(Option::is_none) {
            let outputs = self.step()?;
            if outputs.is_empty() && !self.has_unfinished() {
                break;
            }
            for out in outputs {
                let entry = partial.entry(out.id).or_default();
                entry.0.extend(&out.token_ids);
                entry.1.push_str(&out.text);
                if let Some(finish) = out.finish {
                    let (token_ids, text) = partial.remove(&out.id).unwrap_or_default();
                    done[(out.id - base) as usize] = Some(Completion {
                        token_ids,
                        text,
                        finish,
                        n_prompt_tokens: out.n_prompt_tokens,
                        n_cached_tokens: out.n_cached_tokens,
                    });
                }
            }
        }
        Ok(done.into_iter().map(|c| c.expect("every request finishes")).collect())
    }

    /// Lays out the scheduled tokens as one flat batch. Returns it and the sequences that sample, in logit-row order.
    fn build_step(&self, scheduled: &[Scheduled]) -> (StepBatch, Vec<SeqId>) {
        let bs = self.config.block_size;
        let mut step = StepBatch::default();
        let mut sampling = Vec::new();
        for s in scheduled {
            let seq = self.scheduler.seq(s.id).expect("scheduled sequence exists");
            let start = seq.n_computed;
            let end = start + s.n_new;
            let q_start = step.token_ids.len() as u32;
            for pos in start..end {
                step.token_ids.push(seq.tokens[pos]);
                step.positions.push(pos as u32);
                step.slots.push(seq.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            step.seqs.push(SeqSlice {
                q_start,
                q_len: s.n_new as u32,
                context_len: end as u32,
                block_table: seq.blocks[..end.div_ceil(bs)].to_vec(),
            });
            if end == seq.tokens.len() {
                step.logit_rows.push(step.token_ids.len() as u32 - 1);
                sampling.push(s.id);
            }
        }
        (step, sampling)
    }

    /// Records `token` for request `id`, detokenizes it and decides whether the request is finished.
    fn accept_token(&mut self, id: SeqId, token: u32) -> Result<RequestOutput> {
        let eos = &self.model.config.eos_token_ids;
        let max_context = self.model.config.max_context;
        let request = self.requests.get_mut(&id).expect("sampling request exists");
        let params = &request.params;
        let before_min = request.n_generated < params.min_tokens;
        request.n_generated += 1;
        self.scheduler.append_token(id, token);

        let is_stop_token = params.stop_token_ids.contains(&token) || (!params.ignore_eos && eos.contains(&token));
        let mut finish = if is_stop_token && !before_min {
            Some(FinishReason::Stop)
        } else if request.n_generated >= params.max_tokens || request.n_prompt + request.n_generated >= max_context {
            Some(FinishReason::Length)
        } else {
            None
        };
        let mut text = String::new();
        let mut stopped_by_string = false;
        if !(is_stop_token && finish.is_some()) {
            let mut delta = request.decoder.push(&self.tokenizer, token)?;
            if finish.is_some() {
                delta.push_str(&request.decoder.flush(&self.tokenizer)?);
            }
            match request.stops.push(&delta, !before_min) {
                StopCheck::Stopped(t) => {
                    text = t;
                    finish = Some(FinishReason::Stop);
                    stopped_by_string = true;
                }
                StopCheck::Continue(t) => text = t,
            }
        }
        if finish.is_some() && !stopped_by_string {
            text.push_str(&request.stops.finish());
        }
        let seq = self.scheduler.seq(id).expect("sequence exists");
        Ok(RequestOutput {
            id,
            token_ids: vec![token],
            text,
            finish,
            n_prompt_tokens: request.n_prompt,
            n_cached_tokens: seq.n_cached_tokens,
        })
    }
}
