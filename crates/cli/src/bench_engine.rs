//! `cleave bench-engine`: prefill and decode times of the engine alone, each next to its hardware limit.
//!
//! Prefill: one prompt per length, timed whole (one output token). Decode: `batch` sequences whose `context` tokens
//! of KV are taken as cached (the step time does not depend on the values), timed over `decode_steps` steps.
//! One process runs the whole matrix so a large model loads once.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use cleave_engine::backend::Backend;
use cleave_engine::config::DType;
use cleave_engine::engine::{Engine, RequestParams};
use cleave_engine::scheduler::SchedulerPolicy;

use crate::{EngineArgs, engine_config, with_engine};

#[derive(Args)]
pub struct BenchEngineArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Prompt lengths of the prefill measurements (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    prompt_tokens: Vec<usize>,
    /// Batch sizes of the decode measurements (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Context lengths (cached tokens per sequence) of the decode measurements (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16")]
    context: Vec<usize>,
    /// Decode steps timed per measurement.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Limit figures per GPU (times the ranks at --tp): memory bandwidth in GB/s and dense peak in TFLOP/s (defaults:
    /// the H100 SXM spec on a GPU).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
    #[arg(long)]
    peak_tflops: Option<f64>,
}

pub fn run(args: BenchEngineArgs) -> Result<()> {
    let resolved = crate::resolve_engine_model(&args.engine)?;
    let longest = args.prompt_tokens.iter().copied().max().unwrap_or(1);
    // Each prompt prefills in one step; prefix caching off so every repetition computes everything.
    let config = engine_config(&args.engine)?;
    let config = cleave_engine::engine::EngineConfig {
        prefix_caching: false,
        policy: SchedulerPolicy::PrefillFirst {
            batch_tokens_max: longest,
        },
        ..config
    };
    with_engine!(&args.engine, resolved, config, |engine| bench_with(engine, &args))
}

/// Where the GPU time of a measurement went (`CLEAVE_PROFILE_OPS=1`): ms per op divided by `per` (steps), as JSON,
/// with the largest printed.
fn op_table(profile: &[(String, f64)], per: usize) -> serde_json::Map<String, serde_json::Value> {
    for (name, ms) in profile.iter().take(12) {
        eprintln!("    {name:<40} {:>9.3} ms", ms / per as f64);
    }
    profile
        .iter()
        .map(|(name, ms)| (name.clone(), serde_json::json!(ms / per as f64)))
        .collect()
}

/// "71.0% of 3350 GB/s", or where no limit is known (CPU and mock backends) the flag that gives one.
fn share_of_limit(value: f64, limit: f64, unit: &str, flag: &str) -> String {
    match limit.is_finite() {
        true => format!("{:>5.1}% of {limit} {unit}", 100.0 * value / limit),
        false => format!("(no limit: give {flag})"),
    }
}

/// The median; of an even count, the mean of the middle two (the upper one alone made `--repeat 2` report the
/// slower run).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() % 2 {
        1 => v[mid],
        _ => (v[mid - 1] + v[mid]) / 2.0,
    }
}

