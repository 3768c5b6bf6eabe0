//! Choosing the next token from logits: greedy, or temperature with top-k and top-p, from a per-request seed and draw
//! counter, so that a seeded request gives the same tokens whatever else the engine is running and wherever it is
//! sampled.
//!
//! # The algorithm
//!
//! One definition, implemented here ([`sample_row`], the reference and the CPU backend's path) and on the GPU
//! (`sample_*` in `backend/cuda/kernels.cu`) with the same operations, so both give the same token for the same
//! logits, parameters, seed and draw. Every step is either integer arithmetic or single IEEE-754 operations
//! (`+ - * /` rounded to nearest, no fused multiply-add), which both sides evaluate bit for bit alike; the GPU spells
//! them `__fadd_rn`, `__fmul_rn`, ... so that the compiler cannot contract them.
//!
//! 1. *Allowed tokens*: every id whose logit is not NaN and that is not banned. No allowed token: id 0.
//! 2. *Greedy*: `temperature == 0` (or `1 / temperature` not finite, or a non-finite largest logit): the allowed id
//!    with the largest logit, the lowest id on a tie.
//! 3. *Weights*: with `m` the largest allowed logit, token `i` weighs `q_i = trunc(exp((x_i - m) · (1/T)) · 2^s)`, an
//!    integer ([`weight_shift`] picks `s` so that a whole row's sum fits in a `u64`); `exp` is [`exp_neg`], a
//!    polynomial of plain f32 operations. Tokens more than about `s · ln 2` below the top (in units of T) weigh 0:
//!    their probability was below `2^-s` of the top token's (the total mass dropped is below `vocab · 2^-s`,
//!    under 1e-8 at a 128k vocabulary).
//! 4. *Top-k*: the allowed tokens whose [`float_key`] (the logit's bits, mapped to an order-preserving u32) is at
//!    least the k-th largest key. Ties with the k-th logit are all kept, so more than k tokens can remain.
//! 5. *Top-p*: of those, the tokens whose key is at least `v*`, the largest key such that the tokens at or above it
//!    weigh at least `top_p · W` (`W` the top-k set's weight; sums are exact integers, compared as
//!    `(sum as f64) >= (top_p as f64) * (W as f64)`). This is the smallest set of most likely tokens that reaches
//!    `top_p`, except that tokens tied with the last one are all kept. `top_p >= 1` keeps every token.
//! 6. *Draw*: `r = (h · W_kept) >> 64` with `h = draw_word(seed, draw)` (one counter-based 64-bit hash per draw); the
//!    token is the first kept id, in id order, whose running weight exceeds `r`. So token `i` comes with probability
//!    `q_i / W_kept`: the renormalised softmax over the kept set, to the weights' precision.
//!
//! Nothing depends on the order tokens are visited in or on other rows, so the GPU may reduce in any order and a
//! request samples the same in any batch. The draw counter is all the state: a worker that continues a request
//! sampled elsewhere (disaggregated prefill) skips the draws already made ([`Sampler::skip_draw`]).

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

/// One row's sampling, as a backend receives it: the request's parameters, its seed and draw number, and the ids it
/// may not produce (EOS and stop tokens before `min_tokens`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleRow<'a> {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables.
    pub top_k: u32,
    pub seed: u64,
    /// How many tokens this request has drawn before this one.
    pub draw: u64,
    pub banned: &'a [u32],
}

impl SampleRow<'_> {
    /// The 64-bit random word of this draw.
    pub fn word(&self) -> u64 {
        draw_word(self.seed, self.draw)
    }
}

/// A request's sampler: its parameters, seed and the number of draws made.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    draws: u64,
}

