//! The HTTP side: OpenAI-compatible routes on axum, validation, tokenization, dispatch to the worker pool, SSE
//! streaming, and request-level metrics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use cleave_wire::{ErrorKind, Tokens, WireParams};
use futures::Stream;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::chat_template::ChatInput;
use crate::metrics::Metrics;
use crate::model::ServedModel;
use crate::openai::{ApiError, ChatRequest, CommonParams, CompletionRequest, GenerationRequest, Prompt, Usage};
use crate::workers::{PoolError, RequestStream, WorkerEvent, WorkerPool};

/// Attempts per request when a worker refuses it for a reason another worker may not have (draining, overloaded).
const ATTEMPTS_MAX: usize = 3;

#[derive(Clone, Debug)]
pub struct FrontendConfig {
    /// Requests served at once at most; beyond it requests get 429 with Retry-After.
    pub max_in_flight: usize,
    /// Largest request body accepted (413 beyond).
    pub body_bytes_max: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 4096,
            body_bytes_max: 8 << 20,
        }
    }
}

pub struct AppState {
    pub model: ServedModel,
    pub pool: WorkerPool,
    pub metrics: Arc<Metrics>,
    config: FrontendConfig,
    in_flight: Arc<Semaphore>,
    created: u64,
}

impl AppState {
    pub fn new(model: ServedModel, pool: WorkerPool, metrics: Arc<Metrics>, config: FrontendConfig) -> Self {
        Self {
            model,
            pool,
            metrics,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            created: unix_seconds(),
        }
    }
}

/// Serves [`routes`] on `listener` until `shutdown` completes, then lets in-flight responses finish.
///
/// Every connection gets `TCP_NODELAY`. A streamed response is many small writes (one server-sent event per token
/// update); with Nagle's algorithm each write while the previous one is unacknowledged waits for the client's ACK,
/// which Linux delays by up to 40 ms — measured as 40 ms inter-token gaps before this was set (docs/benchmarks.md).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on a client connection: {e}");
        }
    });
    axum::serve(listener, routes(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The routes of the OpenAI-compatible API plus /health and /metrics.
pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model.name,
            "object": "model",
            "created": state.created,
            "owned_by": "cleave",
            "max_model_len": state.model.context_len,
        }],
    }))
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (decoders, prefillers) = state.pool.ready();
    let status = if decoders > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "status": if decoders > 0 { "ok" } else { "no decode worker" },
                       "decode_workers": decoders, "prefill_workers": prefillers });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")];
    (content_type, state.metrics.render()).into_response()
}

/// Reads a JSON object body and parses it as the endpoint's own fields plus the shared ones: oversized → 413,
/// not JSON → 400, a field of the wrong type → 400 naming the field.
async fn parse_body<T: DeserializeOwned>(state: &AppState, body: Body) -> Result<(T, CommonParams), ApiError> {
    let limit = state.config.body_bytes_max;
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
    })?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    Ok((fields(&value)?, fields(&value)?))
}

fn fields<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(format!("invalid request: {inner}"))
        } else {
            ApiError::bad_param(&path, format!("invalid value for `{path}`: {inner}"))
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat_completions",
        }
    }
}

