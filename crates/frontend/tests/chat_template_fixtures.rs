//! Renders the conversations in `tests/fixtures/chat_templates/*.json` and requires the exact strings Hugging Face
//! transformers rendered for them (`tools/gen_chat_template_fixtures.py`), or the exact `raise_exception` message.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cleave_frontend::chat_template::{ChatInput, ChatTemplate, ChatTemplateError, DEFAULT_TEMPLATE};
use serde_json::Value;

/// The instant the generator pins `strftime_now` to: 2024-09-05T13:07:09Z.
const NOW_UNIX_SECONDS: u64 = 1_725_541_629;

fn pinned_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_UNIX_SECONDS)
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_templates")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn optional_string(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

/// Loads fixture `name`, compiles its template and checks every case; returns the number of cases checked.
fn check_fixture(name: &str) -> usize {
    let dir = fixtures_dir();
    let fixture = read_json(&dir.join(format!("{name}.json")));
    assert_eq!(
        fixture["generated_with"]["now_utc"], "2024-09-05T13:07:09",
        "the generator's pinned time changed"
    );
    let source = std::fs::read_to_string(dir.join(fixture["template_file"].as_str().unwrap())).unwrap();
    let template = ChatTemplate::new(
        &source,
        optional_string(&fixture["bos_token"]),
        optional_string(&fixture["eos_token"]),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
    .with_clock(pinned_now);
    assert_eq!(
        template.takes_content_parts(),
        fixture["content_parts"].as_bool().unwrap(),
        "{name}"
    );

    let cases = fixture["cases"].as_array().unwrap();
    assert!(!cases.is_empty(), "{name} has no cases");
    let mut failures = Vec::new();
    for case in cases {
        let case_name = case["name"].as_str().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let tools = case.get("tools").and_then(Value::as_array);
        let input = ChatInput {
            messages,
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            tools: tools.map(Vec::as_slice),
            extra: case["kwargs"].as_object(),
        };
        let got = template.render_with(&input);
        match (case.get("expected"), case.get("expected_error"), got) {
            (Some(expected), None, Ok(got)) if got == expected.as_str().unwrap() => {}
            (Some(expected), None, got) => failures.push(format!(
                "{name}/{case_name}:\n  expected {expected}\n  got      {got:?}"
            )),
            (None, Some(expected), Err(ChatTemplateError::Raised(message)))
                if message == expected.as_str().unwrap() => {}
            (None, Some(expected), got) => failures.push(format!(
                "{name}/{case_name}: expected raise_exception({expected}), got {got:?}"
            )),
            _ => panic!("{name}/{case_name}: a case needs exactly one of expected / expected_error"),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

#[test]
fn llama3_instruct_matches_transformers() {
    assert_eq!(check_fixture("llama3_8b_instruct"), 7);
}

#[test]
fn llama3_1_instruct_with_tools_and_date_string_matches_transformers() {
    assert_eq!(check_fixture("llama3_1_8b_instruct"), 12);
}

#[test]
fn llama3_2_instruct_with_strftime_now_matches_transformers() {
    assert_eq!(check_fixture("llama3_2_3b_instruct"), 9);
}

#[test]
fn qwen2_instruct_matches_transformers() {
    assert_eq!(check_fixture("qwen2_7b_instruct"), 7);
}

#[test]
fn qwen2_5_instruct_with_tools_matches_transformers() {
    assert_eq!(check_fixture("qwen2_5_3b_instruct"), 9);
}

#[test]
fn mistral_instruct_v0_3_with_tools_and_role_errors_matches_transformers() {
    assert_eq!(check_fixture("mistral_7b_instruct_v0_3"), 11);
}

#[test]
fn gemma3_takes_content_parts_as_transformers_does() {
    assert_eq!(check_fixture("gemma3_1b_it"), 8);
}

#[test]
fn python_semantics_of_the_synthetic_template_match_transformers() {
    assert_eq!(check_fixture("synthetic"), 3);
}

#[test]
fn default_preset_template_is_the_fixture_and_matches_transformers() {
    let source = std::fs::read_to_string(fixtures_dir().join("templates/cleave_default.jinja")).unwrap();
    assert_eq!(DEFAULT_TEMPLATE, source);
    let template = ChatTemplate::default_for_presets();
    assert_eq!(template.source(), source);
    assert_eq!(template.eos_token(), Some("<|im_end|>"));
    assert_eq!(template.bos_token(), None);
    assert_eq!(check_fixture("cleave_default"), 7);
}

#[test]
fn mistral_non_alternating_roles_is_a_request_error_with_the_templates_message() {
    let source = std::fs::read_to_string(fixtures_dir().join("templates/mistral_7b_instruct_v0_3.jinja")).unwrap();
    let template = ChatTemplate::new(&source, Some("<s>".into()), Some("</s>".into())).unwrap();
    let messages = [
        serde_json::json!({"role": "user", "content": "a"}),
        serde_json::json!({"role": "user", "content": "b"}),
    ];
    let err = template.render(&messages, true).unwrap_err();
    assert!(err.is_request_error());
    assert!(
        matches!(&err, ChatTemplateError::Raised(m) if m.contains("conversation roles must alternate user/assistant")),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("rejected the conversation: After the optional system message"),
        "{err}"
    );
}

#[test]
fn broken_template_fails_at_load_naming_the_line() {
    let dir = fixtures_dir();
    let broken = read_json(&dir.join("broken.json"));
    let source = std::fs::read_to_string(dir.join("templates/broken.jinja")).unwrap();
    let err = ChatTemplate::new(&source, None, None).unwrap_err();
    let ChatTemplateError::Syntax { line, detail, .. } = &err else {
        panic!("expected a syntax error, got {err:?}")
    };
    // Jinja2 reports the same line; the wording differs between the two engines.
    assert_eq!(*line as u64, broken["jinja2_error_line"].as_u64().unwrap(), "{err}");
    assert!(!detail.is_empty());
    assert!(!err.is_request_error());
    assert!(err.to_string().contains("syntax error at line 2"), "{err}");
}

#[test]
fn one_template_renders_from_many_threads() {
    let source = std::fs::read_to_string(fixtures_dir().join("templates/llama3_8b_instruct.jinja")).unwrap();
    let template = ChatTemplate::new(&source, Some("<|begin_of_text|>".into()), Some("<|eot_id|>".into())).unwrap();
    let expected = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi 0<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\n";
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let template = &template;
                scope.spawn(move || {
                    for i in 0..200 {
                        let messages = [serde_json::json!({"role": "user", "content": format!("Hi {}", t * 1000 + i)})];
                        let got = template.render(&messages, true).unwrap();
                        let want = expected.replace("Hi 0", &format!("Hi {}", t * 1000 + i));
                        assert_eq!(got, want);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
    });
}
