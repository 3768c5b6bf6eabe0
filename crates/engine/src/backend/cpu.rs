//! The CPU backend: f32 activations and KV cache, weights in f32 or bf16 (kept bf16 in memory, widened in registers),
//! multithreaded with rayon.
//!
//! # Why the matrix product is written here rather than taken from `gemm` or `faer`
//! cleave promises bit-identical greedy tokens whether a sequence runs alone or in a batch of 64, prefilled whole or
//! in chunks, aggregated or disaggregated. That holds only if each output element is summed in an order that does not
//! depend on the batch shape. `gemm` and `faer` choose their blocking (and thus the order of the k-sum) from the
//! problem size and switch to different kernels for matrix-vector products, so a token's logits would change with its
//! neighbours. The kernel below sums every dot product in one fixed order — eight interleaved lanes over k, reduced
//! by a fixed tree — whatever tile, thread or batch it runs in; tiling only decides which dot products run together.

use half::bf16;
use rayon::prelude::*;

use super::{AttentionShape, Backend, KvCacheExport, KvHeadSlice, KvLayout, KvShareKind, PeerKvCache, StepBatch};
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::weights::{HostData, HostTensor};

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// A row-major `(rows, cols)` f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

pub enum CpuWeightData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// A weight `(rows, cols)`; vectors have one row.
pub struct CpuWeight {
    pub rows: usize,
    pub cols: usize,
    pub data: CpuWeightData,
}

impl CpuWeight {
    fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            CpuWeightData::F32(v) => v.clone(),
            CpuWeightData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// One f32 buffer, layer after layer, each laid out as [`KvLayout`] describes. One allocation, so that a peer in
/// this process can address any block from its start (the in-process transport).
pub struct CpuKvCache {
    pub layout: KvLayout,
    pub pool: Vec<f32>,
}

impl CpuKvCache {
    fn layer_elems(&self) -> usize {
        self.layout.n_blocks * self.layout.block_elems()
    }

    pub fn layer(&self, layer_idx: usize) -> &[f32] {
        let n = self.layer_elems();
        &self.pool[layer_idx * n..(layer_idx + 1) * n]
    }

    fn layer_mut(&mut self, layer_idx: usize) -> &mut [f32] {
        let n = self.layer_elems();
        &mut self.pool[layer_idx * n..(layer_idx + 1) * n]
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Batch = StepBatch;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, tensor: HostTensor) -> Result<CpuWeight> {
        let (rows, cols) = match tensor.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => {
                return Err(Error::Backend {
                    backend: "cpu",
                    message: format!("weights must be 1-D or 2-D, got shape {other:?}"),
                });
            }
        };
        let data = match tensor.data {
            HostData::F32(v) => CpuWeightData::F32(v),
            HostData::BF16(v) => CpuWeightData::BF16(v),
        };
        Ok(CpuWeight { rows, cols, data })
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<CpuKvCache> {
        let per_layer = layout
            .n_blocks
            .checked_mul(layout.block_elems())
            .ok_or_else(|| Error::Backend {
                backend: "cpu",
                message: format!("KV cache of {} blocks overflows", layout.n_blocks),
            })?;
        let too_big = || Error::Backend {
            backend: "cpu",
            message: format!(
                "cannot allocate a KV cache of {} MiB; lower --kv-cache-mib",
                (per_layer.saturating_mul(4 * layout.n_layers)) >> 20
            ),
        };
        let total = per_layer.checked_mul(layout.n_layers).ok_or_else(too_big)?;
        let mut pool = Vec::new();
        pool.try_reserve_exact(total).map_err(|_| too_big())?;
        pool.resize(total, 0.0);
        Ok(CpuKvCache { layout: *layout, pool })
    }

    fn batch(&self, step: &StepBatch) -> Result<StepBatch> {
        Ok(step.clone())
    }

    fn batch_tokens(&self, batch: &StepBatch) -> usize {
        batch.n_tokens()
    }

