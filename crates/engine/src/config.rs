//! The model's shape and hyper-parameters, normalised from Hugging Face `config.json` as written by transformers 4.x
//! (`rope_theta` and `rope_scaling` at top level) and 5.x (`rope_parameters`).
//!
//! Parsing goes through `serde_json::Value` rather than a derived struct because the two generations of the format
//! spell the same facts differently, and every rejection must name the offending field.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The families cleave implements. They share one forward pass and differ in a few switches (see [`ModelConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn from_hf_name(name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" => Ok(Self::Llama),
            "MistralForCausalLM" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "Qwen3ForCausalLM" => Ok(Self::Qwen3),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling: long wavelengths are divided by `factor`, short ones kept, and the
/// band between is interpolated smoothly.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Element type of tensors in files and in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// Everything the forward pass needs to know about a model, already validated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest sequence (prompt + generated) the engine accepts. For Mistral with a sliding window this is capped at
    /// the window, inside which windowed attention equals full attention.
    pub max_context: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Element type the weights are kept in.
    pub dtype: DType,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// `n_heads * head_dim`: the width of q and of the attention output.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// `n_kv_heads * head_dim`: the width of k and v.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes of K and V stored per token across all layers, at `kv_dtype`.
    pub fn kv_bytes_per_token(&self, kv_dtype: DType) -> usize {
        2 * self.n_layers * self.kv_dim() * kv_dtype.size_bytes()
    }

    /// Number of parameters, counting a tied embedding once.
    pub fn n_params(&self) -> usize {
        let (h, q, kv, i) = (self.hidden_size, self.q_dim(), self.kv_dim(), self.intermediate_size);
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        if self.qk_norm {
            attn += 2 * self.head_dim;
        }
        let layer = attn + 3 * h * i + 2 * h;
        let embed = self.vocab_size * h;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.n_layers * layer + embed + lm_head + h
    }

    /// Reads and validates `config.json` (plus token ids from `generation_config.json` when present).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let value = read_json(&path)?;
        let mut config = Self::from_hf_json(&value).map_err(|message| Error::Config {
            path: path.clone(),
            message,
        })?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen_config = read_json(&gen_path)?;
            if let Some(eos) = token_ids(&gen_config, "eos_token_id").map_err(|message| Error::Config {
                path: gen_path.clone(),
                message,
            })? {
                config.eos_token_ids = eos;
            }
            if let Some(bos) = token_ids(&gen_config, "bos_token_id").map_err(|message| Error::Config {
                path: gen_path,
                message,
            })? {
                config.bos_token_id = bos.first().copied();
            }
        }
        Ok(config)
    }

    /// Parses a config.json value; the error names the field.
    pub fn from_hf_json(v: &Value) -> std::result::Result<Self, String> {
        let arch_name = v
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or("field \"architectures\" is missing or not a list of strings")?;
        let architecture = Architecture::from_hf_name(arch_name).map_err(|e| e.to_string())?;

        let hidden_size = usize_field(v, "hidden_size")?;
        let n_heads = usize_field(v, "num_attention_heads")?;
        let n_kv_heads = opt_usize_field(v, "num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match opt_usize_field(v, "head_dim")? {
            Some(d) => d,
            None => {
                if n_heads == 0 || hidden_size % n_heads != 0 {
                    return Err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {n_heads} and no head_dim is given"
                    ));
                }
                hidden_size / n_heads
            }
        };
        let (rope_theta, rope_scaling) = parse_rope(v)?;
        let max_position_embeddings = usize_field(v, "max_position_embeddings")?;
        let sliding_window = match architecture {
            Architecture::Mistral => opt_usize_field(v, "sliding_window")?,
            Architecture::Qwen2 | Architecture::Qwen3
                if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) =>
            {
                return Err("use_sliding_window: true is not supported".into());
            }
            _ => None,
        };
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let dtype_name = v
            .get("dtype")
            .or_else(|| v.get("torch_dtype"))
            .and_then(Value::as_str)
            .unwrap_or("bfloat16");
        let dtype = match dtype_name {
            "float32" => DType::F32,
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            other => return Err(format!("dtype {other:?} is not supported (float32, bfloat16, float16)")),
        };

        let config = ModelConfig {
            architecture,
            vocab_size: usize_field(v, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size")?,
            n_layers: usize_field(v, "num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .ok_or("field \"rms_norm_eps\" is missing or not a number")?,
            rope_theta,
            rope_scaling,
            max_context: sliding_window.map_or(max_position_embeddings, |w| w.min(max_position_embeddings)),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: attention_bias,
            qk_norm: architecture == Architecture::Qwen3,
            dtype,
            bos_token_id: token_ids(v, "bos_token_id")?.and_then(|ids| ids.first().copied()),
            eos_token_ids: token_ids(v, "eos_token_id")?.unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_context),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(format!("{name} must be positive, got 0"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(format!("vocab_size {} does not fit u32 token ids", self.vocab_size));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(format!("rope_theta must be positive, got {}", self.rope_theta));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps < 0.0 {
            return Err(format!("rms_norm_eps must be non-negative, got {}", self.rms_norm_eps));
        }
        for &id in &self.eos_token_ids {
            if id as usize >= self.vocab_size {
                return Err(format!(
                    "eos_token_id {id} is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })
}

fn opt_usize_field(v: &Value, name: &str) -> std::result::Result<Option<usize>, String> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| format!("field {name:?} must be a non-negative integer, got {x}")),
    }
}

fn usize_field(v: &Value, name: &str) -> std::result::Result<usize, String> {
    opt_usize_field(v, name)?.ok_or_else(|| format!("field {name:?} is missing"))
}

/// A token id field may be one integer, a list of integers, or null.
fn token_ids(v: &Value, name: &str) -> std::result::Result<Option<Vec<u32>>, String> {
    let to_id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("field {name:?} must hold token ids, got {x}"))
    };
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(to_id)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some),
        Some(x) => Ok(Some(vec![to_id(x)?])),
    }
}

/// RoPE base and scaling from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x).
fn parse_rope(v: &Value) -> std::result::Result<(f64, Option<Llama3RopeScaling>), String> {
    let (params, where_) = match v.get("rope_parameters") {
        Some(p) if p.is_object() => (Some(p), "rope_parameters"),
        _ => (v.get("rope_scaling").filter(|s| s.is_object()), "rope_scaling"),
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| v.get("rope_theta"))
        .map(|t| {
            t.as_f64()
                .ok_or_else(|| format!("rope_theta must be a number, got {t}"))
        })
        .transpose()?
        .unwrap_or(10_000.0);
    let Some(params) = params else {
        return Ok((theta, None));
    };
    let rope_type = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match rope_type {
        "default" => Ok((theta, None)),
        "llama3" => {
            let num = |name: &str| {
                params
                    .get(name)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| format!("{where_}.{name} is missing or not a number (needed by rope_type llama3)"))
            };
            let scaling = Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: opt_usize_field(params, "original_max_position_embeddings")?
                    .ok_or_else(|| format!("{where_}.original_max_position_embeddings is missing"))?,
            };
            if !(scaling.factor > 0.0 && scaling.high_freq_factor > scaling.low_freq_factor) {
                return Err(format!(
                    "{where_}: llama3 scaling needs factor > 0 and high_freq_factor > low_freq_factor, got {scaling:?}"
                ));
            }
            Ok((theta, Some(scaling)))
        }
        other => Err(format!(
            "{where_}.rope_type {other:?} is not supported (default, llama3)"
        )),
    }
}
