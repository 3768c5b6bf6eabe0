//! Tensor parallelism on simulated CPU ranks: at 2 and 4 ranks the logits agree with the naive reference and the
//! greedy tokens equal one rank's; KV exchanged between engines of different rank counts (2 → 1, 1 → 2, 2 → 4,
//! 4 → 2) gives the same tokens as the aggregated engine; a model whose heads do not divide is refused.

mod common;

use std::collections::HashMap;

use cleave_engine::backend::Backend;
use cleave_engine::backend::cpu::CpuBackend;
use cleave_engine::backend::tensor_parallel::Tp;
use cleave_engine::config::{DType, ModelConfig};
use cleave_engine::engine::{Engine, EngineConfig, RequestParams};
use cleave_engine::presets::{ResolvedModel, preset};
use cleave_engine::tokenizer::Tokenizer;
use cleave_engine::weights::DummyWeights;
use common::{ReferenceModel, decode_to_end, greedy, max_rel_err, prompt, resolve};

const VOCAB: usize = 258;
const TOLERANCE: f32 = 1e-4;

/// The tiny preset widened to 8 query and 4 KV heads, with every bias switched on (q/k/v and o_proj), so that
/// four ranks divide it and the once-only o_proj bias is exercised.
fn wide_config() -> ModelConfig {
    ModelConfig {
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 8,
        intermediate_size: 96,
        n_layers: 3,
        qkv_bias: true,
        o_bias: true,
        dtype: DType::F32,
        ..preset("tiny").unwrap()
    }
}

fn dummy(config: ModelConfig) -> ResolvedModel {
    ResolvedModel {
        weights: Box::new(DummyWeights {
            seed: 7,
            dtype: config.dtype,
        }),
        config,
        tokenizer: Tokenizer::Bytes,
        name: "wide".into(),
    }
}

/// A model by fixture or preset name, or "wide" for [`wide_config`].
fn model(name: &str) -> ResolvedModel {
    match name {
        "wide" => dummy(wide_config()),
        _ => resolve(name),
    }
}

fn tp_engine(name: &str, ranks: usize) -> Engine<Tp<CpuBackend>> {
    let backend = Tp::new(vec![CpuBackend; ranks]).unwrap();
    Engine::new(backend, model(name), EngineConfig::default()).expect("engine builds")
}

fn one_rank_engine(name: &str) -> Engine<CpuBackend> {
    Engine::new(CpuBackend, model(name), EngineConfig::default()).expect("engine builds")
}

fn prompts(n: usize, vocab: usize) -> Vec<Vec<u32>> {
    [1usize, 7, 16, 17, 40]
        .iter()
        .cycle()
        .take(n)
        .enumerate()
        .map(|(i, &len)| prompt(len, 50 + i as u32, vocab))
        .collect()
}

/// Greedy tokens of `prompts` run together, and the largest relative error of any sampled row's logits against
/// `reference` (when given).
fn run<B: Backend>(
    engine: &mut Engine<B>,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    reference: Option<&ReferenceModel>,
) -> (Vec<Vec<u32>>, f32) {
    let vocab = engine.model_config().vocab_size;
    let mut sequences: HashMap<u64, Vec<u32>> = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        engine.add_request(i as u64, p.clone(), greedy(max_tokens)).unwrap();
        sequences.insert(i as u64, p.clone());
    }
    let mut err_max = 0f32;
    while engine.has_unfinished() {
        let (outputs, logits) = engine.step_with_logits().unwrap();
        for (row, out) in outputs.iter().enumerate() {
            let tokens = sequences.get_mut(&out.id).unwrap();
            if let Some(reference) = reference {
                let got = &logits[row * vocab..(row + 1) * vocab];
                err_max = err_max.max(max_rel_err(got, &reference.last_logits(tokens)));
            }
            tokens.extend(&out.token_ids);
        }
    }
    assert_eq!(engine.block_pool().n_in_use(), 0, "blocks leaked");
    let generated = (0..prompts.len())
        .map(|i| sequences[&(i as u64)][prompts[i].len()..].to_vec())
        .collect();
    (generated, err_max)
}

