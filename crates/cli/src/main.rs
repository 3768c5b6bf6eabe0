//! `cleave`: the one binary. Subcommands are thin glue over the library crates.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use cleave_engine::backend::cpu::CpuBackend;
use cleave_engine::config::DType;
use cleave_engine::engine::{Engine, EngineConfig, RequestParams};
use cleave_engine::presets::{ResolvedModel, resolve_model};
use cleave_engine::sampler::SamplingParams;
use cleave_engine::scheduler::SchedulerPolicy;

#[derive(Parser)]
#[command(
    name = "cleave",
    version,
    about = "Disaggregated LLM serving: prefill and decode on separate workers."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt.
    Generate(GenerateArgs),
    /// Measure the engine alone: prefill and decode tokens/s (no server, no network).
    BenchEngine(BenchEngineArgs),
    /// Print a model's shape, parameter count and memory figures.
    Info {
        /// A Hugging Face model directory or a preset (tiny, small, llama3-8b, llama3-70b, qwen2.5-7b).
        model: String,
    },
}

#[derive(Args)]
struct EngineArgs {
    /// A Hugging Face model directory or a preset (tiny, small, llama3-8b, llama3-70b, qwen2.5-7b).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Memory for the KV cache, in MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_mib: usize,
    /// Scheduler policy: prefill-first or chunked.
    #[arg(long, default_value = "chunked")]
    scheduler: String,
    /// Token budget per step: the chunk size (chunked) or the prefill batch limit (prefill-first).
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// Disable prefix caching.
    #[arg(long)]
    no_prefix_caching: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Prompt text (tokenized with the model's tokenizer, BOS added).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, sent as they are.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (token_ids, text, finish_reason, timings) instead of the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchEngineArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Sequences decoding together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Decode steps measured (after the prefill, which is not counted).
    #[arg(long, default_value_t = 64)]
    decode_steps: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CLEAVE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::BenchEngine(args) => bench_engine(args),
        Command::Info { model } => info(&model),
    }
}

fn engine_config(args: &EngineArgs) -> Result<EngineConfig> {
    Ok(EngineConfig {
        block_size: args.block_size,
        kv_cache_bytes: args
            .kv_cache_mib
            .checked_mul(1 << 20)
            .context("--kv-cache-mib is too large")?,
        policy: SchedulerPolicy::parse(&args.scheduler, args.step_tokens).map_err(anyhow::Error::msg)?,
        prefix_caching: !args.no_prefix_caching,
        ..EngineConfig::default()
    })
}

fn generate(args: GenerateArgs) -> Result<()> {
    let resolved =
        resolve_model(&args.engine.model).with_context(|| format!("loading model {:?}", args.engine.model))?;
    let load_start = Instant::now();
    let mut engine = Engine::new(CpuBackend, resolved, engine_config(&args.engine)?)?;
    let load_s = load_start.elapsed().as_secs_f64();
    let prompt_ids = match (&args.prompt, args.prompt_ids) {
        (Some(text), None) => engine.tokenizer().encode(text)?,
        (None, Some(ids)) => ids,
        _ => bail!("give exactly one of --prompt and --prompt-ids"),
    };
    let params = RequestParams {
        max_tokens: args.max_tokens,
        min_tokens: args.min_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop_token_ids: Vec::new(),
        stop: args.stop,
        ignore_eos: args.ignore_eos,
    };
    let n_prompt = prompt_ids.len();
    let start = Instant::now();
    let completion = engine.generate(vec![(prompt_ids, params)])?.remove(0);
    let elapsed_s = start.elapsed().as_secs_f64();
    if args.json {
        let out = serde_json::json!({
            "model": engine.model_name(),
            "backend": engine.backend_name(),
            "prompt_tokens": n_prompt,
            "token_ids": completion.token_ids,
            "text": completion.text,
            "finish_reason": completion.finish,
            "load_s": load_s,
            "generate_s": elapsed_s,
        });
        println!("{out}");
    } else {
        println!("{}", completion.text);
        eprintln!(
            "[{} tokens in {:.2} s on {}; finish: {:?}]",
            completion.token_ids.len(),
            elapsed_s,
            engine.backend_name(),
            completion.finish
        );
    }
    Ok(())
}

