//! Chat templates from `tokenizer_config.json`, rendered the way Hugging Face transformers renders them.
//!
//! A [`ChatTemplate`] is compiled once (at model load) and rendered per request; it is `Send + Sync` and rendering
//! takes `&self`. The environment reproduces transformers' `render_jinja_template` (the function behind
//! `apply_chat_template`):
//!
//! - Jinja with `trim_blocks` and `lstrip_blocks` on, loop controls (`break`/`continue`), no trailing newline kept;
//!   `{% generation %}` blocks (transformers' assistant-mask extension) render their body unchanged.
//! - Variables: `messages`, `tools` (none when absent), `documents` (none), `add_generation_prompt`, `bos_token` and
//!   `eos_token` when the model has them, and any extra variables the caller passes (e.g. `date_string`).
//! - `raise_exception(msg)` fails the render with [`ChatTemplateError::Raised`] carrying `msg` (a bad request).
//! - `strftime_now(fmt)` formats the current time (UTC; Python's is local time, which is UTC on our servers).
//! - `tojson` is Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`: non-ASCII
//!   kept, `", "`/`": "` separators, optional indent, insertion order kept.
//! - Printed values follow Python's `str()`: `True`, `None`, `2.0`, `{'a': [1, 'b']}`; the `string` filter too.
//! - Python's string, dict and list methods come from `minijinja-contrib`'s `pycompat`.
//!
//! Messages are normalised as transformers does before rendering: keys whose value is null are dropped, and a
//! message's reasoning (`reasoning_content`, `thinking` or `reasoning`) is copied under both `thinking` and
//! `reasoning_content`. Content given as a list of `{"type": "text", "text": ...}` parts (as the OpenAI API allows)
//! is joined with `"\n"` into one string when the template only handles string content, as vLLM does; templates that
//! loop over a message's content ([`ChatTemplate::takes_content_parts`]) get the list as it is.
//!
//! Object keys keep the order in which `serde_json` iterates them. Without serde_json's `preserve_order` feature
//! that is sorted order, not the client's: `tojson` of a tool schema then differs from what transformers prints for
//! the same request. The frontend should enable that feature.
//!
//! ```
//! use cleave_frontend::chat_template::ChatTemplate;
//! use serde_json::json;
//!
//! let template = ChatTemplate::default_for_presets();
//! let messages = [json!({"role": "user", "content": "Hi"})];
//! let prompt = template.render(&messages, true).unwrap();
//! assert_eq!(prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
//! ```

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectExt, ObjectRepr, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map as JsonMap, Value as Json};

/// The template used for preset models, which ship no tokenizer config: ChatML (`<|im_start|>role\n...<|im_end|>\n`),
/// no system prompt of its own, `<|im_start|>assistant\n` as the generation prompt. With a byte-level tokenizer the
/// markers are plain text; generation should stop at `<|im_end|>` (the template's `eos_token`).
pub const DEFAULT_TEMPLATE: &str = "{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
";

/// The end-of-turn marker of [`DEFAULT_TEMPLATE`], given as its `eos_token`.
pub const DEFAULT_TEMPLATE_EOS: &str = "<|im_end|>";

/// Variables the renderer sets itself; extra variables may not use these names.
const RESERVED_VARIABLES: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// Names of the compiled templates inside the environment.
const TEMPLATE_DEFAULT: &str = "default";
const TEMPLATE_TOOL_USE: &str = "tool_use";