/// At `ranks` ranks: logits within tolerance of the naive reference, and greedy tokens equal to one rank's.
fn check_against_one_rank(name: &str, ranks: usize) {
    let resolved = model(name);
    let reference = ReferenceModel::from_source(resolved.config.clone(), resolved.weights.as_ref());
    let vocab = resolved.config.vocab_size;
    let all = prompts(5, vocab);
    let (one, _) = run(&mut one_rank_engine(name), &all, 8, None);
    let (split, err) = run(&mut tp_engine(name, ranks), &all, 8, Some(&reference));
    assert!(
        err <= TOLERANCE,
        "{name} at {ranks} ranks: logits differ from the reference by {err}"
    );
    assert_eq!(
        split, one,
        "{name}: greedy tokens at {ranks} ranks differ from one rank"
    );
}

#[test]
fn two_ranks_match_one_rank_on_llama_qwen2_and_qwen3_fixtures() {
    // llama: plain; qwen2: q/k/v bias and tied embeddings (f16 checkpoint); qwen3: per-head q/k RMSNorm.
    for name in ["llama", "qwen2", "qwen3"] {
        check_against_one_rank(name, 2);
    }
}

#[test]
fn two_and_four_ranks_match_one_rank_with_every_bias() {
    check_against_one_rank("wide", 2);
    check_against_one_rank("wide", 4);
}

#[test]
fn tiny_preset_at_two_ranks_matches_one_rank_in_a_batch_with_chunked_prefill() {
    let all = prompts(10, VOCAB);
    let config = EngineConfig {
        policy: cleave_engine::scheduler::SchedulerPolicy::Chunked { chunk_tokens: 8 },
        ..Default::default()
    };
    let one = Engine::new(CpuBackend, resolve("tiny"), config.clone())
        .unwrap()
        .generate(all.iter().map(|p| (p.clone(), greedy(12))).collect())
        .unwrap();
    let two = Engine::new(Tp::new(vec![CpuBackend; 2]).unwrap(), resolve("tiny"), config)
        .unwrap()
        .generate(all.iter().map(|p| (p.clone(), greedy(12))).collect())
        .unwrap();
    let tokens = |c: Vec<cleave_engine::engine::Completion>| c.into_iter().map(|c| c.token_ids).collect::<Vec<_>>();
    assert_eq!(tokens(two), tokens(one));
}

#[test]
fn heads_that_do_not_divide_among_the_ranks_are_refused() {
    // The mistral fixture has one KV head; the tiny preset has 2 KV heads, not divisible by 4.
    for (name, ranks, what) in [
        ("mistral", 2, "KV heads"),
        ("tiny", 4, "KV heads"),
        ("tiny", 3, "attention heads"),
    ] {
        let backend = Tp::new(vec![CpuBackend; ranks]).unwrap();
        let e = Engine::new(backend, model(name), EngineConfig::default())
            .err()
            .unwrap_or_else(|| panic!("{name} at {ranks} ranks should be refused"))
            .to_string();
        assert!(
            e.contains(what) && e.contains(&format!("{ranks} ranks")),
            "{name} at {ranks} ranks: {e}"
        );
    }
}

#[test]
fn kv_cache_memory_is_the_total_over_ranks() {
    let one = one_rank_engine("wide");
    let four = tp_engine("wide", 4);
    // The same bytes hold the same blocks: each rank stores a quarter of every block.
    assert_eq!(one.kv_layout().n_blocks, four.kv_layout().n_blocks);
    assert_eq!(one.kv_block_bytes(), four.kv_block_bytes());
}

/// Runs one request with its prefill on `prefill` and its decode on `decode` (KV moved as exported blocks).
fn disaggregated<P: Backend, D: Backend>(
    prefill: &mut Engine<P>,
    decode: &mut Engine<D>,
    id: u64,
    prompt_ids: Vec<u32>,
    params: RequestParams,
) -> Vec<u32> {
    let remote = decode
        .add_remote_prefill_request(id, prompt_ids, params.clone())
        .unwrap();
    let first = prefill
        .prefill_remote(&remote, &params, &mut |chunk| decode.import_kv_block(id, &chunk))
        .unwrap();
    let first_out = decode.finish_remote_prefill(id, first).unwrap();
    let tokens = decode_to_end(decode, first_out);
    assert_eq!(decode.block_pool().n_in_use(), 0);
    assert_eq!(prefill.block_pool().n_in_use(), 0);
    tokens
}

