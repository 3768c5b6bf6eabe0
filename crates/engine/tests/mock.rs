//! The mock backend under the real engine: models of any size build without weights, tokens are deterministic and
//! keep the engine's invariances (batching, chunking, prefix caching, disaggregation), they depend on every layer of
//! every KV block, and steps take the time the timing model says.

mod common;

use std::time::{Duration, Instant};

use cleave_engine::backend::mock::{MockBackend, MockTiming};
use cleave_engine::engine::{Engine, EngineConfig, RequestParams};
use cleave_engine::presets::{resolve_model, resolve_model_without_weights};
use cleave_engine::sampler::SamplingParams;
use cleave_engine::scheduler::SchedulerPolicy;
use common::{fixtures_dir, greedy, prompt};

fn mock_engine(model: &str, timing: MockTiming, config: EngineConfig) -> Engine<MockBackend> {
    let resolved = resolve_model_without_weights(model).unwrap_or_else(|e| panic!("cannot resolve {model}: {e}"));
    Engine::new(MockBackend::new(timing), resolved, config).expect("mock engine builds")
}

fn tiny(config: EngineConfig) -> Engine<MockBackend> {
    mock_engine("tiny", MockTiming::default(), config)
}

fn run(engine: &mut Engine<MockBackend>, prompts: &[Vec<u32>], params: RequestParams) -> Vec<Vec<u32>> {
    let available = engine.block_pool().n_available();
    let done = engine
        .generate(prompts.iter().map(|p| (p.clone(), params.clone())).collect())
        .unwrap();
    assert_eq!(engine.block_pool().n_in_use(), 0, "blocks leaked");
    assert_eq!(engine.block_pool().n_available(), available);
    done.into_iter().map(|c| c.token_ids).collect()
}

#[test]
fn a_llama3_70b_shape_builds_at_once_without_weights_and_generates() {
    let started = Instant::now();
    let config = EngineConfig {
        kv_cache_bytes: 8 << 30, // 8 GiB as a GPU would hold it: the mock keeps 1/1024 of that
        ..EngineConfig::default()
    };
    let mut engine = mock_engine("llama3-70b", MockTiming::default(), config);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(engine.backend_name(), "mock");
    // 80 layers × 8 KV heads × 128 × 2 (K, V) × 2 bytes = 320 KiB per token.
    assert_eq!(engine.block_pool().n_blocks(), (8 << 30) / (16 * 320 * 1024));
    let out = run(&mut engine, &[prompt(100, 1, 128_000)], greedy(8));
    assert_eq!(out[0].len(), 8);
    assert!(out[0].iter().all(|&t| (t as usize) < 128_256));
}

#[test]
fn tokens_are_deterministic_and_depend_on_the_whole_prompt() {
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(30, 10 + i, 258)).collect();
    let a = run(&mut tiny(EngineConfig::default()), &prompts, greedy(16));
    let b = run(&mut tiny(EngineConfig::default()), &prompts, greedy(16));
    assert_eq!(a, b);
    // Changing the first token of a prompt changes what follows.
    let mut changed = prompts[0].clone();
    changed[0] = (changed[0] + 1) % 258;
    let c = run(&mut tiny(EngineConfig::default()), &[changed], greedy(16));
    assert_ne!(c[0], a[0]);
    // Different prompts give different continuations.
    assert_ne!(a[0], a[1]);
}

#[test]
fn batching_chunking_and_prefix_caching_change_no_token() {
    let shared = prompt(40, 7, 258);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            shared
                .iter()
                .copied()
                .chain(prompt(5 + 9 * i, 100 + i as u32, 258))
                .collect()
        })
        .collect();
    let batched = run(&mut tiny(EngineConfig::default()), &prompts, greedy(12));
    let chunked = EngineConfig {
        policy: SchedulerPolicy::Chunked { chunk_tokens: 7 },
        prefix_caching: false,
        ..EngineConfig::default()
    };
    assert_eq!(run(&mut tiny(chunked), &prompts, greedy(12)), batched);
    // One at a time on one engine: every prompt after the first finds the shared prefix cached.
    let mut engine = tiny(EngineConfig::default());
    for (p, expected) in prompts.iter().zip(&batched) {
        let completion = engine.generate(vec![(p.clone(), greedy(12))]).unwrap().remove(0);
        assert_eq!(&completion.token_ids, expected);
    }
    // Prompt 3 again (72 tokens): its first four blocks come from the cache.
    let again = engine
        .generate(vec![(prompts[3].clone(), greedy(12))])
        .unwrap()
        .remove(0);
    assert_eq!(again.n_cached_tokens, 64);
    assert_eq!(again.token_ids, batched[3]);
}

