//! Tensor parallelism inside one engine: [`Tp`] is a [`Backend`] over N rank backends (one per GPU of a host, or
//! simulated CPU ranks), divided Megatron-style.
//!
//! - A weight is one shard per rank, cut as [`WeightSplit`] says: q/k/v and gate/up by output rows (each rank owns
//!   `n_heads / N` query heads, `n_kv_heads / N` KV heads and `intermediate / N` MLP rows), o_proj and down_proj by
//!   input columns, norms, embeddings and the output projection replicated.
//! - A tensor is one tensor per rank, in that rank's shape: the forward pass asks for per-rank shapes
//!   ([`Backend::n_ranks`]), so every operation simply runs on each rank with its own shards, and the two places
//!   where a rank's result is only a partial sum (after o_proj and after down_proj) call [`Backend::all_reduce`].
//! - The KV cache is one cache per rank holding that rank's KV heads. Block ids are shared: the engine keeps one
//!   block pool and one scheduler, and a block id names the same slot in every rank's cache, so ranks always agree on
//!   the batch.
//! - A block as exported or imported ([`Backend::export_kv_block`]) is the *whole* block, every head gathered from
//!   the ranks in the one-device layout ([`KvLayout`]). Any tensor-parallel layout therefore exchanges KV with any
//!   other — a prefill engine at 2 ranks feeds a decode engine at 1 or 4 — and the heads are resharded on the way in.
//!
//! Ranks run one after another on the calling thread. On GPUs that still overlaps them, since each rank only queues
//! work on its own device's stream; on the CPU each rank's operations are themselves multithreaded.
//!
//! Logits are computed on every rank (the output projection is replicated) and read from rank 0.

use super::cpu::{CpuBackend, CpuTensor};
use super::{
    AttentionShape, Backend, KvCacheExport, KvHeadSlice, KvLayout, PeerKvCache, SampleRow, StepBatch, WeightSplit,
};
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::weights::{HostData, HostSliceMut, HostTensor, StackedWeight, WeightSource, matrix_dims};
use rayon::prelude::*;

/// A backend that can be one rank of a [`Tp`]: it can join a reduction group with its peers.
pub trait RankBackend: Backend + Sized {
    /// What the ranks share to sum across devices (NCCL communicators on GPUs; nothing on the CPU).
    type Group: Send + Sync;
    /// Joins `ranks` (in rank order) into one reduction group.
    fn group(ranks: &[Self]) -> Result<Self::Group>;
    /// `xs[r] = Σₛ xs[s]` element-wise for every rank `r`; every rank ends with the same values.
    fn all_reduce_sum(group: &Self::Group, ranks: &[Self], xs: &mut [Self::Tensor]);
    /// Makes this rank's device current on the calling thread before its operations are issued.
    fn make_current(&self) {}

    // Captured steps (CUDA graphs). [`Tp`] drives these on every rank together: every rank replays or every rank
    // captures, since a rank running op by op beside one replaying would issue its all-reduces alone. The defaults
    // capture nothing.

    /// What ending a capture on this rank needs (the graph's own input buffer).
    type GraphCapture;
    /// Starts a step on this rank; whether a graph captured earlier can replay `step`.
    fn start_graph_step(&self, _step: &StepBatch) -> bool {
        false
    }
    /// Replays the graph [`RankBackend::start_graph_step`] found; the logits.
    fn replay_graph(&self, _step: &StepBatch) -> Result<Self::Tensor> {
        Err(tp_error("this backend captures no graphs".into()))
    }
    /// For a step a graph can run: the batch over the graph's own inputs, uploaded, and what ending the capture
    /// needs. `None`: the step runs op by op.
    fn prepare_graph_capture(&self, _step: &StepBatch) -> Result<Option<(Self::Batch, Self::GraphCapture)>> {
        Ok(None)
    }
    fn begin_graph_capture(&self) -> Result<()> {
        Ok(())
    }
    /// Ends the capture; keeps the graph if the captured forward pass gave `logits`.
    fn end_graph_capture(&self, _capture: Self::GraphCapture, _logits: Result<Self::Tensor>) {}
    /// Destroys every graph captured on this rank, once its work is done. [`Tp`] calls it before the group goes:
    /// a graph holding a communicator's collectives must not outlive the communicator.
    fn drop_graphs(&self) {}
}

/// A weight divided among ranks: shard `r` lives on rank `r`.
pub struct TpWeight<W> {
    shards: Vec<W>,
    /// Split by input columns: each rank's product is a partial sum, so a bias is added by rank 0 only.
    split_inputs: bool,
}