    fn batch_logit_rows(&self, batch: &StepBatch) -> usize {
        batch.logit_rows.len()
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn embed(&self, out: &mut CpuTensor, table: &CpuWeight, batch: &StepBatch) {
        let cols = table.cols;
        out.data
            .par_chunks_mut(cols)
            .zip(&batch.token_ids)
            .for_each(|(row, &id)| {
                let start = id as usize * cols;
                match &table.data {
                    CpuWeightData::F32(t) => row.copy_from_slice(&t[start..start + cols]),
                    CpuWeightData::BF16(t) => {
                        for (o, x) in row.iter_mut().zip(&t[start..start + cols]) {
                            *o = x.to_f32();
                        }
                    }
                }
            });
    }

    fn rms_norm(&self, out: &mut CpuTensor, x: &CpuTensor, weight: &CpuWeight, eps: f32) {
        let w = weight.to_f32_vec();
        out.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(o, xr)| rms_norm_row(o, xr, &w, eps));
    }

    fn add_rms_norm(&self, x: &mut CpuTensor, y: &CpuTensor, weight: &CpuWeight, eps: f32, out: &mut CpuTensor) {
        let w = weight.to_f32_vec();
        out.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks_mut(x.cols))
            .zip(y.data.par_chunks(y.cols))
            .for_each(|((o, xr), yr)| {
                xr.iter_mut().zip(yr).for_each(|(a, b)| *a += b);
                rms_norm_row(o, xr, &w, eps);
            });
    }

    fn linear(&self, out: &mut CpuTensor, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) {
        assert_eq!(
            x.cols, w.cols,
            "linear: x has {} columns, weight expects {}",
            x.cols, w.cols
        );
        assert_eq!((out.rows, out.cols), (x.rows, w.rows), "linear: output shape mismatch");
        let bias = bias.map(CpuWeight::to_f32_vec);
        match &w.data {
            CpuWeightData::F32(wd) => matmul_nt(&mut out.data, &x.data, wd, x.rows, w.rows, x.cols, bias.as_deref()),
            CpuWeightData::BF16(wd) => matmul_nt(&mut out.data, &x.data, wd, x.rows, w.rows, x.cols, bias.as_deref()),
        }
    }

    fn qkv_rope_kv(
        &self,
        q: &mut CpuTensor,
        qkv: &CpuTensor,
        cache: &mut CpuKvCache,
        layer_idx: usize,
        rope: &Rope,
        qk_norm: Option<(&CpuWeight, &CpuWeight, f32)>,
        shape: AttentionShape,
        batch: &StepBatch,
    ) {
        let (hd, q_dim) = (shape.head_dim, shape.n_heads * shape.head_dim);
        let kv_dim = shape.n_kv_heads * hd;
        let norms = qk_norm.map(|(qn, kn, eps)| (qn.to_f32_vec(), kn.to_f32_vec(), eps));
        // Rotate q and k in a copy of each row, then scatter: q to `q`, k and v to the cache.
        let mut rows = qkv.data.clone();
        rows.par_chunks_mut(qkv.cols)
            .zip(&batch.positions)
            .for_each(|(row, &pos)| {
                let (q_part, rest) = row.split_at_mut(q_dim);
                let k_part = &mut rest[..kv_dim];
                if let Some((qn, kn, eps)) = &norms {
                    for (part, w) in [(&mut *q_part, qn), (&mut *k_part, kn)] {
                        for head in part.chunks_exact_mut(hd) {
                            let input = head.to_vec();
                            rms_norm_row(head, &input, w, *eps);
                        }
                    }
                }
                rope_row(q_part, hd, pos, &rope.inv_freq);
                rope_row(k_part, hd, pos, &rope.inv_freq);
            });
        let layout = cache.layout;
        let bs = layout.block_size;
        let layer = cache.layer_mut(layer_idx);
        for (t, row) in rows.chunks_exact(qkv.cols).enumerate() {
            q.data[t * q_dim..(t + 1) * q_dim].copy_from_slice(&row[..q_dim]);
            let slot = batch.slots[t] as usize;
            let base = (slot / bs) * layout.block_elems();
            let k_at = base + (slot % bs) * kv_dim;
            let v_at = base + (bs + slot % bs) * kv_dim;
            layer[k_at..k_at + kv_dim].copy_from_slice(&row[q_dim..q_dim + kv_dim]);
            layer[v_at..v_at + kv_dim].copy_from_slice(&row[q_dim + kv_dim..q_dim + 2 * kv_dim]);
        }
    }

