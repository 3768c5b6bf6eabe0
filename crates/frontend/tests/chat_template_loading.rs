//! Loading chat templates from model directories (`tokenizer_config.json`, `chat_template.jinja`,
//! `special_tokens_map.json`) and refusing bad input with errors that name the problem.

use std::path::{Path, PathBuf};

use cleave_frontend::chat_template::{ChatInput, ChatTemplate, ChatTemplateError};
use serde_json::json;

/// A scratch model directory, removed when dropped.
struct ModelDir(PathBuf);

impl ModelDir {
    fn new(name: &str) -> ModelDir {
        let dir = std::env::temp_dir().join(format!("cleave-chat-template-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ModelDir(dir)
    }

    fn write(&self, file: &str, text: &str) -> &ModelDir {
        std::fs::write(self.0.join(file), text).unwrap();
        self
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ModelDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TEMPLATE: &str =
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}{{ eos_token }}";

fn user(text: &str) -> serde_json::Value {
    json!({"role": "user", "content": text})
}

#[test]
fn string_template_with_added_token_objects_for_bos_and_eos() {
    let dir = ModelDir::new("string");
    dir.write(
        "tokenizer_config.json",
        &json!({
            "chat_template": TEMPLATE,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        })
        .to_string(),
    );
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.bos_token(), Some("<s>"));
    assert_eq!(template.eos_token(), Some("</s>"));
    assert_eq!(template.render(&[user("hi")], false).unwrap(), "<s>[user] hi</s>");
}

#[test]
fn template_list_uses_default_and_tool_use_when_tools_are_given() {
    let dir = ModelDir::new("list");
    dir.write(
        "tokenizer_config.json",
        &json!({"chat_template": [
            {"name": "tool_use", "template": "tools: {{ tools | length }}"},
            {"name": "default", "template": "default: {{ messages | length }}"},
        ]})
        .to_string(),
    );
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.source(), "default: {{ messages | length }}");
    assert_eq!(template.render(&[user("a"), user("b")], false).unwrap(), "default: 2");
    let tools = [json!({"type": "function", "function": {"name": "f"}})];
    let input = ChatInput {
        messages: &[user("a")],
        tools: Some(&tools),
        ..ChatInput::default()
    };
    assert_eq!(template.render_with(&input).unwrap(), "tools: 1");
}

#[test]
fn template_list_without_default_names_the_templates_it_has() {
    let dir = ModelDir::new("no-default");
    dir.write(
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#,
    );
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Config { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("tokenizer_config.json") && message.contains("\"rag\"") && message.contains("default"));
}

#[test]
fn chat_template_jinja_takes_priority_and_tokens_come_from_the_config() {
    let dir = ModelDir::new("jinja-file");
    dir.write(
        "tokenizer_config.json",
        r#"{"chat_template": "from config", "bos_token": "<B>", "eos_token": null}"#,
    )
    .write(
        "chat_template.jinja",
        "{{ bos_token }}from file {{ messages[0].content }}\n",
    );
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.eos_token(), None);
    // Like Jinja2 (keep_trailing_newline=False), the file's single trailing newline is not rendered.
    assert_eq!(template.render(&[user("x")], true).unwrap(), "<B>from file x");
}

#[test]
fn jinja_file_alone_takes_tokens_from_special_tokens_map() {
    let dir = ModelDir::new("special-map");
    dir.write("chat_template.jinja", TEMPLATE).write(
        "special_tokens_map.json",
        r#"{"bos_token": {"content": "<|b|>"}, "eos_token": "<|e|>"}"#,
    );
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.render(&[user("x")], false).unwrap(), "<|b|>[user] x<|e|>");
}

#[test]
fn models_without_a_template_give_none() {
    let empty = ModelDir::new("empty");
    assert!(ChatTemplate::from_model_dir(empty.path()).unwrap().is_none());
    let no_template = ModelDir::new("no-template");
    no_template.write(
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "chat_template": null}"#,
    );
    assert!(ChatTemplate::from_model_dir(no_template.path()).unwrap().is_none());
}

#[test]
fn broken_files_are_named_in_the_error() {
    let dir = ModelDir::new("bad-json");
    dir.write("tokenizer_config.json", "{\"chat_template\": ");
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Json { .. }), "{err:?}");
    assert!(
        err.to_string().contains("tokenizer_config.json is not valid JSON"),
        "{err}"
    );

    let dir = ModelDir::new("bad-type");
    dir.write("tokenizer_config.json", r#"{"chat_template": 3}"#);
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("chat_template must be a string or a list"),
        "{err}"
    );

    let dir = ModelDir::new("bad-token");
    dir.write("tokenizer_config.json", r#"{"chat_template": "x", "eos_token": 7}"#);
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("eos_token must be a string"), "{err}");
}

#[test]
fn syntax_error_in_the_jinja_file_names_file_and_line() {
    let dir = ModelDir::new("syntax");
    dir.write(
        "chat_template.jinja",
        "line one\n{% for m in messages %}\n{{ m.content }}\n",
    );
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    let ChatTemplateError::Syntax { origin, line, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(origin.ends_with("chat_template.jinja"), "{origin}");
    assert!(*line >= 2, "{err}");
    assert!(!err.is_request_error());
}

#[test]
fn bad_requests_are_request_errors() {
    let template = ChatTemplate::default_for_presets();
    let err = template.render(&[], true).unwrap_err();
    assert!(matches!(err, ChatTemplateError::EmptyConversation) && err.is_request_error());

    let err = template.render(&[json!("just a string")], true).unwrap_err();
    assert!(
        matches!(err, ChatTemplateError::MessageNotObject { index: 0 }),
        "{err:?}"
    );

    let image = json!({"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
    ]});
    let err = template.render(&[user("a"), image], true).unwrap_err();
    assert!(
        matches!(&err, ChatTemplateError::UnsupportedContentPart { index: 1, part_index: 1, detail } if detail.contains("image_url")),
        "{err:?}"
    );

    let extra = json!({"messages": []});
    let input = ChatInput {
        messages: &[user("a")],
        extra: extra.as_object(),
        ..ChatInput::default()
    };
    let err = template.render_with(&input).unwrap_err();
    assert!(
        matches!(&err, ChatTemplateError::ReservedVariable(name) if name == "messages"),
        "{err:?}"
    );

    // The default template concatenates content as a string; a number is a template failure, not a panic.
    let err = template
        .render(&[json!({"role": "user", "content": 5})], true)
        .unwrap_err();
    assert!(
        matches!(err, ChatTemplateError::Render(_)) && err.is_request_error(),
        "{err:?}"
    );
}

#[test]
fn extra_variables_override_special_tokens_like_transformers_kwargs() {
    let template = ChatTemplate::new("{{ bos_token }}|{{ greeting }}", Some("<s>".into()), None).unwrap();
    let extra = json!({"bos_token": "<override>", "greeting": "hello"});
    let input = ChatInput {
        messages: &[user("a")],
        extra: extra.as_object(),
        ..ChatInput::default()
    };
    assert_eq!(template.render_with(&input).unwrap(), "<override>|hello");
}

#[test]
fn strftime_now_reads_the_real_clock_by_default() {
    let template = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
    let year: i64 = template.render(&[user("a")], false).unwrap().parse().unwrap();
    assert!((2024..3000).contains(&year), "{year}");
}