impl<W> TpWeight<W> {
    /// Shard `r` is rank `r`'s.
    pub fn shards(&self) -> &[W] {
        &self.shards
    }
}

/// One KV cache per rank, each holding that rank's KV heads of every block.
pub struct TpKvCache<C> {
    ranks: Vec<C>,
    /// The whole cache's layout (all heads), as blocks are exported.
    layout: KvLayout,
}

pub struct Tp<B: RankBackend> {
    /// Declared first so that it is dropped first: communicators go before the devices they run on.
    group: B::Group,
    ranks: Vec<B>,
    /// Whether decode steps may replay captured graphs at more than one rank (on unless `CLEAVE_TP_GRAPHS=0`). NCCL
    /// warns that graphs holding its collectives, launched for several GPUs from one thread, can deadlock
    /// (`cudaGraphLaunch` may block until the other GPUs' graphs run), so replays are launched from one thread per
    /// rank. At 2 H100s they take TP 2 decode from 4.49 to 4.23 ms a step at batch 1 (docs/benchmarks.md).
    graphs: bool,
}

impl<B: RankBackend> Drop for Tp<B> {
    /// Captured graphs first, then (field order) the group, then the ranks: `ncclCommDestroy` waits until every
    /// graph that captured the communicator's collectives is destroyed, so dropping the group first blocked forever
    /// (`CLEAVE_TP_GRAPHS=1 cleave selftest --tp 2` hung, GPUs idle, right after its first tensor-parallel engine).
    fn drop(&mut self) {
        for rank in &self.ranks {
            rank.make_current();
            rank.drop_graphs();
        }
    }
}

impl<B: RankBackend> Tp<B> {
    /// Ranks in order: rank `r` holds the `r`-th share of every split weight.
    pub fn new(ranks: Vec<B>) -> Result<Self> {
        if ranks.is_empty() {
            return Err(tp_error("tensor parallelism needs at least one rank".into()));
        }
        let group = B::group(&ranks)?;
        let graphs = ranks.len() == 1 || std::env::var("CLEAVE_TP_GRAPHS").as_deref() != Ok("0");
        Ok(Self { group, ranks, graphs })
    }

    pub fn ranks(&self) -> &[B] {
        &self.ranks
    }

    /// Runs `f` on every rank with its device current, in rank order.
    fn each<T>(&self, mut f: impl FnMut(usize, &B) -> T) -> Vec<T> {
        self.ranks
            .iter()
            .enumerate()
            .map(|(r, rank)| {
                rank.make_current();
                f(r, rank)
            })
            .collect()
    }

    /// The layout of one rank's cache: the whole layout at `n_kv_heads / N` heads.
    fn rank_layout(&self, layout: &KvLayout) -> Result<KvLayout> {
        let n = self.ranks.len();
        if !layout.n_kv_heads.is_multiple_of(n) {
            return Err(tp_error(format!(
                "{} KV heads cannot be divided among {n} ranks",
                layout.n_kv_heads
            )));
        }
        Ok(KvLayout {
            n_kv_heads: layout.n_kv_heads / n,
            ..*layout
        })
    }

    /// Sizes for moving one block between the whole layout and the ranks' caches: a block is `2 * block_size` rows
    /// (K then V, one row per token), a row holds every head, and rank `r`'s heads are the `r`-th of N equal pieces
    /// of each row. Returns (bytes of a whole row, bytes of one rank's piece of it).
    fn block_rows(&self, layout: &KvLayout, n_bytes: usize) -> Result<(usize, usize)> {
        let whole = self.kv_block_bytes(layout);
        let rank_bytes = self.ranks[0].kv_block_bytes(&self.rank_layout(layout)?);
        let n = self.ranks.len();
        if n_bytes != whole || rank_bytes * n != whole {
            return Err(tp_error(format!(
                "a KV block is {whole} bytes ({rank_bytes} per rank over {n} ranks); got {n_bytes}"
            )));
        }
        let row_bytes = whole / (2 * layout.block_size);
        Ok((row_bytes, row_bytes / n))
    }
}

impl<B: RankBackend> Backend for Tp<B> {
    type Tensor = Vec<B::Tensor>;
    type Weight = TpWeight<B::Weight>;
    type KvCache = TpKvCache<B::KvCache>;
    type Batch = Vec<B::Batch>;

