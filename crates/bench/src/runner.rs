//! The open-loop sender: every request goes out at its planned time whatever the server does, and its stream is
//! timed as it arrives.
//!
//! The only thing that can hold a request back is the in-flight limit (`--max-concurrency`, else
//! [`IN_FLIGHT_DEFAULT_MAX`]): a request due while the limit is reached waits for a free slot, in order, and its
//! record says so (`waited_for_slot`, and `sent_s` later than `scheduled_s`). TTFT and e2e are measured from the
//! actual send, so the report shows the send delays beside them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::prompt::{BodyBuilder, Endpoint};
use crate::sse::{Chunk, SseParser, TokenTimes, parse_chunk, truncate};
use crate::workload::RequestPlan;

/// In-flight requests at most when `--max-concurrency` is not given: far above what one server sustains at an SLO,
/// low enough to stay within file-descriptor limits.
pub const IN_FLIGHT_DEFAULT_MAX: usize = 2048;
/// The most bytes of an error response's body kept in the record.
const ERROR_BODY_MAX: usize = 4096;

/// Where requests go.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:port`, no trailing slash.
    pub base_url: String,
    pub endpoint: Endpoint,
    pub api_key: Option<String>,
    pub request_timeout: Duration,
}

/// What happened to one request. Times in seconds are from the start of the run; durations are in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub idx: usize,
    pub scheduled_s: f64,
    pub sent_s: f64,
    /// The in-flight limit was reached when this request was due.
    pub waited_for_slot: bool,
    /// Planned input tokens (exact for token-id prompts; for text prompts see `prompt_tokens`).
    pub input_len: u32,
    /// Requested output tokens (max_tokens = min_tokens).
    pub output_len: u32,
    /// The server's `usage.prompt_tokens`, when it reported usage.
    pub prompt_tokens: Option<u64>,
    pub output_tokens: u64,
    pub ttft_ms: Option<f64>,
    /// (e2e - ttft) / (output_tokens - 1), for requests with at least two output tokens.
    pub tpot_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
    /// Every gap between consecutive output tokens (see `TokenTimes` for chunks of several tokens).
    pub itl_ms: Vec<f64>,
    /// Why the request failed: the HTTP status and body, a stream error event, a connection error or a timeout.
    pub error: Option<String>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// One run's records, in request order, and how long it took.
pub struct RunOutput {
    pub records: Vec<RequestRecord>,
    /// From the first planned send to the last response's end.
    pub duration_s: f64,
}

/// A reqwest client for benchmarking: no proxies (a load test of loopback must not go through `$HTTP_PROXY`), no
/// Nagle, a connection pool as large as the in-flight limit.
pub fn client(in_flight_max: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(in_flight_max)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")
}

/// Sends every planned request at its time (at most `in_flight_max` at once) and collects the records.
pub async fn run(
    client: &reqwest::Client,
    target: &Target,
    plans: &[RequestPlan],
    bodies: &BodyBuilder,
    in_flight_max: usize,
    progress: &ProgressBar,
) -> RunOutput {
    let slots = Arc::new(Semaphore::new(in_flight_max));
    let url: Arc<str> = format!("{}{}", target.base_url, target.endpoint.path()).into();
    let start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    let mut records = Vec::with_capacity(plans.len());
    for plan in plans {
        // Build the body before the request is due, so building never delays a send.
        let body = bodies.body(plan);
        tokio::time::sleep_until(start + Duration::from_secs_f64(plan.at_s)).await;
        let (slot, waited_for_slot) = match slots.clone().try_acquire_owned() {
            Ok(slot) => (slot, false),
            Err(_) => (
                slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
                true,
            ),
        };
        let (client, target, url, progress) = (client.clone(), target.clone(), url.clone(), progress.clone());
        let mut dispatch = Dispatch {
            idx: plan.idx,
            scheduled_s: plan.at_s,
            sent_s: 0.0,
            waited_for_slot,
            input_len: plan.input_len,
            output_len: plan.output_len,
        };
        tasks.spawn(async move {
            let sent = Instant::now();
            dispatch.sent_s = (tokio::time::Instant::from_std(sent) - start).as_secs_f64();
            let response = tokio::time::timeout(target.request_timeout, send(&client, &target, &url, body, sent));
            let (times, end_s, error) = match response.await {
                Ok(outcome) => outcome,
                Err(_) => (
                    TokenTimes::default(),
                    None,
                    Some(format!("timed out after {:?}", target.request_timeout)),
                ),
            };
            drop(slot);
            progress.inc(1);
            record(dispatch, times, end_s, error)
        });
        while let Some(done) = tasks.try_join_next() {
            records.push(done.expect("a request task panicked"));
        }
    }
    while let Some(done) = tasks.join_next().await {
        records.push(done.expect("a request task panicked"));
    }
    let duration_s = start.elapsed().as_secs_f64();
    records.sort_by_key(|r| r.idx);
    RunOutput { records, duration_s }
}

/// What is known of a request when it is sent.
struct Dispatch {
    idx: usize,
    scheduled_s: f64,
    sent_s: f64,
    waited_for_slot: bool,
    input_len: u32,
    output_len: u32,
}