async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let endpoint = Endpoint::Completions;
    let result = async {
        let (request, common): (CompletionRequest, _) = parse_body(&state, body).await?;
        check_model(&state, &common)?;
        if request.echo {
            return Err(ApiError::bad_param("echo", "echo is not supported"));
        }
        if request.suffix.is_some() {
            return Err(ApiError::bad_param("suffix", "suffix is not supported"));
        }
        if request.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::bad_param("best_of", "only best_of = 1 is supported"));
        }
        let generation = common.validate()?;
        let prompt_ids = match Prompt::parse(&request.prompt)? {
            Prompt::Text(text) => encode(&state, text, true).await?,
            Prompt::Ids(ids) => ids,
        };
        Ok((prompt_ids, generation))
    }
    .await;
    match result {
        Ok((prompt_ids, generation)) => dispatch(state, endpoint, prompt_ids, generation).await,
        Err(e) => refuse(&state, endpoint, e),
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let endpoint = Endpoint::Chat;
    let result = async {
        let (request, common): (ChatRequest, _) = parse_body(&state, body).await?;
        check_model(&state, &common)?;
        let generation = common.validate()?;
        if request.messages.is_empty() {
            return Err(ApiError::bad_param(
                "messages",
                "messages must hold at least one message",
            ));
        }
        let tools = match &request.tools {
            None | Some(Value::Null) => None,
            Some(Value::Array(tools)) => Some(tools.as_slice()),
            Some(_) => return Err(ApiError::bad_param("tools", "tools must be a list")),
        };
        let input = ChatInput {
            messages: &request.messages,
            add_generation_prompt: true,
            tools,
            extra: None,
        };
        let text = state.model.chat_template.render_with(&input).map_err(|e| {
            if e.is_request_error() {
                ApiError::bad_param("messages", e.to_string())
            } else {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        })?;
        // The template writes the special tokens itself (as transformers' apply_chat_template assumes).
        let prompt_ids = encode(&state, text, false).await?;
        Ok((prompt_ids, generation))
    }
    .await;
    match result {
        Ok((prompt_ids, generation)) => dispatch(state, endpoint, prompt_ids, generation).await,
        Err(e) => refuse(&state, endpoint, e),
    }
}

/// Prompts longer than this (bytes) are tokenized on the blocking pool, so that tokenizing holds up the other requests
/// on the same async worker thread for at most ~0.1-0.2 ms. `tokenizers` takes ~0.6 ms for a 1k-token (4 kB) prompt,
/// the byte-level BPE encoder ~0.03 ms (docs/benchmarks.md): with it, prompts up to ~4k tokens skip the hand-off to
/// the blocking pool, which costs more than tokenizing them.
const TOKENIZE_INLINE_BYTES_MAX: usize = 1024;
const TOKENIZE_INLINE_BYTES_MAX_FAST_ENCODER: usize = 16 * 1024;

async fn encode(state: &Arc<AppState>, text: String, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    let inline_bytes_max = if state.model.tokenizer.encodes_fast() {
        TOKENIZE_INLINE_BYTES_MAX_FAST_ENCODER
    } else {
        TOKENIZE_INLINE_BYTES_MAX
    };
    if text.len() <= inline_bytes_max {
        return state.model.encode(&text, add_special_tokens);
    }
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.model.encode(&text, add_special_tokens))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("tokenizing the prompt: {e}")))?
}

fn check_model(state: &AppState, common: &CommonParams) -> Result<(), ApiError> {
    if common.model != state.model.name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model {:?} does not exist; this server serves {:?}",
                common.model, state.model.name
            ),
        ));
    }
    Ok(())
}

fn refuse(state: &AppState, endpoint: Endpoint, error: ApiError) -> Response {
    let outcome = match error.status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => "overloaded",
        s if s.is_client_error() => "client_error",
        _ => "error",
    };
    state
        .metrics
        .requests
        .with_label_values(&[endpoint.label(), outcome])
        .inc();
    error.into_response()
}