    fn name(&self) -> &'static str {
        self.ranks[0].name()
    }

    fn n_ranks(&self) -> usize {
        self.ranks.len()
    }

    fn weight(&self, tensor: HostTensor) -> Result<Self::Weight> {
        self.weight_split(tensor, WeightSplit::Replicated)
    }

    fn weight_split(&self, tensor: HostTensor, split: WeightSplit) -> Result<Self::Weight> {
        let n = self.ranks.len();
        let shards = self
            .each(|r, rank| rank.weight(shard(&tensor, &split, r, n)?))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(TpWeight {
            shards,
            split_inputs: split == WeightSplit::Inputs,
        })
    }

    /// Each rank's shard is read from `source` straight into its own buffer, and the next rank's is read on a helper
    /// thread while this thread hands the current one to its rank: on GPUs the upload (on this thread, where the
    /// rank's device is current) overlaps the reading of the next shard, and at most two shards are in host memory.
    fn weight_from(
        &self,
        source: &dyn WeightSource,
        weight: &StackedWeight,
        split: WeightSplit,
    ) -> Result<Self::Weight> {
        let n = self.ranks.len();
        let mut shards = Vec::with_capacity(n);
        if split == WeightSplit::Replicated {
            // Every rank holds the same values: read once (generating or converting costs more than copying) and
            // copy, the last rank taking the buffer itself.
            let mut whole = Some(read_shard(source, weight, &split, 0, 1)?);
            for (r, rank) in self.ranks.iter().enumerate() {
                let host = match r + 1 < n {
                    true => shard(whole.as_ref().expect("taken by the last rank"), &split, 0, 1)?,
                    false => whole.take().expect("taken once"),
                };
                rank.make_current();
                shards.push(rank.weight(host)?);
            }
        } else {
            let split = &split;
            std::thread::scope(|scope| -> Result<()> {
                let read = |r: usize| scope.spawn(move || read_shard(source, weight, split, r, n));
                let mut next = Some(read(0));
                for (r, rank) in self.ranks.iter().enumerate() {
                    let pending = next.take().expect("a read per rank");
                    let host = pending
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
                    if r + 1 < n {
                        next = Some(read(r + 1));
                    }
                    rank.make_current();
                    shards.push(rank.weight(host)?);
                }
                Ok(())
            })?;
        }
        Ok(TpWeight {
            shards,
            split_inputs: split == WeightSplit::Inputs,
        })
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<Self::KvCache> {
        let local = self.rank_layout(layout)?;
        let ranks = self
            .each(|_, rank| rank.kv_cache(&local))
            .into_iter()
            .collect::<Result<_>>()?;
        Ok(TpKvCache { ranks, layout: *layout })
    }

    fn warm_up_steps(&self) -> Vec<StepBatch> {
        match self.graphs {
            // Every rank's pool has the same blocks, so rank 0's steps serve all.
            true => Backend::warm_up_steps(&self.ranks[0]),
            false => Vec::new(),
        }
    }

    /// Decode steps replay a graph on every rank, or are captured on every rank (see [`RankBackend`]), where graphs
    /// are on (see `graphs`).
    fn run_step(
        &self,
        step: &StepBatch,
        forward: &mut dyn FnMut(&Self::Batch) -> Result<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        if !self.graphs {
            return forward(&self.batch(step)?);
        }
        if self
            .each(|_, rank| rank.start_graph_step(step))
            .into_iter()
            .all(|ok| ok)
        {
            // Each rank's graph is launched from a thread of its own: a graph holding NCCL collectives may block
            // its launch until the other GPUs' graphs run, which one thread launching them in turn would never reach.
            return std::thread::scope(|scope| {
                let launches: Vec<_> = self
                    .ranks
                    .iter()
                    .map(|rank| {
                        scope.spawn(move || {
                            rank.make_current();
                            rank.replay_graph(step)
                        })
                    })
                    .collect();
                launches
                    .into_iter()
                    .map(|launch| {
                        launch
                            .join()
                            .unwrap_or_else(|_| Err(tp_error("a rank's graph launch panicked".into())))
                    })
                    .collect()
            });
        }
        let prepared = self
            .each(|_, rank| rank.prepare_graph_capture(step))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let Some(prepared) = prepared.into_iter().collect::<Option<Vec<_>>>() else {
            return forward(&self.batch(step)?);
        };
        let (batch, captures): (Vec<_>, Vec<_>) = prepared.into_iter().unzip();
        // This step runs for real; its replay is captured for the next steps of the bucket.
        let out = forward(&batch)?;
        let begun: Vec<bool> = self.each(|_, rank| rank.begin_graph_capture().is_ok());
        let captured = match begun.iter().all(|&ok| ok) {
            true => forward(&batch).map_err(|e| e.to_string()),
            false => Err("a rank could not start capturing".to_string()),
        };
        let (mut logits, failure): (Vec<Option<B::Tensor>>, _) = match captured {
            Ok(logits) => (logits.into_iter().map(Some).collect(), None),
            Err(e) => (Vec::new(), Some(e)),
        };
        for (r, ((rank, capture), began)) in self.ranks.iter().zip(captures).zip(begun).enumerate() {
            if !began {
                continue;
            }
            rank.make_current();
            let rank_logits = logits.get_mut(r).and_then(Option::take).ok_or_else(|| {
                tp_error(
                    failure
                        .clone()
                        .unwrap_or_else(|| "the captured pass gave no logits".into()),
                )
            });
            rank.end_graph_capture(capture, rank_logits);
        }
        Ok(out)
    }

    fn batch(&self, step: &StepBatch) -> Result<Self::Batch> {
        self.each(|_, rank| rank.batch(step)).into_iter().collect()
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.each(|_, rank| rank.tensor(rows, cols)).into_iter().collect()
    }

    fn batch_tokens(&self, batch: &Self::Batch) -> usize {
        self.ranks[0].batch_tokens(&batch[0])
    }

    fn batch_logit_rows(&self, batch: &Self::Batch) -> usize {
        self.ranks[0].batch_logit_rows(&batch[0])
    }

    fn embed(&self, out: &mut Self::Tensor, table: &Self::Weight, batch: &Self::Batch) {
        self.each(|r, rank| rank.embed(&mut out[r], &table.shards[r], &batch[r]));
    }

    fn rms_norm(&self, out: &mut Self::Tensor, x: &Self::Tensor, weight: &Self::Weight, eps: f32) {
        self.each(|r, rank| rank.rms_norm(&mut out[r], &x[r], &weight.shards[r], eps));
    }

    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        y: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
        out: &mut Self::Tensor,
    ) {
        self.each(|r, rank| rank.add_rms_norm(&mut x[r], &y[r], &weight.shards[r], eps, &mut out[r]));
    }

    fn linear(&self, out: &mut Self::Tensor, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Weight>) {
        self.each(|r, rank| {
            // The partial sums of an input-split product are added up by all_reduce: the bias goes in once.
            let bias = bias.filter(|_| !w.split_inputs || r == 0).map(|b| &b.shards[r]);
            rank.linear(&mut out[r], &x[r], &w.shards[r], bias)
        });
    }

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
    ) {
        self.each(|r, rank| {
            let qk_norm = qk_norm.map(|(qn, kn, eps)| (&qn.shards[r], &kn.shards[r], eps));
            rank.qkv_rope_kv(
                &mut q[r],
                &qkv[r],
                &mut cache.ranks[r],
                layer_idx,
                rope,
                qk_norm,
                shape,
                &batch[r],
            )
        });
    }

    fn attention(
        &self,
        out: &mut Self::Tensor,
        q: &Self::Tensor,
        cache: &Self::KvCache,
        layer_idx: usize,
        shape: AttentionShape,
        batch: &Self::Batch,
    ) {
        self.each(|r, rank| rank.attention(&mut out[r], &q[r], &cache.ranks[r], layer_idx, shape, &batch[r]));
    }

    fn all_reduce(&self, x: &mut Self::Tensor) {
        B::all_reduce_sum(&self.group, &self.ranks, x);
    }

    fn silu_mul(&self, out: &mut Self::Tensor, gate_up: &Self::Tensor) {
        self.each(|r, rank| rank.silu_mul(&mut out[r], &gate_up[r]));
    }

    fn gather_logit_rows(&self, out: &mut Self::Tensor, x: &Self::Tensor, batch: &Self::Batch) {
        self.each(|r, rank| rank.gather_logit_rows(&mut out[r], &x[r], &batch[r]));
    }

    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>> {
        self.ranks[0].make_current();
        self.ranks[0].to_host(&x[0])
    }

    /// The whole block, as one device would hold it: what crosses to other engines whatever their ranks.
    fn kv_block_bytes(&self, layout: &KvLayout) -> usize {
        self.ranks[0].kv_block_bytes(layout)
    }

    fn export_kv_block(&self, cache: &Self::KvCache, layer_idx: usize, block: u32, dst: &mut [u8]) -> Result<()> {
        let (row_bytes, piece) = self.block_rows(&cache.layout, dst.len())?;
        let mut local = vec![0u8; dst.len() / self.ranks.len()];
        for (r, (rank, rank_cache)) in self.ranks.iter().zip(&cache.ranks).enumerate() {
            rank.make_current();
            rank.export_kv_block(rank_cache, layer_idx, block, &mut local)?;
            for (row, heads) in local.chunks_exact(piece).enumerate() {
                let at = row * row_bytes + r * piece;
                dst[at..at + piece].copy_from_slice(heads);
            }
        }
        Ok(())
    }

    /// Each rank exports its share of all the blocks at once; the heads are then interleaved block by block as
    /// [`Backend::export_kv_block`] does.
    fn export_kv_blocks(&self, cache: &Self::KvCache, layer_idx: usize, blocks: &[u32], dst: &mut [u8]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let block_bytes = dst.len() / blocks.len();
        let (row_bytes, piece) = self.block_rows(&cache.layout, block_bytes)?;
        if block_bytes * blocks.len() != dst.len() {
            return Err(tp_error(format!(
                "{} bytes do not hold {} whole KV blocks",
                dst.len(),
                blocks.len()
            )));
        }
        let rank_block_bytes = block_bytes / self.ranks.len();
        let mut local = vec![0u8; rank_block_bytes * blocks.len()];
        for (r, (rank, rank_cache)) in self.ranks.iter().zip(&cache.ranks).enumerate() {
            rank.make_current();
            rank.export_kv_blocks(rank_cache, layer_idx, blocks, &mut local)?;
            for (whole, share) in dst
                .chunks_exact_mut(block_bytes)
                .zip(local.chunks_exact(rank_block_bytes))
            {
                for (row, heads) in share.chunks_exact(piece).enumerate() {
                    let at = row * row_bytes + r * piece;
                    whole[at..at + piece].copy_from_slice(heads);
                }
            }
        }
        Ok(())
    }

    fn import_kv_block(&self, cache: &mut Self::KvCache, layer_idx: usize, block: u32, src: &[u8]) -> Result<()> {
        let (row_bytes, piece) = self.block_rows(&cache.layout, src.len())?;
        let mut local = vec![0u8; src.len() / self.ranks.len()];
        for (r, (rank, rank_cache)) in self.ranks.iter().zip(&mut cache.ranks).enumerate() {
            for (row, heads) in local.chunks_exact_mut(piece).enumerate() {
                let at = row * row_bytes + r * piece;
                heads.copy_from_slice(&src[at..at + piece]);
            }
            rank.make_current();
            rank.import_kv_block(rank_cache, layer_idx, block, &local)?;
        }
        Ok(())
    }

    fn sample_tokens(&self, logits: &mut Self::Tensor, rows: &[SampleRow]) -> Option<Result<Vec<u32>>> {
        self.ranks[0].make_current();
        self.ranks[0].sample_tokens(&mut logits[0], rows)
    }

    /// Each rank's pool, exported by the rank (one handle per rank, each its heads of every block).
    fn export_kv_cache(&self, cache: &Self::KvCache) -> Option<KvCacheExport> {
        merge_exports(self.each(|r, rank| rank.export_kv_cache(&cache.ranks[r])))
    }

    fn export_kv_cache_in_process(&self, cache: &Self::KvCache) -> Option<KvCacheExport> {
        merge_exports(self.each(|r, rank| rank.export_kv_cache_in_process(&cache.ranks[r])))
    }

    /// Maps into each rank the peer ranks whose KV heads overlap its own: with as many peer ranks, rank r's
    /// twin alone (the same heads); with another split, one or several (a prefill rank at TP 2 holds the heads of
    /// two decode ranks at TP 4). The mapping's `bases` are indexed by (rank, peer rank), 0 where not mapped.
    fn open_peer_kv_cache(&self, export: &KvCacheExport) -> Result<PeerKvCache> {
        let (n, d) = (self.ranks.len(), export.handles.len());
        let mut bases = vec![0u64; n * d];
        let mut opened: Vec<(usize, PeerKvCache)> = Vec::new();
        for (r, s) in overlapping_ranks(n, d) {
            let rank = &self.ranks[r];
            rank.make_current();
            let share = export.rank(s).expect("one handle per peer rank");
            match rank.open_peer_kv_cache(&share) {
                Ok(peer) => {
                    bases[r * d + s] = peer.single_base()?;
                    opened.push((r, peer));
                }
                Err(e) => {
                    for (r, peer) in opened {
                        self.ranks[r].make_current();
                        self.ranks[r].close_peer_kv_cache(peer);
                    }
                    return Err(e);
                }
            }
        }
        Ok(PeerKvCache {
            kind: export.kind,
            bases,
            layer_bytes: export.layer_bytes,
            block_bytes: export.block_bytes,
            n_layers: export.n_layers,
        })
    }

    fn close_peer_kv_cache(&self, peer: PeerKvCache) {
        let d = peer.bases.len() / self.ranks.len();
        for (r, s) in overlapping_ranks(self.ranks.len(), d) {
            self.ranks[r].make_current();
            self.ranks[r].close_peer_kv_cache(peer.share(r * d + s));
        }
    }

    /// Each rank copies the heads it shares with each mapped peer rank: whole blocks between equal splits, the
    /// overlapping heads row by row otherwise.
    fn copy_kv_blocks_to_peer(
        &self,
        cache: &Self::KvCache,
        peer: &PeerKvCache,
        layer_idx: usize,
        blocks: &[(u32, u32)],
    ) -> Result<()> {
        let n = self.ranks.len();
        let d = peer.bases.len() / n;
        let heads = cache.layout.n_kv_heads;
        if d == 0 || peer.bases.len() != n * d || !heads.is_multiple_of(d) {
            return Err(tp_error(format!(
                "a peer mapping of {} bases does not fit an engine of {n} ranks and {heads} KV heads",
                peer.bases.len()
            )));
        }
        let (mine, theirs) = (heads / n, heads / d);
        for (r, s) in overlapping_ranks(n, d) {
            let rank = &self.ranks[r];
            rank.make_current();
            let one = peer.share(r * d + s);
            if n == d {
                rank.copy_kv_blocks_to_peer(&cache.ranks[r], &one, layer_idx, blocks)?;
                continue;
            }
            let (lo, hi) = ((r * mine).max(s * theirs), ((r + 1) * mine).min((s + 1) * theirs));
            let slice = KvHeadSlice {
                src_head0: lo - r * mine,
                dst_head0: lo - s * theirs,
                n_heads: hi - lo,
                dst_heads: theirs,
            };
            rank.copy_kv_heads_to_peer(&cache.ranks[r], &one, layer_idx, blocks, slice)?;
        }
        Ok(())
    }

    fn finish_peer_copies(&self) -> Result<()> {
        self.each(|_, rank| rank.finish_peer_copies()).into_iter().collect()
    }

    /// Rank 0's (every rank runs the same ops on the same shapes); the others' are taken and dropped.
    fn take_op_profile(&self) -> Vec<(String, f64)> {
        self.each(|_, rank| rank.take_op_profile())
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// The KV pool is divided among the ranks, so it may take the smallest rank's free memory on every rank.
    fn free_memory_bytes(&self) -> Option<usize> {
        let free = self.each(|_, rank| rank.free_memory_bytes());
        let min = free.into_iter().collect::<Option<Vec<_>>>()?.into_iter().min()?;
        Some(min * self.ranks.len())
    }
}

