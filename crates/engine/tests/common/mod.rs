//! Shared test helpers, chief among them a naive reference forward pass: plain loops, f64 sums, no paging, no
//! batching, every position recomputed from scratch. It shares nothing with the engine's forward pass but the
//! weights, so agreement between the two checks the paging, batching, prefix caching and kernels.
#![allow(dead_code)]

use std::path::PathBuf;

use cleave_engine::backend::Backend;
use cleave_engine::backend::cpu::CpuBackend;
use cleave_engine::config::ModelConfig;
use cleave_engine::engine::{Engine, EngineConfig, RequestOutput, RequestParams};
use cleave_engine::presets::{ResolvedModel, resolve_model};
use cleave_engine::weights::WeightSource;

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf")
}

pub fn resolve(model: &str) -> ResolvedModel {
    let path = fixtures_dir().join(model);
    let arg = if path.is_dir() {
        path.to_string_lossy().into_owned()
    } else {
        model.to_string()
    };
    resolve_model(&arg).unwrap_or_else(|e| panic!("cannot resolve {model}: {e}"))
}

pub fn engine(model: &str, config: EngineConfig) -> Engine<CpuBackend> {
    Engine::new(CpuBackend, resolve(model), config).expect("engine builds")
}

/// Steps `engine` until the request whose first output is `first` (the only one running) finishes; its tokens.
pub fn decode_to_end<B: Backend>(engine: &mut Engine<B>, first: RequestOutput) -> Vec<u32> {
    let mut tokens = first.token_ids;
    let mut finished = first.finish.is_some();
    while !finished {
        for out in engine.step().unwrap() {
            tokens.extend(out.token_ids);
            finished |= out.finish.is_some();
        }
    }
    tokens
}

pub fn greedy(max_tokens: usize) -> RequestParams {
    RequestParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Deterministic pseudo-random token ids below `vocab` (never BOS-only, never empty).
pub fn prompt(len: usize, seed: u32, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s % vocab as u32
        })
        .collect()
}

struct RefLayer {
    input_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    wo: Vec<f32>,
    bo: Option<Vec<f32>>,
    post_norm: Vec<f32>,
    w_gate: Vec<f32>,
    w_up: Vec<f32>,
    w_down: Vec<f32>,
}

pub struct ReferenceModel {
    c: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<RefLayer>,
    norm: Vec<f32>,
    lm_head: Vec<f32>,
    inv_freq: Vec<f64>,
}

impl ReferenceModel {
    pub fn load(model: &str) -> Self {
        let resolved = resolve(model);
        Self::from_source(resolved.config, resolved.weights.as_ref())
    }