fn info(model: &str) -> Result<()> {
    let ResolvedModel { config: c, name, .. } =
        resolve_model(model).with_context(|| format!("loading model {model:?}"))?;
    let weight_bytes = c.n_params() * c.dtype.size_bytes();
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!("model            {name}");
    println!("architecture     {}", c.architecture.hf_name());
    println!("layers           {}", c.n_layers);
    println!("hidden           {}", c.hidden_size);
    println!("intermediate     {}", c.intermediate_size);
    println!(
        "heads            {} (kv {}, head_dim {})",
        c.n_heads, c.n_kv_heads, c.head_dim
    );
    println!("vocab            {}", c.vocab_size);
    println!("context          {}", c.max_context);
    println!(
        "rope             theta {}{}",
        c.rope_theta,
        if c.rope_scaling.is_some() {
            ", llama3 scaling"
        } else {
            ""
        }
    );
    println!("parameters       {} ({:.2} B)", c.n_params(), c.n_params() as f64 / 1e9);
    println!(
        "weights          {:?}, {} bytes ({:.2} GiB)",
        c.dtype,
        weight_bytes,
        gib(weight_bytes)
    );
    println!(
        "kv per token     {} bytes in bf16, {} bytes in f32 (cpu backend)",
        c.kv_bytes_per_token(DType::BF16),
        c.kv_bytes_per_token(DType::F32)
    );
    Ok(())
}

/// Prefill: one prompt of `prompt_tokens` with a single output token, timed whole. Decode: `batch` sequences with
/// short prompts, timed over `decode_steps` steps after their prefill. Prefix caching is off so every repetition
/// computes everything.
fn bench_engine(args: BenchEngineArgs) -> Result<()> {
    let config = EngineConfig {
        prefix_caching: false,
        ..engine_config(&args.engine)?
    };
    let mut engine = Engine::new(CpuBackend, resolve_model(&args.engine.model)?, config)?;
    let vocab = engine.model_config().vocab_size as u32;
    let ids = |n: usize, salt: u32| {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt) % vocab)
            .collect::<Vec<_>>()
    };
    let greedy = |max_tokens| RequestParams {
        max_tokens,
        ignore_eos: true,
        ..RequestParams::default()
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut prefill_s = Vec::new();
    let mut decode_s = Vec::new();
    for rep in 0..args.repeat.max(1) {
        let start = Instant::now();
        engine.generate(vec![(ids(args.prompt_tokens, rep as u32), greedy(1))])?;
        prefill_s.push(start.elapsed().as_secs_f64());

        for b in 0..args.batch {
            engine.add_request(
                b as u64,
                ids(16, (rep * 1000 + b) as u32),
                greedy(args.decode_steps + 1),
            )?;
        }
        // The first step prefills every prompt and samples each sequence's first token.
        engine.step()?;
        let start = Instant::now();
        let mut n_tokens = 0;
        while engine.has_unfinished() {
            n_tokens += engine.step()?.len();
        }
        let elapsed = start.elapsed().as_secs_f64();
        if n_tokens != args.batch * args.decode_steps {
            bail!(
                "decode produced {n_tokens} tokens, expected {}",
                args.batch * args.decode_steps
            );
        }
        decode_s.push(elapsed);
    }
    let (prefill, decode) = (median(prefill_s.clone()), median(decode_s.clone()));
    let c = engine.model_config();
    let weight_bytes = c.n_params() * c.dtype.size_bytes();
    let decode_step_s = decode / args.decode_steps as f64;
    let result = serde_json::json!({
        "model": engine.model_name(),
        "backend": engine.backend_name(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "prompt_tokens": args.prompt_tokens,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": args.prompt_tokens as f64 / prefill,
        "prefill_gflops_per_s": 2.0 * c.n_params() as f64 * args.prompt_tokens as f64 / prefill / 1e9,
        "batch": args.batch,
        "decode_steps": args.decode_steps,
        "decode_s": decode_s,
        "decode_tokens_per_s": (args.batch * args.decode_steps) as f64 / decode,
        "decode_step_ms": decode_step_s * 1e3,
        "decode_weight_gb_per_s": weight_bytes as f64 / decode_step_s / 1e9,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
