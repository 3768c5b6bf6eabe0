//! The Llama-family transformer, written once over [`Backend`]. Llama 2/3, Mistral, Qwen2 and Qwen3 differ only in
//! switches of [`ModelConfig`]: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings, RoPE scaling.

use crate::backend::{AttentionShape, Backend, KvLayout, StepBatch, WeightSplit};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::weights::{StackedWeight, WeightSource};

/// One decoder layer's weights, `nn.Linear`-style `(out, in)`. q, k and v are stacked into one matrix, and gate and
/// up into another, so each pair or triple is one matrix product. Shapes are the whole model's; under tensor
/// parallelism each rank holds its share of `qkv_proj`, `gate_up_proj` (rows) and `o_proj`, `down_proj` (columns).
pub struct Layer<W> {
    pub input_norm: W,           // (hidden)
    pub qkv_proj: W,             // (q_dim + 2 * kv_dim, hidden): rows q, then k, then v
    pub qkv_bias: Option<W>,     // (q_dim + 2 * kv_dim)
    pub qk_norm: Option<[W; 2]>, // (head_dim), (head_dim)
    pub o_proj: W,               // (hidden, q_dim)
    pub o_bias: Option<W>,       // (hidden)
    pub post_attention_norm: W,  // (hidden)
    pub gate_up_proj: W,         // (2 * intermediate, hidden): rows gate, then up
    pub down_proj: W,            // (hidden, intermediate)
}

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub embed_tokens: B::Weight, // (vocab, hidden)
    pub layers: Vec<Layer<B::Weight>>,
    pub norm: B::Weight, // (hidden)
    /// `None` when the embedding is tied: the output projection reuses `embed_tokens`.
    pub lm_head: Option<B::Weight>, // (vocab, hidden)
    pub rope: Rope,
}