impl Sampler {
    /// `fallback_seed` is used when the request has none (the engine draws it from its own RNG).
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(fallback_seed);
        Self { params, seed, draws: 0 }
    }

    /// The next draw as a row for a backend's device sampling; [`Sampler::advance`] once it is drawn.
    pub fn row<'a>(&self, banned: &'a [u32]) -> SampleRow<'a> {
        SampleRow {
            temperature: self.params.temperature,
            top_p: self.params.top_p,
            top_k: self.params.top_k.min(u32::MAX as usize) as u32,
            seed: self.seed,
            draw: self.draws,
            banned,
        }
    }

    /// Counts a draw made elsewhere (on the device, from [`Sampler::row`]).
    pub fn advance(&mut self) {
        self.draws += 1;
    }

    /// Consumes the draw one `sample` call would have made, without sampling: when another worker sampled this
    /// request's first token with the same seed, the sequence continues as if it had been drawn here.
    pub fn skip_draw(&mut self) {
        self.advance();
    }

    /// Picks a token on the host. `banned` ids (EOS before `min_tokens`) are never chosen.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32]) -> u32 {
        let token = sample_row(&self.row(banned), logits);
        self.advance();
        token
    }
}

/// SplitMix64's output function.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The random word of draw `draw` of a request seeded `seed`: SplitMix64's `draw`-th output from the state
/// `mix64(seed)`. A pure function, so any draw can be computed anywhere.
pub fn draw_word(seed: u64, draw: u64) -> u64 {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    mix64(mix64(seed).wrapping_add(draw.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// The logit's bits as a u32 that orders like the value (-0 just below +0; NaN is never asked for).
pub fn float_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// The fixed-point scale of the weights, `2^s`: the largest `s <= 52` with `vocab · 2^s < 2^63`.
pub fn weight_shift(vocab: usize) -> u32 {
    let bits = usize::BITS - vocab.max(1).leading_zeros();
    63u32.saturating_sub(bits).min(52)
}

// f32 constants by their bits, so that the CUDA side (same bits) cannot parse them differently.
const LOG2E: u32 = 0x3fb8_aa3b;
const LN2_HI: u32 = 0x3f31_8000; // 0.693359375: few bits, so k · LN2_HI is exact
const LN2_LO: u32 = 0xb95e_8083; // ln 2 - LN2_HI
/// 1/7!, 1/6!, ..., 1/2!, 1, 1: e^r = Σ r^n / n! to degree 7 (error ~5e-9 for |r| <= ln2 / 2).
const EXP_POLY: [u32; 8] = [
    0x3950_0d01,
    0x3ab6_0b61,
    0x3c08_8889,
    0x3d2a_aaab,
    0x3e2a_aaab,
    0x3f00_0000,
    0x3f80_0000,
    0x3f80_0000,
];
/// Below this `(x - m) / T` a weight is 0 (e^-80 · 2^52 < 1) and 2^k stays a normal number.
const EXP_MIN: f32 = -80.0;

/// `e^a` for `EXP_MIN <= a <= 0`, from plain f32 operations only (the GPU performs the same ones): `a = k ln 2 + r`,
/// `e^a = 2^k · poly(r)`.
pub fn exp_neg(a: f32) -> f32 {
    let f = f32::from_bits;
    let k = (a * f(LOG2E)).round_ties_even();
    let r = (a - k * f(LN2_HI)) - k * f(LN2_LO);
    let mut p = f(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = p * r + f(c);
    }
    p * f(((127 + k as i32) as u32) << 23)
}

/// Token weight `trunc(e^((x - m) / T) · 2^s)` (`scale = 2^s`, `inv_t = 1 / T`).
pub fn token_weight(x: f32, m: f32, inv_t: f32, scale: f32) -> u64 {
    let a = (x - m) * inv_t;
    if a.is_nan() || a < EXP_MIN {
        return 0;
    }
    (exp_neg(a) * scale) as u64
}

/// Samples one row of logits as the module docs define it. `row.banned` ids are excluded.
pub fn sample_row(row: &SampleRow, logits: &[f32]) -> u32 {
    let allowed = |i: usize, x: f32| !x.is_nan() && !row.banned.contains(&(i as u32));
    let mut best: Option<usize> = None;
    let mut n_allowed = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if allowed(i, x) {
            n_allowed += 1;
            if best.is_none_or(|b| x > logits[b]) {
                best = Some(i);
            }
        }
    }
    let Some(best) = best else {
        return 0;
    };
    let m = logits[best];
    let inv_t = 1.0 / row.temperature;
    if row.temperature.is_nan() || row.temperature <= 0.0 || !inv_t.is_finite() || !m.is_finite() {
        return best as u32;
    }
    let scale = f32::from_bits((127 + weight_shift(logits.len())) << 23);

    // Top-k: the k-th largest key among the allowed tokens.
    let k = row.top_k as usize;
    let mut threshold = 0u32;
    if k > 0 && k < n_allowed {
        let mut keys: Vec<u32> = (logits.iter().enumerate())
            .filter(|&(i, &x)| allowed(i, x))
            .map(|(_, &x)| float_key(x))
            .collect();
        threshold = *keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a)).1;
    }
    // Weights of the top-k set (0 outside it).
    let weights: Vec<u64> = (logits.iter().enumerate())
        .map(|(i, &x)| {
            if allowed(i, x) && float_key(x) >= threshold {
                token_weight(x, m, inv_t, scale)
            } else {
                0
            }
        })
        .collect();
    // Top-p: the largest key whose tokens at or above it weigh at least top_p of the set.
    if row.top_p < 1.0 {
        let mut kept: Vec<(u32, u64)> = (logits.iter().zip(&weights))
            .filter(|&(_, &w)| w > 0)
            .map(|(&x, &w)| (float_key(x), w))
            .collect();
        kept.sort_unstable_by_key(|&(key, _)| std::cmp::Reverse(key));
        let total: u64 = kept.iter().map(|&(_, w)| w).sum();
        let target = row.top_p as f64 * total as f64;
        let mut cum = 0u64;
        for (key, w) in kept {
            cum += w;
            if cum as f64 >= target {
                threshold = threshold.max(key);
                break;
            }
        }
    }
    let kept_weight = |i: usize| {
        if weights[i] > 0 && float_key(logits[i]) >= threshold {
            weights[i]
        } else {
            0
        }
    };
    let total: u64 = (0..logits.len()).map(kept_weight).sum();
    let r = ((row.word() as u128 * total as u128) >> 64) as u64;
    let mut cum = 0u64;
    for i in 0..logits.len() {
        cum += kept_weight(i);
        if cum > r {
            return i as u32;
        }
    }
    best as u32
}