#[test]
fn preemption_recomputes_the_same_tokens() {
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(20, 50 + i, 258)).collect();
    let expected = run(&mut tiny(EngineConfig::default()), &prompts, greedy(40));
    // Room for about 3 sequences of 60 tokens: decode growth preempts.
    let block_bytes = 16 * 2 * 2 * 16 * 2 * 2; // block × K,V × kv heads × head_dim × bf16 × layers
    let small = EngineConfig {
        kv_cache_bytes: 12 * block_bytes,
        ..EngineConfig::default()
    };
    let mut engine = tiny(small);
    assert_eq!(engine.block_pool().n_blocks(), 12);
    assert_eq!(run(&mut engine, &prompts, greedy(40)), expected);
    assert!(engine.n_preemptions() > 0, "the cache was small enough to preempt");
}

#[test]
fn disaggregated_prefill_gives_the_aggregated_tokens_and_needs_every_layer() {
    let p = prompt(45, 3, 258);
    let expected = run(&mut tiny(EngineConfig::default()), std::slice::from_ref(&p), greedy(10)).remove(0);
    let n_layers = tiny(EngineConfig::default()).model_config().n_layers;
    // `skip`: a (layer, block) chunk that is lost on the way.
    let split = |skip: Option<(usize, usize)>| {
        let (mut decode, mut prefill) = (tiny(EngineConfig::default()), tiny(EngineConfig::default()));
        let remote = decode.add_remote_prefill_request(1, p.clone(), greedy(10)).unwrap();
        let first = prefill
            .prefill_remote(&remote, &greedy(10), &mut |chunk| {
                if skip == Some((chunk.layer_idx, chunk.block_index)) {
                    return Ok(());
                }
                decode.import_kv_block(1, &chunk)
            })
            .unwrap();
        let mut tokens = decode.finish_remote_prefill(1, first).unwrap().token_ids;
        while decode.has_unfinished() {
            tokens.extend(decode.step().unwrap().into_iter().flat_map(|o| o.token_ids));
        }
        tokens
    };
    assert_eq!(split(None), expected);
    // Position 44 (the last prompt token) sits in block 2: losing any layer of it changes the first decode step.
    for layer in 0..n_layers {
        let lost = split(Some((layer, 2)));
        assert_eq!(lost[0], expected[0], "the first token comes from the prefill side");
        assert_ne!(lost, expected, "losing layer {layer} of the last block must show");
    }
}

#[test]
fn seeded_sampling_repeats_and_stays_among_the_candidates() {
    let sampled = |seed| RequestParams {
        sampling: SamplingParams {
            temperature: 1.5,
            top_p: 1.0,
            top_k: 0,
            seed: Some(seed),
        },
        ..greedy(64)
    };
    let p = vec![prompt(12, 1, 258)];
    let a = run(&mut tiny(EngineConfig::default()), &p, sampled(1));
    assert_eq!(a, run(&mut tiny(EngineConfig::default()), &p, sampled(1)));
    assert_ne!(a, run(&mut tiny(EngineConfig::default()), &p, sampled(2)));
    let greedy_tokens = run(&mut tiny(EngineConfig::default()), &p, greedy(64));
    assert_ne!(a, greedy_tokens, "temperature 1.5 leaves the top candidate at times");
    // Each step's logits: four candidates above a floor that holds no probability.
    let mut engine = tiny(EngineConfig::default());
    engine.add_request(9, p[0].clone(), greedy(1)).unwrap();
    let (_, logits) = engine.step_with_logits().unwrap();
    assert!((1..=4).contains(&logits.iter().filter(|&&x| x > -30.0).count()));
}

