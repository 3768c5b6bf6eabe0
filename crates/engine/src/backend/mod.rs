//! The backend interface: the handful of operations a Llama-family forward pass needs, over tensors that live
//! wherever the backend computes. [`crate::model::Model`] is written once against it; `cpu` implements it here and
//! `cuda` implements it on the GPU.
//!
//! Operations write into caller-provided outputs so that a backend can keep its buffers in an arena (and capture a
//! step in a CUDA graph). Per-step inputs (token ids, positions, KV slots, block tables) are uploaded once per step
//! as a [`Backend::Batch`].

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mock;
pub mod tensor_parallel;

use crate::error::Result;
use crate::rope::Rope;
use crate::sampler::SampleRow;
use crate::weights::{HostTensor, StackedWeight, WeightSource};

/// How a peer reaches an exported KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvShareKind {
    /// Another process on the same host, through a CUDA IPC handle.
    CudaIpc,
    /// Another engine in the same process, by address (host memory on the CPU, a device pointer on a GPU).
    InProcess,
}

/// A KV cache as exported for peers (another process on the same host, or another engine in this process): the
/// handle of each tensor-parallel rank's allocation and the geometry to find a block of a layer in it. Peers must run
/// the same model (same layers and block bytes) split over as many ranks: rank `r` copies into rank `r`'s share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCacheExport {
    pub kind: KvShareKind,
    /// Per rank, the backend's handle to the allocation: a `CUipcMemHandle` (64 bytes), or the address (8 bytes,
    /// little endian).
    pub handles: Vec<Vec<u8>>,
    /// Bytes from one layer to the next, in one rank's allocation.
    pub layer_bytes: u64,
    /// Bytes of one block of one layer, in one rank's allocation.
    pub block_bytes: u64,
    pub n_layers: u32,
}

impl KvCacheExport {
    /// Rank `r`'s share alone, as a one-rank backend opens it.
    pub fn rank(&self, r: usize) -> Option<KvCacheExport> {
        Some(KvCacheExport {
            handles: vec![self.handles.get(r)?.clone()],
            ..self.clone()
        })
    }

    /// The handle of a one-rank export.
    pub fn single_handle(&self) -> Result<&[u8]> {
        only_share(&self.handles).map(Vec::as_slice)
    }
}

/// The one share of a peer's cache that a one-rank backend can use.
fn only_share<T>(shares: &[T]) -> Result<&T> {
    match shares {
        [share] => Ok(share),
        many => Err(crate::error::Error::Backend {
            backend: "this",
            message: format!(
                "the peer's KV cache is split over {} ranks, this backend has one",
                many.len()
            ),
        }),
    }
}

/// The KV heads a peer copy moves when this cache and the peer's split the heads differently (tensor parallelism at
/// different degrees): heads `src_head0 .. src_head0 + n_heads` of every K and V row of this cache's block go to heads
/// `dst_head0 ..` of the peer block's rows, which hold `dst_heads` heads each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvHeadSlice {
    pub src_head0: usize,
    pub dst_head0: usize,
    pub n_heads: usize,
    pub dst_heads: usize,
}

impl KvHeadSlice {
    /// Every one of `n_heads` heads, where both caches hold the same heads.
    pub fn whole(n_heads: usize) -> Self {
        KvHeadSlice {
            src_head0: 0,
            dst_head0: 0,
            n_heads,
            dst_heads: n_heads,
        }
    }
}

/// A peer's KV cache mapped into this process (see [`Backend::open_peer_kv_cache`]).
#[derive(Debug)]
pub struct PeerKvCache {
    pub kind: KvShareKind,
    /// Where each mapped share of the peer's cache starts in this process's address space: one for a one-rank
    /// backend; for a tensor-parallel one, indexed by (rank, peer rank), 0 where the pair shares no heads.
    pub bases: Vec<u64>,
    pub layer_bytes: u64,
    pub block_bytes: u64,
    pub n_layers: u32,
}

impl PeerKvCache {
    /// Entry `i` of `bases` alone, as a one-rank backend uses it.
    pub fn share(&self, i: usize) -> PeerKvCache {
        PeerKvCache {
            kind: self.kind,
            bases: vec![self.bases[i]],
            layer_bytes: self.layer_bytes,
            block_bytes: self.block_bytes,
            n_layers: self.n_layers,
        }
    }

