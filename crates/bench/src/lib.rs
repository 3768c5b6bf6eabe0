//! `cleave bench`: an open-loop load generator for any OpenAI-compatible endpoint.
//!
//! A run goes: [`workload::generate`] plans every request (send time, input and output length) from a seed;
//! [`prompt::BodyBuilder`] turns each plan into a request body (token-id or text prompt, output length pinned with
//! `max_tokens = min_tokens` and `ignore_eos`); [`runner::run`] sends each at its time, whatever the server does, and
//! times the stream ([`sse`] parses it and counts tokens); [`stats::Summary`] gives percentiles, throughput and
//! goodput; [`report`] prints tables and writes JSON, [`plot`] writes SVG plots. With `--compare`, [`serve::Server`]
//! starts a `cleave serve` per deployment spec and the same workload runs against each.
//!
//! ```text
//! cleave bench --url http://127.0.0.1:8000 --rates 1,2,4 --num-requests 500 \
//!     --input-len 'mix:0.9*lognormal:512:1.0,0.1*uniform:8192:32768' --output-len 256 \
//!     --slo-ttft-ms 2000 --slo-itl-ms 100 --output-json out.json --plot-dir plots
//! ```
//!
//! The length grammar is in [`spec`]; the measurement rules (token counting, ITL of multi-token chunks, TPOT, SLOs,
//! goodput) in [`sse::TokenTimes`] and [`stats`].

pub mod plot;
pub mod prompt;
pub mod report;
pub mod runner;
pub mod serve;
pub mod spec;
pub mod sse;
pub mod stats;
pub mod workload;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::prompt::{BodyBuilder, BodyConfig, Endpoint, PromptFormat, VOCAB_SIZE_MIN};
use crate::report::{Deployment, Report, Run, SweepGoodput};
use crate::runner::{IN_FLIGHT_DEFAULT_MAX, RequestRecord, Target};
use crate::spec::LengthSpec;
use crate::stats::{Slo, Summary};
use crate::workload::{Arrivals, RequestPlan, ShareGpt, Source, Stop, TokenCount, WorkloadConfig};

