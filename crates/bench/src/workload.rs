//! The workload: when each request is sent and how many tokens it has in and out.
//!
//! A workload is a pure function of its [`WorkloadConfig`]: the same seed gives the same arrival times and lengths.
//! Each random quantity draws from its own ChaCha8 stream of the seed, so changing the rate does not change the
//! lengths, and changing the length spec does not change the arrival times. Arrival gaps are drawn at rate 1 and
//! divided by the rate, so the runs of a rate sweep share one arrival pattern, compressed.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp1, Gamma};
use serde::{Deserialize, Serialize};

use crate::spec::{LENGTH_MAX, LengthSpec};

/// The most requests one run may plan: bounds memory (a plan and a record per request) whatever the rate and duration.
pub const REQUESTS_MAX: usize = 1_000_000;

/// ChaCha8 stream ids, one per random quantity (see the module docs). Prompt contents use streams from
/// [`STREAM_PROMPT_BASE`] on, one per request.
pub(crate) const STREAM_ARRIVALS: u64 = 1;
pub(crate) const STREAM_LENGTHS: u64 = 2;
pub(crate) const STREAM_SHAREGPT_ORDER: u64 = 3;
pub(crate) const STREAM_SHARED_PREFIX: u64 = 4;
pub(crate) const STREAM_PROMPT_BASE: u64 = 1 << 32;

/// One planned request.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestPlan {
    pub idx: usize,
    /// When to send it, in seconds from the start of the run.
    pub at_s: f64,
    pub input_len: u32,
    pub output_len: u32,
    /// The ShareGPT prompt text, sent as is with `--prompt-format text`.
    #[serde(skip)]
    pub text: Option<String>,
}

/// How inter-arrival gaps are distributed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Arrivals {
    /// Exponential gaps.
    Poisson,
    /// Gamma gaps with this shape and mean 1/rate: below 1 burstier than Poisson, above 1 more regular. Shape 1 is
    /// Poisson (and is drawn as Poisson).
    Gamma { shape: f64 },
}

/// How many requests a run sends.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    Requests(usize),
    /// Every arrival before this many seconds.
    DurationS(f64),
}

/// Where lengths (and, for a trace, arrival times) come from.
#[derive(Clone, Debug)]
pub enum Source {
    Synthetic { input: LengthSpec, output: LengthSpec },
    Trace(Vec<TraceEntry>),
    ShareGpt(ShareGpt),
}

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub source: Source,
    pub arrivals: Arrivals,
    /// Requests per second; infinity sends everything at once. Ignored for a trace.
    pub rate: f64,
    pub stop: Stop,
    pub seed: u64,
    /// Replaces the source's output lengths (the ShareGPT reply or the trace's `output_len`).
    pub output_override: Option<LengthSpec>,
}

/// Plans every request of one run.
pub fn generate(config: &WorkloadConfig) -> Result<Vec<RequestPlan>> {
    let times = match &config.source {
        Source::Trace(entries) => trace_times(entries, config.stop),
        _ => arrival_times(config.arrivals, config.rate, config.stop, config.seed)?,
    };
    let mut lengths_rng = stream(config.seed, STREAM_LENGTHS);
    let sharegpt_order = match &config.source {
        Source::ShareGpt(sharegpt) => sharegpt.order(config.seed),
        _ => Vec::new(),
    };
    let mut plans = Vec::with_capacity(times.len());
    for (idx, at_s) in times.into_iter().enumerate() {
        let (input_len, mut output_len, text) = match &config.source {
            Source::Synthetic { input, output } => {
                let input_len = input.sample(&mut lengths_rng);
                (input_len, output.sample(&mut lengths_rng), None)
            }
            Source::Trace(entries) => (entries[idx].input_len, entries[idx].output_len, None),
            Source::ShareGpt(sharegpt) => {
                let turn = &sharegpt.turns[sharegpt_order[idx % sharegpt_order.len()]];
                (turn.input_len, turn.output_len, Some(turn.prompt.clone()))
            }
        };
        if let Some(spec) = &config.output_override {
            output_len = spec.sample(&mut lengths_rng);
        }
        plans.push(RequestPlan {
            idx,
            at_s,
            input_len,
            output_len,
            text,
        });
    }
    Ok(plans)
}

