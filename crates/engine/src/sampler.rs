//! Choosing the next token from logits: greedy, or temperature with top-k and top-p, from a per-request seeded RNG
//! so that a seeded request gives the same tokens whatever else the engine is running.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// How a request samples. `temperature == 0` is greedy (the lowest id wins a tie).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 disables).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 disables).
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// `fallback_seed` is used when the request has none (the engine draws it from its own RNG).
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed.unwrap_or(fallback_seed));
        Self { params, rng }
    }

    /// Consumes the draw one `sample` call would have made, without sampling: when another worker sampled this
    /// request's first token with the same seed, the sequence continues as if it had been drawn here.
    pub fn skip_draw(&mut self) {
        if self.params.temperature != 0.0 {
            self.rng.next_u64();
        }
    }

    /// Picks a token. `banned` ids (EOS before `min_tokens`) are never chosen.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32]) -> u32 {
        let allowed = |i: usize| !banned.contains(&(i as u32));
        if self.params.temperature == 0.0 {
            return argmax(logits, allowed);
        }
        // Candidates sorted by logit, highest first (ties by id), after top-k.
        let mut candidates: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| allowed(i as usize) && !logits[i as usize].is_nan())
            .collect();
        candidates.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let Some(&best) = candidates.first() else {
            return argmax(logits, allowed);
        };
        let inv_t = 1.0 / self.params.temperature as f64;
        let max = logits[best as usize] as f64;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    cumulative += p;
                    cumulative >= self.params.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        // Inverse-CDF draw over the kept mass.
        let kept: f64 = probs.iter().sum();
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * kept;
        let mut cumulative = 0.0;
        for (p, &id) in probs.iter().zip(&candidates) {
            cumulative += p;
            if u < cumulative {
                return id;
            }
        }
        candidates[probs.len() - 1]
    }
}

fn argmax(logits: &[f32], allowed: impl Fn(usize) -> bool) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &x) in logits.iter().enumerate() {
        if allowed(i) && !x.is_nan() && best.is_none_or(|b| x > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_respects_bans() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeded_sampling_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = |top_k| SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k,
            seed: Some(7),
        };
        let mut s = Sampler::new(p(1), 0);
        assert_eq!(s.sample(&logits, &[]), argmax(&logits, |_| true));
        let draw = || {
            let mut s = Sampler::new(p(0), 0);
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "sampling never varied: {a:?}"
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass at T=1; top_p 0.5 must always pick it.
        let logits = [5.0, 3.0, 0.0, 0.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                top_k: 0,
                seed: Some(1),
            },
            0,
        );
        assert!((0..200).all(|_| s.sample(&logits, &[]) == 0));
    }
}