/// The (rank, peer rank) pairs whose KV heads overlap when the heads are split evenly over `n` ranks here and `d`
/// there: rank r holds the fraction [r/n, (r+1)/n) of them, peer rank s [s/d, (s+1)/d).
fn overlapping_ranks(n: usize, d: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).flat_map(move |r| {
        (0..d)
            .filter(move |&s| r * d < (s + 1) * n && s * n < (r + 1) * d)
            .map(move |s| (r, s))
    })
}

/// One export of every rank's share, or `None` if a rank cannot share its pool.
fn merge_exports(exports: Vec<Option<KvCacheExport>>) -> Option<KvCacheExport> {
    let exports: Vec<KvCacheExport> = exports.into_iter().collect::<Option<_>>()?;
    let first = exports.first()?.clone();
    Some(KvCacheExport {
        handles: exports.into_iter().flat_map(|e| e.handles).collect(),
        ..first
    })
}

/// Simulated ranks on the host: the all-reduce adds the ranks' tensors in rank order, so it is deterministic.
impl RankBackend for CpuBackend {
    type Group = ();
    type GraphCapture = ();

    fn group(_ranks: &[Self]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum(_group: &(), _ranks: &[Self], xs: &mut [CpuTensor]) {
        let Some((sum, rest)) = xs.split_first_mut() else {
            return;
        };
        for x in rest.iter() {
            sum.data.iter_mut().zip(&x.data).for_each(|(a, b)| *a += b);
        }
        for x in rest {
            x.data.copy_from_slice(&sum.data);
        }
    }
}

fn tp_error(message: String) -> Error {
    Error::Backend {
        backend: "tensor-parallel",
        message,
    }
}

/// Rank `rank`'s share (of `n`) of `tensor` under `split`.
pub fn shard(tensor: &HostTensor, split: &WeightSplit, rank: usize, n: usize) -> Result<HostTensor> {
    let (shape, take) = shard_plan(&tensor.shape, split, rank, n)?;
    let mut data = HostData::zeroed(tensor.data.dtype(), take.iter().map(ExactSizeIterator::len).sum());
    match (&tensor.data, data.as_mut_slice()) {
        (HostData::F32(v), HostSliceMut::F32(out)) => gather(v, &take, out),
        (HostData::BF16(v), HostSliceMut::BF16(out)) => gather(v, &take, out),
        _ => unreachable!("zeroed in the tensor's own dtype"),
    }
    Ok(HostTensor { shape, data })
}

/// Rank `rank`'s share (of `n`) of `weight` under `split`, read from `source`: the same values as
/// [`shard`]`(weight.read_by_stacking(source))`, but each part's rows or columns for this rank are read straight into
/// one buffer, so every value is written once (the whole stacked tensor is never built).
pub fn read_shard(
    source: &dyn WeightSource,
    weight: &StackedWeight,
    split: &WeightSplit,
    rank: usize,
    n: usize,
) -> Result<HostTensor> {
    let whole_shape = weight.shape();
    let (shape, _) = shard_plan(&whole_shape, split, rank, n)?;
    let (n_rows, n_cols) = matrix_dims(&whole_shape);
    let mut data = HostData::zeroed(weight.host_dtype(source)?, shape.iter().product());
    let mut out = data.as_mut_slice();
    let mut at = 0;
    // The blocks `shard_plan` cuts, in its order: whole rows of each part for an output split, a run of columns of
    // every row for an input split.
    let mut read = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        let len = rows.len() * cols.len();
        weight.read_block(source, rows, cols, out.slice(at..at + len))?;
        at += len;
        Result::Ok(())
    };
    match split {
        WeightSplit::Replicated => read(0..n_rows, 0..n_cols)?,
        WeightSplit::Outputs(parts) => {
            let mut part_start = 0;
            for &part in parts {
                let first_row = part_start + rank * (part / n);
                read(first_row..first_row + part / n, 0..n_cols)?;
                part_start += part;
            }
        }
        WeightSplit::Inputs => {
            let piece = n_cols / n;
            read(0..n_rows, rank * piece..(rank + 1) * piece)?;
        }
    }
    Ok(HostTensor { shape, data })
}

