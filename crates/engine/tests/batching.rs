//! Continuous batching: batch invariance, policy equivalence, preemption, cancellation, and block accounting after
//! every scenario.

mod common;

use cleave_engine::engine::{EngineConfig, FinishReason, RequestParams};
use cleave_engine::sampler::SamplingParams;
use cleave_engine::scheduler::SchedulerPolicy;
use common::{engine, greedy, prompt};

const VOCAB: usize = 258;

fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| prompt(3 + (i * 7) % 45, 1000 + i as u32, VOCAB))
        .collect()
}

/// Greedy tokens of each prompt, run all together through an engine with `config`; checks that every block is
/// back in the pool afterwards.
fn run(config: EngineConfig, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let mut engine = engine("tiny", config);
    let available = engine.block_pool().n_available();
    let done = engine
        .generate(prompts.iter().map(|p| (p.clone(), greedy(max_tokens))).collect())
        .unwrap();
    assert_eq!(engine.block_pool().n_available(), available, "blocks leaked");
    assert_eq!(engine.block_pool().n_in_use(), 0);
    done.into_iter().map(|c| c.token_ids).collect()
}

#[test]
fn sequence_alone_and_in_a_batch_of_16_gives_identical_tokens() {
    let all = prompts(16);
    let batched = run(EngineConfig::default(), &all, 24);
    for (i, p) in all.iter().enumerate() {
        let alone = run(EngineConfig::default(), std::slice::from_ref(p), 24);
        assert_eq!(alone[0], batched[i], "prompt {i} changed inside the batch");
    }
}

#[test]
fn prefill_first_and_chunked_give_identical_tokens() {
    let all = prompts(12);
    let chunked = run(
        EngineConfig {
            policy: SchedulerPolicy::Chunked { chunk_tokens: 8 },
            ..Default::default()
        },
        &all,
        20,
    );
    let prefill_first = run(
        EngineConfig {
            policy: SchedulerPolicy::PrefillFirst { batch_tokens_max: 64 },
            ..Default::default()
        },
        &all,
        20,
    );
    assert_eq!(chunked, prefill_first);
}

#[test]
fn preemption_under_a_tiny_kv_cache_keeps_tokens_and_blocks() {
    let all = prompts(10);
    let roomy = run(EngineConfig::default(), &all, 30);
    // tiny's KV is 2 layers × 2 × 32 × 4 bytes = 512 bytes per token: 8 KiB per 16-token block. 12 blocks cannot
    // hold ten growing sequences at once, so sequences are preempted and recomputed.
    let config = EngineConfig {
        kv_cache_bytes: 12 * 8192,
        ..Default::default()
    };
    let mut engine = engine("tiny", config);
    let done = engine
        .generate(all.iter().map(|p| (p.clone(), greedy(30))).collect())
        .unwrap();
    assert!(engine.n_preemptions() > 0, "the scenario should force preemption");
    let tight: Vec<Vec<u32>> = done.into_iter().map(|c| c.token_ids).collect();
    assert_eq!(tight, roomy);
    assert_eq!(engine.block_pool().n_available(), engine.block_pool().n_blocks());
}

#[test]
fn cancellation_frees_blocks_at_once_and_spares_the_others() {
    let mut engine = engine(
        "tiny",
        EngineConfig {
            policy: SchedulerPolicy::Chunked { chunk_tokens: 16 },
            ..Default::default()
        },
    );
    let available = engine.block_pool().n_available();
    let all = prompts(6);
    let expected = run(EngineConfig::default(), &all, 12);
    for (i, p) in all.iter().enumerate() {
        engine.add_request(i as u64, p.clone(), greedy(12)).unwrap();
    }
    // A long prompt cancelled while still waiting, one cancelled mid-prefill, one mid-decode.
    engine.add_request(100, prompt(300, 5, VOCAB), greedy(12)).unwrap();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); all.len()];
    let mut step = 0;
    while engine.has_unfinished() {
        if step == 0 {
            assert!(engine.cancel(100).is_some());
        }
        if step == 1 {
            assert!(engine.block_pool().n_in_use() > 0);
            let out = engine.cancel(5).expect("request 5 exists");
            assert_eq!(out.finish, Some(FinishReason::Cancelled));
        }
        if step == 6 {
            engine.cancel(2).expect("request 2 exists");
        }
        for out in engine.step().unwrap() {
            tokens[out.id as usize].extend(out.token_ids);
        }
        step += 1;
    }
    for i in [0, 1, 3, 4] {
        assert_eq!(tokens[i], expected[i], "request {i} was disturbed by a cancellation");
    }
    assert!(engine.cancel(2).is_none(), "a cancelled request is gone");
    assert_eq!(engine.block_pool().n_available(), available);
    assert_eq!(engine.block_pool().n_in_use(), 0);
}