/// Deepest nesting of JSON values that `tojson` and Python-style printing walk before giving up.
const VALUE_DEPTH_MAX: usize = 128;

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// A file of the model directory exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the model directory is not valid JSON.
    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A field of `tokenizer_config.json` has a shape transformers would not accept.
    #[error("{}: {detail}", path.display())]
    Config { path: PathBuf, detail: String },
    /// The template does not compile. `origin` names where it came from.
    #[error("chat template from {origin} has a syntax error at line {line}: {detail}")]
    Syntax {
        origin: String,
        line: usize,
        detail: String,
    },
    /// The template called `raise_exception(message)`: the conversation is one the model does not accept (for
    /// example roles that do not alternate). A bad request.
    #[error("the model's chat template rejected the conversation: {0}")]
    Raised(String),
    /// The template failed on this conversation for another reason (a missing field, a type it cannot handle).
    #[error("the model's chat template failed on this conversation: {0}")]
    Render(String),
    /// There are no messages to render.
    #[error("the conversation is empty; send at least one message")]
    EmptyConversation,
    /// A message is not a JSON object.
    #[error("message {index} is not a JSON object")]
    MessageNotObject { index: usize },
    /// A message's content is a list with a part the template cannot take.
    #[error("message {index}, content part {part_index}: {detail}")]
    UnsupportedContentPart {
        index: usize,
        part_index: usize,
        detail: String,
    },
    /// An extra template variable uses a name the renderer sets itself.
    #[error("`{0}` is set by the renderer and cannot be passed as an extra template variable")]
    ReservedVariable(String),
}

impl ChatTemplateError {
    /// Whether the error comes from the request (HTTP 400) rather than from the model's files.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            Self::Raised(_)
                | Self::Render(_)
                | Self::EmptyConversation
                | Self::MessageNotObject { .. }
                | Self::UnsupportedContentPart { .. }
                | Self::ReservedVariable(_)
        )
    }
}

/// What to render: the conversation plus the optional variables transformers passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatInput<'a> {
    /// The messages, each a JSON object (`role`, `content`, and whatever else the template reads, e.g. `tool_calls`).
    pub messages: &'a [Json],
    /// Append the template's prompt for the assistant's next turn.
    pub add_generation_prompt: bool,
    /// Tool (function) definitions, passed as `tools`; none when absent.
    pub tools: Option<&'a [Json]>,
    /// Extra template variables, like transformers' `**kwargs` (e.g. `date_string`, `tools_in_user_message`). They
    /// override `bos_token`/`eos_token`; names in `RESERVED_VARIABLES` are refused.
    pub extra: Option<&'a JsonMap<String, Json>>,
}

/// A compiled chat template with the model's special tokens. Cheap to render from many threads at once.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    has_tool_use_template: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    takes_content_parts: bool,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
};

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("has_tool_use_template", &self.has_tool_use_template)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("takes_content_parts", &self.takes_content_parts)
            .finish()
    }
}

impl ChatTemplate {
    /// Loads the chat template of a Hugging Face model directory, as transformers does: `chat_template.jinja` if
    /// present, else `chat_template` in `tokenizer_config.json` (a string, or a list of `{name, template}` of which
    /// `default` is used, and `tool_use` when tools are given). `bos_token`/`eos_token` come from
    /// `tokenizer_config.json` (strings or `{"content": ...}` objects), else from `special_tokens_map.json`.
    /// Returns `Ok(None)` when the model has no chat template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<ChatTemplate>, ChatTemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?;
        let special_path = dir.join("special_tokens_map.json");
        let special = read_json_object(&special_path)?;
        let token = |name: &str| -> Result<Option<String>, ChatTemplateError> {
            if let Some(config) = &config
                && let Some(token) = special_token(&config_path, config, name)?
            {
                return Ok(Some(token));
            }
            match &special {
                Some(special) => special_token(&special_path, special, name),
                None => Ok(None),
            }
        };
        let bos_token = token("bos_token")?;
        let eos_token = token("eos_token")?;

