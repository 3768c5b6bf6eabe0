//! Rotary position embedding frequencies, including Llama 3.1's frequency-dependent scaling.

use crate::config::{Llama3RopeScaling, ModelConfig};

/// Inverse frequencies `θ_i = base^(-2i/d)` for `i < d/2`, after scaling. Computed once on the host; backends derive
/// `cos(pos·θ_i)` and `sin(pos·θ_i)` from them.
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let d = config.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(scaling) = &config.rope_scaling {
            for f in &mut inv_freq {
                *f = llama3_scaled(*f, scaling);
            }
        }
        Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }
}

/// Llama 3.1 scaling (as in Hugging Face's `_compute_llama3_parameters`): wavelengths longer than
/// `original_max / low_freq_factor` are stretched by `factor`, those shorter than `original_max / high_freq_factor`
/// kept, and the band between interpolated.
fn llama3_scaled(inv_freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / s.factor
    } else {
        let smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}