    fn attention(
        &self,
        out: &mut CpuTensor,
        q: &CpuTensor,
        cache: &CpuKvCache,
        layer_idx: usize,
        shape: AttentionShape,
        batch: &StepBatch,
    ) {
        let layout = cache.layout;
        let (bs, kv_dim, hd) = (layout.block_size, layout.kv_dim(), shape.head_dim);
        let group = shape.n_heads / shape.n_kv_heads;
        let layer = cache.layer(layer_idx);
        let mut row_seq = vec![0usize; q.rows];
        for (s, seq) in batch.seqs.iter().enumerate() {
            row_seq[seq.q_start as usize..(seq.q_start + seq.q_len) as usize].fill(s);
        }
        out.data.par_chunks_mut(q.cols).enumerate().for_each(|(r, out_row)| {
            let seq = &batch.seqs[row_seq[r]];
            // Causal: the token at position `pos` sees positions 0..=pos.
            let pos = (seq.context_len - seq.q_len) as usize + (r - seq.q_start as usize);
            let n_ctx = pos + 1;
            let key_at = |t: usize| {
                let block = seq.block_table[t / bs] as usize;
                block * layout.block_elems() + (t % bs) * kv_dim
            };
            let mut scores = vec![0f32; n_ctx];
            for h in 0..shape.n_heads {
                let kv_off = (h / group) * hd;
                let q_head = &q.row(r)[h * hd..(h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (t, s) in scores.iter_mut().enumerate() {
                    let k_at = key_at(t) + kv_off;
                    *s = dot(q_head, &layer[k_at..k_at + hd]) * shape.scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out_row[h * hd..(h + 1) * hd];
                o.fill(0.0);
                for (t, &p) in scores.iter().enumerate() {
                    let v_at = key_at(t) + bs * kv_dim + kv_off;
                    for (oi, vi) in o.iter_mut().zip(&layer[v_at..v_at + hd]) {
                        *oi = p.mul_add(*vi, *oi);
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        });
    }

    fn silu_mul(&self, out: &mut CpuTensor, gate_up: &CpuTensor) {
        let inter = out.cols;
        out.data
            .par_chunks_mut(inter)
            .zip(gate_up.data.par_chunks(2 * inter))
            .for_each(|(o, gu)| {
                let (gate, up) = gu.split_at(inter);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
    }

    fn gather_logit_rows(&self, out: &mut CpuTensor, x: &CpuTensor, batch: &StepBatch) {
        for (i, &r) in batch.logit_rows.iter().enumerate() {
            out.data[i * x.cols..(i + 1) * x.cols].copy_from_slice(x.row(r as usize));
        }
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn kv_block_bytes(&self, layout: &KvLayout) -> usize {
        layout.block_elems() * 4
    }

    fn export_kv_block(&self, cache: &CpuKvCache, layer_idx: usize, block: u32, dst: &mut [u8]) -> Result<()> {
        let src = block_range(cache, layer_idx, block, dst.len())?;
        for (d, s) in dst.chunks_exact_mut(4).zip(&cache.layer(layer_idx)[src]) {
            d.copy_from_slice(&s.to_le_bytes());
        }
        Ok(())
    }

    fn import_kv_block(&self, cache: &mut CpuKvCache, layer_idx: usize, block: u32, src: &[u8]) -> Result<()> {
        let dst = block_range(cache, layer_idx, block, src.len())?;
        for (d, s) in cache.layer_mut(layer_idx)[dst].iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
        Ok(())
    }

    fn export_kv_cache_in_process(&self, cache: &CpuKvCache) -> Option<KvCacheExport> {
        let layout = cache.layout;
        Some(KvCacheExport {
            kind: KvShareKind::InProcess,
            handles: vec![(cache.pool.as_ptr() as u64).to_le_bytes().to_vec()],
            layer_bytes: (cache.layer_elems() * 4) as u64,
            block_bytes: (layout.block_elems() * 4) as u64,
            n_layers: layout.n_layers as u32,
        })
    }

    fn open_peer_kv_cache(&self, export: &KvCacheExport) -> Result<PeerKvCache> {
        match (export.kind, <[u8; 8]>::try_from(export.single_handle()?)) {
            (KvShareKind::InProcess, Ok(address)) => Ok(PeerKvCache {
                kind: KvShareKind::InProcess,
                bases: vec![u64::from_le_bytes(address)],
                layer_bytes: export.layer_bytes,
                block_bytes: export.block_bytes,
                n_layers: export.n_layers,
            }),
            _ => Err(Error::Backend {
                backend: "cpu",
                message: "the CPU backend reaches another KV cache only inside its own process".into(),
            }),
        }
    }

    /// Whole blocks: every head of each row.
    fn copy_kv_blocks_to_peer(
        &self,
        cache: &CpuKvCache,
        peer: &PeerKvCache,
        layer_idx: usize,
        blocks: &[(u32, u32)],
    ) -> Result<()> {
        let heads = KvHeadSlice::whole(cache.layout.n_kv_heads);
        self.copy_kv_heads_to_peer(cache, peer, layer_idx, blocks, heads)
    }

    fn copy_kv_heads_to_peer(
        &self,
        cache: &CpuKvCache,
        peer: &PeerKvCache,
        layer_idx: usize,
        blocks: &[(u32, u32)],
        heads: KvHeadSlice,
    ) -> Result<()> {
        let layout = cache.layout;
        let (hd, src_row) = (layout.head_dim, layout.kv_dim());
        let dst_row = heads.dst_heads * hd;
        let dst_block_bytes = (2 * layout.block_size * dst_row * 4) as u64;
        let peer_blocks = peer.layer_bytes / peer.block_bytes.max(1);
        if peer.kind != KvShareKind::InProcess
            || peer.block_bytes != dst_block_bytes
            || layer_idx >= peer.n_layers as usize
            || heads.src_head0 + heads.n_heads > layout.n_kv_heads
            || heads.dst_head0 + heads.n_heads > heads.dst_heads
        {
            return Err(Error::Backend {
                backend: "cpu",
                message: format!(
                    "heads {heads:?} of {} do not fit the peer's KV cache ({} layers of {}-byte blocks)",
                    layout.n_kv_heads, peer.n_layers, peer.block_bytes
                ),
            });
        }
        let base = peer.single_base()?;
        let src_layer = cache.layer(layer_idx);
        let n = heads.n_heads * hd;
        for &(src, dst) in blocks {
            if src as usize >= layout.n_blocks || dst as u64 >= peer_blocks {
                return Err(Error::Backend {
                    backend: "cpu",
                    message: format!("KV block {src} → peer block {dst} is out of range"),
                });
            }
            let block = &src_layer[src as usize * layout.block_elems()..][..layout.block_elems()];
            let dst_block = base + layer_idx as u64 * peer.layer_bytes + dst as u64 * peer.block_bytes;
            // K rows then V rows: 2 × block_size rows in both blocks.
            for row in 0..2 * layout.block_size {
                let from = &block[row * src_row + heads.src_head0 * hd..][..n];
                let to = dst_block + ((row * dst_row + heads.dst_head0 * hd) * 4) as u64;
                // SAFETY: `base` is the start of a live CpuKvCache of this process (its decode worker keeps it
                // alive for the process's life once exported) and the row range is inside it (checked above). The
                // block belongs to the request being prefilled, which the owner does not touch until told it is done.
                unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), to as *mut f32, n) };
            }
        }
        Ok(())
    }
}

fn block_range(cache: &CpuKvCache, layer_idx: usize, block: u32, n_bytes: usize) -> Result<std::ops::Range<usize>> {
    let layout = cache.layout;
    let elems = layout.block_elems();
    if layer_idx >= layout.n_layers || block as usize >= layout.n_blocks || n_bytes != elems * 4 {
        return Err(Error::Backend {
            backend: "cpu",
            message: format!(
                "KV block access out of range: layer {layer_idx} of {}, block {block} of {}, {n_bytes} bytes (a block is {})",
                layout.n_layers,
                layout.n_blocks,
                elems * 4
            ),
        });
    }
    let start = block as usize * elems;
    Ok(start..start + elems)
}

/// Rotate-half RoPE of every `head_dim` slice of `row` at `pos`. The angle is formed in f32 as Hugging Face does
/// (`inv_freq.float() @ position_ids.float()`).
fn rope_row(row: &mut [f32], head_dim: usize, pos: u32, inv_freq: &[f32]) {
    let half = head_dim / 2;
    let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
        .iter()
        .map(|&f| (pos as f32 * f).sin_cos())
        .map(|(s, c)| (c, s))
        .unzip();
    for head in row.chunks_exact_mut(head_dim) {
        let (x1, x2) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

fn rms_norm_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let mean_sq = dot(x, x) / x.len() as f32;
    let inv_rms = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv_rms * wi;
    }
}

/// A weight element the kernels widen to f32 in registers.
trait WeightElem: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32: a shift, which vectorises (half's conversion also handles NaN specially).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

const LANES: usize = 8;

/// Dot product in the one summation order every kernel here uses: lane `l` accumulates the products at `k ≡ l
/// (mod 8)` in increasing k with fused multiply-add, then the lanes are reduced by a fixed tree.
#[inline(always)]
fn dot<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let mut acc = [[[0f32; LANES]; 1]; 1];
    tile_dot::<1, 1, W>([x], [w], &mut acc);
    reduce_lanes(&acc[0][0])
}

#[inline(always)]
fn reduce_lanes(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Accumulates `MR × NR` dot products at once (register tiling) with the per-element order of [`dot`].
#[inline(always)]
fn tile_dot<const MR: usize, const NR: usize, W: WeightElem>(
    x: [&[f32]; MR],
    w: [&[W]; NR],
    acc: &mut [[[f32; LANES]; NR]; MR],
) {
    let k = x[0].len();
    let k_main = k - k % LANES;
    let mut kk = 0;
    while kk < k_main {
        let mut wv = [[0f32; LANES]; NR];
        for j in 0..NR {
            for l in 0..LANES {
                wv[j][l] = w[j][kk + l].widen();
            }
        }
        for i in 0..MR {
            let xv: &[f32] = &x[i][kk..kk + LANES];
            for j in 0..NR {
                for l in 0..LANES {
                    acc[i][j][l] = xv[l].mul_add(wv[j][l], acc[i][j][l]);
                }
            }
        }
        kk += LANES;
    }
    for l in 0..k - k_main {
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j][l] = x[i][k_main + l].mul_add(w[j][k_main + l].widen(), acc[i][j][l]);
            }
        }
    }
}

/// Raw pointer to the output, shared across rayon tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its own rows × columns block).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` makes closures capture the whole `Send` wrapper rather than its raw pointer field.
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay within the output slice (asserted in matmul_nt).
        unsafe { self.0.add(i) }
    }
}

/// `out (m, n) = x (m, k) · w (n, k)ᵀ + bias`, parallel over blocks of rows and columns.
fn matmul_nt<W: WeightElem>(out: &mut [f32], x: &[f32], w: &[W], m: usize, n: usize, k: usize, bias: Option<&[f32]>) {
    const MR: usize = 4;
    const NR: usize = 4;
    const M_BLOCK: usize = 64;
    // Enough column blocks to keep every thread busy on a single-row (decode) product, but not so small that the
    // per-task overhead shows.
    let n_threads = rayon::current_num_threads();
    let n_block = (n.div_ceil(4 * n_threads)).clamp(NR, 256).next_multiple_of(NR);
    let m_blocks = m.div_ceil(M_BLOCK);
    let n_blocks = n.div_ceil(n_block);
    let out_ptr = OutPtr(out.as_mut_ptr());
    assert!(out.len() >= m * n && x.len() >= m * k && w.len() >= n * k);

    (0..m_blocks * n_blocks).into_par_iter().for_each(|task| {
        let (mb, nb) = (task / n_blocks, task % n_blocks);
        let (m0, m1) = (mb * M_BLOCK, ((mb + 1) * M_BLOCK).min(m));
        let (n0, n1) = (nb * n_block, ((nb + 1) * n_block).min(n));
        let x_row = |i: usize| &x[i * k..(i + 1) * k];
        let w_row = |j: usize| &w[j * k..(j + 1) * k];
        let store = |i: usize, j: usize, lanes: &[f32; LANES]| {
            let value = reduce_lanes(lanes) + bias.map_or(0.0, |b| b[j]);
            // SAFETY: (i, j) lies in this task's block, which no other task writes; bounds asserted above.
            unsafe { *out_ptr.at(i * n + j) = value };
        };
        let mut j = n0;
        while j < n1 {
            if j + NR <= n1 {
                let ws = [w_row(j), w_row(j + 1), w_row(j + 2), w_row(j + 3)];
                let mut i = m0;
                while i + MR <= m1 {
                    let mut acc = [[[0f32; LANES]; NR]; MR];
                    tile_dot::<MR, NR, W>([x_row(i), x_row(i + 1), x_row(i + 2), x_row(i + 3)], ws, &mut acc);
                    for (a, row) in acc.iter().enumerate() {
                        for (b, lanes) in row.iter().enumerate() {
                            store(i + a, j + b, lanes);
                        }
                    }
                    i += MR;
                }
                for i in i..m1 {
                    let mut acc = [[[0f32; LANES]; NR]; 1];
                    tile_dot::<1, NR, W>([x_row(i)], ws, &mut acc);
                    for (b, lanes) in acc[0].iter().enumerate() {
                        store(i, j + b, lanes);
                    }
                }
                j += NR;
            } else {
                for i in m0..m1 {
                    let mut acc = [[[0f32; LANES]; 1]; 1];
                    tile_dot::<1, 1, W>([x_row(i)], [w_row(j)], &mut acc);
                    store(i, j, &acc[0][0]);
                }
                j += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_matches_naive_for_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (64, 70, 100), (130, 7, 8)] {
            let (x, w) = (pseudo_random(m * k, 1), pseudo_random(n * k, 2));
            let mut out = vec![0f32; m * n];
            matmul_nt(&mut out, &x, &w, m, n, k, None);
            for (a, b) in out.iter().zip(naive(&x, &w, m, n, k)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "({m},{n},{k}): {a} vs {b}");
            }
        }
    }

    #[test]
    fn matmul_row_is_bit_identical_whatever_the_batch() {
        let (n, k) = (37, 91);
        let w = pseudo_random(n * k, 3);
        let x = pseudo_random(70 * k, 4);
        let mut alone = vec![0f32; n];
        matmul_nt(&mut alone, &x[5 * k..6 * k], &w, 1, n, k, None);
        for m in [6, 9, 70] {
            let mut batched = vec![0f32; m * n];
            matmul_nt(&mut batched, &x[..m * k], &w, m, n, k, None);
            assert_eq!(
                &batched[5 * n..6 * n],
                &alone[..],
                "row 5 changed inside a batch of {m}"
            );
        }
    }
}
