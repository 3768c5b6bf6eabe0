//! Built-in model shapes with deterministic dummy weights, and the resolution of a `--model` argument (a Hugging Face
//! directory or a preset name) into a config, a weight source and a tokenizer.

use std::ops::Range;
use std::path::Path;

use crate::config::{Architecture, DType, Llama3RopeScaling, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_VOCAB, Tokenizer};
use crate::weights::{DummyWeights, HostDType, HostSliceMut, SafetensorsDir, WeightSource};

pub const PRESET_NAMES: [&str; 5] = ["tiny", "small", "llama3-8b", "llama3-70b", "qwen2.5-7b"];

/// Seed of preset weights. Fixed so every process building a preset builds the same model.
pub const PRESET_SEED: u64 = 0x00c1_ea5e;

/// The shape of a preset, or `None` for an unknown name.
pub fn preset(name: &str) -> Option<ModelConfig> {
    let llama3_rope = Some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let base = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 128_256,
        hidden_size: 4096,
        intermediate_size: 14_336,
        n_layers: 32,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: llama3_rope,
        max_context: 131_072,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        dtype: DType::BF16,
        bos_token_id: Some(128_000),
        eos_token_ids: vec![128_001, 128_009],
    };
    // Small presets speak the byte tokenizer, so their vocabulary is exactly its ids.
    let byte_vocab = ModelConfig {
        vocab_size: BYTE_VOCAB,
        bos_token_id: Some(BYTE_BOS),
        eos_token_ids: vec![BYTE_EOS],
        rope_theta: 10_000.0,
        rope_scaling: None,
        ..base.clone()
    };
    let config = match name {
        // For tests and the default demo: a few hundred thousand parameters, instant on any CPU.
        "tiny" => ModelConfig {
            hidden_size: 64,
            intermediate_size: 176,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            max_context: 4096,
            ..byte_vocab
        },
        // About 100M parameters, for CPU demos and benchmarks.
        "small" => ModelConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            n_layers: 12,
            n_heads: 12,
            n_kv_heads: 4,
            head_dim: 64,
            max_context: 8192,
            ..byte_vocab
        },
        "llama3-8b" => base,
        "llama3-70b" => ModelConfig {
            hidden_size: 8192,
            intermediate_size: 28_672,
            n_layers: 80,
            n_heads: 64,
            ..base
        },
        "qwen2.5-7b" => ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 152_064,
            hidden_size: 3584,
            intermediate_size: 18_944,
            n_layers: 28,
            n_heads: 28,
            n_kv_heads: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: None,
            max_context: 32_768,
            qkv_bias: true,
            bos_token_id: Some(151_643),
            eos_token_ids: vec![151_643, 151_645],
            ..base
        },
        _ => return None,
    };
    Some(config)
}

/// Everything needed to build an engine for a `--model` argument.
pub struct ResolvedModel {
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Tokenizer,
    /// The directory or preset name, for messages and the API's model id.
    pub name: String,
}

/// A directory is read as a Hugging Face model; anything else must be a preset name.
pub fn resolve_model(arg: &str) -> Result<ResolvedModel> {
    let mut resolved = resolve_model_without_weights(arg)?;
    let path = Path::new(arg);
    resolved.weights = if path.is_dir() {
        Box::new(SafetensorsDir::open(path)?)
    } else {
        Box::new(DummyWeights {
            seed: PRESET_SEED,
            dtype: resolved.config.dtype,
        })
    };
    Ok(resolved)
}

/// [`resolve_model`] without its weights: the config and tokenizer, for what never reads a weight — the frontend
/// and the mock backend (so a model directory needs no safetensors for them). Its weight source refuses every read.
pub fn resolve_model_without_weights(arg: &str) -> Result<ResolvedModel> {
    let path = Path::new(arg);
    let (config, tokenizer) = if path.is_dir() {
        let config = ModelConfig::from_hf_dir(path)?;
        let tokenizer_path = path.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(Error::Tokenizer(format!(
                "{} is missing; cleave needs a tokenizer.json",
                tokenizer_path.display()
            )));
        }
        (config, Tokenizer::from_file(&tokenizer_path)?)
    } else {
        let config = preset(arg).ok_or_else(|| Error::UnknownModel(arg.to_string()))?;
        (config, Tokenizer::Bytes)
    };
    Ok(ResolvedModel {
        config,
        weights: Box::new(NoWeights { model: arg.to_string() }),
        tokenizer,
        name: arg.to_string(),
    })
}

/// The weight source of a model resolved without weights.
struct NoWeights {
    model: String,
}

impl NoWeights {
    fn refuse(&self, name: &str) -> Error {
        Error::Weights {
            path: self.model.clone().into(),
            message: format!(
                "the model was resolved without its weights (for the mock backend or a frontend), so tensor {name:?} cannot be read"
            ),
        }
    }
}

impl WeightSource for NoWeights {
    fn has(&self, _name: &str) -> bool {
        false
    }

    fn host_dtype(&self, name: &str, _shape: &[usize]) -> Result<HostDType> {
        Err(self.refuse(name))
    }

    fn read_block(
        &self,
        name: &str,
        _shape: &[usize],
        _rows: Range<usize>,
        _cols: Range<usize>,
        _out: HostSliceMut<'_>,
    ) -> Result<()> {
        Err(self.refuse(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_named() {
        for name in PRESET_NAMES {
            let c = preset(name).unwrap_or_else(|| panic!("preset {name} missing"));
            c.validate().unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
        // Llama-3-8B has 8.03B parameters; a wrong shape would show here.
        let n = preset("llama3-8b").unwrap().n_params();
        assert!(
            (8_000_000_000..8_100_000_000).contains(&n),
            "llama3-8b has {n} parameters"
        );
        let small = preset("small").unwrap().n_params();
        assert!(
            (80_000_000..130_000_000).contains(&small),
            "small has {small} parameters"
        );
    }
}
