//! The Llama-family transformer, written once over [`Backend`]. Llama 2/3, Mistral, Qwen2 and Qwen3 differ only in
//! switches of [`ModelConfig`]: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings, RoPE scaling.

use crate::backend::{AttentionShape, Backend, KvLayout, StepBatch};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::weights::WeightSource;

/// One decoder layer's weights. Shapes as in the Hugging Face checkpoint (`nn.Linear` stores `(out, in)`).
pub struct Layer<W> {
    pub input_norm: W,            // (hidden)
    pub q_proj: W,                // (n_heads * head_dim, hidden)
    pub k_proj: W,                // (n_kv_heads * head_dim, hidden)
    pub v_proj: W,                // (n_kv_heads * head_dim, hidden)
    pub qkv_bias: Option<[W; 3]>, // (q_dim), (kv_dim), (kv_dim)
    pub qk_norm: Option<[W; 2]>,  // (head_dim), (head_dim)
    pub o_proj: W,                // (hidden, n_heads * head_dim)
    pub o_bias: Option<W>,        // (hidden)
    pub post_attention_norm: W,   // (hidden)
    pub gate_proj: W,             // (intermediate, hidden)
    pub up_proj: W,               // (intermediate, hidden)
    pub down_proj: W,             // (hidden, intermediate)
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
    /// Loads every tensor the config calls for, checking shapes, and hands them to the backend.
    pub fn load(backend: &B, config: ModelConfig, source: &dyn WeightSource) -> Result<Self> {
        let (h, q_dim, kv_dim, inter, hd) = (
            config.hidden_size,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
            config.head_dim,
        );
        let get = |name: &str, shape: &[usize]| backend.weight(source.tensor(name, shape)?);
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj: get(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, h])?,
                k_proj: get(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, h])?,
                v_proj: get(&format!("{p}.self_attn.v_proj.weight"), &[kv_dim, h])?,
                qkv_bias: match config.qkv_bias {
                    true => Some([
                        get(&format!("{p}.self_attn.q_proj.bias"), &[q_dim])?,
                        get(&format!("{p}.self_attn.k_proj.bias"), &[kv_dim])?,
                        get(&format!("{p}.self_attn.v_proj.bias"), &[kv_dim])?,
                    ]),
                    false => None,
                },
                qk_norm: match config.qk_norm {
                    true => Some([
                        get(&format!("{p}.self_attn.q_norm.weight"), &[hd])?,
                        get(&format!("{p}.self_attn.k_norm.weight"), &[hd])?,
                    ]),
                    false => None,
                },
                o_proj: get(&format!("{p}.self_attn.o_proj.weight"), &[h, q_dim])?,
                o_bias: match config.o_bias {
                    true => Some(get(&format!("{p}.self_attn.o_proj.bias"), &[h])?),
                    false => None,
                },
                post_attention_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: get(&format!("{p}.mlp.gate_proj.weight"), &[inter, h])?,
                up_proj: get(&format!("{p}.mlp.up_proj.weight"), &[inter, h])?,
                down_proj: get(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?,
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

    /// Runs one step: writes the new tokens' K and V into the cache and returns the logits `(logit_rows, vocab)`.
    pub fn forward(&self, backend: &B, cache: &mut B::KvCache, step: &StepBatch) -> Result<B::Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let n = step.n_tokens();
        let batch = backend.batch(step)?;
        let attn_shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let t = |cols: usize| backend.tensor(n, cols);
        let (mut x, mut h) = (t(c.hidden_size)?, t(c.hidden_size)?); // (n, hidden)
        let (mut q, mut k, mut v) = (t(c.q_dim())?, t(c.kv_dim())?, t(c.kv_dim())?);
        let (mut attn, mut o) = (t(c.q_dim())?, t(c.hidden_size)?);
        let (mut gate, mut up, mut act) = (
            t(c.intermediate_size)?,
            t(c.intermediate_size)?,
            t(c.intermediate_size)?,
        );

        backend.embed(&mut x, &self.embed_tokens, &batch);
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            // x = x + o_proj(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h))),  h = rms_norm(x)
            backend.rms_norm(&mut h, &x, &layer.input_norm, eps);
            let [q_bias, k_bias, v_bias] = match &layer.qkv_bias {
                Some([qb, kb, vb]) => [Some(qb), Some(kb), Some(vb)],
                None => [None, None, None],
            };
            backend.linear(&mut q, &h, &layer.q_proj, q_bias);
            backend.linear(&mut k, &h, &layer.k_proj, k_bias);
            backend.linear(&mut v, &h, &layer.v_proj, v_bias);
            if let Some([q_norm, k_norm]) = &layer.qk_norm {
                backend.head_rms_norm(&mut q, c.head_dim, q_norm, eps);
                backend.head_rms_norm(&mut k, c.head_dim, k_norm, eps);
            }
            backend.rope(&mut q, c.head_dim, &self.rope, &batch);
            backend.rope(&mut k, c.head_dim, &self.rope, &batch);
            backend.write_kv(cache, layer_idx, &k, &v, &batch);
            backend.attention(&mut attn, &q, cache, layer_idx, attn_shape, &batch);
            backend.linear(&mut o, &attn, &layer.o_proj, layer.o_bias.as_ref());
            backend.add_assign(&mut x, &o);

            // x = x + down_proj(silu(gate_proj(h)) * up_proj(h)),  h = rms_norm(x)
            backend.rms_norm(&mut h, &x, &layer.post_attention_norm, eps);
            backend.linear(&mut gate, &h, &layer.gate_proj, None);
            backend.linear(&mut up, &h, &layer.up_proj, None);
            backend.silu_mul(&mut act, &gate, &up);
            backend.linear(&mut o, &act, &layer.down_proj, None);
            backend.add_assign(&mut x, &o);
        }

        // logits = lm_head(rms_norm(x)) for the rows that sample.
        let n_out = step.logit_rows.len();
        let mut last = backend.tensor(n_out, c.hidden_size)?;
        backend.gather_logit_rows(&mut last, &x, &batch);
        let mut last_normed = backend.tensor(n_out, c.hidden_size)?;
        backend.rms_norm(&mut last_normed, &last, &self.norm, eps);
        let mut logits = backend.tensor(n_out, c.vocab_size)?;
        backend.linear(
            &mut logits,
            &last_normed,
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            None,
        );
        Ok(logits)
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
