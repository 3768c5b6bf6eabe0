//! The OpenAI API's request and response bodies (the parts cleave serves), the vLLM-style extensions, and its error
//! JSON. Requests are checked here into a [`GenerationRequest`]: every bad field becomes an [`ApiError`] naming it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An error in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// Seconds a client should wait before retrying (429 and 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn unavailable(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(status, message)
        }
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY => {
                "invalid_request_error"
            }
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            _ => "internal_error",
        }
    }

    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert("retry-after", seconds.into());
        }
        response
    }
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// vLLM's extension: usage in every chunk, so clients can count tokens per chunk.
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// Fields shared by completions and chat completions.
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: String,
    pub max_tokens: Option<i64>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM extension; 0 or -1 disable it.
    pub top_k: Option<i64>,
    pub min_tokens: Option<i64>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    /// vLLM extension: token ids that end generation.
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub logprobs: Option<Value>,
    pub user: Option<String>,
}

/// The fields only completions have; the shared ones are parsed from the same body as [`CommonParams`] (not
/// flattened into this struct, which would lose the field names in errors).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Text, a list of token ids, or a list holding one of those.
    pub prompt: Value,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// The fields only chat completions have (see [`CompletionRequest`] for the shared ones).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
}

/// A request after validation: what the frontend sends to a worker, plus how to answer.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub max_tokens: Option<u32>,
    pub min_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
}

/// Most stop strings per request (OpenAI allows 4; more is cheap, unbounded is not).
pub const STOP_STRINGS_MAX: usize = 16;
/// Longest stop string, in bytes.
pub const STOP_STRING_BYTES_MAX: usize = 256;

impl CommonParams {
    pub fn validate(&self) -> Result<GenerationRequest, ApiError> {
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => Some(positive("max_completion_tokens", n)?),
            (None, Some(n)) => Some(positive("max_tokens", n)?),
            (None, None) => None,
        };
        let min_tokens = match self.min_tokens {
            Some(n) if n < 0 => return Err(ApiError::bad_param("min_tokens", "min_tokens must be at least 0")),
            Some(n) => u32::try_from(n).map_err(|_| ApiError::bad_param("min_tokens", "min_tokens is too large"))?,
            None => 0,
        };
        if let Some(max) = max_tokens
            && min_tokens > max
        {
            return Err(ApiError::bad_param(
                "min_tokens",
                format!("min_tokens ({min_tokens}) is larger than max_tokens ({max})"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_param(
                "temperature",
                format!("temperature must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_param(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
            k => {
                return Err(ApiError::bad_param(
                    "top_k",
                    format!("top_k must be -1, 0 or positive, got {k}"),
                ));
            }
        };
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad_param("n", format!("only n = 1 is supported, got {n}")));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_param(name, format!("{name} is not supported (only 0)")));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::bad_param("logit_bias", "logit_bias is not supported"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|l| !(l.is_null() || l == &Value::Bool(false)))
        {
            return Err(ApiError::bad_param("logprobs", "logprobs are not supported"));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > STOP_STRINGS_MAX {
            return Err(ApiError::bad_param(
                "stop",
                format!("at most {STOP_STRINGS_MAX} stop strings"),
            ));
        }
        if stop.iter().any(|s| s.is_empty() || s.len() > STOP_STRING_BYTES_MAX) {
            return Err(ApiError::bad_param(
                "stop",
                format!("stop strings must be 1 to {STOP_STRING_BYTES_MAX} bytes long"),
            ));
        }
        let options = self.stream_options.as_ref();
        if options.is_some() && !self.stream {
            return Err(ApiError::bad_param(
                "stream_options",
                "stream_options requires stream: true",
            ));
        }
        Ok(GenerationRequest {
            max_tokens,
            min_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            // Seeds are u64 in the engine; negative ones keep their bits, as NumPy-style seeds are often signed.
            seed: self.seed.map(|s| s as u64),
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            stream: self.stream,
            include_usage: options.is_some_and(|o| o.include_usage || o.continuous_usage_stats),
            continuous_usage: options.is_some_and(|o| o.continuous_usage_stats),
        })
    }
}

fn positive(name: &str, n: i64) -> Result<u32, ApiError> {
    if n < 1 {
        return Err(ApiError::bad_param(name, format!("{name} must be at least 1, got {n}")));
    }
    u32::try_from(n).map_err(|_| ApiError::bad_param(name, format!("{name} is too large: {n}")))
}

/// A completion prompt: text to tokenize, or token ids to send as they are.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    pub fn parse(prompt: &Value) -> Result<Prompt, ApiError> {
        let bad = || {
            ApiError::bad_param(
                "prompt",
                "prompt must be a string, a list of token ids, or a list holding exactly one of those",
            )
        };
        match prompt {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => items
                .iter()
                .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
                .collect::<Option<Vec<u32>>>()
                .map(Prompt::Ids)
                .ok_or_else(|| ApiError::bad_param("prompt", "token ids must be integers in 0..2^32")),
            Value::Array(items) if items.len() == 1 => Prompt::parse(&items[0]),
            Value::Array(items) if items.len() > 1 => Err(ApiError::bad_param(
                "prompt",
                format!("one prompt per request is supported, got {}", items.len()),
            )),
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32, cached_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}