    pub fn from_source(c: ModelConfig, src: &dyn WeightSource) -> Self {
        let (h, q, kv, i, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let get = |name: String, shape: &[usize]| src.tensor(&name, shape).unwrap().to_f32();
        let opt = |cond: bool, name: String, shape: &[usize]| cond.then(|| src.tensor(&name, shape).unwrap().to_f32());
        let layers = (0..c.n_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                RefLayer {
                    input_norm: get(format!("{p}.input_layernorm.weight"), &[h]),
                    wq: get(format!("{p}.self_attn.q_proj.weight"), &[q, h]),
                    wk: get(format!("{p}.self_attn.k_proj.weight"), &[kv, h]),
                    wv: get(format!("{p}.self_attn.v_proj.weight"), &[kv, h]),
                    bq: opt(c.qkv_bias, format!("{p}.self_attn.q_proj.bias"), &[q]),
                    bk: opt(c.qkv_bias, format!("{p}.self_attn.k_proj.bias"), &[kv]),
                    bv: opt(c.qkv_bias, format!("{p}.self_attn.v_proj.bias"), &[kv]),
                    q_norm: opt(c.qk_norm, format!("{p}.self_attn.q_norm.weight"), &[hd]),
                    k_norm: opt(c.qk_norm, format!("{p}.self_attn.k_norm.weight"), &[hd]),
                    wo: get(format!("{p}.self_attn.o_proj.weight"), &[h, q]),
                    bo: opt(c.o_bias, format!("{p}.self_attn.o_proj.bias"), &[h]),
                    post_norm: get(format!("{p}.post_attention_layernorm.weight"), &[h]),
                    w_gate: get(format!("{p}.mlp.gate_proj.weight"), &[i, h]),
                    w_up: get(format!("{p}.mlp.up_proj.weight"), &[i, h]),
                    w_down: get(format!("{p}.mlp.down_proj.weight"), &[h, i]),
                }
            })
            .collect();
        let embed = get("model.embed_tokens.weight".into(), &[c.vocab_size, h]);
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight".into(), &[c.vocab_size, h])
        };
        // RoPE frequencies, following Hugging Face's formulas directly.
        let inv_freq = (0..hd / 2)
            .map(|j| {
                let f = 1.0 / c.rope_theta.powf(2.0 * j as f64 / hd as f64);
                match &c.rope_scaling {
                    None => f,
                    Some(s) => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let old = s.original_max_position_embeddings as f64;
                        if wavelen < old / s.high_freq_factor {
                            f
                        } else if wavelen > old / s.low_freq_factor {
                            f / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect();
        Self {
            embed,
            layers,
            norm: get("model.norm.weight".into(), &[h]),
            lm_head,
            inv_freq,
            c,
        }
    }

    /// Logits at the last position of `tokens`.
    pub fn last_logits(&self, tokens: &[u32]) -> Vec<f32> {
        let c = &self.c;
        let (h, hd, n) = (c.hidden_size, c.head_dim, tokens.len());
        let eps = c.rms_norm_eps;
        let group = c.n_heads / c.n_kv_heads;
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| {
                self.embed[t as usize * h..(t as usize + 1) * h]
                    .iter()
                    .map(|&v| v as f64)
                    .collect()
            })
            .collect();
        for layer in &self.layers {
            let hn: Vec<Vec<f64>> = x.iter().map(|r| rms_norm(r, &layer.input_norm, eps)).collect();
            let mut q: Vec<Vec<f64>> = hn.iter().map(|r| linear(r, &layer.wq, layer.bq.as_deref())).collect();
            let mut k: Vec<Vec<f64>> = hn.iter().map(|r| linear(r, &layer.wk, layer.bk.as_deref())).collect();
            let v: Vec<Vec<f64>> = hn.iter().map(|r| linear(r, &layer.wv, layer.bv.as_deref())).collect();
            for (pos, (qr, kr)) in q.iter_mut().zip(k.iter_mut()).enumerate() {
                for (row, norm) in [(qr, &layer.q_norm), (kr, &layer.k_norm)] {
                    for head in row.chunks_mut(hd) {
                        if let Some(w) = norm {
                            let normed = rms_norm(head, w, eps);
                            head.copy_from_slice(&normed);
                        }
                        self.rotate(head, pos);
                    }
                }
            }
            let mut attn = vec![vec![0f64; c.q_dim()]; n];
            for t in 0..n {
                for head in 0..c.n_heads {
                    let kvh = head / group;
                    let qh = &q[t][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| {
                            qh.iter()
                                .zip(&k[s][kvh * hd..(kvh + 1) * hd])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for (s, w) in weights.iter().enumerate() {
                        for d in 0..hd {
                            attn[t][head * hd + d] += w / total * v[s][kvh * hd + d];
                        }
                    }
                }
            }
            for t in 0..n {
                let o = linear(&attn[t], &layer.wo, layer.bo.as_deref());
                x[t].iter_mut().zip(o).for_each(|(a, b)| *a += b);
                let hn = rms_norm(&x[t], &layer.post_norm, eps);
                let gate = linear(&hn, &layer.w_gate, None);
                let up = linear(&hn, &layer.w_up, None);
                let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let down = linear(&act, &layer.w_down, None);
                x[t].iter_mut().zip(down).for_each(|(a, b)| *a += b);
            }
        }
        let last = rms_norm(&x[n - 1], &self.norm, eps);
        linear(&last, &self.lm_head, None)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }

    /// Rotate-half RoPE of one head at `pos`.
    fn rotate(&self, head: &mut [f64], pos: usize) {
        let half = head.len() / 2;
        for j in 0..half {
            let angle = pos as f64 * self.inv_freq[j];
            let (s, c) = angle.sin_cos();
            let (a, b) = (head[j], head[j + half]);
            head[j] = a * c - b * s;
            head[j + half] = b * c + a * s;
        }
    }
}

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * inv * w as f64).collect()
}

/// `x · wᵀ + b` with `w` stored `(out, in)`.
fn linear(x: &[f64], w: &[f32], b: Option<&[f32]>) -> Vec<f64> {
    let n_in = x.len();
    w.chunks(n_in)
        .enumerate()
        .map(|(o, row)| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum::<f64>() + b.map_or(0.0, |b| b[o] as f64))
        .collect()
}

/// Largest |a - b| / max(1, |b|).
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}