/// The distribution [`sample_row`] draws from, in f64 straight from the definition (for checks): softmax(x / T) over
/// the allowed tokens, cut to the top k (ties kept), then to the smallest most likely set reaching `top_p` (ties
/// kept). Only for `temperature > 0`.
pub fn distribution(logits: &[f32], row: &SampleRow) -> Vec<f64> {
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| !logits[i].is_nan() && !row.banned.contains(&(i as u32)))
        .collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let k = row.top_k as usize;
    if k > 0 && k < order.len() {
        let kth = logits[order[k - 1]];
        order.retain(|&i| logits[i] >= kth);
    }
    let mut dist = vec![0.0; logits.len()];
    let Some(&top) = order.first() else {
        return dist;
    };
    let m = logits[top] as f64;
    let w: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / row.temperature as f64).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut keep = order.len();
    if row.top_p < 1.0 {
        let mut cum = 0.0;
        for (j, &wj) in w.iter().enumerate() {
            cum += wj;
            if cum >= row.top_p as f64 * total {
                let last = logits[order[j]];
                keep = order.iter().take_while(|&&i| logits[i] >= last).count();
                break;
            }
        }
    }
    let kept: f64 = w[..keep].iter().sum();
    for (j, &i) in order[..keep].iter().enumerate() {
        dist[i] = w[j] / kept;
    }
    dist
}

/// Pearson's chi-square of observed token counts against a distribution (see [`distribution`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChiSquare {
    pub statistic: f64,
    pub df: usize,
    /// Draws of tokens the distribution gives no chance.
    pub impossible: u64,
}

