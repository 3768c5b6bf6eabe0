//! The engine's paged, batched, prefix-cached path against the naive reference forward pass: every sampled token's
//! logits agree within 1e-4 (relative to max(1, |logit|)).

mod common;

use std::collections::HashMap;

use cleave_engine::engine::EngineConfig;
use cleave_engine::scheduler::SchedulerPolicy;
use common::{ReferenceModel, engine, greedy, max_rel_err, prompt};

const TOLERANCE: f32 = 1e-4;

/// Runs `prompts` together through an engine and checks every step's logits against the reference. Returns the
/// prompt tokens each request found in the prefix cache.
fn check(
    model: &str,
    config: EngineConfig,
    reference: &ReferenceModel,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<usize> {
    let mut engine = engine(model, config);
    check_on(&mut engine, reference, prompts, max_tokens)
}

fn check_on(
    engine: &mut cleave_engine::engine::Engine<cleave_engine::backend::cpu::CpuBackend>,
    reference: &ReferenceModel,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<usize> {
    let vocab = engine.model_config().vocab_size;
    let mut sequences: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut cached = vec![0; prompts.len()];
    for (i, p) in prompts.iter().enumerate() {
        engine.add_request(i as u64, p.clone(), greedy(max_tokens)).unwrap();
        sequences.insert(i as u64, p.clone());
    }
    let mut n_checked = 0;
    while engine.has_unfinished() {
        let (outputs, logits) = engine.step_with_logits().unwrap();
        for (row, out) in outputs.iter().enumerate() {
            let tokens = sequences.get_mut(&out.id).unwrap();
            let expected = reference.last_logits(tokens);
            let got = &logits[row * vocab..(row + 1) * vocab];
            let err = max_rel_err(got, &expected);
            assert!(
                err <= TOLERANCE,
                "request {} at length {}: logits differ by {err} (relative)",
                out.id,
                tokens.len()
            );
            tokens.extend(&out.token_ids);
            cached[out.id as usize] = out.n_cached_tokens;
            n_checked += 1;
        }
    }
    assert_eq!(n_checked, prompts.len() * max_tokens);
    cached
}

#[test]
fn batch_of_different_lengths_crossing_blocks_matches_reference() {
    let reference = ReferenceModel::load("tiny");
    // Lengths around the 16-token block size: inside one block, exactly one, just past, several.
    let prompts: Vec<Vec<u32>> = [1, 5, 15, 16, 17, 33, 50]
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(n, i as u32 + 1, 258))
        .collect();
    check("tiny", EngineConfig::default(), &reference, &prompts, 6);
}

#[test]
fn prefix_cache_hits_match_reference() {
    let reference = ReferenceModel::load("tiny");
    let mut engine = engine(
        "tiny",
        EngineConfig {
            block_size: 8,
            ..EngineConfig::default()
        },
    );
    let shared = prompt(37, 7, 258);
    check_on(&mut engine, &reference, std::slice::from_ref(&shared), 3);
    // Same 37-token prefix, different continuations: the first 4 full blocks (32 tokens) come from the cache.
    let followers: Vec<Vec<u32>> = (0..3u32)
        .map(|i| {
            shared
                .iter()
                .copied()
                .chain(prompt(5 + i as usize, 100 + i, 258))
                .collect()
        })
        .collect();
    let cached = check_on(&mut engine, &reference, &followers, 4);
    assert!(
        cached.iter().all(|&c| c == 32),
        "expected 32 cached prompt tokens each, got {cached:?}"
    );
    // A prompt identical to a cached one recomputes only its last block.
    let cached = check_on(&mut engine, &reference, std::slice::from_ref(&followers[0]), 2);
    assert_eq!(cached, vec![40]);
}

#[test]
fn chunked_prefill_and_small_chunks_match_reference() {
    let reference = ReferenceModel::load("tiny");
    let prompts: Vec<Vec<u32>> = [40, 3, 27]
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(n, 50 + i as u32, 258))
        .collect();
    for chunk_tokens in [1, 7, 64] {
        let config = EngineConfig {
            policy: SchedulerPolicy::Chunked { chunk_tokens },
            ..EngineConfig::default()
        };
        check("tiny", config, &reference, &prompts, 4);
    }
}

#[test]
fn hf_fixtures_match_reference() {
    for model in ["llama", "llama3_rope", "qwen2", "qwen3", "mistral"] {
        if !common::fixtures_dir().join(model).is_dir() {
            panic!("fixture {model} is missing: run tools/gen_hf_fixtures.py");
        }
        let reference = ReferenceModel::load(model);
        let prompts: Vec<Vec<u32>> = [3, 17, 40]
            .iter()
            .enumerate()
            .map(|(i, &n)| prompt(n, 9 + i as u32, 300))
            .collect();
        check(model, EngineConfig::default(), &reference, &prompts, 4);
    }
}