/// Checks the prompt against the model and the workers, routes it, and answers (streamed or whole).
async fn dispatch(
    state: Arc<AppState>,
    endpoint: Endpoint,
    prompt_ids: Vec<u32>,
    generation: GenerationRequest,
) -> Response {
    let arrived = Instant::now();
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        let error = ApiError::unavailable(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} requests are in flight, the most this server takes",
                state.config.max_in_flight
            ),
        );
        return refuse(&state, endpoint, error);
    };
    let params = match check_lengths(&state, &prompt_ids, &generation) {
        Ok(params) => params,
        Err(e) => return refuse(&state, endpoint, e),
    };
    let n_prompt = prompt_ids.len();
    let (stream, first) = match start(&state, prompt_ids, params).await {
        Ok(started) => started,
        Err(e) => return refuse(&state, endpoint, e),
    };
    state.metrics.requests_in_flight.inc();
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    let id = format!("{prefix}-{:016x}{:08x}", stream.id, state.created as u32);
    let run = Run {
        state: state.clone(),
        endpoint,
        generation,
        stream,
        pending: Some(first),
        arrived,
        last_token: None,
        n_prompt: n_prompt as u32,
        n_cached: 0,
        n_generated: 0,
        outcome: None,
        _permit: permit,
        id,
    };
    if run.generation.stream {
        Sse::new(sse_events(run))
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        run.collect().await
    }
}

/// The prompt must fit the model's context and the workers' KV pools; `max_tokens` defaults to what is left.
fn check_lengths(state: &AppState, prompt_ids: &[u32], g: &GenerationRequest) -> Result<WireParams, ApiError> {
    let model = &state.model;
    if prompt_ids.is_empty() {
        return Err(ApiError::bad_param("prompt", "the prompt is empty"));
    }
    if let Some(&bad) = prompt_ids.iter().find(|&&id| id as usize >= model.vocab_size) {
        return Err(ApiError::bad_param(
            "prompt",
            format!("token id {bad} is outside the vocabulary (size {})", model.vocab_size),
        ));
    }
    let mut limit = model.context_len;
    let mut limit_name = "the model's context";
    if let Some(capacity) = state.pool.capacity_tokens()
        && capacity < limit
    {
        (limit, limit_name) = (capacity, "the KV cache of the largest worker");
    }
    if prompt_ids.len() >= limit {
        return Err(ApiError::bad_param(
            "prompt",
            format!(
                "the prompt has {} tokens; {limit_name} holds {limit} (prompt plus output)",
                prompt_ids.len()
            ),
        ));
    }
    let room = (limit - prompt_ids.len()) as u32;
    let max_tokens = g.max_tokens.unwrap_or(room);
    if max_tokens > room {
        return Err(ApiError::bad_param(
            "max_tokens",
            format!(
                "max_tokens is {max_tokens} but the prompt has {} tokens and {limit_name} holds {limit}: at most {room}",
                prompt_ids.len()
            ),
        ));
    }
    Ok(WireParams {
        max_tokens,
        min_tokens: g.min_tokens.min(max_tokens),
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        seed: g.seed,
        stop_token_ids: g.stop_token_ids.clone(),
        stop: g.stop.clone(),
        ignore_eos: g.ignore_eos,
    })
}