pub(crate) fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Send times in seconds: the first request at 0, then gaps drawn at rate 1 and divided by `rate`.
pub fn arrival_times(arrivals: Arrivals, rate: f64, stop: Stop, seed: u64) -> Result<Vec<f64>> {
    ensure!(rate > 0.0 && !rate.is_nan(), "the rate must be positive, not {rate}");
    let gamma = match arrivals {
        Arrivals::Gamma { shape } if shape != 1.0 => {
            ensure!(
                shape.is_finite() && shape > 0.0,
                "the burstiness (gamma shape) must be positive, not {shape}"
            );
            Some(Gamma::new(shape, 1.0 / shape).context("gamma distribution")?)
        }
        _ => None,
    };
    let mut rng = stream(seed, STREAM_ARRIVALS);
    let mut unit_gap = move || -> f64 {
        match &gamma {
            Some(gamma) => gamma.sample(&mut rng),
            None => Exp1.sample(&mut rng),
        }
    };
    let mut times = Vec::new();
    let mut t_unit = 0.0;
    match stop {
        Stop::Requests(n) => {
            ensure!(
                n <= REQUESTS_MAX,
                "{n} requests is more than the limit of {REQUESTS_MAX}"
            );
            for _ in 0..n {
                times.push(if rate.is_infinite() { 0.0 } else { t_unit / rate });
                t_unit += unit_gap();
            }
        }
        Stop::DurationS(duration_s) => {
            ensure!(
                rate.is_finite(),
                "an infinite rate needs a number of requests, not a duration"
            );
            while t_unit / rate < duration_s {
                ensure!(
                    times.len() < REQUESTS_MAX,
                    "{duration_s} s at {rate} req/s plans more than the limit of {REQUESTS_MAX} requests"
                );
                times.push(t_unit / rate);
                t_unit += unit_gap();
            }
        }
    }
    Ok(times)
}

// ---------------------------------------------------------------------------------------------------------------
// Traces

/// One line of a `--trace` file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceEntry {
    /// Seconds; only differences matter (the earliest entry is sent at 0).
    pub timestamp: f64,
    pub input_len: u32,
    pub output_len: u32,
}

/// Reads a JSON-lines trace, one `{"timestamp": s, "input_len": n, "output_len": n}` per line (blank lines are
/// skipped), sorted by timestamp.
pub fn load_trace(path: &Path) -> Result<Vec<TraceEntry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading trace {}", path.display()))?;
    parse_trace(&text).with_context(|| format!("trace {}", path.display()))
}

pub fn parse_trace(text: &str) -> Result<Vec<TraceEntry>> {
    let mut entries = Vec::new();
    for (line_idx, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = line_idx + 1;
        let entry: TraceEntry = serde_json::from_str(line).with_context(|| format!("line {line_no}"))?;
        ensure!(
            entry.timestamp.is_finite() && entry.timestamp >= 0.0,
            "line {line_no}: timestamp {} is not a finite number of seconds >= 0",
            entry.timestamp
        );
        for (name, len) in [("input_len", entry.input_len), ("output_len", entry.output_len)] {
            ensure!(
                (1..=LENGTH_MAX).contains(&len),
                "line {line_no}: {name} {len} is outside 1..={LENGTH_MAX}"
            );
        }
        ensure!(entries.len() < REQUESTS_MAX, "more than {REQUESTS_MAX} requests");
        entries.push(entry);
    }
    ensure!(!entries.is_empty(), "no requests in the trace");
    entries.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(entries)
}

fn trace_times(entries: &[TraceEntry], stop: Stop) -> Vec<f64> {
    let t0 = entries[0].timestamp;
    let times = entries.iter().map(|e| e.timestamp - t0);
    match stop {
        Stop::Requests(n) => times.take(n).collect(),
        Stop::DurationS(duration_s) => times.take_while(|&t| t < duration_s).collect(),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// ShareGPT

/// How ShareGPT text is measured in tokens.
pub enum TokenCount {
    /// ceil(characters / 4), the usual rule of thumb for English with BPE vocabularies; at least 1.
    Approx,
    /// Exact, with a Hugging Face `tokenizer.json` (no special tokens added).
    Tokenizer(Box<tokenizers::Tokenizer>),
}

impl TokenCount {
    pub fn from_file(path: &Path) -> Result<TokenCount> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("loading tokenizer {}", path.display()))?;
        Ok(TokenCount::Tokenizer(Box::new(tokenizer)))
    }

    pub fn count(&self, text: &str) -> Result<u32> {
        let n = match self {
            TokenCount::Approx => text.chars().count().div_ceil(4),
            TokenCount::Tokenizer(tokenizer) => tokenizer
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .len(),
        };
        Ok(n.clamp(1, LENGTH_MAX as usize) as u32)
    }
}

