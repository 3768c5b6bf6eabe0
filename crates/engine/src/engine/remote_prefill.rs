//! Disaggregated prefill at the engine level, independent of any transport.
//!
//! The decode engine owns the request: [`Engine::add_remote_prefill_request`] allocates its KV blocks (reusing its
//! prefix cache) and parks it; the prefill engine's [`Engine::prefill_remote`] computes the prompt and hands over
//! each layer's blocks as soon as that layer is computed, which the decode side writes into its own blocks with
//! [`Engine::import_kv_block`]; [`Engine::finish_remote_prefill`] then starts decoding from the first token the
//! prefill side sampled. If the prefill side fails, [`Engine::fall_back_to_local_prefill`] prefills locally and
//! nothing is lost. Workers carry [`RemotePrefill`] and [`KvBlockChunk`] over their transports.

use cleave_kv::block_hashes;

use super::{Engine, RequestOutput, RequestParams};
use crate::backend::{Backend, SeqSlice, StepBatch};
use crate::error::{Error, Result};
use crate::sampler::Sampler;
use crate::scheduler::SeqId;

/// What a decode engine asks of a prefill engine for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePrefill {
    pub prompt_ids: Vec<u32>,
    /// Leading blocks the decode side already holds (its prefix cache): the prefill side does not send them.
    pub n_cached_blocks: usize,
    /// Blocks the prompt occupies: `ceil(prompt_len / block_size)`.
    pub n_blocks: usize,
}

/// One layer of one block of a request's KV, in the layout of `Backend::export_kv_block`.
pub struct KvBlockChunk<'a> {
    pub layer_idx: usize,
    /// Position of the block in the request's sequence (not a block id: each side has its own).
    pub block_index: usize,
    pub bytes: &'a [u8],
}

impl<B: Backend> Engine<B> {
    /// Decode side: validates and parks a request whose prompt another engine prefills, with its KV blocks
    /// allocated. Returns what to ask of the prefill engine.
    pub fn add_remote_prefill_request(
        &mut self,
        id: SeqId,
        prompt_ids: Vec<u32>,
        params: RequestParams,
    ) -> Result<RemotePrefill> {
        self.validate_request(id, &prompt_ids, &params)?;
        let Some((n_cached_blocks, blocks)) = self.scheduler.add_parked(id, prompt_ids.clone(), &mut self.pool) else {
            return Err(Error::Overloaded("not enough free KV blocks for the prompt".into()));
        };
        self.track_request(id, prompt_ids.len(), params);
        Ok(RemotePrefill {
            prompt_ids,
            n_cached_blocks,
            n_blocks: blocks.len(),
        })
    }