#[test]
fn stop_strings_min_tokens_and_eos() {
    let mut engine = engine("tiny", EngineConfig::default());
    let p = prompt(9, 77, VOCAB);
    let free = engine.generate(vec![(p.clone(), greedy(40))]).unwrap().remove(0);
    // Stop at a string the unconstrained run produced: the output ends right before it.
    let text = free.text.clone();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "need some text to pick a stop string from: {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let stopped = engine
        .generate(vec![(
            p.clone(),
            RequestParams {
                stop: vec![stop.clone()],
                ..greedy(40)
            },
        )])
        .unwrap()
        .remove(0);
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.text, text[..text.find(&stop).unwrap()]);

    // Making the first free token an EOS: the request stops there unless min_tokens or ignore_eos say otherwise.
    let first = free.token_ids[0];
    let as_eos = |extra: RequestParams| RequestParams {
        stop_token_ids: vec![first],
        ..extra
    };
    let stops_at_once = engine
        .generate(vec![(
            p.clone(),
            as_eos(RequestParams {
                max_tokens: 40,
                ..Default::default()
            }),
        )])
        .unwrap()
        .remove(0);
    assert_eq!(
        (stops_at_once.token_ids.clone(), stops_at_once.finish),
        (vec![first], FinishReason::Stop)
    );
    let held = engine
        .generate(vec![(
            p.clone(),
            as_eos(RequestParams {
                max_tokens: 40,
                min_tokens: 5,
                ..Default::default()
            }),
        )])
        .unwrap()
        .remove(0);
    assert!(
        held.token_ids.len() >= 5 && !held.token_ids[..5].contains(&first),
        "min_tokens not honoured: {:?}",
        held.token_ids
    );
    assert_eq!(engine.block_pool().n_in_use(), 0);
}

#[test]
fn seeded_sampling_repeats_and_differs_across_seeds() {
    let mut engine = engine("tiny", EngineConfig::default());
    let p = prompt(12, 3, VOCAB);
    let params = |seed| RequestParams {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            seed: Some(seed),
        },
        ..greedy(32)
    };
    let a = engine
        .generate(vec![(p.clone(), params(1)), (p.clone(), params(2))])
        .unwrap();
    let b = engine.generate(vec![(p.clone(), params(1))]).unwrap();
    assert_eq!(a[0].token_ids, b[0].token_ids, "same seed, different tokens");
    assert_ne!(a[0].token_ids, a[1].token_ids, "different seeds, same tokens");
}

#[test]
fn kv_events_report_stored_and_removed_blocks() {
    use cleave_kv::KvEvent;
    // 4 blocks of 16 tokens: a 40-token prompt stores 2 full blocks; a second, different one must evict.
    let mut engine = engine(
        "tiny",
        EngineConfig {
            kv_cache_bytes: 4 * 8192,
            ..Default::default()
        },
    );
    engine.generate(vec![(prompt(40, 1, VOCAB), greedy(1))]).unwrap();
    let events = engine.drain_kv_events();
    assert_eq!(
        events.iter().filter(|e| matches!(e, KvEvent::Stored { .. })).count(),
        2,
        "{events:?}"
    );
    engine.generate(vec![(prompt(60, 2, VOCAB), greedy(1))]).unwrap();
    let events = engine.drain_kv_events();
    assert!(
        events.iter().any(|e| matches!(e, KvEvent::Removed { .. })),
        "{events:?}"
    );
}