impl<B: Backend> Model<B> {
    /// Loads every tensor the config calls for, checking shapes, and hands them to the backend — divided among its
    /// tensor-parallel ranks Megatron-style: q/k/v and gate/up split by output (heads, MLP rows), o_proj and
    /// down_proj by input, everything else replicated. A backend that reads no values (the mock) gets only the
    /// shapes: `source` is not read.
    pub fn load(backend: &B, config: ModelConfig, source: &dyn WeightSource) -> Result<Self> {
        let (h, q_dim, kv_dim, inter, hd) = (
            config.hidden_size,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
            config.head_dim,
        );
        check_divisible(&config, backend.n_ranks())?;
        let load = |weight: StackedWeight, split: WeightSplit| match backend.weight_without_values(&weight.shape()) {
            Some(weight) => Ok(weight),
            None => backend.weight_from(source, &weight, split),
        };
        let get_split =
            |name: &str, shape: &[usize], split: WeightSplit| load(StackedWeight::single(name, shape), split);
        let get = |name: &str, shape: &[usize]| get_split(name, shape, WeightSplit::Replicated);
        // Split per part, so each rank gets its own q, k and v heads (gate and up rows) from the one stacked matrix.
        let stacked = |parts: &[(String, usize)], cols: &[usize]| -> Result<B::Weight> {
            let split = WeightSplit::Outputs(parts.iter().map(|(_, rows)| *rows).collect());
            let weight = StackedWeight {
                parts: parts.to_vec(),
                cols: cols.to_vec(),
            };
            load(weight, split)
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("model.layers.{i}");
            let attn = |proj: &str, suffix: &str, rows: usize| (format!("{p}.self_attn.{proj}_proj.{suffix}"), rows);
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv_proj: stacked(
                    &[
                        attn("q", "weight", q_dim),
                        attn("k", "weight", kv_dim),
                        attn("v", "weight", kv_dim),
                    ],
                    &[h],
                )?,
                qkv_bias: match config.qkv_bias {
                    true => Some(stacked(
                        &[
                            attn("q", "bias", q_dim),
                            attn("k", "bias", kv_dim),
                            attn("v", "bias", kv_dim),
                        ],
                        &[],
                    )?),
                    false => None,
                },
                qk_norm: match config.qk_norm {
                    true => Some([
                        get(&format!("{p}.self_attn.q_norm.weight"), &[hd])?,
                        get(&format!("{p}.self_attn.k_norm.weight"), &[hd])?,
                    ]),
                    false => None,
                },
                o_proj: get_split(
                    &format!("{p}.self_attn.o_proj.weight"),
                    &[h, q_dim],
                    WeightSplit::Inputs,
                )?,
                o_bias: match config.o_bias {
                    true => Some(get(&format!("{p}.self_attn.o_proj.bias"), &[h])?),
                    false => None,
                },
                post_attention_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up_proj: stacked(
                    &[
                        (format!("{p}.mlp.gate_proj.weight"), inter),
                        (format!("{p}.mlp.up_proj.weight"), inter),
                    ],
                    &[h],
                )?,
                down_proj: get_split(&format!("{p}.mlp.down_proj.weight"), &[h, inter], WeightSplit::Inputs)?,
            });
        }
        // Some tied checkpoints still carry an lm_head copy; a missing one with tie_word_embeddings=false is an error.
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[config.vocab_size, h])?)
        };
        Ok(Self {
            embed_tokens: get("model.embed_tokens.weight", &[config.vocab_size, h])?,
            layers,
            norm: get("model.norm.weight", &[h])?,
            lm_head,
            rope: Rope::new(&config),
            config,
        })
    }

    pub fn kv_layout(&self, n_blocks: usize, block_size: usize) -> KvLayout {
        KvLayout {
            n_layers: self.config.n_layers,
            n_blocks,
            block_size,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one step: writes the new tokens' K and V into the cache and returns the logits `(logit_rows, vocab)`
    /// (a backend replaying a captured step may return padding rows after them).
    pub fn forward(&self, backend: &B, cache: &mut B::KvCache, step: &StepBatch) -> Result<B::Tensor> {
        backend.run_step(step, &mut |batch| {
            self.forward_batch(backend, cache, batch, &mut |_, _| Ok(()))
        })
    }

    /// [`Model::forward`], calling `layer_done(layer_idx, cache)` as soon as each layer's K and V are in the cache —
    /// before the layer's attention runs — so a prefill worker can ship layer `i` while it computes the rest.
    pub fn forward_streaming(
        &self,
        backend: &B,
        cache: &mut B::KvCache,
        step: &StepBatch,
        layer_done: &mut dyn FnMut(usize, &B::KvCache) -> Result<()>,
    ) -> Result<B::Tensor> {
        let batch = backend.batch(step)?;
        self.forward_batch(backend, cache, &batch, layer_done)
    }

    fn forward_batch(
        &self,
        backend: &B,
        cache: &mut B::KvCache,
        batch: &B::Batch,
        layer_done: &mut dyn FnMut(usize, &B::KvCache) -> Result<()>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let n = backend.batch_tokens(batch);
        // This rank's share: heads and MLP rows are divided among the tensor-parallel ranks (all of them at one).
        let ranks = backend.n_ranks();
        let (n_heads, n_kv_heads, inter) = (c.n_heads / ranks, c.n_kv_heads / ranks, c.intermediate_size / ranks);
        let (q_dim, kv_dim) = (n_heads * c.head_dim, n_kv_heads * c.head_dim);
        let attn_shape = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let t = |cols: usize| backend.tensor(n, cols);
        let (mut x, mut h) = (t(c.hidden_size)?, t(c.hidden_size)?); // (n, hidden), on every rank
        let (mut qkv, mut q, mut attn) = (t(q_dim + 2 * kv_dim)?, t(q_dim)?, t(q_dim)?); // this rank's heads
        let mut o = t(c.hidden_size)?;
        let (mut gate_up, mut act) = (t(2 * inter)?, t(inter)?); // this rank's MLP rows

        // x = embed(tokens);  h = rms_norm(x)
        backend.embed(&mut x, &self.embed_tokens, batch);
        backend.rms_norm(&mut h, &x, &self.layers[0].input_norm, eps);
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            // q, k, v = h · [W_q; W_k; W_v]ᵀ;  q, k = rope(q, k);  cache ← k, v
            backend.linear(&mut qkv, &h, &layer.qkv_proj, layer.qkv_bias.as_ref());
            let qk_norm = layer.qk_norm.as_ref().map(|[qn, kn]| (qn, kn, eps));
            backend.qkv_rope_kv(&mut q, &qkv, cache, layer_idx, &self.rope, qk_norm, attn_shape, batch);
            layer_done(layer_idx, cache)?;
            // x = x + o_proj(attention(q, cache));  h = rms_norm(x)
            backend.attention(&mut attn, &q, cache, layer_idx, attn_shape, batch);
            backend.linear(&mut o, &attn, &layer.o_proj, layer.o_bias.as_ref());
            backend.all_reduce(&mut o); // each rank's heads contribute a partial o_proj
            backend.add_rms_norm(&mut x, &o, &layer.post_attention_norm, eps, &mut h);

            // x = x + down_proj(silu(gate_proj(h)) * up_proj(h));  h = rms_norm(x) with the next layer's weight
            backend.linear(&mut gate_up, &h, &layer.gate_up_proj, None);
            backend.silu_mul(&mut act, &gate_up);
            backend.linear(&mut o, &act, &layer.down_proj, None);
            backend.all_reduce(&mut o); // each rank's MLP rows contribute a partial down_proj
            let next_norm = self
                .layers
                .get(layer_idx + 1)
                .map_or(&self.norm, |next| &next.input_norm);
            backend.add_rms_norm(&mut x, &o, next_norm, eps, &mut h);
        }

        // logits = lm_head(rms_norm(x)) for the rows that sample (as many as the batch has: a graph-captured
        // decode batch is padded to its bucket).
        let n_out = backend.batch_logit_rows(batch);
        let mut last = backend.tensor(n_out, c.hidden_size)?;
        backend.gather_logit_rows(&mut last, &h, batch);
        let mut logits = backend.tensor(n_out, c.vocab_size)?;
        backend.linear(
            &mut logits,
            &last,
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            None,
        );
        Ok(logits)
    }
}