#[test]
fn a_model_directory_without_weights_serves_with_its_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures_dir().join("llama").join(file), dir.path().join(file)).unwrap();
    }
    let arg = dir.path().to_string_lossy().into_owned();
    let error = resolve_model(&arg)
        .err()
        .expect("weights are needed to compute")
        .to_string();
    assert!(error.contains("no *.safetensors"), "{error}");
    let mut engine = mock_engine(&arg, MockTiming::default(), EngineConfig::default());
    let ids = engine.tokenizer().encode("Hello there").unwrap();
    let done = engine.generate(vec![(ids, greedy(6))]).unwrap().remove(0);
    assert_eq!(done.token_ids.len(), 6);
    assert_eq!(done.text, engine.tokenizer().decode(&done.token_ids).unwrap());
    // The resolved model's weight source refuses reads with a message saying why.
    let resolved = resolve_model_without_weights(&arg).unwrap();
    let error = resolved
        .weights
        .tensor("model.norm.weight", &[64])
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("without its weights"), "{error}");
}

#[test]
fn steps_take_the_time_the_timing_model_says() {
    // 10 ms per step, plus 100 µs per prefill token: a 40-token prompt and 4 more tokens take 1 prefill step (14 ms)
    // and 4 decode steps (40 ms).
    let timing = MockTiming::parse("base_ms=10,prefill_token_us=100").unwrap();
    let mut engine = mock_engine("tiny", timing, EngineConfig::default());
    let started = Instant::now();
    let done = engine.generate(vec![(prompt(40, 1, 258), greedy(5))]).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(done[0].token_ids.len(), 5);
    assert!(elapsed >= Duration::from_millis(54), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(54 + 100), "{elapsed:?}");
    // The tokens do not depend on the timing.
    let free = run(&mut tiny(EngineConfig::default()), &[prompt(40, 1, 258)], greedy(5));
    assert_eq!(done[0].token_ids, free[0]);
}

#[test]
fn a_remote_prefill_streams_its_layers_across_the_step() {
    // 40 ms for the step, over the tiny model's 2 layers: layer 0 is exported at ~20 ms, layer 1 at ~40 ms.
    let timing = MockTiming::parse("base_ms=40").unwrap();
    let mut prefill = mock_engine("tiny", timing, EngineConfig::default());
    let mut decode = tiny(EngineConfig::default());
    let remote = decode
        .add_remote_prefill_request(1, prompt(20, 1, 258), greedy(2))
        .unwrap();
    let started = Instant::now();
    let mut exported_at = Vec::new();
    prefill
        .prefill_remote(&remote, &greedy(2), &mut |chunk| {
            exported_at.push((chunk.layer_idx, started.elapsed()));
            decode.import_kv_block(1, &chunk)
        })
        .unwrap();
    let layer_0 = exported_at
        .iter()
        .filter(|(l, _)| *l == 0)
        .map(|(_, t)| *t)
        .max()
        .unwrap();
    let layer_1 = exported_at
        .iter()
        .filter(|(l, _)| *l == 1)
        .map(|(_, t)| *t)
        .min()
        .unwrap();
    assert!(
        (Duration::from_millis(20)..Duration::from_millis(40)).contains(&layer_0),
        "{layer_0:?}"
    );
    assert!(layer_1 >= Duration::from_millis(40), "{layer_1:?}");
}

#[test]
fn min_tokens_bans_hold_when_tokens_are_picked_on_the_device() {
    // The mock samples "on the device" (`sample_tokens`), as the CUDA backend does, with the bans in its rows.
    let p = prompt(20, 5, 258);
    let free = run(&mut tiny(EngineConfig::default()), std::slice::from_ref(&p), greedy(6)).remove(0);
    // min_tokens with nothing banned in the way changes nothing.
    let at_least = RequestParams {
        min_tokens: 6,
        ..greedy(6)
    };
    assert_eq!(
        run(&mut tiny(EngineConfig::default()), std::slice::from_ref(&p), at_least).remove(0),
        free
    );
    // The first greedy token made a stop token and banned by min_tokens: the next best is taken instead, the same
    // one the host picks from the full logits.
    let banned = RequestParams {
        min_tokens: 2,
        stop_token_ids: vec![free[0]],
        ..greedy(6)
    };
    let device = run(
        &mut tiny(EngineConfig::default()),
        std::slice::from_ref(&p),
        banned.clone(),
    )
    .remove(0);
    assert_ne!(device[0], free[0]);
    let mut host = tiny(EngineConfig::default());
    host.add_request(1, p, banned).unwrap();
    let mut host_tokens = Vec::new();
    while host.has_unfinished() {
        let (outputs, _logits) = host.step_with_logits().unwrap();
        host_tokens.extend(outputs.into_iter().flat_map(|o| o.token_ids));
    }
    assert_eq!(device, host_tokens);
}
