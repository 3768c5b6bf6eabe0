//! Tiny Hugging Face checkpoints (tests/fixtures/hf, made by tools/gen_hf_fixtures.py) against the outputs
//! transformers produced for them: same prompt token ids, last-prompt logits within 1e-4, and exactly the same
//! greedy tokens.

mod common;

use cleave_engine::engine::EngineConfig;
use common::{engine, fixtures_dir, greedy, max_rel_err};
use serde_json::Value;

fn check_fixture(name: &str) {
    let path = fixtures_dir().join(name).join("reference.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("reference.json exists")).unwrap();
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<u32>>()
    };
    let mut engine = engine(name, EngineConfig::default());
    let vocab = engine.model_config().vocab_size;
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let case_name = case["name"].as_str().unwrap();
        let prompt_ids = ids(&case["prompt_ids"]);
        let encoded = engine.tokenizer().encode(case["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(
            encoded, prompt_ids,
            "{name}/{case_name}: tokenization differs from transformers"
        );

        let expected = ids(&case["greedy_ids"]);
        engine.add_request(0, prompt_ids, greedy(expected.len())).unwrap();
        let mut generated: Vec<u32> = Vec::new();
        let mut first_logits = None;
        while engine.has_unfinished() {
            let (outputs, logits) = engine.step_with_logits().unwrap();
            if first_logits.is_none() && !outputs.is_empty() {
                first_logits = Some(logits[..vocab].to_vec());
            }
            outputs.iter().for_each(|o| generated.extend(&o.token_ids));
        }
        let hf_logits: Vec<f32> = case["last_prompt_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let err = max_rel_err(&first_logits.unwrap(), &hf_logits);
        assert!(
            err < 1e-4,
            "{name}/{case_name}: last prompt logits differ from transformers by {err}"
        );
        assert_eq!(
            generated, expected,
            "{name}/{case_name}: greedy tokens differ from transformers"
        );
    }
    assert_eq!(engine.block_pool().n_in_use(), 0);
}

#[test]
fn llama_sharded_f32_matches_transformers() {
    check_fixture("llama");
}

#[test]
fn llama3_rope_scaling_bf16_tied_matches_transformers() {
    check_fixture("llama3_rope");
}

#[test]
fn qwen2_qkv_bias_f16_matches_transformers() {
    check_fixture("qwen2");
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check_fixture("qwen3");
}

#[test]
fn mistral_matches_transformers() {
    check_fixture("mistral");
}