/// Requests per run when neither `--num-requests` nor `--duration-s` is given.
pub const NUM_REQUESTS_DEFAULT: usize = 200;
/// The index of the probe request sent before a run: far past any run's, so its prompt shares nothing with theirs.
const PROBE_IDX: usize = prompt::REQUEST_IDX_MAX as usize;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Base URL of the OpenAI-compatible server (not used with --compare).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// The API to call.
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// Model name for the requests [default: the first model the server lists at /v1/models].
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer token for the Authorization header [default: $OPENAI_API_KEY if set].
    #[arg(long)]
    pub api_key: Option<String>,

    /// Requests per second ("inf": all at once).
    #[arg(long, value_name = "REQ_PER_S", conflicts_with = "rates", help_heading = "Workload")]
    pub rate: Option<f64>,
    /// A sweep: one run per rate, the same seeded workload each time, e.g. 1,2,4,8.
    #[arg(long, value_name = "R1,R2,...", value_delimiter = ',', help_heading = "Workload")]
    pub rates: Vec<f64>,
    /// Gamma shape of the inter-arrival gaps: 1 is Poisson, below 1 burstier, above 1 more regular.
    #[arg(long, value_name = "SHAPE", default_value_t = 1.0, help_heading = "Workload")]
    pub burstiness: f64,
    /// Requests per run [default: 200 unless --duration-s].
    #[arg(long, conflicts_with = "duration_s", help_heading = "Workload")]
    pub num_requests: Option<usize>,
    /// Send every arrival planned within this many seconds instead of a fixed number.
    #[arg(long, help_heading = "Workload")]
    pub duration_s: Option<f64>,
    /// Prompt lengths in tokens: N, fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MIN:MAX] or
    /// mix:W*SPEC,W*SPEC,... (weights sum to 1) [default: fixed:512].
    #[arg(long, value_name = "SPEC", help_heading = "Workload")]
    pub input_len: Option<LengthSpec>,
    /// Output lengths in tokens, same grammar; overrides a trace's or ShareGPT's [default: fixed:128].
    #[arg(long, value_name = "SPEC", help_heading = "Workload")]
    pub output_len: Option<LengthSpec>,
    /// JSON-lines trace, one {"timestamp": s, "input_len": n, "output_len": n} per line: arrival times and lengths.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["sharegpt", "input_len", "rate", "rates", "burstiness"], help_heading = "Workload")]
    pub trace: Option<PathBuf>,
    /// ShareGPT JSON: lengths from each conversation's first human turn and its reply, in a seeded order.
    #[arg(long, value_name = "FILE", conflicts_with = "input_len", help_heading = "Workload")]
    pub sharegpt: Option<PathBuf>,
    /// tokenizer.json to count ShareGPT tokens exactly [default: ceil(characters / 4)].
    #[arg(long, value_name = "FILE", requires = "sharegpt", help_heading = "Workload")]
    pub tokenizer: Option<PathBuf>,
    /// Seed of everything random: arrival times, lengths, prompt contents.
    #[arg(long, default_value_t = 0, help_heading = "Workload")]
    pub seed: u64,

    /// Prompt as token ids or text [default: tokens for completions, text for chat].
    #[arg(long, value_enum, help_heading = "Prompts")]
    pub prompt_format: Option<PromptFormat>,
    /// Token ids are drawn from min(1000, N/4)..N; 32000 suits Llama 2/3, Mistral and Qwen, 256 cleave's byte presets.
    #[arg(long, default_value_t = 32000, help_heading = "Prompts")]
    pub vocab_size: u32,
    /// Tokens at the start of every prompt that are the same for all requests (prefix-cache hits).
    #[arg(long, default_value_t = 0, help_heading = "Prompts")]
    pub shared_prefix_len: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0, help_heading = "Prompts")]
    pub temperature: f64,
    /// A JSON object merged into every request body last, e.g. '{"top_p": 0.9}'.
    #[arg(long, help_heading = "Prompts")]
    pub extra_body: Option<String>,

    /// Requests in flight at most; one due while it is reached waits (and the report says so) [default: 2048].
    #[arg(long, help_heading = "Sending")]
    pub max_concurrency: Option<usize>,
    /// A request not finished after this many seconds is recorded as failed.
    #[arg(long, default_value_t = 600.0, help_heading = "Sending")]
    pub request_timeout_s: f64,

    /// GPUs behind the endpoint, for tokens/s per GPU; with --compare, one value or one per spec.
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "1",
        help_heading = "Report"
    )]
    pub gpus: Vec<u32>,
    /// SLO on time to first token, ms.
    #[arg(long, help_heading = "Report")]
    pub slo_ttft_ms: Option<f64>,
    /// The TTFT SLO applies only to prompts of at most this many tokens.
    #[arg(long, help_heading = "Report", requires = "slo_ttft_ms")]
    pub slo_ttft_max_input_tokens: Option<u32>,
    /// SLO on each request's own p99 inter-token gap, ms (another quantile with --slo-itl-quantile).
    #[arg(long, help_heading = "Report")]
    pub slo_itl_ms: Option<f64>,
    /// The quantile of each request's inter-token gaps that --slo-itl-ms bounds, in percent; 100 bounds the longest
    /// gap (no stall allowed).
    #[arg(long, value_name = "PERCENT", default_value_t = 99.0, help_heading = "Report")]
    pub slo_itl_quantile: f64,
    /// SLO on time per output token, (e2e - ttft) / (output tokens - 1), ms.
    #[arg(long, help_heading = "Report")]
    pub slo_tpot_ms: Option<f64>,
    /// For a sweep, the goodput is the highest rate where at least this % of requests met every SLO.
    #[arg(long, value_name = "PERCENT", default_value_t = 90.0, help_heading = "Report")]
    pub attainment: f64,
    /// Prompts longer than this are marked on the ITL-over-time plot.
    #[arg(long, default_value_t = 8192, help_heading = "Report")]
    pub long_prompt_tokens: u32,
    /// Write the configuration, every request's record and the summaries here.
    #[arg(long, value_name = "FILE", help_heading = "Report")]
    pub output_json: Option<PathBuf>,
    /// Send nothing: summarise the runs of an earlier --output-json again under this command's SLO flags and
    /// --attainment (tables, goodput; --output-json writes the rescored report).
    #[arg(long, value_name = "FILE", help_heading = "Report")]
    pub rescore: Option<PathBuf>,
    /// Write SVG plots here.
    #[arg(long, value_name = "DIR", help_heading = "Report")]
    pub plot_dir: Option<PathBuf>,

    /// Deployment specs: for each, start `cleave serve --config SPEC --port PORT`, wait for /health, run the same
    /// workload, stop it with SIGTERM; then compare.
    #[arg(long, value_name = "SPEC.yaml", num_args = 1.., help_heading = "Compare")]
    pub compare: Vec<PathBuf>,
    /// How long a `cleave serve` may take to answer /health with 200.
    #[arg(long, default_value_t = 600.0, help_heading = "Compare")]
    pub serve_timeout_s: f64,
    /// Write each deployment's whole output (the server's and its workers' logs) to DIR/SPEC-NAME.log. Without it,
    /// the last lines are printed when requests failed.
    #[arg(long, value_name = "DIR", help_heading = "Compare")]
    pub serve_log_dir: Option<PathBuf>,
}