/// Copies the elements of `src` in `take`, concatenated, into `out`, in parallel: a rank's shards of a 70B model are
/// 70 GB (a 70B worker at TP 2 took 325 s to load on the GPU host with single-threaded copies like this one).
fn gather<T: Copy + Send + Sync>(src: &[T], take: &[std::ops::Range<usize>], out: &mut [T]) {
    const CHUNK: usize = 1 << 20;
    let mut pieces = Vec::new();
    let mut rest = out;
    for range in take {
        let (dst, tail) = rest.split_at_mut(range.len());
        pieces.extend(dst.chunks_mut(CHUNK).zip(src[range.clone()].chunks(CHUNK)));
        rest = tail;
    }
    pieces.into_par_iter().for_each(|(d, s)| d.copy_from_slice(s));
}

/// The shard's shape and the element ranges of the whole tensor it is made of, in order.
fn shard_plan(
    shape: &[usize],
    split: &WeightSplit,
    rank: usize,
    n: usize,
) -> Result<(Vec<usize>, Vec<std::ops::Range<usize>>)> {
    let bad = |what: String| Err(tp_error(format!("cannot split a tensor of shape {shape:?} {what}")));
    let (&rows, rest) = shape.split_first().unwrap_or((&1, &[]));
    let cols: usize = rest.iter().product();
    match split {
        WeightSplit::Replicated => Ok((shape.to_vec(), std::iter::once(0..rows * cols).collect())),
        WeightSplit::Outputs(parts) => {
            if parts.iter().sum::<usize>() != rows || parts.iter().any(|p| !p.is_multiple_of(n)) {
                return bad(format!("into parts of {parts:?} rows, each divided among {n} ranks"));
            }
            let mut take = Vec::with_capacity(parts.len());
            let mut part_start = 0;
            for &part in parts {
                let first_row = part_start + rank * (part / n);
                take.push(first_row * cols..(first_row + part / n) * cols);
                part_start += part;
            }
            let mut shard_shape = shape.to_vec();
            shard_shape[0] = rows / n;
            Ok((shard_shape, take))
        }
        WeightSplit::Inputs => {
            if shape.len() != 2 || !cols.is_multiple_of(n) {
                return bad(format!("by input columns among {n} ranks"));
            }
            let piece = cols / n;
            let take = (0..rows)
                .map(|row| row * cols + rank * piece..row * cols + (rank + 1) * piece)
                .collect();
            Ok((vec![rows, piece], take))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(shape: &[usize]) -> HostTensor {
        let n = shape.iter().product::<usize>();
        HostTensor {
            shape: shape.to_vec(),
            data: HostData::F32((0..n).map(|i| i as f32).collect()),
        }
    }

    fn values(t: &HostTensor) -> Vec<f32> {
        t.to_f32()
    }

    #[test]
    fn output_split_gives_each_rank_its_rows_of_every_part() {
        // Parts of 4 and 2 rows (think q heads and k heads), 3 columns, over 2 ranks.
        let t = host(&[6, 3]);
        let split = WeightSplit::Outputs(vec![4, 2]);
        let r0 = shard(&t, &split, 0, 2).unwrap();
        let r1 = shard(&t, &split, 1, 2).unwrap();
        assert_eq!(r0.shape, vec![3, 3]);
        // rank 0: rows 0, 1 of the first part and row 4 (first of the second); rank 1: rows 2, 3 and 5.
        assert_eq!(values(&r0), [0., 1., 2., 3., 4., 5., 12., 13., 14.]);
        assert_eq!(values(&r1), [6., 7., 8., 9., 10., 11., 15., 16., 17.]);
    }

    #[test]
    fn output_split_of_a_vector_splits_its_one_axis() {
        let t = host(&[8]);
        let s = shard(&t, &WeightSplit::Outputs(vec![4, 4]), 1, 2).unwrap();
        assert_eq!(s.shape, vec![4]);
        assert_eq!(values(&s), [2., 3., 6., 7.]);
    }

    #[test]
    fn input_split_gives_each_rank_its_columns() {
        let t = host(&[2, 4]);
        let s = shard(&t, &WeightSplit::Inputs, 1, 2).unwrap();
        assert_eq!(s.shape, vec![2, 2]);
        assert_eq!(values(&s), [2., 3., 6., 7.]);
    }

    #[test]
    fn uneven_splits_are_refused_with_the_shape() {
        let t = host(&[6, 3]);
        let message = |split| shard(&t, &split, 0, 2).err().expect("refused").to_string();
        let e = message(WeightSplit::Outputs(vec![3, 3]));
        assert!(e.contains("[6, 3]") && e.contains("2 ranks"), "{e}");
        let e = message(WeightSplit::Inputs);
        assert!(e.contains("input columns"), "{e}");
    }

    #[test]
    fn host_all_reduce_sums_every_rank_into_every_rank() {
        let t = |v: f32| CpuTensor {
            rows: 1,
            cols: 2,
            data: vec![v, 2.0 * v],
        };
        let mut xs = vec![t(1.0), t(2.0), t(4.0)];
        CpuBackend::all_reduce_sum(&(), &[CpuBackend, CpuBackend, CpuBackend], &mut xs);
        for x in &xs {
            assert_eq!(x.data, [7.0, 14.0]);
        }
    }

    #[test]
    fn kv_blocks_export_whole_and_import_back_into_any_rank_count() {
        let layout = KvLayout {
            n_layers: 2,
            n_blocks: 3,
            block_size: 4,
            n_kv_heads: 4,
            head_dim: 2,
        };
        // A whole block with distinct values, imported at 4 ranks, exported again at 4 ranks; and the same bytes
        // imported into one CPU cache: both exports equal the input.
        let block: Vec<u8> = (0..layout.block_elems())
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let tp = Tp::new(vec![CpuBackend; 4]).unwrap();
        let mut cache = tp.kv_cache(&layout).unwrap();
        tp.import_kv_block(&mut cache, 1, 2, &block).unwrap();
        let mut out = vec![0u8; block.len()];
        tp.export_kv_block(&cache, 1, 2, &mut out).unwrap();
        assert_eq!(out, block);
        // Rank 1 holds head 1 of every token: elements 2..4 of each 8-element row.
        let rank1 = &cache.ranks[1].layer(1)[2 * layout.block_elems() / 4..][..4];
        assert_eq!(rank1, [2.0, 3.0, 10.0, 11.0]);
        let e = tp.export_kv_block(&cache, 1, 2, &mut out[1..]).unwrap_err().to_string();
        assert!(e.contains("bytes"), "{e}");
    }
}