        let jinja_path = dir.join("chat_template.jinja");
        if let Some(source) = read_optional(&jinja_path)? {
            let origin = jinja_path.display().to_string();
            return Self::compile(source, None, bos_token, eos_token, &origin).map(Some);
        }
        let Some(config) = config else { return Ok(None) };
        let origin = format!("{} (chat_template)", config_path.display());
        match config.get("chat_template") {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(source)) => Self::compile(source.clone(), None, bos_token, eos_token, &origin).map(Some),
            Some(Json::Array(entries)) => {
                let named = named_templates(&config_path, entries)?;
                let find = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
                let Some(default) = find(TEMPLATE_DEFAULT) else {
                    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(ChatTemplateError::Config {
                        path: config_path,
                        detail: format!("chat_template lists templates {names:?} but none is named \"default\""),
                    });
                };
                Self::compile(default, find(TEMPLATE_TOOL_USE), bos_token, eos_token, &origin).map(Some)
            }
            Some(other) => Err(ChatTemplateError::Config {
                path: config_path,
                detail: format!(
                    "chat_template must be a string or a list of {{\"name\", \"template\"}} objects, not {}",
                    json_kind(other)
                ),
            }),
        }
    }

    /// Compiles `source` with the given special tokens.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        Self::compile(source.to_owned(), None, bos_token, eos_token, "the given source")
    }

    /// [`DEFAULT_TEMPLATE`] (ChatML), with `eos_token` [`DEFAULT_TEMPLATE_EOS`] and no `bos_token`.
    pub fn default_for_presets() -> ChatTemplate {
        Self::compile(
            DEFAULT_TEMPLATE.to_owned(),
            None,
            None,
            Some(DEFAULT_TEMPLATE_EOS.to_owned()),
            "cleave",
        )
        .expect("the built-in default chat template compiles")
    }

    /// Replaces the clock `strftime_now` reads (by default `SystemTime::now`), e.g. to pin dates in tests.
    pub fn with_clock(mut self, now: fn() -> SystemTime) -> ChatTemplate {
        register_strftime_now(&mut self.env, now);
        self
    }

    /// The template's source text (the default one when the model has several).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Whether the template loops over a message's content, i.e. takes OpenAI-style lists of content parts as they
    /// are. Otherwise lists of text parts are joined into one string and other parts are refused.
    pub fn takes_content_parts(&self) -> bool {
        self.takes_content_parts
    }

    /// Renders `messages` with no tools and no extra variables.
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        self.render_with(&ChatInput {
            messages,
            add_generation_prompt,
            tools: None,
            extra: None,
        })
    }

    /// Renders a conversation with tools and extra variables.
    pub fn render_with(&self, input: &ChatInput<'_>) -> Result<String, ChatTemplateError> {
        if input.messages.is_empty() {
            return Err(ChatTemplateError::EmptyConversation);
        }
        let messages = input
            .messages
            .iter()
            .enumerate()
            .map(|(index, message)| self.normalize_message(index, message))
            .collect::<Result<Vec<_>, _>>()?;

        let mut context: Vec<(Value, Value)> = Vec::with_capacity(6 + input.extra.map_or(0, |e| e.len()));
        let mut set = |name: &str, value: Value| match context.iter_mut().find(|(k, _)| k.as_str() == Some(name)) {
            Some(entry) => entry.1 = value,
            None => context.push((Value::from(name), value)),
        };
        set("messages", Value::from_object(PyList(messages)));
        set(
            "tools",
            input.tools.map_or(Value::from(()), |tools| {
                Value::from_object(PyList(tools.iter().map(json_to_value).collect()))
            }),
        );
        set("documents", Value::from(()));
        set("add_generation_prompt", Value::from(input.add_generation_prompt));
        if let Some(bos) = &self.bos_token {
            set("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            set("eos_token", Value::from(eos.as_str()));
        }
        for (name, value) in input.extra.into_iter().flatten() {
            if RESERVED_VARIABLES.contains(&name.as_str()) {
                return Err(ChatTemplateError::ReservedVariable(name.clone()));
            }
            set(name, json_to_value(value));
        }

        let name = if input.tools.is_some() && self.has_tool_use_template {
            TEMPLATE_TOOL_USE
        } else {
            TEMPLATE_DEFAULT
        };
        let template = self
            .env
            .get_template(name)
            .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        template
            .render(Value::from_object(PyDict(context)))
            .map_err(render_error)
    }

    fn compile(
        source: String,
        tool_use_source: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        origin: &str,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .expect("the default delimiters are valid");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            let mut text = String::new();
            write_py_str(&mut text, value, 0)?;
            out.write_str(&text)
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write rendered text"))
        });
        env.add_filter("tojson", tojson);
        env.add_filter("string", |value: &Value| -> Result<String, Error> {
            let mut text = String::new();
            write_py_str(&mut text, value, 0)?;
            Ok(text)
        });
        env.add_function("raise_exception", |message: &Value| -> Result<Value, Error> {
            let mut text = String::new();
            write_py_str(&mut text, message, 0)?;
            Err(Error::new(ErrorKind::InvalidOperation, text.clone()).with_source(TemplateRaised(text)))
        });
        register_strftime_now(&mut env, SystemTime::now);

        let syntax_error = |err: Error| ChatTemplateError::Syntax {
            origin: origin.to_owned(),
            line: err.line().unwrap_or(0),
            detail: err.detail().map_or_else(|| err.kind().to_string(), str::to_owned),
        };
        let takes_content_parts = loops_over_content(&source);
        env.add_template_owned(TEMPLATE_DEFAULT, rewrite_generation_blocks(&source).into_owned())
            .map_err(syntax_error)?;
        let has_tool_use_template = tool_use_source.is_some();
        if let Some(tool_use) = tool_use_source {
            env.add_template_owned(TEMPLATE_TOOL_USE, rewrite_generation_blocks(&tool_use).into_owned())
                .map_err(syntax_error)?;
        }
        Ok(ChatTemplate {
            env,
            source,
            has_tool_use_template,
            bos_token,
            eos_token,
            takes_content_parts,
        })
    }

    /// Turns one message into the object the template sees, normalised as transformers does.
    fn normalize_message(&self, index: usize, message: &Json) -> Result<Value, ChatTemplateError> {
        let Json::Object(fields) = message else {
            return Err(ChatTemplateError::MessageNotObject { index });
        };
        let mut entries: Vec<(Value, Value)> = Vec::with_capacity(fields.len() + 2);
        // transformers drops null-valued keys: many templates test `'key' in message` or `is defined`.
        for (key, value) in fields.iter().filter(|(_, v)| !v.is_null()) {
            let value = match (key.as_str(), value) {
                ("content", Json::Array(parts)) if !self.takes_content_parts => {
                    Value::from(join_text_parts(index, parts)?)
                }
                _ => json_to_value(value),
            };
            entries.push((Value::from(key.as_str()), value));
        }
        // transformers' `_alias_reasoning_fields`: `{"thinking": r, **message, "reasoning_content": r}`.
        let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|name| {
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v.clone())
        });
        if let Some(reasoning) = reasoning {
            if !entries.iter().any(|(k, _)| k.as_str() == Some("thinking")) {
                entries.insert(0, (Value::from("thinking"), reasoning.clone()));
            }
            match entries
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some("reasoning_content"))
            {
                Some(entry) => entry.1 = reasoning,
                None => entries.push((Value::from("reasoning_content"), reasoning)),
            }
        }
        Ok(Value::from_object(PyDict(entries)))
    }
}