/// Routes the request and waits for its first update, trying another worker when one refuses it for a passing
/// reason (draining, overloaded).
async fn start(
    state: &AppState,
    prompt_ids: Vec<u32>,
    params: WireParams,
) -> Result<(RequestStream, WorkerEvent), ApiError> {
    let mut last_error = String::new();
    for _ in 0..ATTEMPTS_MAX {
        let mut stream = match state.pool.generate(prompt_ids.clone(), params.clone()) {
            Ok(stream) => stream,
            Err(e @ PoolError::NoWorker(_)) => {
                return Err(ApiError::unavailable(StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
            }
            Err(e @ PoolError::Overloaded(_)) => {
                last_error = e.to_string();
                continue;
            }
        };
        match stream.next().await {
            Some(WorkerEvent::Failed { message, kind }) if kind.is_retryable() => last_error = message,
            Some(WorkerEvent::Failed { message, kind }) => return Err(worker_error(message, kind)),
            Some(first) => return Ok((stream, first)),
            None => last_error = format!("worker {} dropped the request", stream.worker),
        }
    }
    Err(ApiError::unavailable(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no worker could take the request: {last_error}"),
    ))
}

/// A worker's refusal before any token, by its kind: the engine's validation errors are the client's fault.
fn worker_error(message: String, kind: ErrorKind) -> ApiError {
    match kind {
        ErrorKind::InvalidRequest => ApiError::bad_request(message),
        ErrorKind::Overloaded | ErrorKind::Draining => ApiError::unavailable(StatusCode::SERVICE_UNAVAILABLE, message),
        ErrorKind::Internal => ApiError::new(StatusCode::BAD_GATEWAY, message),
    }
}

/// One request being answered.
struct Run {
    state: Arc<AppState>,
    endpoint: Endpoint,
    generation: GenerationRequest,
    stream: RequestStream,
    /// The first update, already received by [`start`].
    pending: Option<WorkerEvent>,
    arrived: Instant,
    last_token: Option<Instant>,
    n_prompt: u32,
    n_cached: u32,
    n_generated: u32,
    /// Set when the request ended; if the run is dropped without one, the client went away.
    outcome: Option<&'static str>,
    id: String,
    _permit: OwnedSemaphorePermit,
}

/// What the next update means for the response.
enum Step {
    Tokens(Tokens),
    Failed(String),
}

impl Run {
    async fn next(&mut self) -> Option<Step> {
        let event = match self.pending.take() {
            Some(event) => event,
            None => self.stream.next().await?,
        };
        Some(match event {
            WorkerEvent::Tokens(tokens) => {
                self.observe(&tokens);
                Step::Tokens(tokens)
            }
            WorkerEvent::Failed { message, .. } => Step::Failed(message),
        })
    }

    /// Token-level metrics: TTFT on the first token, one gap per update after it.
    fn observe(&mut self, tokens: &Tokens) {
        self.n_prompt = tokens.n_prompt_tokens;
        self.n_cached = tokens.n_cached_tokens;
        let n = tokens.token_ids.len() as u32;
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let metrics = &self.state.metrics;
        match self.last_token {
            None => {
                let ttft = now - self.arrived;
                metrics
                    .time_to_first_token
                    .with_label_values(&[self.endpoint.label()])
                    .observe(ttft.as_secs_f64());
                metrics.prompt_tokens.inc_by(self.n_prompt.into());
                metrics.cached_prompt_tokens.inc_by(self.n_cached.into());
            }
            Some(last) => {
                metrics.inter_token_latency.observe((now - last).as_secs_f64());
            }
        }
        for _ in 1..n {
            metrics.inter_token_latency.observe(0.0);
        }
        metrics.generation_tokens.inc_by(n.into());
        self.last_token = Some(now);
        self.n_generated += n;
    }

    fn finish(&mut self, outcome: &'static str) {
        if self.outcome.is_some() {
            return;
        }
        self.outcome = Some(outcome);
        let metrics = &self.state.metrics;
        metrics
            .requests
            .with_label_values(&[self.endpoint.label(), outcome])
            .inc();
        if outcome == "success" {
            metrics
                .e2e_latency
                .with_label_values(&[self.endpoint.label()])
                .observe(self.arrived.elapsed().as_secs_f64());
        }
    }

    fn usage(&self) -> Usage {
        Usage::new(self.n_prompt, self.n_generated, self.n_cached)
    }

    /// The OpenAI finish reason for a worker's; `cancelled` means the worker gave up on the request.
    fn finish_reason(finish: &str) -> Result<&'static str, String> {
        match finish {
            "length" => Ok("length"),
            "stop" => Ok("stop"),
            other => Err(format!("the worker ended the request ({other})")),
        }
    }

    /// Non-streaming: gather everything, then one JSON body.
    async fn collect(mut self) -> Response {
        let mut text = String::new();
        let finish = loop {
            match self.next().await {
                Some(Step::Tokens(tokens)) => {
                    text.push_str(&tokens.text);
                    if let Some(finish) = tokens.finish {
                        break Self::finish_reason(&finish);
                    }
                }
                Some(Step::Failed(message)) => break Err(message),
                None => break Err(format!("worker {} dropped the request", self.stream.worker)),
            }
        };
        let finish = match finish {
            Ok(finish) => finish,
            Err(message) => {
                self.finish("error");
                return ApiError::new(StatusCode::BAD_GATEWAY, message).into_response();
            }
        };
        self.finish("success");
        let state = &self.state;
        let choice = match self.endpoint {
            Endpoint::Completions => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion",
        };
        Json(json!({
            "id": self.id,
            "object": object,
            "created": unix_seconds(),
            "model": state.model.name,
            "choices": [choice],
            "usage": self.usage(),
        }))
        .into_response()
    }

    /// One streamed chunk; `usage` is attached when continuous usage stats were asked for.
    fn chunk(&self, delta_text: Option<&str>, role: bool, finish: Option<&str>) -> Event {
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": delta_text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(text) = delta_text {
                    delta.insert("content".into(), text.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        let mut body = json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": unix_seconds(),
            "model": self.state.model.name,
            "choices": [choice],
        });
        if self.generation.continuous_usage {
            body["usage"] = json!(self.usage());
        }
        Event::default().data(body.to_string())
    }

    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        }
    }

    fn usage_chunk(&self) -> Event {
        let body = json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": unix_seconds(),
            "model": self.state.model.name,
            "choices": [],
            "usage": self.usage(),
        });
        Event::default().data(body.to_string())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Dropped before the end: the client disconnected (the request stream cancels it on the worker).
        self.finish("cancelled");
        self.state.metrics.requests_in_flight.dec();
    }
}