fn record(dispatch: Dispatch, times: TokenTimes, end_s: Option<f64>, error: Option<String>) -> RequestRecord {
    let Dispatch {
        idx,
        scheduled_s,
        sent_s,
        waited_for_slot,
        input_len,
        output_len,
    } = dispatch;
    let ms = |s: f64| (s * 1e6).round() / 1e3; // milliseconds, to the microsecond
    let output_tokens = times.n_output();
    let tpot_ms = match (times.ttft_s, end_s) {
        (Some(ttft_s), Some(end_s)) if output_tokens >= 2 => Some(ms((end_s - ttft_s) / (output_tokens - 1) as f64)),
        _ => None,
    };
    RequestRecord {
        idx,
        scheduled_s: (scheduled_s * 1e6).round() / 1e6,
        sent_s: (sent_s * 1e6).round() / 1e6,
        waited_for_slot,
        input_len,
        output_len,
        prompt_tokens: times.usage_prompt_tokens,
        output_tokens,
        ttft_ms: times.ttft_s.map(ms),
        tpot_ms,
        e2e_ms: end_s.map(ms),
        itl_ms: times.itl_s.iter().map(|&s| ms(s)).collect(),
        error,
    }
}

/// Sends one request and reads its stream. Returns the token times, the end time (seconds after `sent`, when
/// `data: [DONE]` arrived) and the error, if any.
async fn send(
    client: &reqwest::Client,
    target: &Target,
    url: &str,
    body: Vec<u8>,
    sent: Instant,
) -> (TokenTimes, Option<f64>, Option<String>) {
    let mut times = TokenTimes::default();
    let mut request = client.post(url).header("content-type", "application/json").body(body);
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(e) => return (times, None, Some(error_chain(&e))),
    };
    let status = response.status();
    if !status.is_success() {
        let body = read_error_body(response).await;
        return (
            times,
            None,
            Some(format!("HTTP {status}: {}", truncate(body.trim(), 1000))),
        );
    }
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    loop {
        let bytes = match response.chunk().await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break,
            Err(e) => return (times, None, Some(format!("reading the stream: {}", error_chain(&e)))),
        };
        let at_s = sent.elapsed().as_secs_f64();
        if let Err(e) = parser.push(&bytes, &mut events) {
            return (times, None, Some(e));
        }
        for event in events.drain(..) {
            match parse_chunk(&event) {
                Chunk::Done => {
                    let error = (times.n_output() == 0).then(|| "the stream ended with no tokens".to_string());
                    return (times, Some(at_s), error);
                }
                Chunk::Data {
                    has_text,
                    has_choices,
                    completion_tokens,
                    prompt_tokens,
                } => {
                    times.on_data(at_s, has_text, has_choices, completion_tokens);
                    times.usage_prompt_tokens = prompt_tokens.or(times.usage_prompt_tokens);
                }
                Chunk::Error(message) => return (times, None, Some(format!("error event: {message}"))),
            }
        }
    }
    let n = times.n_output();
    (
        times,
        None,
        Some(format!("the stream ended after {n} tokens without data: [DONE]")),
    )
}

async fn read_error_body(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(bytes)) = response.chunk().await {
        body.extend_from_slice(&bytes);
        if body.len() >= ERROR_BODY_MAX {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// An error and its causes, `: `-separated (reqwest's own message omits the cause, e.g. "connection refused").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The first model the server lists at `GET /v1/models`.
pub async fn first_model(client: &reqwest::Client, base_url: &str, api_key: Option<&str>) -> Result<String> {
    let url = format!("{base_url}/v1/models");
    let mut request = client.get(&url).timeout(Duration::from_secs(30));
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {url}: {}", error_chain(&e)))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| anyhow::anyhow!("GET {url}: {}", error_chain(&e)))?;
    if !status.is_success() {
        bail!(
            "GET {url}: HTTP {status}: {}",
            truncate(&String::from_utf8_lossy(&body), 500)
        );
    }
    let models: serde_json::Value = serde_json::from_slice(&body).with_context(|| format!("GET {url}: not JSON"))?;
    match models["data"][0]["id"].as_str() {
        Some(id) => Ok(id.to_string()),
        None => bail!(
            "GET {url} lists no model ({}); pass --model",
            truncate(&models.to_string(), 300)
        ),
    }
}

/// Raises the soft open-file limit to cover `in_flight_max` sockets, or says why it cannot.
pub fn ensure_fd_limit(in_flight_max: usize) -> Result<()> {
    let needed = in_flight_max as u64 + 64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur >= needed {
        return Ok(());
    }
    if limit.rlim_max < needed {
        bail!(
            "{in_flight_max} requests in flight need about {needed} open files but the hard limit is {}; lower \
             --max-concurrency or raise `ulimit -Hn`",
            limit.rlim_max
        );
    }
    limit.rlim_cur = needed;
    // SAFETY: setrlimit reads one rlimit through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!(
            "raising the open-file limit to {needed}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