/// The error `raise_exception` attaches, so a render failure can be told apart from other template errors.
#[derive(Debug)]
struct TemplateRaised(String);

impl fmt::Display for TemplateRaised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateRaised {}

fn render_error(err: Error) -> ChatTemplateError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<TemplateRaised>() {
            return ChatTemplateError::Raised(raised.0.clone());
        }
        cause = e.source();
    }
    ChatTemplateError::Render(err.to_string())
}

fn register_strftime_now(env: &mut Environment<'static>, now: fn() -> SystemTime) {
    env.add_function("strftime_now", move |format: &str| -> String {
        let unix_seconds = match now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        strftime(format, unix_seconds)
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Model directory files

fn read_optional(path: &Path) -> Result<Option<String>, ChatTemplateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ChatTemplateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_json_object(path: &Path) -> Result<Option<JsonMap<String, Json>>, ChatTemplateError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    match serde_json::from_str(&text) {
        Ok(Json::Object(map)) => Ok(Some(map)),
        Ok(other) => Err(ChatTemplateError::Config {
            path: path.to_owned(),
            detail: format!("expected a JSON object, found {}", json_kind(&other)),
        }),
        Err(source) => Err(ChatTemplateError::Json {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A special token: a string, an AddedToken object `{"content": ...}`, or null/absent.
fn special_token(path: &Path, config: &JsonMap<String, Json>, name: &str) -> Result<Option<String>, ChatTemplateError> {
    match config.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(token)) => Ok(Some(token.clone())),
        Some(Json::Object(token)) => match token.get("content") {
            Some(Json::String(content)) => Ok(Some(content.clone())),
            _ => Err(ChatTemplateError::Config {
                path: path.to_owned(),
                detail: format!("{name} is an object without a string \"content\""),
            }),
        },
        Some(other) => Err(ChatTemplateError::Config {
            path: path.to_owned(),
            detail: format!(
                "{name} must be a string or an object with \"content\", not {}",
                json_kind(other)
            ),
        }),
    }
}

fn named_templates(path: &Path, entries: &[Json]) -> Result<Vec<(String, String)>, ChatTemplateError> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| match (entry.get("name"), entry.get("template")) {
            (Some(Json::String(name)), Some(Json::String(template))) => Ok((name.clone(), template.clone())),
            _ => Err(ChatTemplateError::Config {
                path: path.to_owned(),
                detail: format!("chat_template[{i}] must be an object with string \"name\" and \"template\""),
            }),
        })
        .collect()
}

fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Template source scanning

/// Every `{% ... %}` tag of `source`: (byte range of the whole tag, its statement without `-`/`+` markers).
fn block_tags(source: &str) -> impl Iterator<Item = (std::ops::Range<usize>, &str)> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let start = pos + source[pos..].find("{%")?;
        let end = start + 2 + source[start + 2..].find("%}")?;
        pos = end + 2;
        let inner = &source[start + 2..end];
        let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
        let inner = inner.strip_suffix(['-', '+']).unwrap_or(inner);
        Some((start..end + 2, inner.trim()))
    })
}

