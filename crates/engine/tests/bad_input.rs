//! Broken model directories and bad requests get an error naming the problem and the file or field — never a panic.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use cleave_engine::backend::cpu::CpuBackend;
use cleave_engine::engine::{Engine, EngineConfig, RequestParams};
use cleave_engine::presets::resolve_model;
use common::{engine, fixtures_dir, greedy};

/// A writable copy of a fixture directory.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    fs::create_dir(&dir).unwrap();
    for entry in fs::read_dir(fixtures_dir().join(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load_error(dir: &Path) -> String {
    let result = resolve_model(dir.to_str().unwrap()).and_then(|m| Engine::new(CpuBackend, m, EngineConfig::default()));
    match result {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    fs::write(path, serde_json::to_string(&config).unwrap()).unwrap();
}

fn assert_mentions(message: &str, needles: &[&str]) {
    for n in needles {
        assert!(message.contains(n), "error {message:?} does not mention {n:?}");
    }
}

#[test]
fn missing_shard_names_the_file() {
    let (_tmp, dir) = copy_fixture("llama");
    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert_mentions(&load_error(&dir), &["model-00002-of-00002.safetensors"]);
}

#[test]
fn truncated_safetensors_is_reported() {
    let (_tmp, dir) = copy_fixture("qwen2");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_error(&dir), &["model.safetensors", "truncated"]);
    // Cut inside the header too.
    fs::write(&path, &bytes[..20]).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn wrong_shape_names_the_tensor() {
    let (_tmp, dir) = copy_fixture("mistral");
    edit_config(&dir, |c| c["intermediate_size"] = 128.into());
    assert_mentions(
        &load_error(&dir),
        &["model.layers.0.mlp.gate_proj.weight", "shape", "model.safetensors"],
    );
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let (_tmp, dir) = copy_fixture("qwen3");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    // Rewrite one tensor's dtype in the JSON header: "F32" -> "I32" keeps every offset valid.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let at = header.find("\"model.norm.weight\"").unwrap();
    let dtype_at = at + header[at..].find("\"F32\"").unwrap();
    let mut patched = bytes.clone();
    patched[8 + dtype_at + 1] = b'I';
    fs::write(&path, patched).unwrap();
    assert_mentions(&load_error(&dir), &["model.norm.weight", "I32"]);
}

#[test]
fn unknown_architecture_is_named() {
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]));
    assert_mentions(&load_error(&dir), &["GPT2LMHeadModel", "unsupported architecture"]);
}

#[test]
fn inconsistent_config_names_the_fields() {
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |c| c["num_key_value_heads"] = 3.into());
    assert_mentions(
        &load_error(&dir),
        &["config.json", "num_attention_heads 4", "num_key_value_heads 3"],
    );
    edit_config(&dir, |c| {
        c["num_key_value_heads"] = 2.into();
        c["hidden_size"] = serde_json::Value::String("64".into());
    });
    assert_mentions(&load_error(&dir), &["config.json", "hidden_size"]);
    edit_config(&dir, |c| {
        c["hidden_size"] = 64.into();
        c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0});
    });
    assert_mentions(&load_error(&dir), &["rope_parameters.rope_type", "yarn"]);
    fs::write(dir.join("config.json"), "{not json").unwrap();
    assert_mentions(&load_error(&dir), &["config.json", "not valid JSON"]);
}

#[test]
fn missing_tensor_and_tokenizer_are_named() {
    let (_tmp, dir) = copy_fixture("llama3_rope");
    // The fixture ties its embeddings; untying it asks for an lm_head the files do not have.
    edit_config(&dir, |c| c["tie_word_embeddings"] = false.into());
    assert_mentions(&load_error(&dir), &["lm_head.weight", "missing"]);
    fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_mentions(&load_error(&dir), &["tokenizer.json"]);
}

#[test]
fn bad_requests_are_rejected_with_the_numbers() {
    let mut engine = engine("tiny", EngineConfig::default());
    let available = engine.block_pool().n_available();
    let err = |e: &mut Engine<CpuBackend>, ids: Vec<u32>, params: RequestParams| {
        e.add_request(1, ids, params).unwrap_err().to_string()
    };
    assert_mentions(&err(&mut engine, vec![], greedy(4)), &["prompt is empty"]);
    assert_mentions(
        &err(&mut engine, vec![1, 2, 258], greedy(4)),
        &["258", "vocabulary of 258"],
    );
    assert_mentions(
        &err(&mut engine, vec![1; 5000], greedy(4)),
        &["5000 tokens", "context of 4096"],
    );
    assert_mentions(&err(&mut engine, vec![1; 10], greedy(0)), &["max_tokens"]);
    assert_mentions(
        &err(
            &mut engine,
            vec![1; 10],
            RequestParams {
                min_tokens: 9,
                ..greedy(4)
            },
        ),
        &["min_tokens 9", "max_tokens 4"],
    );
    let mut hot = greedy(4);
    hot.sampling.temperature = f32::NAN;
    assert_mentions(&err(&mut engine, vec![1; 10], hot), &["temperature"]);
    let mut top_p = greedy(4);
    top_p.sampling.top_p = 0.0;
    assert_mentions(&err(&mut engine, vec![1; 10], top_p), &["top_p"]);
    // Nothing was queued or allocated by the rejected requests, and the engine still serves.
    assert!(!engine.has_unfinished());
    assert_eq!(engine.block_pool().n_available(), available);
    assert_eq!(
        engine.generate(vec![(vec![1, 2, 3], greedy(2))]).unwrap()[0]
            .token_ids
            .len(),
        2
    );
}

#[test]
fn request_larger_than_the_kv_cache_is_rejected_not_queued_forever() {
    let mut engine = engine(
        "tiny",
        EngineConfig {
            kv_cache_bytes: 4 * 8192,
            ..Default::default()
        },
    );
    let e = engine.add_request(1, vec![1; 100], greedy(1)).unwrap_err().to_string();
    assert_mentions(&e, &["7 KV blocks", "the cache has 4"]);
}
