//! Disaggregated prefill between two engines in one process (the transport-free core of prefill/decode workers):
//! tokens are bit-identical to the aggregated engine's, with and without cached prefixes; the decode side refuses
//! malformed KV; a failed remote prefill falls back to local prefill; no block leaks on either side.

mod common;

use cleave_engine::backend::cpu::CpuBackend;
use cleave_engine::engine::{Engine, EngineConfig, KvBlockChunk, RequestParams};
use cleave_engine::sampler::SamplingParams;
use common::{decode_to_end, engine, greedy, prompt};

const VOCAB: usize = 258;

/// Runs one request with its prefill on `prefill` and its decode on `decode`; returns the tokens and how many KV
/// chunks crossed.
fn disaggregated(
    decode: &mut Engine<CpuBackend>,
    prefill: &mut Engine<CpuBackend>,
    id: u64,
    prompt_ids: Vec<u32>,
    params: RequestParams,
) -> (Vec<u32>, usize, usize) {
    let remote = decode
        .add_remote_prefill_request(id, prompt_ids, params.clone())
        .unwrap();
    let mut n_chunks = 0;
    let first = prefill
        .prefill_remote(&remote, &params, &mut |chunk| {
            n_chunks += 1;
            decode.import_kv_block(id, &chunk)
        })
        .unwrap();
    let mut tokens = Vec::new();
    let out = decode.finish_remote_prefill(id, first).unwrap();
    tokens.extend(out.token_ids);
    let mut finished = out.finish.is_some();
    while !finished {
        for out in decode.step().unwrap() {
            assert_eq!(out.id, id);
            tokens.extend(out.token_ids);
            finished |= out.finish.is_some();
        }
    }
    (tokens, n_chunks, remote.n_cached_blocks)
}

fn aggregated(prompt_ids: Vec<u32>, params: RequestParams) -> Vec<u32> {
    engine("tiny", EngineConfig::default())
        .generate(vec![(prompt_ids, params)])
        .unwrap()
        .remove(0)
        .token_ids
}

#[test]
fn disaggregated_tokens_equal_aggregated_across_block_boundaries() {
    let (mut decode, mut prefill) = (
        engine("tiny", EngineConfig::default()),
        engine("tiny", EngineConfig::default()),
    );
    let n_layers = decode.model_config().n_layers;
    for (i, len) in [1usize, 15, 16, 17, 40, 70].into_iter().enumerate() {
        let p = prompt(len, 300 + i as u32, VOCAB);
        let expected = aggregated(p.clone(), greedy(12));
        let (tokens, n_chunks, n_cached) = disaggregated(&mut decode, &mut prefill, i as u64, p, greedy(12));
        assert_eq!(tokens, expected, "prompt of {len} tokens");
        assert_eq!(n_cached, 0);
        assert_eq!(
            n_chunks,
            n_layers * len.div_ceil(16),
            "every layer of every block crosses once"
        );
    }
    assert_eq!(decode.block_pool().n_in_use(), 0);
    assert_eq!(prefill.block_pool().n_in_use(), 0);
}

#[test]
fn blocks_the_decode_side_has_cached_are_not_sent() {
    let (mut decode, mut prefill) = (
        engine("tiny", EngineConfig::default()),
        engine("tiny", EngineConfig::default()),
    );
    let n_layers = decode.model_config().n_layers;
    let system = prompt(48, 1, VOCAB);
    let first: Vec<u32> = system.iter().copied().chain(prompt(10, 2, VOCAB)).collect();
    let second: Vec<u32> = system.iter().copied().chain(prompt(20, 3, VOCAB)).collect();
    disaggregated(&mut decode, &mut prefill, 1, first, greedy(4));
    let expected = aggregated(second.clone(), greedy(10));
    let (tokens, n_chunks, n_cached) = disaggregated(&mut decode, &mut prefill, 2, second, greedy(10));
    assert_eq!(
        n_cached, 3,
        "the 48-token shared prefix is 3 cached blocks on the decode side"
    );
    assert_eq!(n_chunks, n_layers * (68usize.div_ceil(16) - 3));
    assert_eq!(tokens, expected);
}

#[test]
fn seeded_sampling_continues_identically_across_the_split() {
    let params = RequestParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 40,
            seed: Some(11),
        },
        ..greedy(16)
    };
    let p = prompt(23, 9, VOCAB);
    let expected = aggregated(p.clone(), params.clone());
    let (mut decode, mut prefill) = (
        engine("tiny", EngineConfig::default()),
        engine("tiny", EngineConfig::default()),
    );
    let (tokens, _, _) = disaggregated(&mut decode, &mut prefill, 5, p, params);
    assert_eq!(tokens, expected);
}