    /// Decode side: writes one layer of one block of a parked request's prompt KV. Blocks the decode side already
    /// held (`n_cached_blocks`), unknown requests and malformed chunks are refused without touching any block.
    pub fn import_kv_block(&mut self, id: SeqId, chunk: &KvBlockChunk) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if !self.scheduler.is_parked(id) {
            return bad(format!("request {id} is not waiting for remote KV"));
        }
        let seq = self.scheduler.seq(id).expect("parked sequence exists");
        let n_cached_blocks = seq.n_cached_tokens / self.config.block_size;
        if chunk.block_index < n_cached_blocks || chunk.block_index >= seq.blocks.len() {
            return bad(format!(
                "KV block {} of request {id} is outside the blocks it receives ({n_cached_blocks}..{})",
                chunk.block_index,
                seq.blocks.len()
            ));
        }
        if chunk.layer_idx >= self.layout.n_layers {
            return bad(format!(
                "layer {} does not exist (the model has {})",
                chunk.layer_idx, self.layout.n_layers
            ));
        }
        let block = seq.blocks[chunk.block_index];
        self.backend
            .import_kv_block(&mut self.cache, chunk.layer_idx, block, chunk.bytes)
    }

    /// Decode side: every block of every layer has arrived; the request decodes from `first_token`, which the
    /// prefill side sampled (with the request's seed: this side's sampler skips that draw).
    pub fn finish_remote_prefill(&mut self, id: SeqId, first_token: u32) -> Result<RequestOutput> {
        if !self.scheduler.is_parked(id) {
            return Err(Error::InvalidRequest(format!(
                "request {id} is not waiting for remote KV"
            )));
        }
        if first_token as usize >= self.model.config.vocab_size {
            return Err(Error::InvalidRequest(format!(
                "first token {first_token} is outside the vocabulary"
            )));
        }
        self.scheduler.unpark_computed(id, &mut self.pool);
        self.requests.get_mut(&id).expect("tracked request").sampler.skip_draw();
        let output = self.accept_token(id, first_token)?;
        if output.finish.is_some() {
            self.requests.remove(&id);
            self.scheduler.remove(id, &mut self.pool);
        }
        Ok(output)
    }

    /// Decode side: the remote prefill failed or timed out; prefill the request here instead.
    pub fn fall_back_to_local_prefill(&mut self, id: SeqId) -> Result<()> {
        if !self.scheduler.is_parked(id) {
            return Err(Error::InvalidRequest(format!(
                "request {id} is not waiting for remote KV"
            )));
        }
        self.scheduler.unpark_to_waiting(id, &mut self.pool);
        Ok(())
    }

    /// Prefill side: computes `remote.prompt_ids` (reusing this engine's own prefix cache), passes every layer of
    /// every block from `remote.n_cached_blocks` on to `sink` as soon as that layer is computed, and returns the
    /// first token sampled with `params`. Runs as one step of its own, outside the continuous batch; the blocks stay
    /// in this engine's prefix cache for later requests with the same prefix.
    pub fn prefill_remote(
        &mut self,
        remote: &RemotePrefill,
        params: &RequestParams,
        sink: &mut dyn FnMut(KvBlockChunk) -> Result<()>,
    ) -> Result<u32> {
        let prompt = &remote.prompt_ids;
        self.validate_request(SeqId::MAX, prompt, params)?;
        let bs = self.config.block_size;
        if remote.n_blocks != prompt.len().div_ceil(bs) || remote.n_cached_blocks > remote.n_blocks {
            return Err(Error::InvalidRequest(format!(
                "{} blocks with {} cached do not fit a prompt of {} tokens in blocks of {bs}",
                remote.n_blocks,
                remote.n_cached_blocks,
                prompt.len()
            )));
        }
        let hashes = if self.config.prefix_caching {
            block_hashes(&prompt[..prompt.len() - 1], bs)
        } else {
            Vec::new()
        };
        let mut blocks = self.pool.acquire_cached_prefix(&hashes);
        let n_cached = blocks.len();
        let Some(fresh) = self.pool.allocate_n(remote.n_blocks - n_cached) else {
            self.pool.release_all(&blocks);
            return Err(Error::Overloaded("not enough free KV blocks for the prompt".into()));
        };
        blocks.extend(fresh);

        let result = self.prefill_blocks(remote, params, &blocks, n_cached * bs, sink);
        if result.is_ok() && self.config.prefix_caching {
            let all_hashes = block_hashes(prompt, bs);
            for (i, &hash) in all_hashes.iter().enumerate().skip(n_cached) {
                self.pool
                    .register(blocks[i], hash, i.checked_sub(1).map(|p| all_hashes[p]));
            }
        }
        self.pool.release_all(&blocks);
        result
    }

    fn prefill_blocks(
        &mut self,
        remote: &RemotePrefill,
        params: &RequestParams,
        blocks: &[u32],
        n_computed: usize,
        sink: &mut dyn FnMut(KvBlockChunk) -> Result<()>,
    ) -> Result<u32> {
        let prompt = &remote.prompt_ids;
        let bs = self.config.block_size as u32;
        let positions: Vec<u32> = (n_computed as u32..prompt.len() as u32).collect();
        let step = StepBatch {
            token_ids: prompt[n_computed..].to_vec(),
            slots: positions
                .iter()
                .map(|&p| blocks[(p / bs) as usize] * bs + p % bs)
                .collect(),
            seqs: vec![SeqSlice {
                q_start: 0,
                q_len: positions.len() as u32,
                context_len: prompt.len() as u32,
                block_table: blocks.to_vec(),
            }],
            logit_rows: vec![positions.len() as u32 - 1],
            positions,
        };
        crate::model::validate_step(&step, &self.model.config, &self.layout)?;
        let mut bytes = vec![0u8; self.backend.kv_block_bytes(&self.layout)];
        let backend = &self.backend;
        let logits = self
            .model
            .forward_streaming(backend, &mut self.cache, &step, &mut |layer_idx, cache| {
                for (block_index, &block) in blocks.iter().enumerate().skip(remote.n_cached_blocks) {
                    backend.export_kv_block(cache, layer_idx, block, &mut bytes)?;
                    sink(KvBlockChunk {
                        layer_idx,
                        block_index,
                        bytes: &bytes,
                    })?;
                }
                Ok(())
            })?;
        let logits = self.backend.to_host(&logits)?;
        let vocab = self.model.config.vocab_size;
        let banned: Vec<u32> = if params.min_tokens > 0 {
            self.model
                .config
                .eos_token_ids
                .iter()
                .chain(&params.stop_token_ids)
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        self.next_seed = self
            .next_seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        Ok(Sampler::new(params.sampling.clone(), self.next_seed).sample(&logits[..vocab], &banned))
    }
}