/// Prefill at `prefill_ranks` feeding decode at `decode_ranks` (0 = the plain one-device backend) gives the
/// aggregated one-rank engine's tokens for prompts around the block size.
fn check_resharding(prefill_ranks: usize, decode_ranks: usize) {
    fn run_pair<P: Backend, D: Backend>(mut prefill: Engine<P>, mut decode: Engine<D>) -> Vec<Vec<u32>> {
        prompts(5, VOCAB)
            .into_iter()
            .enumerate()
            .map(|(i, p)| disaggregated(&mut prefill, &mut decode, i as u64, p, greedy(10)))
            .collect()
    }
    let expected: Vec<Vec<u32>> = prompts(5, VOCAB)
        .into_iter()
        .map(|p| {
            one_rank_engine("wide")
                .generate(vec![(p, greedy(10))])
                .unwrap()
                .remove(0)
                .token_ids
        })
        .collect();
    let got = match (prefill_ranks, decode_ranks) {
        (0, d) => run_pair(one_rank_engine("wide"), tp_engine("wide", d)),
        (p, 0) => run_pair(tp_engine("wide", p), one_rank_engine("wide")),
        (p, d) => run_pair(tp_engine("wide", p), tp_engine("wide", d)),
    };
    assert_eq!(
        got, expected,
        "prefill at {prefill_ranks} ranks, decode at {decode_ranks}"
    );
}

#[test]
fn prefill_at_two_ranks_feeds_decode_at_one() {
    check_resharding(2, 0);
}

#[test]
fn prefill_at_one_rank_feeds_decode_at_two() {
    check_resharding(0, 2);
}

#[test]
fn prefill_at_two_ranks_feeds_decode_at_four_and_back() {
    check_resharding(2, 4);
    check_resharding(4, 2);
}

/// Runs prompts prefilled by `prefill` straight into `decode`'s pool (the in-process transport here; CUDA IPC works
/// the same per rank) and checks the tokens are the one-rank engine's and no block leaks.
fn check_peer_copies<P: Backend, D: Backend>(mut prefill: Engine<P>, mut decode: Engine<D>, what: &str) {
    let export = decode
        .export_kv_cache_in_process()
        .expect("CPU ranks export in process");
    let peer = prefill.open_peer_kv_cache(&export).unwrap();
    for (i, p) in prompts(5, VOCAB).into_iter().enumerate() {
        let id = i as u64;
        let remote = decode.add_remote_prefill_request(id, p.clone(), greedy(10)).unwrap();
        let dst = decode.parked_blocks(id).unwrap();
        let first = prefill
            .prefill_remote_to_peer(&remote, &greedy(10), &peer, &dst, &mut || Ok(()))
            .unwrap();
        let first_out = decode.finish_remote_prefill(id, first).unwrap();
        let expected = one_rank_engine("wide").generate(vec![(p, greedy(10))]).unwrap();
        assert_eq!(
            decode_to_end(&mut decode, first_out),
            expected[0].token_ids,
            "{what}, prompt {i}"
        );
    }
    prefill.close_peer_kv_cache(peer);
    assert_eq!(decode.block_pool().n_in_use(), 0);
    assert_eq!(prefill.block_pool().n_in_use(), 0);
}

/// Peer copies between tensor-parallel engines: between equal splits each prefill rank writes its heads into the
/// decode rank that holds the same heads, whole blocks; between different splits each prefill rank writes the heads
/// it shares with each decode rank, row by row (TP 2 → 4 and 4 → 2, and TP 2 → a one-device engine). A one-device
/// prefill engine does not map a split pool and says why (KV then moves over TCP, resharded).
#[test]
fn tensor_parallel_engines_copy_kv_straight_into_a_peer_of_any_split() {
    for (p, d) in [(2, 2), (4, 4), (2, 4), (4, 2)] {
        check_peer_copies(tp_engine("wide", p), tp_engine("wide", d), &format!("TP {p} → TP {d}"));
    }
    check_peer_copies(tp_engine("wide", 2), one_rank_engine("wide"), "TP 2 → one device");

    let two_ranks = tp_engine("wide", 2).export_kv_cache_in_process().unwrap();
    let e = one_rank_engine("wide")
        .open_peer_kv_cache(&two_ranks)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 ranks"), "{e}");
}