fn bench_with<B: Backend>(mut engine: Engine<B>, args: &BenchEngineArgs) -> Result<()> {
    let c = engine.model_config().clone();
    let on_gpu = engine.backend_name() == "cuda";
    // Tensor-parallel ranks each bring their own memory and compute: the limits are per GPU times the ranks.
    let ranks = crate::rank_devices(&args.engine)?.len();
    let bandwidth_gbs = ranks as f64 * args.bandwidth_gbs.unwrap_or(if on_gpu { 3350.0 } else { f64::NAN });
    let peak_tflops = ranks as f64 * args.peak_tflops.unwrap_or(if on_gpu { 989.0 } else { f64::NAN });
    let layout = engine.kv_layout();
    let kv_bytes_per_token = 2 * c.n_layers * c.kv_dim() * (engine_kv_elem_bytes(&engine));
    // The CUDA backend keeps f16 checkpoints in bf16; the CPU backend widens them to f32.
    let weight_elem_bytes = match (c.dtype, on_gpu) {
        (DType::F32, _) | (DType::F16, false) => 4,
        (DType::BF16, _) | (DType::F16, true) => 2,
    };
    let weight_bytes = c.n_params() * weight_elem_bytes;
    let vocab = c.vocab_size as u32;
    let ids = |n: usize, salt: u32| {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt) % vocab)
            .collect::<Vec<_>>()
    };
    let greedy = |max_tokens| RequestParams {
        max_tokens,
        ignore_eos: true,
        ..RequestParams::default()
    };
    let mut rows = Vec::new();
    eprintln!(
        "bench-engine: {} on {}, {} KV blocks of {} tokens",
        engine.model_name(),
        engine.backend_name(),
        layout.n_blocks,
        layout.block_size
    );

    for &n in &args.prompt_tokens {
        let (mut times, mut profile) = (Vec::new(), Vec::new());
        for rep in 0..args.repeat.max(1) + 1 {
            engine.take_op_profile();
            let start = Instant::now();
            engine.generate(vec![(ids(n, rep as u32), greedy(1))])?;
            // The first run warms up (kernel loading, allocator) and is not counted.
            if rep > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
            profile = engine.take_op_profile();
        }
        let t = median(times.clone());
        // Linear layers: 2 FLOPs per parameter per token (the embedding lookup is free, the LM head runs once);
        // causal attention: QKᵀ and PV over n²/2 pairs per head.
        let params_matmul = c.n_params() - c.vocab_size * c.hidden_size * if c.tie_word_embeddings { 1 } else { 2 };
        let flops = 2.0 * params_matmul as f64 * n as f64
            + 2.0 * 2.0 * (n as f64).powi(2) / 2.0 * (c.n_layers * c.q_dim()) as f64;
        let tflops = flops / t / 1e12;
        eprintln!(
            "prefill {n:>6} tokens: {:>9.2} ms  {:>8.1} TFLOP/s  {}",
            t * 1e3,
            tflops,
            share_of_limit(tflops, peak_tflops, "TFLOP/s", "--peak-tflops")
        );
        rows.push(serde_json::json!({
            "kind": "prefill", "prompt_tokens": n, "seconds": times, "median_s": t,
            "tokens_per_s": n as f64 / t, "tflops": tflops, "fraction_of_peak": tflops / peak_tflops,
            "op_ms": op_table(&profile, 1),
        }));
    }

    for &context in &args.context {
        for &batch in &args.batch {
            let needed_blocks = batch * (context + args.decode_steps + 1).div_ceil(layout.block_size);
            if needed_blocks > layout.n_blocks {
                eprintln!(
                    "decode batch {batch} × context {context}: needs {needed_blocks} KV blocks, the pool has {}; skipped",
                    layout.n_blocks
                );
                rows.push(serde_json::json!({"kind": "decode", "batch": batch, "context": context, "skipped": "KV pool too small"}));
                continue;
            }
            let (mut times, mut profile) = (Vec::new(), Vec::new());
            for rep in 0..args.repeat.max(1) + 1 {
                for b in 0..batch {
                    engine.add_request_for_decode_benchmark(
                        b as u64,
                        ids(context, (rep * 7919 + b) as u32),
                        greedy(args.decode_steps + 1),
                    )?;
                }
                // Warm-up step (allocations for this batch shape), not timed.
                engine.step()?;
                engine.take_op_profile();
                let start = Instant::now();
                let mut n_tokens = 0;
                while engine.has_unfinished() {
                    n_tokens += engine.step()?.len();
                }
                let elapsed = start.elapsed().as_secs_f64();
                if n_tokens != batch * args.decode_steps {
                    bail!(
                        "decode produced {n_tokens} tokens, expected {}",
                        batch * args.decode_steps
                    );
                }
                if rep > 0 {
                    times.push(elapsed / args.decode_steps as f64);
                }
                profile = engine.take_op_profile();
            }
            let step_s = median(times.clone());
            // Bytes a step must read at least: every weight once, plus each sequence's KV.
            let bytes = weight_bytes as f64 + (batch * (context + args.decode_steps / 2) * kv_bytes_per_token) as f64;
            let gbs = bytes / step_s / 1e9;
            eprintln!(
                "decode batch {batch:>4} context {context:>6}: {:>8.3} ms/step  {:>9.1} tok/s  {:>7.1} GB/s  {}",
                step_s * 1e3,
                batch as f64 / step_s,
                gbs,
                share_of_limit(gbs, bandwidth_gbs, "GB/s", "--bandwidth-gbs")
            );
            rows.push(serde_json::json!({
                "kind": "decode", "batch": batch, "context": context, "step_s": times, "median_step_s": step_s,
                "tokens_per_s": batch as f64 / step_s, "bytes_per_step": bytes, "gb_per_s": gbs,
                "fraction_of_bandwidth": gbs / bandwidth_gbs,
                "op_ms_per_step": op_table(&profile, args.decode_steps),
            }));
        }
    }
    let out = serde_json::json!({
        "model": engine.model_name(),
        "backend": engine.backend_name(),
        "tp": ranks,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "bandwidth_limit_gbs": bandwidth_gbs,
        "peak_limit_tflops": peak_tflops,
        "results": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Bytes of one KV element on this engine's backend.
fn engine_kv_elem_bytes<B: Backend>(engine: &Engine<B>) -> usize {
    let layout = engine.kv_layout();
    engine.kv_block_bytes() / layout.block_elems()
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![264.4, 239.5]), 251.95);
        assert_eq!(super::median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