/// Whether some `{% for x in <expr> %}` iterates over an expression mentioning `content` (vLLM's heuristic for
/// templates that take OpenAI-style content parts).
fn loops_over_content(source: &str) -> bool {
    block_tags(source).any(|(_, statement)| {
        statement
            .strip_prefix("for ")
            .and_then(|rest| rest.split_once(" in "))
            .is_some_and(|(_, iterable)| iterable.contains("content"))
    })
}

/// Rewrites transformers' `{% generation %}...{% endgeneration %}` (which renders its body unchanged) into
/// `{% if true %}...{% endif %}`, keeping the whitespace-control markers so trimming is the same.
fn rewrite_generation_blocks(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut copied = 0;
    for (range, statement) in block_tags(source) {
        let replacement = match statement {
            "generation" => "if true",
            "endgeneration" => "endif",
            _ => continue,
        };
        let tag = &source[range.clone()];
        let open = if tag[2..].starts_with(['-', '+']) {
            &tag[..3]
        } else {
            &tag[..2]
        };
        let close = if tag[..tag.len() - 2].ends_with(['-', '+']) {
            &tag[tag.len() - 3..]
        } else {
            "%}"
        };
        out.push_str(&source[copied..range.start]);
        out.push_str(open);
        out.push(' ');
        out.push_str(replacement);
        out.push(' ');
        out.push_str(close);
        copied = range.end;
    }
    out.push_str(&source[copied..]);
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------------------------------------------
// Values: JSON in, Python semantics out

/// A JSON object as the template sees it: keys in the order given, printed like a Python dict.
#[derive(Debug)]
struct PyDict(Vec<(Value, Value)>);

impl Object for PyDict {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.0.iter().map(|(k, _)| k.clone())))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        write_py_repr(&mut text, &Value::from_dyn_object(self.clone()), 0).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// A JSON array as the template sees it, printed like a Python list.
#[derive(Debug)]
struct PyList(Vec<Value>);

impl Object for PyList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let index = key.as_i64()?;
        let index = if index < 0 { index + self.0.len() as i64 } else { index };
        self.0.get(usize::try_from(index).ok()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.0.len())
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        write_py_repr(&mut text, &Value::from_dyn_object(self.clone()), 0).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

fn json_to_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            (None, None) => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::from_object(PyList(items.iter().map(json_to_value).collect())),
        Json::Object(map) => Value::from_object(PyDict(
            map.iter()
                .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v)))
                .collect(),
        )),
    }
}