/// One usable conversation: the first human turn and the reply to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub prompt: String,
    pub input_len: u32,
    pub output_len: u32,
}

/// The usable conversations of a ShareGPT file, in file order.
#[derive(Clone, Debug)]
pub struct ShareGpt {
    pub turns: Vec<Turn>,
    /// Conversations without a human turn followed by a non-empty reply.
    pub n_skipped: usize,
}

#[derive(Deserialize)]
struct Conversation {
    #[serde(default)]
    conversations: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    from: String,
    value: String,
}

impl ShareGpt {
    pub fn load(path: &Path, count: &TokenCount) -> Result<ShareGpt> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading ShareGPT file {}", path.display()))?;
        Self::parse(&text, count).with_context(|| format!("ShareGPT file {}", path.display()))
    }

    /// Parses a ShareGPT JSON array: `[{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}]`.
    pub fn parse(text: &str, count: &TokenCount) -> Result<ShareGpt> {
        let conversations: Vec<Conversation> = serde_json::from_str(text)
            .context("expected a JSON array of {\"conversations\": [{\"from\": ..., \"value\": ...}, ...]}")?;
        let n_total = conversations.len();
        let mut turns = Vec::new();
        for conversation in conversations {
            let messages = &conversation.conversations;
            let Some(human_idx) = messages.iter().position(|m| is_human(&m.from)) else {
                continue;
            };
            let Some(reply) = messages.get(human_idx + 1).filter(|m| !is_human(&m.from)) else {
                continue;
            };
            let prompt = &messages[human_idx].value;
            if prompt.trim().is_empty() || reply.value.trim().is_empty() {
                continue;
            }
            ensure!(
                turns.len() < REQUESTS_MAX,
                "more than {REQUESTS_MAX} usable conversations"
            );
            turns.push(Turn {
                prompt: prompt.clone(),
                input_len: count.count(prompt)?,
                output_len: count.count(&reply.value)?,
            });
        }
        if turns.is_empty() {
            bail!("no usable conversation among {n_total} (each needs a human turn followed by a non-empty reply)");
        }
        let n_skipped = n_total - turns.len();
        Ok(ShareGpt { turns, n_skipped })
    }

    /// The order in which requests take conversations: shuffled by the seed, cycling when a run has more requests
    /// than the file has conversations.
    fn order(&self, seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.turns.len()).collect();
        order.shuffle(&mut stream(seed, STREAM_SHAREGPT_ORDER));
        order
    }
}