    /// The base of a one-rank mapping.
    pub fn single_base(&self) -> Result<u64> {
        only_share(&self.bases).copied()
    }
}

/// Shape of the paged KV cache. Layer by layer, block by block: for each layer, block `b` is one contiguous run of
/// `2 * block_size * n_kv_heads * head_dim` elements — first K then V, each token-major (`[block_size][n_kv_heads]
/// [head_dim]`). So one block of one layer can be exported or imported as a single contiguous copy (disaggregation
/// moves blocks layer by layer), and consecutive block ids form one contiguous run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub n_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Elements of one block of one layer (K and V).
    pub fn block_elems(&self) -> usize {
        2 * self.block_size * self.kv_dim()
    }
}

/// One sequence's share of a step: its rows in the step's token dimension and where its KV lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSlice {
    /// First row of this sequence's new tokens in the step.
    pub q_start: u32,
    /// Number of new tokens (1 for a decode step, up to the chunk size for prefill).
    pub q_len: u32,
    /// Tokens in the KV cache once this step has written its new ones: the new tokens sit at positions
    /// `context_len - q_len .. context_len`.
    pub context_len: u32,
    /// Physical block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

/// The host-side description of one forward step over many sequences (tokens flattened, as in varlen attention).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Per token: `block_id * block_size + offset`, where its K and V are written.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Rows (indices into the token dimension) whose logits the step returns, in order.
    pub logit_rows: Vec<u32>,
}

impl StepBatch {
    pub fn n_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// How a weight is divided among the ranks of a tensor-parallel backend ([`tensor_parallel::Tp`]). Single-device
/// backends ignore it: at one rank every split is the whole tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightSplit {
    /// Every rank holds all of it (norms, embeddings, the output projection).
    Replicated,
    /// Output features split (Megatron's column-parallel linear; vectors split along their one axis): the rows are
    /// a stack of parts of the given row counts, and rank `r` of `n` holds the `r`-th of `n` equal pieces of each
    /// part, stacked in the same order. So stacked `[q | k | v]` gives each rank its own q heads, k heads and v heads,
    /// and `[gate | up]` its own gate and up rows, and the per-rank layout is the one-device layout at fewer heads.
    Outputs(Vec<usize>),
    /// Input features split (row-parallel linear): rank `r` holds the `r`-th of `n` equal runs of columns, so its
    /// product is a partial sum that [`Backend::all_reduce`] completes. A bias given with such a weight is added
    /// once (by rank 0), not once per rank.
    Inputs,
}

/// Attention geometry that the attention kernel needs besides the batch.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

pub trait Backend: Send + Sync {
    /// A 2-D activation `(rows, cols)`, row-major.
    type Tensor: Send;
    /// A weight matrix `(out_features, in_features)` as stored by PyTorch `nn.Linear`, or a vector.
    type Weight: Send + Sync;
    type KvCache: Send;
    type Batch;