/// Joins a list of `{"type": "text", "text": ...}` parts with "\n" (vLLM's "string" content format).
fn join_text_parts(index: usize, parts: &[Json]) -> Result<String, ChatTemplateError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (part_index, part) in parts.iter().enumerate() {
        let error = |detail: String| ChatTemplateError::UnsupportedContentPart {
            index,
            part_index,
            detail,
        };
        match (
            part.get("type").and_then(Json::as_str),
            part.get("text").and_then(Json::as_str),
        ) {
            (Some("text"), Some(text)) => texts.push(text),
            (Some("text"), None) => return Err(error("a \"text\" part needs a string \"text\"".to_owned())),
            (Some(other), _) => {
                return Err(error(format!(
                    "parts of type {other:?} are not supported by this model's chat template"
                )));
            }
            (None, _) => return Err(error("each content part needs a string \"type\"".to_owned())),
        }
    }
    Ok(texts.join("\n"))
}

fn too_deep() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("value nested deeper than {VALUE_DEPTH_MAX} levels"),
    )
}

/// Python's `str(value)`, which Jinja2 uses for `{{ value }}` and the `string` filter.
fn write_py_str(out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined => Ok(()),
        ValueKind::String => {
            out.push_str(value.as_str().unwrap_or_default());
            Ok(())
        }
        _ => write_py_repr(out, value, depth),
    }
}