fn is_human(from: &str) -> bool {
    matches!(from, "human" | "user")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(input: &str, output: &str, rate: f64, stop: Stop, seed: u64) -> WorkloadConfig {
        WorkloadConfig {
            source: Source::Synthetic {
                input: input.parse().unwrap(),
                output: output.parse().unwrap(),
            },
            arrivals: Arrivals::Poisson,
            rate,
            stop,
            seed,
            output_override: None,
        }
    }

    #[test]
    fn same_seed_same_workload_other_seed_other_workload() {
        let config = synthetic("lognormal:512:1.0", "uniform:1:256", 4.0, Stop::Requests(500), 42);
        let a = generate(&config).unwrap();
        assert_eq!(a, generate(&config).unwrap());
        let b = generate(&WorkloadConfig {
            seed: 43,
            ..config.clone()
        })
        .unwrap();
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().zip(&b).all(|(a, b)| a.at_s != b.at_s || a.idx == 0),
            "arrival times differ"
        );
        assert!(
            a.iter().zip(&b).filter(|(a, b)| a.input_len == b.input_len).count() < 50,
            "input lengths differ"
        );
    }

    #[test]
    fn rate_scales_arrivals_and_keeps_lengths() {
        let slow = generate(&synthetic("lognormal:512:1.0", "64", 1.0, Stop::Requests(100), 1)).unwrap();
        let fast = generate(&synthetic("lognormal:512:1.0", "64", 4.0, Stop::Requests(100), 1)).unwrap();
        for (s, f) in slow.iter().zip(&fast) {
            assert!((s.at_s - 4.0 * f.at_s).abs() < 1e-9);
            assert_eq!((s.input_len, s.output_len), (f.input_len, f.output_len));
        }
        // A duration run plans the same first requests as a count run.
        let timed = generate(&synthetic("lognormal:512:1.0", "64", 1.0, Stop::DurationS(30.0), 1)).unwrap();
        assert!(timed.iter().all(|p| p.at_s < 30.0));
        assert_eq!(timed[..], slow[..timed.len()]);
        assert!(slow[timed.len()].at_s >= 30.0);
    }

    #[test]
    fn poisson_and_gamma_gaps_have_the_right_moments() {
        let n = 200_000;
        for (arrivals, cv2) in [
            (Arrivals::Poisson, 1.0),
            (Arrivals::Gamma { shape: 0.25 }, 4.0),
            (Arrivals::Gamma { shape: 4.0 }, 0.25),
        ] {
            let times = arrival_times(arrivals, 10.0, Stop::Requests(n), 3).unwrap();
            let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            assert!((mean - 0.1).abs() < 0.002, "{arrivals:?}: mean gap {mean}");
            // The squared coefficient of variation of gamma gaps is 1/shape.
            let got_cv2 = var / (mean * mean);
            assert!(
                (got_cv2 / cv2 - 1.0).abs() < 0.05,
                "{arrivals:?}: cv^2 {got_cv2}, want {cv2}"
            );
        }
        // Exponential gaps: the median is ln 2 times the mean.
        let times = arrival_times(Arrivals::Poisson, 1.0, Stop::Requests(n), 4).unwrap();
        let mut gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_by(f64::total_cmp);
        let median = gaps[gaps.len() / 2];
        assert!((median - std::f64::consts::LN_2).abs() < 0.01, "median gap {median}");
    }

    #[test]
    fn infinite_rate_sends_everything_at_once() {
        let times = arrival_times(Arrivals::Poisson, f64::INFINITY, Stop::Requests(5), 0).unwrap();
        assert_eq!(times, vec![0.0; 5]);
        let err = arrival_times(Arrivals::Poisson, f64::INFINITY, Stop::DurationS(5.0), 0).unwrap_err();
        assert!(
            err.to_string().contains("infinite rate needs a number of requests"),
            "{err}"
        );
        let err = arrival_times(Arrivals::Poisson, 0.0, Stop::Requests(5), 0).unwrap_err();
        assert!(err.to_string().contains("rate must be positive"), "{err}");
        let err = arrival_times(Arrivals::Poisson, 1e9, Stop::DurationS(1e9), 0).unwrap_err();
        assert!(err.to_string().contains("more than the limit"), "{err}");
    }

    #[test]
    fn trace_parses_sorts_and_limits() {
        let text = "{\"timestamp\": 12.5, \"input_len\": 100, \"output_len\": 10}\n\n\
                    {\"timestamp\": 10.0, \"input_len\": 9000, \"output_len\": 20}\n\
                    {\"timestamp\": 11, \"input_len\": 5, \"output_len\": 1}\n";
        let entries = parse_trace(text).unwrap();
        let config = WorkloadConfig {
            source: Source::Trace(entries),
            arrivals: Arrivals::Poisson,
            rate: 1.0,
            stop: Stop::Requests(usize::MAX),
            seed: 0,
            output_override: None,
        };
        let plans = generate(&config).unwrap();
        let got: Vec<_> = plans.iter().map(|p| (p.at_s, p.input_len, p.output_len)).collect();
        assert_eq!(got, vec![(0.0, 9000, 20), (1.0, 5, 1), (2.5, 100, 10)]);
        let plans = generate(&WorkloadConfig {
            stop: Stop::DurationS(2.0),
            ..config.clone()
        })
        .unwrap();
        assert_eq!(plans.len(), 2);
        let plans = generate(&WorkloadConfig {
            output_override: Some("7".parse().unwrap()),
            ..config
        })
        .unwrap();
        assert!(plans.iter().all(|p| p.output_len == 7));
    }

    #[test]
    fn malformed_traces_name_the_line() {
        let cases = [
            ("", "no requests"),
            ("{\"timestamp\": 1, \"input_len\": 5}", "line 1"),
            (
                "{\"timestamp\": 1, \"input_len\": 5, \"output_len\": 1}\nnot json",
                "line 2",
            ),
            (
                "{\"timestamp\": -1, \"input_len\": 5, \"output_len\": 1}",
                "timestamp -1",
            ),
            (
                "{\"timestamp\": 1, \"input_len\": 0, \"output_len\": 1}",
                "input_len 0 is outside",
            ),
            ("{\"timestamp\": 1, \"input_len\": -4, \"output_len\": 1}", "line 1"),
            (
                "{\"timestamp\": 1, \"input_len\": 4, \"output_len\": 1, \"x\": 2}",
                "unknown field `x`",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", parse_trace(text).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
    }

    const SHAREGPT: &str = r#"[
        {"id": "a", "conversations": [{"from": "human", "value": "Hello there, how are you?"},
                                      {"from": "gpt", "value": "Fine."}, {"from": "human", "value": "ignored"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no human"}]},
        {"id": "c", "conversations": [{"from": "system", "value": "be nice"}, {"from": "user", "value": "0123456789"},
                                      {"from": "assistant", "value": "abcdefgh"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "unanswered"}]},
        {"id": "e", "conversations": [{"from": "human", "value": "two humans"}, {"from": "human", "value": "x"}]},
        {"id": "f"},
        {"id": "g", "conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "empty prompt"}]}
    ]"#;

    #[test]
    fn sharegpt_takes_the_first_human_turn_and_its_reply() {
        let sharegpt = ShareGpt::parse(SHAREGPT, &TokenCount::Approx).unwrap();
        assert_eq!(sharegpt.n_skipped, 5);
        let want = vec![
            Turn {
                prompt: "Hello there, how are you?".into(),
                input_len: 7,
                output_len: 2,
            },
            Turn {
                prompt: "0123456789".into(),
                input_len: 3,
                output_len: 2,
            },
        ];
        assert_eq!(sharegpt.turns, want);
        let config = WorkloadConfig {
            source: Source::ShareGpt(sharegpt),
            arrivals: Arrivals::Poisson,
            rate: 1.0,
            stop: Stop::Requests(6),
            seed: 9,
            output_override: None,
        };
        let plans = generate(&config).unwrap();
        // Six requests cycle through the two conversations in a seeded order.
        for pair in plans.chunks(2) {
            assert_ne!(pair[0].text, pair[1].text);
            assert_eq!(pair[0].text, plans[0].text);
        }
        assert_eq!(plans, generate(&config).unwrap());
        let text = plans[0].text.clone().unwrap();
        let turn = want.iter().find(|t| t.prompt == text).unwrap();
        assert_eq!(
            (plans[0].input_len, plans[0].output_len),
            (turn.input_len, turn.output_len)
        );
    }

    #[test]
    fn a_tokenizer_file_counts_exactly() {
        let path = std::env::temp_dir().join(format!("cleave-bench-tokenizer-{}.json", std::process::id()));
        let tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2}, "unk_token": "[UNK]"}}"#;
        std::fs::write(&path, tokenizer).unwrap();
        let count = TokenCount::from_file(&path).unwrap();
        // "hello", "world", "," (unknown), "hello"; the approximation would say ceil(18 / 4) = 5.
        assert_eq!(count.count("hello world, hello").unwrap(), 4);
        assert_eq!(TokenCount::Approx.count("hello world, hello").unwrap(), 5);
        assert_eq!(count.count("").unwrap(), 1, "at least one token");
        std::fs::write(&path, "{}").unwrap();
        let err = format!("{:#}", TokenCount::from_file(&path).err().unwrap());
        assert!(err.contains("loading tokenizer"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn malformed_sharegpt_is_a_clear_error() {
        let cases = [
            ("{}", "expected a JSON array"),
            (
                "[{\"conversations\": [{\"from\": \"human\"}]}]",
                "missing field `value`",
            ),
            (
                "[{\"conversations\": [{\"from\": \"gpt\", \"value\": \"x\"}]}]",
                "no usable conversation among 1",
            ),
            ("[", "expected a JSON array"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", ShareGpt::parse(text, &TokenCount::Approx).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
    }
}