/// Validated arguments.
struct Plan {
    workload: WorkloadConfig,
    rates: Vec<Option<f64>>,
    body: BodyConfig,
    endpoint: Endpoint,
    api_key: Option<String>,
    model: Option<String>,
    in_flight_max: usize,
    request_timeout: Duration,
    slo: Slo,
    attainment_min: f64,
    config_json: serde_json::Value,
}

impl Plan {
    fn new(args: &BenchArgs) -> Result<Plan> {
        let rates: Vec<Option<f64>> = match (&args.trace, args.rate, args.rates.as_slice()) {
            (Some(_), _, _) => vec![None],
            (None, Some(rate), _) => vec![Some(rate)],
            (None, None, []) => vec![Some(1.0)],
            (None, None, rates) => rates.iter().map(|&r| Some(r)).collect(),
        };
        for rate in rates.iter().flatten() {
            ensure!(*rate > 0.0, "rates must be positive (or inf), not {rate}");
        }
        ensure!(
            args.burstiness.is_finite() && args.burstiness > 0.0,
            "--burstiness must be positive"
        );
        let stop = match (args.num_requests, args.duration_s) {
            (Some(n), _) => {
                ensure!(n > 0, "--num-requests must be at least 1");
                Stop::Requests(n)
            }
            (None, Some(s)) => {
                ensure!(s.is_finite() && s > 0.0, "--duration-s must be positive");
                Stop::DurationS(s)
            }
            (None, None) if args.trace.is_some() => Stop::Requests(usize::MAX),
            (None, None) => Stop::Requests(NUM_REQUESTS_DEFAULT),
        };
        let (source, source_json) = if let Some(path) = &args.trace {
            let entries = workload::load_trace(path)?;
            (Source::Trace(entries), json!({"kind": "trace", "path": path}))
        } else if let Some(path) = &args.sharegpt {
            let (count, counted) = match &args.tokenizer {
                Some(tokenizer) => (
                    TokenCount::from_file(tokenizer)?,
                    format!("tokenizer {}", tokenizer.display()),
                ),
                None => (TokenCount::Approx, "ceil(characters / 4)".to_string()),
            };
            let sharegpt = ShareGpt::load(path, &count)?;
            let source_json = json!({"kind": "sharegpt", "path": path, "tokens_counted_by": counted,
                "conversations_used": sharegpt.turns.len(), "conversations_skipped": sharegpt.n_skipped});
            (Source::ShareGpt(sharegpt), source_json)
        } else {
            let input = args
                .input_len
                .clone()
                .unwrap_or(LengthSpec::Dist(spec::Dist::Fixed(512)));
            let output = args
                .output_len
                .clone()
                .unwrap_or(LengthSpec::Dist(spec::Dist::Fixed(128)));
            let source_json = json!({"kind": "synthetic", "input_len": input.to_string(),
                "output_len": output.to_string()});
            (Source::Synthetic { input, output }, source_json)
        };
        let output_override = match source {
            Source::Synthetic { .. } => None,
            _ => args.output_len.clone(),
        };
        let arrivals = if args.burstiness == 1.0 {
            Arrivals::Poisson
        } else {
            Arrivals::Gamma { shape: args.burstiness }
        };
        let workload = WorkloadConfig {
            source,
            arrivals,
            rate: 1.0,
            stop,
            seed: args.seed,
            output_override,
        };

        let format = match (args.endpoint, args.prompt_format) {
            (Endpoint::Chat, Some(PromptFormat::Tokens)) => {
                bail!("--endpoint chat sends text; --prompt-format tokens needs --endpoint completions")
            }
            (Endpoint::Chat, _) => PromptFormat::Text,
            (Endpoint::Completions, format) => format.unwrap_or(PromptFormat::Tokens),
        };
        ensure!(
            args.vocab_size >= VOCAB_SIZE_MIN,
            "--vocab-size {} is below the minimum of {VOCAB_SIZE_MIN}",
            args.vocab_size
        );
        let extra = match &args.extra_body {
            None => Default::default(),
            Some(text) => match serde_json::from_str(text).context("--extra-body")? {
                serde_json::Value::Object(fields) => fields,
                other => bail!("--extra-body must be a JSON object, not {other}"),
            },
        };
        let body = BodyConfig {
            endpoint: args.endpoint,
            format,
            model: String::new(),
            vocab_size: args.vocab_size,
            shared_prefix_len: args.shared_prefix_len,
            temperature: args.temperature,
            seed: args.seed,
            run: 0,
            extra,
        };

        let in_flight_max = args.max_concurrency.unwrap_or(IN_FLIGHT_DEFAULT_MAX);
        ensure!(in_flight_max > 0, "--max-concurrency must be at least 1");
        ensure!(
            args.request_timeout_s.is_finite() && args.request_timeout_s > 0.0,
            "--request-timeout-s must be positive"
        );
        ensure!(args.gpus.iter().all(|&g| g > 0), "--gpus must be at least 1");
        let n_targets = args.compare.len().max(1);
        ensure!(
            args.gpus.len() == 1 || args.gpus.len() == n_targets,
            "--gpus takes one value, or one per --compare spec ({n_targets}), not {}",
            args.gpus.len()
        );
        for spec in &args.compare {
            ensure!(spec.is_file(), "--compare: no such file {}", spec.display());
        }
        let slo = slo_of(args)?;
        let api_key = args.api_key.clone().or_else(|| std::env::var("OPENAI_API_KEY").ok());

        let config_json = json!({
            "url": if args.compare.is_empty() { Some(&args.url) } else { None },
            "compare": args.compare,
            "endpoint": args.endpoint,
            "model": args.model,
            "seed": args.seed,
            "workload": {
                "source": source_json,
                "arrivals": workload.arrivals,
                "rates": rates.iter().map(|r| r.map(|r| if r.is_infinite() { json!("inf") } else { json!(r) })).collect::<Vec<_>>(),
                "stop": match stop { Stop::Requests(usize::MAX) => json!("whole trace"), stop => json!(stop) },
                "output_len_override": workload.output_override.as_ref().map(ToString::to_string),
            },
            "prompt": &body,
            "in_flight_max": in_flight_max,
            "max_concurrency": args.max_concurrency,
            "request_timeout_s": args.request_timeout_s,
            "gpus": args.gpus,
            "slo": slo,
            "attainment_min": args.attainment / 100.0,
            "long_prompt_tokens": args.long_prompt_tokens,
        });
        Ok(Plan {
            workload,
            rates,
            body,
            endpoint: args.endpoint,
            api_key,
            model: args.model.clone(),
            in_flight_max,
            request_timeout: Duration::from_secs_f64(args.request_timeout_s),
            slo,
            attainment_min: args.attainment / 100.0,
            config_json,
        })
    }
}