impl ChiSquare {
    /// Over the tokens expected at least 5 times; the rest are pooled into one cell.
    pub fn new(counts: &[u64], dist: &[f64]) -> Self {
        let n: u64 = counts.iter().sum();
        let (mut statistic, mut cells, mut impossible) = (0.0, 0usize, 0u64);
        let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
        for (&c, &p) in counts.iter().zip(dist) {
            if p == 0.0 {
                impossible += c;
                continue;
            }
            let e = p * n as f64;
            if e >= 5.0 {
                statistic += (c as f64 - e).powi(2) / e;
                cells += 1;
            } else {
                pooled_obs += c as f64;
                pooled_exp += e;
            }
        }
        if pooled_exp >= 5.0 {
            statistic += (pooled_obs - pooled_exp).powi(2) / pooled_exp;
            cells += 1;
        }
        Self {
            statistic,
            df: cells.saturating_sub(1),
            impossible,
        }
    }

    /// The statistic a right distribution exceeds with probability about 1e-6 (Wilson–Hilferty).
    pub fn bound(&self) -> f64 {
        let df = self.df.max(1) as f64;
        let z = 4.75;
        df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3)
    }

    pub fn passes(&self) -> bool {
        self.impossible == 0 && self.statistic < self.bound()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
        }
    }

    fn argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    /// Logits from a fixed LCG, in `[-spread, spread)`.
    fn random_logits(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * spread
            })
            .collect()
    }

    fn counts(logits: &[f32], p: &SamplingParams, banned: &[u32], n: usize) -> Vec<u64> {
        let mut counts = vec![0u64; logits.len()];
        // One draw per seed and many draws of one seed both cover the definition: use both.
        for seed in 0..(n / 4) as u64 {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    ..p.clone()
                },
                0,
            );
            for _ in 0..4 {
                counts[s.sample(logits, banned) as usize] += 1;
            }
        }
        counts
    }

    #[test]
    fn greedy_takes_the_largest_and_respects_bans() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1]), 2);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0], &[]), 1, "lowest id wins a tie");
        assert_eq!(s.sample(&[f32::NAN, 1.0], &[]), 1, "NaN is never chosen");
        assert_eq!(s.sample(&[1.0, 2.0], &[0, 1]), 0, "nothing allowed: id 0");
    }

    #[test]
    fn seeded_sampling_repeats_varies_and_is_a_pure_function_of_seed_and_draw() {
        let logits = random_logits(500, 3, 4.0);
        let p = params(1.0, 0, 1.0, 7);
        let draw = || {
            let mut s = Sampler::new(p.clone(), 0);
            (0..40).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 10,
            "sampling barely varied: {a:?}"
        );
        // Draw n is the same computed alone, from a row, or after skipping the earlier draws.
        let mut skipped = Sampler::new(p.clone(), 0);
        for _ in 0..17 {
            skipped.skip_draw();
        }
        assert_eq!(skipped.sample(&logits, &[]), a[17]);
        let row = SampleRow {
            draw: 17,
            ..Sampler::new(p.clone(), 0).row(&[])
        };
        assert_eq!(sample_row(&row, &logits), a[17]);
        let other_seed: Vec<u32> = {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 8), 0);
            (0..40).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_ne!(a, other_seed);
    }

    #[test]
    fn top_k_one_and_tiny_temperatures_are_greedy() {
        for seed in 0..20 {
            let mut logits = random_logits(1000, seed, 5.0);
            let greedy = argmax(&logits);
            // At T = 1e-4 a runner-up 0.01 below is e^-100 as likely.
            logits[greedy as usize] += 0.01;
            for p in [
                params(1.0, 1, 1.0, seed),
                params(1e-4, 0, 1.0, seed),
                params(0.7, 0, 1e-6, seed),
            ] {
                let mut s = Sampler::new(p.clone(), 0);
                for _ in 0..5 {
                    assert_eq!(s.sample(&logits, &[]), greedy, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        // Token 0 holds nearly all the mass; banned, it must never come, whatever the parameters.
        let mut logits = random_logits(64, 1, 1.0);
        logits[0] = 20.0;
        logits[5] = 19.0;
        for p in [
            params(0.0, 0, 1.0, 0),
            params(1.0, 0, 1.0, 1),
            params(2.0, 2, 0.5, 2),
            params(1.0, 0, 0.3, 3),
        ] {
            let mut s = Sampler::new(p.clone(), 0);
            for _ in 0..300 {
                let t = s.sample(&logits, &[0, 7]);
                assert!(t != 0 && t != 7, "{p:?} chose banned {t}");
            }
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass at T=1; top_p 0.5 must always pick it.
        let logits = [5.0, 3.0, 0.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 0.5, 1), 0);
        assert!((0..200).all(|_| s.sample(&logits, &[]) == 0));
    }

    #[test]
    fn weights_follow_exp_closely() {
        for i in 0..=8000 {
            let a = -(i as f32) * 0.01;
            let rel = (exp_neg(a) as f64 - (a as f64).exp()).abs() / (a as f64).exp();
            assert!(rel < 3e-7, "exp_neg({a}) off by {rel:e}");
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(weight_shift(128_256), 46);
        assert_eq!(weight_shift(4), 52);
        let scale = f32::from_bits((127 + 46) << 23);
        assert_eq!(token_weight(2.0, 2.0, 1.0, scale), 1 << 46);
        assert_eq!(token_weight(f32::NEG_INFINITY, 2.0, 1.0, scale), 0);
        assert!(float_key(-1.0) < float_key(-0.0) && float_key(-0.0) < float_key(0.0));
        assert!(float_key(0.0) < float_key(1e-30) && float_key(1.0) < float_key(f32::INFINITY));
        assert!(float_key(f32::NEG_INFINITY) < float_key(-1e30));
    }

    /// Frequencies over many seeds against the renormalised top-k / top-p softmax, for a spread of parameters.
    #[test]
    fn draws_follow_the_renormalised_distribution() {
        let n = 40_000;
        let mut logits = random_logits(40, 11, 3.0);
        logits[3] = logits[9]; // a tie, which top-k and top-p keep together
        logits[20] = f32::NAN;
        let cases = [
            (params(1.0, 0, 1.0, 0), vec![]),
            (params(0.6, 0, 1.0, 0), vec![]),
            (params(1.3, 7, 1.0, 0), vec![]),
            (params(1.0, 0, 0.8, 0), vec![]),
            (params(0.9, 12, 0.7, 0), vec![2]),
            (params(2.0, 0, 0.95, 0), vec![5, 30]),
        ];
        for (p, banned) in cases {
            let dist = distribution(&logits, &Sampler::new(p.clone(), 0).row(&banned));
            let chi = ChiSquare::new(&counts(&logits, &p, &banned, n), &dist);
            assert!(chi.passes(), "{p:?}: {chi:?}, bound {:.1}", chi.bound());
        }
    }

    /// The check above is able to fail: the same draws against a distribution one temperature off, or without the
    /// top-p cut, are rejected.
    #[test]
    fn the_distribution_check_rejects_a_wrong_distribution() {
        let n = 40_000;
        let logits = random_logits(40, 11, 3.0);
        let p = params(1.0, 0, 0.8, 0);
        let c = counts(&logits, &p, &[], n);
        assert!(ChiSquare::new(&c, &distribution(&logits, &Sampler::new(p.clone(), 0).row(&[]))).passes());
        for wrong in [params(1.1, 0, 0.8, 0), params(1.0, 0, 0.85, 0)] {
            let chi = ChiSquare::new(&c, &distribution(&logits, &Sampler::new(wrong.clone(), 0).row(&[])));
            assert!(!chi.passes(), "draws at {p:?} passed as {wrong:?}: {chi:?}");
        }
    }

    /// A full-size row: top-k and top-p sets match the definition, so a row's draws stay inside them.
    #[test]
    fn large_vocabulary_rows_stay_in_the_kept_set() {
        let logits = random_logits(128_256, 5, 8.0);
        for p in [
            params(0.8, 50, 1.0, 3),
            params(1.0, 0, 0.9, 4),
            params(0.7, 200, 0.5, 5),
        ] {
            let dist = distribution(&logits, &Sampler::new(p.clone(), 0).row(&[]));
            let mut s = Sampler::new(p.clone(), 0);
            for _ in 0..50 {
                let t = s.sample(&logits, &[]) as usize;
                assert!(dist[t] > 0.0, "{p:?} drew {t}, outside the kept set");
            }
        }
    }
}