    fn name(&self) -> &'static str;
    fn weight(&self, tensor: HostTensor) -> Result<Self::Weight>;
    /// A weight of `shape` for a backend that never reads weight values (the mock), so that a model of any size is
    /// built without generating or reading a byte of it; `None` for a backend that computes (it gets the values
    /// through [`Backend::weight`], [`Backend::weight_split`] or [`Backend::weight_from`]).
    fn weight_without_values(&self, _shape: &[usize]) -> Option<Self::Weight> {
        None
    }
    /// Loads a weight divided among tensor-parallel ranks as `split` says; one rank holds all of it.
    fn weight_split(&self, tensor: HostTensor, _split: WeightSplit) -> Result<Self::Weight> {
        self.weight(tensor)
    }
    /// [`Backend::weight_split`] of `weight` as read from `source`, each rank's share read straight into its own
    /// buffer (no whole stacked tensor, no copy per rank): what [`crate::model::Model::load`] calls.
    fn weight_from(
        &self,
        source: &dyn WeightSource,
        weight: &StackedWeight,
        _split: WeightSplit,
    ) -> Result<Self::Weight> {
        self.weight(tensor_parallel::read_shard(
            source,
            weight,
            &WeightSplit::Replicated,
            0,
            1,
        )?)
    }
    /// Tensor-parallel ranks the model is divided over. The forward pass runs on each rank's share of the heads and
    /// of the MLP; tensors it allocates have per-rank shapes.
    fn n_ranks(&self) -> usize {
        1
    }
    fn kv_cache(&self, layout: &KvLayout) -> Result<Self::KvCache>;
    fn batch(&self, step: &StepBatch) -> Result<Self::Batch>;
    fn tensor(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Token rows of an uploaded batch (a captured step's batch may be padded past the step's tokens).
    fn batch_tokens(&self, batch: &Self::Batch) -> usize;
    /// Rows of the batch whose logits are computed (`logit_rows`, plus padding in a padded batch).
    fn batch_logit_rows(&self, batch: &Self::Batch) -> usize;

    /// `out[t] = table[token_ids[t]]`.
    fn embed(&self, out: &mut Self::Tensor, table: &Self::Weight, batch: &Self::Batch);
    /// `out = x / sqrt(mean(x²) + eps) * weight`, row by row.
    fn rms_norm(&self, out: &mut Self::Tensor, x: &Self::Tensor, weight: &Self::Weight, eps: f32);
    /// `x += y`, then `out = rms_norm(x) * weight`: the residual add fused with the next layer's norm.
    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        y: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
        out: &mut Self::Tensor,
    );
    /// `out = x · wᵀ (+ bias)`.
    fn linear(&self, out: &mut Self::Tensor, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Weight>);
    /// Splits each row of `qkv` (`[q heads | k heads | v heads]`), applies the per-head q/k RMSNorm when given
    /// (Qwen3), rotates q and k by the token's position (rotate-half RoPE), writes q to `q` and k, v into the token's
    /// slot of layer `layer_idx`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_kv(
        &self,
        q: &mut Self::Tensor,
        qkv: &Self::Tensor,
        cache: &mut Self::KvCache,
        layer_idx: usize,
        rope: &Rope,
        qk_norm: Option<(&Self::Weight, &Self::Weight, f32)>,
        shape: AttentionShape,
        batch: &Self::Batch,
    );
    /// Causal attention of each new token over its sequence's cached context (which includes the new tokens).
    fn attention(
        &self,
        out: &mut Self::Tensor,
        q: &Self::Tensor,
        cache: &Self::KvCache,
        layer_idx: usize,
        shape: AttentionShape,
        batch: &Self::Batch,
    );
    /// `x = Σ over ranks of x`: completes the partial sums of an input-split linear layer. Nothing at one rank.
    fn all_reduce(&self, _x: &mut Self::Tensor) {}
    /// `out = silu(gate) * up` where each row of `gate_up` is `[gate | up]`.
    fn silu_mul(&self, out: &mut Self::Tensor, gate_up: &Self::Tensor);
    /// `out[i] = x[batch.logit_rows[i]]`.
    fn gather_logit_rows(&self, out: &mut Self::Tensor, x: &Self::Tensor, batch: &Self::Batch);
    /// Copies a tensor to the host as f32, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;

    /// Bytes of one block of one layer, as exported.
    fn kv_block_bytes(&self, layout: &KvLayout) -> usize;
    /// Copies block `block` of layer `layer_idx` into `dst` (exactly `kv_block_bytes` long).
    fn export_kv_block(&self, cache: &Self::KvCache, layer_idx: usize, block: u32, dst: &mut [u8]) -> Result<()>;
    /// [`Backend::export_kv_block`] of each of `blocks` in layer `layer_idx`, one after the other into `dst`
    /// (`blocks.len() × kv_block_bytes` long). Backends with their own memory override it to gather the blocks on
    /// the device and copy once (one small synchronous copy per block limits a transfer to a few GB/s).
    fn export_kv_blocks(&self, cache: &Self::KvCache, layer_idx: usize, blocks: &[u32], dst: &mut [u8]) -> Result<()> {
        let block_bytes = if blocks.is_empty() { 0 } else { dst.len() / blocks.len() };
        if block_bytes * blocks.len() != dst.len() {
            return Err(crate::error::Error::InvalidRequest(format!(
                "{} bytes do not hold {} whole KV blocks",
                dst.len(),
                blocks.len()
            )));
        }
        for (&block, chunk) in blocks.iter().zip(dst.chunks_exact_mut(block_bytes.max(1))) {
            self.export_kv_block(cache, layer_idx, block, chunk)?;
        }
        Ok(())
    }
    /// Overwrites block `block` of layer `layer_idx` from `src` (as produced by `export_kv_block`).
    fn import_kv_block(&self, cache: &mut Self::KvCache, layer_idx: usize, block: u32, src: &[u8]) -> Result<()>;

    /// Runs one step's `forward` over the batch built from `step`. Backends may replay a captured version instead
    /// (the CUDA backend does for decode steps); the result then has at least `step.logit_rows.len()` rows, of
    /// which the first are the step's.
    fn run_step(
        &self,
        step: &StepBatch,
        forward: &mut dyn FnMut(&Self::Batch) -> Result<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        forward(&self.batch(step)?)
    }

    /// Steps to run once, before serving, whose outputs are thrown away: the CUDA backend captures a decode graph
    /// for each batch-size bucket with them, so that no request's step later stalls for a capture (tens of ms).
    /// They write K and V only where no sequence lives.
    fn warm_up_steps(&self) -> Vec<StepBatch> {
        Vec::new()
    }

    /// Samples row `i` of `logits` as `rows[i]` asks ([`crate::sampler`] defines the algorithm), where the logits
    /// live, so that only token ids cross to the host. May overwrite the logits (banned ids). `None` where the
    /// backend has no such path (the engine then samples on the host with [`crate::sampler::Sampler`]).
    fn sample_tokens(&self, _logits: &mut Self::Tensor, _rows: &[SampleRow]) -> Option<Result<Vec<u32>>> {
        None
    }

    /// This KV cache as another process on the same host can open it with [`Backend::open_peer_kv_cache`] (CUDA
    /// IPC), or `None` where the backend cannot share its memory (the CPU backend).
    fn export_kv_cache(&self, _cache: &Self::KvCache) -> Option<KvCacheExport> {
        None
    }

    /// This KV cache as another engine of this process can reach it (the in-process transport), or `None`. The
    /// cache must then stay allocated for the rest of the process: a peer may hold its address.
    fn export_kv_cache_in_process(&self, _cache: &Self::KvCache) -> Option<KvCacheExport> {
        None
    }

    /// Opens a peer's KV cache from its export, for [`Backend::copy_kv_blocks_to_peer`].
    fn open_peer_kv_cache(&self, _export: &KvCacheExport) -> Result<PeerKvCache> {
        Err(crate::error::Error::Backend {
            backend: "this",
            message: "this backend cannot open another process's KV cache".into(),
        })
    }

    /// Releases what [`Backend::open_peer_kv_cache`] mapped.
    fn close_peer_kv_cache(&self, _peer: PeerKvCache) {}

    /// Copies layer `layer_idx` of blocks `(ours, theirs)` from this cache into the peer's, device to device,
    /// ordered after the work already queued (so after the layer's K and V are written). The copy may overlap
    /// later work; [`Backend::finish_peer_copies`] waits for it.
    fn copy_kv_blocks_to_peer(
        &self,
        _cache: &Self::KvCache,
        _peer: &PeerKvCache,
        _layer_idx: usize,
        _blocks: &[(u32, u32)],
    ) -> Result<()> {
        Err(crate::error::Error::Backend {
            backend: "this",
            message: "this backend cannot copy KV into another process's cache".into(),
        })
    }

    /// [`Backend::copy_kv_blocks_to_peer`] for a peer whose blocks hold other heads: only the heads `heads` names,
    /// row by row.
    fn copy_kv_heads_to_peer(
        &self,
        _cache: &Self::KvCache,
        _peer: &PeerKvCache,
        _layer_idx: usize,
        _blocks: &[(u32, u32)],
        _heads: KvHeadSlice,
    ) -> Result<()> {
        Err(crate::error::Error::Backend {
            backend: "this",
            message: "this backend cannot copy KV heads into another cache".into(),
        })
    }

    /// Blocks until every copy queued by [`Backend::copy_kv_blocks_to_peer`] has landed in the peer's memory.
    fn finish_peer_copies(&self) -> Result<()> {
        Ok(())
    }

    /// Device memory still free, where the backend has its own (sizes the KV pool as a fraction of it).
    fn free_memory_bytes(&self) -> Option<usize> {
        None
    }

    /// GPU time by op name (kernel, or GEMM by its output and inner sizes) since the last call, in ms, largest
    /// first; empty unless the backend profiles ops (`CLEAVE_PROFILE_OPS=1` on CUDA).
    fn take_op_profile(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
}