/// Streaming: OpenAI's SSE chunks, then `[DONE]`. A failure mid-stream is sent as an error event.
fn sse_events(run: Run) -> impl Stream<Item = Result<Event, Infallible>> {
    enum Phase {
        Start,
        Streaming,
        Done,
    }
    futures::stream::unfold(
        (run, Phase::Start, VecDeque::<Event>::new()),
        |(mut run, mut phase, mut queue)| async move {
            loop {
                if let Some(event) = queue.pop_front() {
                    return Some((Ok(event), (run, phase, queue)));
                }
                match phase {
                    Phase::Done => return None,
                    Phase::Start => {
                        phase = Phase::Streaming;
                        if run.endpoint == Endpoint::Chat {
                            queue.push_back(run.chunk(Some(""), true, None));
                        }
                    }
                    Phase::Streaming => {
                        let failure = match run.next().await {
                            Some(Step::Tokens(tokens)) => {
                                let finish = tokens.finish.as_deref().map(Run::finish_reason);
                                // A chunk per update that carries tokens, even when their text is empty (held
                                // back for a stop string or an incomplete character, or no text at all): clients
                                // time tokens by chunks.
                                let carries = !tokens.token_ids.is_empty() || !tokens.text.is_empty();
                                if carries && !matches!(finish, Some(Err(_))) {
                                    queue.push_back(run.chunk(Some(&tokens.text), false, None));
                                }
                                match finish {
                                    None => None,
                                    Some(Ok(reason)) => {
                                        queue.push_back(run.chunk(None, false, Some(reason)));
                                        if run.generation.include_usage {
                                            queue.push_back(run.usage_chunk());
                                        }
                                        queue.push_back(Event::default().data("[DONE]"));
                                        run.finish("success");
                                        phase = Phase::Done;
                                        None
                                    }
                                    Some(Err(message)) => Some(message),
                                }
                            }
                            Some(Step::Failed(message)) => Some(message),
                            None => Some(format!("worker {} dropped the request", run.stream.worker)),
                        };
                        if let Some(message) = failure {
                            queue.push_back(error_event(&message));
                            run.finish("error");
                            phase = Phase::Done;
                        }
                    }
                }
            }
        },
    )
}

fn error_event(message: &str) -> Event {
    let error = ApiError::new(StatusCode::BAD_GATEWAY, message);
    Event::default().data(error.body().to_string())
}