#[test]
fn failed_remote_prefill_falls_back_to_local_prefill() {
    let (mut decode, mut prefill) = (
        engine("tiny", EngineConfig::default()),
        engine("tiny", EngineConfig::default()),
    );
    let p = prompt(37, 4, VOCAB);
    let expected = aggregated(p.clone(), greedy(8));
    let remote = decode.add_remote_prefill_request(7, p, greedy(8)).unwrap();
    // The prefill side dies after its first layer.
    let mut sent = 0;
    let err = prefill.prefill_remote(&remote, &greedy(8), &mut |chunk| {
        if chunk.layer_idx > 0 {
            return Err(cleave_engine::Error::Backend {
                backend: "test",
                message: "connection lost".into(),
            });
        }
        sent += 1;
        decode.import_kv_block(7, &chunk)
    });
    assert!(err.is_err());
    assert!(sent > 0);
    decode.fall_back_to_local_prefill(7).unwrap();
    let mut tokens = Vec::new();
    while decode.has_unfinished() {
        decode
            .step()
            .unwrap()
            .into_iter()
            .for_each(|o| tokens.extend(o.token_ids));
    }
    assert_eq!(tokens, expected);
    assert_eq!(decode.block_pool().n_in_use(), 0);
    assert_eq!(
        prefill.block_pool().n_in_use(),
        0,
        "the failed prefill released its blocks"
    );
}

#[test]
fn malformed_kv_is_refused_without_touching_blocks() {
    let mut decode = engine("tiny", EngineConfig::default());
    let available = decode.block_pool().n_available();
    let block_bytes = decode.kv_block_bytes();
    let good = vec![0u8; block_bytes];
    let remote = decode
        .add_remote_prefill_request(3, prompt(20, 5, VOCAB), greedy(4))
        .unwrap();
    assert_eq!(remote.n_blocks, 2);
    let cases: Vec<(u64, usize, usize, Vec<u8>, &str)> = vec![
        (99, 0, 0, good.clone(), "not waiting for remote KV"),
        (3, 0, 2, good.clone(), "outside the blocks"),
        (3, 9, 0, good.clone(), "layer 9 does not exist"),
        (3, 0, 0, good[..block_bytes - 4].to_vec(), "bytes"),
    ];
    for (id, layer_idx, block_index, bytes, expected) in cases {
        let e = decode
            .import_kv_block(
                id,
                &KvBlockChunk {
                    layer_idx,
                    block_index,
                    bytes: &bytes,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains(expected), "{e:?} should mention {expected:?}");
    }
    assert!(
        decode.finish_remote_prefill(3, 100_000).is_err(),
        "a first token outside the vocabulary is refused"
    );
    decode.cancel(3).expect("the parked request can be cancelled");
    assert_eq!(decode.block_pool().n_available(), available);
    assert!(
        decode.finish_remote_prefill(3, 1).is_err(),
        "a cancelled request cannot be finished"
    );
}

/// The in-process transport at the engine level: the prefill engine writes each layer straight into the decode
/// engine's blocks by address (no chunks), and the tokens are the aggregated engine's; no block leaks.
#[test]
fn in_process_peer_copies_give_the_aggregated_tokens() {
    let (mut decode, mut prefill) = (
        engine("tiny", EngineConfig::default()),
        engine("tiny", EngineConfig::default()),
    );
    let export = decode
        .export_kv_cache_in_process()
        .expect("the CPU backend exports in process");
    let peer = prefill.open_peer_kv_cache(&export).unwrap();
    for (i, len) in [16usize, 17, 40, 70].into_iter().enumerate() {
        let (id, p) = (i as u64, prompt(len, 700 + i as u32, VOCAB));
        let remote = decode.add_remote_prefill_request(id, p.clone(), greedy(12)).unwrap();
        let dst = decode.parked_blocks(id).unwrap();
        let first = prefill
            .prefill_remote_to_peer(&remote, &greedy(12), &peer, &dst, &mut || Ok(()))
            .unwrap();
        let first_out = decode.finish_remote_prefill(id, first).unwrap();
        let tokens = decode_to_end(&mut decode, first_out);
        assert_eq!(tokens, aggregated(p, greedy(12)), "prompt of {len} tokens");
    }
    prefill.close_peer_kv_cache(peer);
    assert_eq!(decode.block_pool().n_in_use(), 0);
    assert_eq!(prefill.block_pool().n_in_use(), 0);
}