/// Python's `repr(value)` for the values a template can hold.
fn write_py_repr(out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
    if depth > VALUE_DEPTH_MAX {
        return Err(too_deep());
    }
    match value.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => write_py_number(out, value),
        ValueKind::String => write_py_str_literal(out, value.as_str().unwrap_or_default()),
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_repr(out, &key, depth + 1)?;
                out.push_str(": ");
                write_py_repr(out, &value.get_item(&key)?, depth + 1)?;
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let (open, close) = if value.is_tuple() { ('(', ")") } else { ('[', "]") };
            out.push(open);
            let mut n = 0;
            for item in value.try_iter()? {
                if n > 0 {
                    out.push_str(", ");
                }
                write_py_repr(out, &item, depth + 1)?;
                n += 1;
            }
            out.push_str(if value.is_tuple() && n == 1 { ",)" } else { close });
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

fn write_py_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
    } else {
        let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
        write_py_float(out, x, "inf", "nan");
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation for exponents in -4..16 (always
/// with a fractional part), else as `d.ddde+XX`.
fn write_py_float(out: &mut String, x: f64, inf: &str, nan: &str) {
    if x.is_nan() {
        out.push_str(nan);
        return;
    }
    if x.is_infinite() {
        if x < 0.0 {
            out.push('-');
        }
        out.push_str(inf);
        return;
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e-7" or "1e16".
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` exponent is an integer");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    out.push_str(sign);
    if (-4..16).contains(&exponent) {
        if exponent < 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exponent - 1) as usize));
            out.push_str(&digits);
        } else {
            let int_len = exponent as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs());
    }
}

/// Python's `repr(str)`: single quotes unless the text has a single quote and no double quote.
fn write_py_str_literal(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !is_py_printable(c) => {
                let code = c as u32;
                let _ = match code {
                    0..=0xff => write!(out, "\\x{code:02x}"),
                    0x100..=0xffff => write!(out, "\\u{code:04x}"),
                    _ => write!(out, "\\U{code:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for the characters that plausibly occur in chat messages: controls, format
/// characters, separators other than the space, and private use are not printable. (Python also treats unassigned
/// code points as unprintable; this does not know the Unicode tables and prints them.)
fn is_py_printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x1680 | 0x180e
        | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f | 0x3000 | 0xd800..=0xf8ff
        | 0xfeff | 0xfff9..=0xfffb | 0xf0000..)
}

/// Python's `json.dumps` options, as transformers' `tojson` filter passes them.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, args: Rest<ValueOrKwargs>) -> Result<String, Error> {
    let args = args.into_values();
    let (positional, kwargs): (&[Value], Kwargs) = minijinja::value::from_args(&args)?;
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments",
        ));
    }
    let arg = |index: usize, name: &str| -> Result<Option<Value>, Error> {
        match (positional.get(index), kwargs.get::<Option<Value>>(name)?) {
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson got multiple values for {name}"),
            )),
            (Some(v), None) => Ok(Some(v.clone())),
            (None, v) => Ok(v),
        }
    };
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_separator, key_separator) = match arg(2, "separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] if item.as_str().is_some() && key.as_str().is_some() => (
                    item.as_str().unwrap_or_default().to_owned(),
                    key.as_str().unwrap_or_default().to_owned(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be two strings",
                    ));
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(out)
}

fn write_json(out: &mut String, value: &Value, style: &JsonStyle, depth: usize) -> Result<(), Error> {
    if depth > VALUE_DEPTH_MAX {
        return Err(too_deep());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => {
            let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            write_py_float(out, x, "Infinity", "NaN");
        }
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                entries.push((json_key(&key)?, value.get_item(&key)?));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_separator);
                }
                newline(out, depth + 1);
                write_json_str(out, key, style.ensure_ascii);
                out.push_str(&style.key_separator);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_separator);
                }
                newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// `json.dumps` turns keys that are not strings into strings: numbers as printed, `true`/`false`, `null`.
fn json_key(key: &Value) -> Result<String, Error> {
    let mut out = String::new();
    match key.kind() {
        ValueKind::String => out.push_str(key.as_str().unwrap_or_default()),
        ValueKind::Number | ValueKind::Bool | ValueKind::None => write_json(
            &mut out,
            key,
            &JsonStyle {
                ensure_ascii: false,
                indent: None,
                item_separator: String::new(),
                key_separator: String::new(),
                sort_keys: false,
            },
            0,
        )?,
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, not {kind}"),
            ));
        }
    }
    Ok(out)
}

/// A JSON string as Python's `json` module writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------------------------
// strftime

/// A UTC calendar time.
#[derive(Debug, Clone, Copy)]
struct CivilTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday .. 6 = Sunday
    weekday: u32,
    /// 1..=366
    day_of_year: u32,
}

impl CivilTime {
    /// Days since 1970-01-01 to a proleptic Gregorian date, by counting 400-year eras from 0000-03-01 (March-based
    /// years put the leap day last).
    fn from_unix_seconds(unix_seconds: i64) -> CivilTime {
        let days = unix_seconds.div_euclid(86_400);
        let second_of_day = unix_seconds.rem_euclid(86_400) as u32;
        let days_since_0000_03_01 = days + 719_468;
        let era = days_since_0000_03_01.div_euclid(146_097);
        let day_of_era = days_since_0000_03_01.rem_euclid(146_097);
        let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_march_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * day_of_march_year + 2) / 153;
        let day = (day_of_march_year - (153 * month_from_march + 2) / 5 + 1) as u32;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        } as u32;
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const DAYS_BEFORE_MONTH: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = DAYS_BEFORE_MONTH[month as usize - 1] + day + u32::from(is_leap && month > 2);
        CivilTime {
            year,
            month,
            day,
            hour: second_of_day / 3_600,
            minute: second_of_day / 60 % 60,
            second: second_of_day % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year,
        }
    }
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Python's `datetime.strftime` on Linux (glibc, C locale) for a naive UTC time: the usual directives, the `-` flag
/// (no padding), `%f` (always 000000) and empty `%z`/`%Z`. Unknown directives are copied as they are.
fn strftime(format: &str, unix_seconds: i64) -> String {
    let t = CivilTime::from_unix_seconds(unix_seconds);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.next_if_eq(&'-').is_some();
        let Some(directive) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, n: i64, width: usize, pad: char| {
            if no_pad {
                let _ = write!(out, "{n}");
            } else if pad == ' ' {
                let _ = write!(out, "{n:>width$}");
            } else {
                let _ = write!(out, "{n:0width$}");
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
        match directive {
            'a' => out.push_str(&WEEKDAYS[t.weekday as usize][..3]),
            'A' => out.push_str(WEEKDAYS[t.weekday as usize]),
            'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[t.month as usize - 1]),
            'c' => out.push_str(&strftime("%a %b %e %H:%M:%S %Y", unix_seconds)),
            'C' => num(&mut out, t.year.div_euclid(100), 2, '0'),
            'd' => num(&mut out, i64::from(t.day), 2, '0'),
            'D' | 'x' => out.push_str(&strftime("%m/%d/%y", unix_seconds)),
            'e' => num(&mut out, i64::from(t.day), 2, ' '),
            'f' => out.push_str("000000"),
            'F' => out.push_str(&strftime("%Y-%m-%d", unix_seconds)),
            'H' => num(&mut out, i64::from(t.hour), 2, '0'),
            'I' => num(&mut out, i64::from(hour12), 2, '0'),
            'j' => num(&mut out, i64::from(t.day_of_year), 3, '0'),
            'm' => num(&mut out, i64::from(t.month), 2, '0'),
            'M' => num(&mut out, i64::from(t.minute), 2, '0'),
            'n' => out.push('\n'),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'R' => out.push_str(&strftime("%H:%M", unix_seconds)),
            's' => {
                let _ = write!(out, "{unix_seconds}");
            }
            'S' => num(&mut out, i64::from(t.second), 2, '0'),
            't' => out.push('\t'),
            'T' | 'X' => out.push_str(&strftime("%H:%M:%S", unix_seconds)),
            'u' => num(&mut out, i64::from(t.weekday) + 1, 1, '0'),
            'w' => num(&mut out, i64::from((t.weekday + 1) % 7), 1, '0'),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => {
                let _ = write!(out, "{}", t.year);
            }
            'z' | 'Z' => {}
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python_for_the_fixture_table() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/chat_templates/strftime.json"
        );
        let fixture: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 30);
        for case in cases {
            let unix = case["unix_seconds"].as_i64().unwrap();
            let format = case["format"].as_str().unwrap();
            assert_eq!(
                strftime(format, unix),
                case["expected"].as_str().unwrap(),
                "{format} at {unix}"
            );
        }
    }

    #[test]
    fn civil_time_handles_dates_before_1970() {
        // 1969-12-31T23:59:59Z, a Wednesday; 1900-03-01 (1900 is not a leap year), a Thursday.
        let t = CivilTime::from_unix_seconds(-1);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (1969, 12, 31, 23, 59, 59, 2)
        );
        let t = CivilTime::from_unix_seconds(-2_203_891_200);
        assert_eq!((t.year, t.month, t.day, t.weekday, t.day_of_year), (1900, 3, 1, 3, 60));
    }

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (9_999_999_999_999_998.0, "9999999999999998.0"),
            (123_456_789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.2345e-7, "1.2345e-07"),
            (1e300, "1e+300"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::INFINITY, "inf"),
            (f64::NAN, "nan"),
        ];
        for (x, expected) in cases {
            let mut out = String::new();
            write_py_float(&mut out, x, "inf", "nan");
            assert_eq!(out, expected, "{x:?}");
        }
    }

    #[test]
    fn strings_repr_like_python() {
        let cases = [
            ("plain", "'plain'"),
            ("it's", "\"it's\""),
            ("both ' and \"", "'both \\' and \"'"),
            ("tab\there\nnew \\", "'tab\\there\\nnew \\\\'"),
            ("Zoë 世界 🌍", "'Zoë 世界 🌍'"),
            ("\u{0}\u{7f}\u{a0}\u{200b}", "'\\x00\\x7f\\xa0\\u200b'"),
        ];
        for (s, expected) in cases {
            let mut out = String::new();
            write_py_str_literal(&mut out, s);
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn generation_tags_become_if_blocks_with_their_whitespace_markers() {
        let source = "a{%- generation -%}b{% endgeneration %}c{%+generation%}{{ x }}{%- endgeneration +%}";
        assert_eq!(
            rewrite_generation_blocks(source),
            "a{%- if true -%}b{% endif %}c{%+ if true %}{{ x }}{%- endif +%}"
        );
        assert!(matches!(
            rewrite_generation_blocks("{% if x %}{% endif %}"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn content_part_templates_are_detected_by_their_loops() {
        assert!(loops_over_content(
            "{%- for item in message['content'] -%}{{ item }}{% endfor %}"
        ));
        assert!(loops_over_content("{% for part in message.content %}{% endfor %}"));
        assert!(!loops_over_content(
            "{% for message in messages %}{{ message.content }}{% endfor %}"
        ));
        assert!(!loops_over_content("{% for t in message.tool_calls %}{% endfor %}"));
    }
}