/// The objectives the SLO flags give, checked.
fn slo_of(args: &BenchArgs) -> Result<Slo> {
    ensure!(
        (0.0..=100.0).contains(&args.attainment),
        "--attainment is a percentage, 0 to 100"
    );
    ensure!(
        (0.0..=100.0).contains(&args.slo_itl_quantile),
        "--slo-itl-quantile is a percentage, 0 to 100"
    );
    Ok(Slo {
        ttft_ms: args.slo_ttft_ms,
        ttft_input_tokens_max: args.slo_ttft_max_input_tokens,
        itl_p99_ms: args.slo_itl_ms,
        itl_quantile: Some(args.slo_itl_quantile),
        tpot_ms: args.slo_tpot_ms,
    })
}

/// For each target of a rate sweep with SLOs: the highest rate whose attainment reached `attainment_min`.
fn sweep_goodput(runs: &[Run], slo: &Slo, n_rates: usize, attainment_min: f64) -> Vec<SweepGoodput> {
    if n_rates < 2 || !slo.is_set() {
        return Vec::new();
    }
    let mut targets: Vec<&str> = runs.iter().map(|r| r.target.as_str()).collect();
    targets.dedup();
    targets
        .into_iter()
        .map(|target| {
            let points: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.target == target)
                .filter_map(|r| Some((r.rate?, r.summary.slo.as_ref()?.attainment)))
                .collect();
            SweepGoodput {
                target: target.to_string(),
                attainment_min,
                goodput_rate: stats::goodput_rate(&points, attainment_min),
            }
        })
        .collect()
}