/// Tensor parallelism divides heads and MLP rows evenly among ranks; a model that does not divide is refused here
/// rather than computed wrong. (KV heads are not replicated across ranks, so `n_kv_heads` bounds the ranks.)
fn check_divisible(config: &ModelConfig, ranks: usize) -> Result<()> {
    let counts = [
        ("attention heads", config.n_heads),
        ("KV heads", config.n_kv_heads),
        ("MLP rows (intermediate_size)", config.intermediate_size),
    ];
    match counts
        .iter()
        .find(|(_, count)| ranks == 0 || !count.is_multiple_of(ranks))
    {
        Some((what, count)) => Err(Error::InvalidRequest(format!(
            "tensor parallelism over {ranks} ranks needs the model's {what} to divide evenly among them, but it has {count}"
        ))),
        None => Ok(()),
    }
}

/// Checks a step before it reaches the backend, whose kernels index without bounds checks on the device.
pub fn validate_step(step: &StepBatch, config: &ModelConfig, layout: &KvLayout) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidRequest(m));
    let n = step.n_tokens();
    if step.positions.len() != n || step.slots.len() != n {
        return bad(format!(
            "step has {n} tokens but {} positions and {} slots",
            step.positions.len(),
            step.slots.len()
        ));
    }
    if let Some(&id) = step.token_ids.iter().find(|&&id| id as usize >= config.vocab_size) {
        return bad(format!(
            "token id {id} is outside the vocabulary of {}",
            config.vocab_size
        ));
    }
    let slots_max = layout.n_blocks * layout.block_size;
    if let Some(&s) = step.slots.iter().find(|&&s| s as usize >= slots_max) {
        return bad(format!("KV slot {s} is outside the cache of {slots_max} slots"));
    }
    Ok(())
}
