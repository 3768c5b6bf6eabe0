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
use crate::backend::{Backend, KvCacheExport, PeerKvCache, SeqSlice, StepBatch};
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

/// What [`Engine::prefill_remote`] and [`Engine::prefill_remote_to_peer`] do after each layer: `(backend, cache,
/// layer, blocks)`, where `blocks` are this engine's blocks of the request, by position in its sequence.
type LayerDone<'a, B> = dyn FnMut(&B, &<B as Backend>::KvCache, usize, &[u32]) -> Result<()> + 'a;

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

    /// Decode side: the block ids a parked request's KV goes to, by position in its sequence (what a prefill engine
    /// writing straight into this engine's cache needs), or `None` if the request is not parked.
    pub fn parked_blocks(&self, id: SeqId) -> Option<Vec<u32>> {
        self.scheduler
            .is_parked(id)
            .then(|| self.scheduler.seq(id).map(|seq| seq.blocks.clone()))
            .flatten()
    }

    /// This engine's KV cache as a prefill engine in another process on this host can open it (CUDA IPC), or
    /// `None` where the backend cannot share memory.
    pub fn export_kv_cache(&self) -> Option<KvCacheExport> {
        self.backend.export_kv_cache(&self.cache)
    }

    /// Decode side: this engine's KV cache as another engine of this process can write into it. The engine must
    /// then not be dropped before the process ends (a peer may hold the address).
    pub fn export_kv_cache_in_process(&self) -> Option<KvCacheExport> {
        self.backend.export_kv_cache_in_process(&self.cache)
    }

    /// Prefill side: maps a decode engine's exported cache, to write remote prefills straight into it.
    pub fn open_peer_kv_cache(&self, export: &KvCacheExport) -> Result<PeerKvCache> {
        // Each rank's share holds its heads of every block: the shares add up to the whole block.
        let block_bytes = export.block_bytes as usize * export.handles.len();
        if export.n_layers as usize != self.layout.n_layers || block_bytes != self.backend.kv_block_bytes(&self.layout)
        {
            return Err(Error::InvalidRequest(format!(
                "the peer's KV cache ({} layers of {block_bytes}-byte blocks) does not match this model's",
                export.n_layers
            )));
        }
        self.backend.open_peer_kv_cache(export)
    }

    pub fn close_peer_kv_cache(&self, peer: PeerKvCache) {
        self.backend.close_peer_kv_cache(peer);
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
        let block_bytes = self.backend.kv_block_bytes(&self.layout);
        let mut bytes = Vec::new();
        self.prefill_remote_with(remote, params, &mut |backend, cache, layer_idx, blocks| {
            // The layer's new blocks leave the device in one copy, then cross one block at a time.
            let new = blocks.get(remote.n_cached_blocks..).unwrap_or_default();
            bytes.resize(new.len() * block_bytes, 0);
            backend.export_kv_blocks(cache, layer_idx, new, &mut bytes)?;
            for (i, chunk) in bytes.chunks_exact(block_bytes).enumerate() {
                sink(KvBlockChunk {
                    layer_idx,
                    block_index: remote.n_cached_blocks + i,
                    bytes: chunk,
                })?;
            }
            Ok(())
        })
    }

    /// Prefill side, same host: as [`prefill_remote`](Self::prefill_remote), but each layer's blocks are copied
    /// device to device into the decode engine's cache (`peer`, opened with
    /// [`open_peer_kv_cache`](Self::open_peer_kv_cache)): block `i` of the request goes to `dst_blocks[i]`.
    /// `keep_going` is asked before each layer; an error from it (a cancel) stops the prefill there. When this
    /// returns, every copy has completed.
    pub fn prefill_remote_to_peer(
        &mut self,
        remote: &RemotePrefill,
        params: &RequestParams,
        peer: &PeerKvCache,
        dst_blocks: &[u32],
        keep_going: &mut dyn FnMut() -> Result<()>,
    ) -> Result<u32> {
        if dst_blocks.len() != remote.n_blocks {
            return Err(Error::InvalidRequest(format!(
                "{} destination blocks for a prompt of {} blocks",
                dst_blocks.len(),
                remote.n_blocks
            )));
        }
        let first_token = self.prefill_remote_with(remote, params, &mut |backend, cache, layer_idx, blocks| {
            keep_going()?;
            let pairs: Vec<(u32, u32)> = blocks
                .iter()
                .zip(dst_blocks)
                .skip(remote.n_cached_blocks)
                .map(|(&ours, &theirs)| (ours, theirs))
                .collect();
            backend.copy_kv_blocks_to_peer(cache, peer, layer_idx, &pairs)
        });
        // Also after a failure or a cancel: copies already queued must land before the blocks change hands.
        let copied = self.backend.finish_peer_copies();
        let first_token = first_token?;
        copied?;
        Ok(first_token)
    }

    /// Computes the prompt and calls `per_layer(backend, cache, layer, blocks)` after each layer's KV is written
    /// (`blocks` are this engine's blocks for the request, by position in its sequence).
    fn prefill_remote_with(
        &mut self,
        remote: &RemotePrefill,
        params: &RequestParams,
        per_layer: &mut LayerDone<'_, B>,
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

        let result = self.prefill_blocks(remote, params, &blocks, n_cached * bs, per_layer);
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
        per_layer: &mut LayerDone<'_, B>,
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
        let backend = &self.backend;
        let logits = self
            .model
            .forward_streaming(backend, &mut self.cache, &step, &mut |layer_idx, cache| {
                per_layer(backend, cache, layer_idx, blocks)
            })?;
        let mut logits = logits;
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
        // The first draw of the request's sampler: on the device where the backend can, else on the host.
        let mut sampler = Sampler::new(params.sampling.clone(), self.next_seed);
        if let Some(tokens) = self.backend.sample_tokens(&mut logits, &[sampler.row(&banned)]) {
            return Ok(tokens?[0]);
        }
        let vocab = self.model.config.vocab_size;
        let logits = self.backend.to_host(&logits)?;
        Ok(sampler.sample(&logits[..vocab], &banned))
    }
}