/// The comparison table and each target's sweep goodput, on stdout.
fn print_comparison(runs: &[Run], sweep: &[SweepGoodput], slo: &Slo) {
    if runs.len() > 1 {
        println!("{}", report::comparison_table(runs));
    }
    for goodput in sweep {
        let rate = goodput
            .goodput_rate
            .map_or("none of the rates".to_string(), |r| format!("{r} req/s"));
        println!(
            "goodput of {}: {rate} (highest rate with SLO attainment >= {}%; {})",
            goodput.target,
            goodput.attainment_min * 100.0,
            report::slo_text(slo)
        );
    }
}

/// `--rescore FILE`: the runs of an earlier report summarised again under this command's SLOs; nothing is sent.
fn rescore(args: &BenchArgs, path: &std::path::Path) -> Result<()> {
    let slo = slo_of(args)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let saved: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    ensure!(
        saved["schema"] == report::SCHEMA,
        "{} is not a cleave bench report (schema {}, expected {})",
        path.display(),
        saved["schema"],
        report::SCHEMA
    );
    let runs = saved["runs"]
        .as_array()
        .with_context(|| format!("{} has no runs", path.display()))?
        .iter()
        .enumerate()
        .map(|(i, run)| -> Result<Run> {
            let field = |name: &str| format!("{}: run {i} has no valid {name}", path.display());
            let requests: Vec<RequestRecord> =
                serde_json::from_value(run["requests"].clone()).with_context(|| field("requests"))?;
            let duration_s = run["summary"]["duration_s"]
                .as_f64()
                .with_context(|| field("duration"))?;
            let gpus = run["summary"]["gpus"].as_u64().with_context(|| field("GPU count"))? as u32;
            let rate = match &run["rate"] {
                serde_json::Value::String(s) if s == "inf" => Some(f64::INFINITY),
                rate => rate.as_f64(),
            };
            Ok(Run {
                target: run["target"].as_str().with_context(|| field("target"))?.to_string(),
                model: run["model"].as_str().unwrap_or_default().to_string(),
                rate,
                summary: Summary::new(&requests, duration_s, gpus, slo),
                requests,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let n_rates = runs
        .iter()
        .map(|r| r.rate.map(f64::to_bits))
        .collect::<std::collections::HashSet<_>>()
        .len();
    let sweep = sweep_goodput(&runs, &slo, n_rates, args.attainment / 100.0);
    for run in &runs {
        println!("{}", report::run_table(run));
    }
    print_comparison(&runs, &sweep, &slo);
    if let Some(out) = &args.output_json {
        let mut config = saved["config"].clone();
        config["slo"] = json!(slo);
        config["attainment_min"] = json!(args.attainment / 100.0);
        let rescored = json!({
            "schema": report::SCHEMA,
            "cleave_version": env!("CARGO_PKG_VERSION"),
            "rescored_from": path,
            "started_unix_s": saved["started_unix_s"],
            "command_line": std::env::args().collect::<Vec<_>>(),
            "config": config,
            "runs": runs,
            "sweep_goodput": sweep,
            "deployments": saved["deployments"],
        });
        std::fs::write(out, serde_json::to_vec(&rescored)?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(path) = &args.rescore {
        return rescore(&args, path);
    }
    let plan = Plan::new(&args)?;
    runner::ensure_fd_limit(plan.in_flight_max)?;
    let started_unix_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let (runs, deployments) = runtime.block_on(execute(&args, &plan))?;

    let sweep = sweep_goodput(&runs, &plan.slo, plan.rates.len(), plan.attainment_min);
    print_comparison(&runs, &sweep, &plan.slo);
    if let Some(dir) = &args.plot_dir {
        let files = plot::write_all(dir, &runs, args.long_prompt_tokens, plan.rates.len() > 1)?;
        eprintln!("wrote {} plots to {}", files.len(), dir.display());
    }
    if let Some(path) = &args.output_json {
        let report = Report {
            schema: report::SCHEMA,
            cleave_version: env!("CARGO_PKG_VERSION"),
            started_unix_s,
            command_line: std::env::args().collect(),
            config: plan.config_json.clone(),
            runs,
            sweep_goodput: sweep,
            deployments,
        };
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), &report)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

async fn execute(args: &BenchArgs, plan: &Plan) -> Result<(Vec<Run>, Vec<Deployment>)> {
    let client = runner::client(plan.in_flight_max)?;
    let mut runs = Vec::new();
    let mut deployments = Vec::new();
    if args.compare.is_empty() {
        let base_url = args.url.trim_end_matches('/').to_string();
        runs.extend(run_target(&client, plan, &base_url, &args.url, args.gpus[0]).await?);
        return Ok((runs, deployments));
    }
    for (spec_idx, spec) in args.compare.iter().enumerate() {
        let port = serve::free_port()?;
        eprintln!("starting cleave serve --config {} --port {port}", spec.display());
        let log = match &args.serve_log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let name = spec.file_stem().unwrap_or(spec.as_os_str()).to_string_lossy();
                Some(dir.join(format!("{spec_idx}-{name}.log")))
            }
            None => None,
        };
        let mut server = serve::Server::start_cleave_serve(spec, port, log.as_deref())?;
        let healthy = server
            .wait_healthy(&client, Duration::from_secs_f64(args.serve_timeout_s))
            .await?;
        let gpus = args.gpus.get(spec_idx).copied().unwrap_or(args.gpus[0]);
        let target = spec.display().to_string();
        let target_runs = run_target(&client, plan, &format!("http://127.0.0.1:{port}"), &target, gpus).await?;
        if target_runs.iter().any(|r| r.summary.n_failed > 0) {
            eprintln!("{target}: requests failed{}", server.tail());
        }
        runs.extend(target_runs);
        let exit = server.stop().await?;
        eprintln!("{target}: {exit}");
        deployments.push(Deployment {
            spec: target,
            port,
            seconds_to_healthy: healthy.as_secs_f64(),
            exit,
        });
    }
    Ok((runs, deployments))
}

/// Every rate of the plan against one server; prints each run's table as it finishes.
async fn run_target(
    client: &reqwest::Client,
    plan: &Plan,
    base_url: &str,
    target_name: &str,
    gpus: u32,
) -> Result<Vec<Run>> {
    let model = match &plan.model {
        Some(model) => model.clone(),
        None => runner::first_model(client, base_url, plan.api_key.as_deref()).await?,
    };
    let bodies_for = |run: usize| {
        BodyBuilder::new(BodyConfig {
            model: model.clone(),
            run: run as u64,
            ..plan.body.clone()
        })
    };
    let probe_bodies = bodies_for(0);
    let target = Target {
        base_url: base_url.to_string(),
        endpoint: plan.endpoint,
        api_key: plan.api_key.clone(),
        request_timeout: plan.request_timeout,
    };
    probe(client, &target, &probe_bodies)
        .await
        .with_context(|| format!("{target_name}: the probe request failed"))?;
    let mut runs = Vec::new();
    for (run_idx, &rate) in plan.rates.iter().enumerate() {
        let bodies = bodies_for(run_idx);
        let workload = WorkloadConfig {
            rate: rate.unwrap_or(1.0),
            ..plan.workload.clone()
        };
        let plans = workload::generate(&workload)?;
        let progress = progress_bar(plans.len(), &format!("{target_name} @ {}", report::rate_label(rate)));
        let output = runner::run(client, &target, &plans, &bodies, plan.in_flight_max, &progress).await;
        progress.finish_and_clear();
        let summary = Summary::new(&output.records, output.duration_s, gpus, plan.slo);
        let run = Run {
            target: target_name.to_string(),
            model: model.clone(),
            rate,
            summary,
            requests: output.records,
        };
        println!("{}", report::run_table(&run));
        runs.push(run);
    }
    Ok(runs)
}

/// One small request before the run, so a wrong URL, model or API fails at once with the server's message.
async fn probe(client: &reqwest::Client, target: &Target, bodies: &BodyBuilder) -> Result<()> {
    let plan = RequestPlan {
        idx: PROBE_IDX,
        at_s: 0.0,
        input_len: 8,
        output_len: 4,
        text: None,
    };
    let output = runner::run(client, target, &[plan], bodies, 1, &ProgressBar::hidden()).await;
    match &output.records[0].error {
        None => Ok(()),
        Some(error) => bail!("{error}"),
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
fn progress_bar(len: usize, label: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} requests done")
        .expect("a valid template");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn plan(args: &[&str]) -> Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))?;
        Plan::new(&cli.bench)
    }

    #[test]
    fn bad_arguments_are_refused_with_the_reason() {
        let cases: [(&[&str], &str); 11] = [
            (&["--rate", "0"], "rates must be positive"),
            (&["--rates", "1,nan"], "rates must be positive"),
            (&["--num-requests", "0"], "at least 1"),
            (&["--input-len", "uniform:5"], "bad length spec \"uniform:5\""),
            (
                &["--endpoint", "chat", "--prompt-format", "tokens"],
                "--endpoint chat sends text",
            ),
            (&["--vocab-size", "100"], "below the minimum of 256"),
            (&["--extra-body", "[1]"], "must be a JSON object"),
            (&["--gpus", "1,2"], "one per --compare spec (1), not 2"),
            (&["--attainment", "150"], "a percentage"),
            (&["--trace", "t.jsonl", "--rate", "2"], "cannot be used with"),
            (&["--compare", "/nonexistent.yaml"], "no such file /nonexistent.yaml"),
        ];
        for (args, want) in cases {
            let err = format!("{:#}", plan(args).err().unwrap());
            assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn defaults_make_a_poisson_run_of_fixed_lengths() {
        let plan = plan(&[]).unwrap();
        assert_eq!(plan.rates, vec![Some(1.0)]);
        assert_eq!(plan.workload.stop, Stop::Requests(NUM_REQUESTS_DEFAULT));
        assert_eq!(plan.workload.arrivals, Arrivals::Poisson);
        assert_eq!(
            (plan.body.format, plan.in_flight_max),
            (PromptFormat::Tokens, IN_FLIGHT_DEFAULT_MAX)
        );
        assert_eq!(plan.config_json["workload"]["source"]["input_len"], "fixed:512");
        let plan = super::tests::plan(&["--rates", "1,inf", "--burstiness", "0.5", "--endpoint", "chat"]).unwrap();
        assert_eq!(plan.rates, vec![Some(1.0), Some(f64::INFINITY)]);
        assert_eq!(plan.workload.arrivals, Arrivals::Gamma { shape: 0.5 });
        assert_eq!(plan.body.format, PromptFormat::Text);
        assert_eq!(plan.config_json["workload"]["rates"], json!([1.0, "inf"]));
    }
}
