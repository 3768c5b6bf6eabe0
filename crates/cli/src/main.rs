//! `cleave`: the one binary. Subcommands are thin glue over the library crates.

use std::time::Instant;

mod bench_engine;
mod bench_kv_transfer;
mod selftest;
mod serve;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use cleave_engine::backend::Backend;
use cleave_engine::backend::mock::MockTiming;
use cleave_engine::config::DType;
use cleave_engine::engine::{Engine, EngineConfig, RequestParams};
use cleave_engine::presets::{ResolvedModel, resolve_model, resolve_model_without_weights};
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
    /// Measure the engine alone: prefill and decode times against the hardware's limits (no server, no network).
    BenchEngine(bench_engine::BenchEngineArgs),
    /// Measure KV block transfer between two GPUs (CUDA IPC, and TCP's stages) against the link's limit.
    BenchKvTransfer(bench_kv_transfer::BenchKvTransferArgs),
    /// Check the GPU backend against the CPU backend and Hugging Face references on whatever GPU is present.
    Selftest(selftest::SelftestArgs),
    /// Serve a model: start the workers of a deployment and the OpenAI-compatible API (default: tiny preset on the
    /// CPU, one prefill and one decode worker, http://127.0.0.1:8000).
    Serve(serve::ServeArgs),
    /// Run the OpenAI-compatible HTTP frontend alone, for workers started elsewhere.
    Frontend(serve::FrontendArgs),
    /// Run a worker: one engine serving the worker protocol (docs/protocol.md) on TCP.
    Worker(WorkerArgs),
    /// Load-test an OpenAI-compatible server: seeded open-loop workload, latency percentiles, goodput, plots.
    Bench(Box<cleave_bench::BenchArgs>),
    /// Print a model's shape, parameter count and memory figures.
    Info {
        /// A Hugging Face model directory or a preset (tiny, small, llama3-8b, llama3-70b, qwen2.5-7b).
        model: String,
    },
}

#[derive(Args, Clone)]
pub struct EngineArgs {
    /// A Hugging Face model directory or a preset (tiny, small, llama3-8b, llama3-70b, qwen2.5-7b).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Compute backend: auto (CUDA when a GPU is usable, else CPU), cpu, cuda, or mock (no computation and no
    /// weights: steps take the time --mock-timing says; for tests of routing and scaling).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// The mock backend's cost of a step, as KEY=VALUE,...: base_ms, prefill_token_us (per prompt token),
    /// decode_seq_us (per decoding sequence), context_token_ns (per KV token attended); left out: 0 (as fast as the
    /// host allows). E.g. base_ms=6,prefill_token_us=60,decode_seq_us=40.
    #[arg(long, value_name = "SPEC", value_parser = MockTiming::parse)]
    mock_timing: Option<MockTiming>,
    /// GPU ordinal for the cuda backend.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Tensor parallelism: divide the model's heads and MLP among this many ranks (GPUs for cuda, simulated ranks on
    /// the CPU). Default: the number of --devices, else 1.
    #[arg(long)]
    tp: Option<usize>,
    /// GPU ordinals of the tensor-parallel ranks (comma-separated), one per rank; default: --device and the next
    /// ones.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<usize>,
    /// Memory for the KV cache, in MiB, all tensor-parallel ranks together (default: 256 on the CPU; on a GPU,
    /// --kv-cache-fraction of free memory).
    #[arg(long)]
    kv_cache_mib: Option<usize>,
    /// On a GPU: fraction of the memory left after the weights that the KV pool takes.
    #[arg(long, default_value_t = 0.85)]
    kv_cache_fraction: f64,
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
struct WorkerArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// aggregated (prefill and decode here), prefill, or decode (long prompts prefilled by --prefill-worker).
    #[arg(long, default_value = "aggregated")]
    role: String,
    /// Address to listen on (port 0 picks a free one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Decode role: a prefill worker (host:port) to send long prompts to (repeatable). A frontend may name others.
    #[arg(long)]
    prefill_worker: Vec<String>,
    /// Decode role: prompts of at least this many tokens are prefilled remotely.
    #[arg(long, default_value_t = 512)]
    remote_prefill_tokens_min: usize,
    /// Decode role: also run a prefill worker in this process (same model and backend; --colocated-prefill-device
    /// picks its GPU) and link to it: KV is written straight into this worker's pool (the in-process transport).
    #[arg(long)]
    colocated_prefill: bool,
    /// GPU of the colocated prefill worker (default: --device).
    #[arg(long)]
    colocated_prefill_device: Option<usize>,
    /// Decode role: short prompts are prefilled locally while more than this many tokens wait at the prefill worker.
    #[arg(long, default_value_t = cleave_worker::REMOTE_QUEUE_TOKENS_MAX_DEFAULT)]
    remote_queue_tokens_max: usize,
    /// Pin the worker to these CPU cores (comma-separated) and compute with one thread per core.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Drain and exit when stdin closes (set by `cleave serve` for the workers it supervises).
    #[arg(long, hide = true)]
    drain_on_stdin_eof: bool,
    /// etcd endpoint (URL) to register this worker in, for frontends started with --etcd; repeatable or
    /// comma-separated. The record is removed when the worker drains, or when its lease expires if it dies.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Discovery namespace: separates clusters that share one etcd.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// host:port that frontends and decode workers connect to (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// The worker's id in etcd, unique within the namespace (default: ROLE-ADVERTISED_ADDR).
    #[arg(long)]
    worker_id: Option<String>,
    /// Lifetime of the etcd lease: how long a worker that died stays registered.
    #[arg(long, default_value_t = 10)]
    lease_ttl_secs: u64,
}

fn worker(args: WorkerArgs) -> Result<()> {
    let role = cleave_wire::Role::parse_worker(&args.role).map_err(anyhow::Error::msg)?;
    if !args.cpus.is_empty() {
        pin_to_cpus(&args.cpus)?;
    }
    let resolved = resolve_engine_model(&args.engine)?;
    let config = engine_config(&args.engine)?;
    let (on_listening, on_drain) = if args.etcd.is_empty() {
        (None, None)
    } else {
        // Refuse what is wrong before building the engine, which can take minutes.
        let lease_ttl = std::time::Duration::from_secs(args.lease_ttl_secs);
        let (ttl_min, ttl_max) = (cleave_discovery::LEASE_TTL_MIN, cleave_discovery::LEASE_TTL_MAX);
        if !(ttl_min..=ttl_max).contains(&lease_ttl) {
            bail!(
                "--lease-ttl-secs is {}; it must be from {} to {}",
                args.lease_ttl_secs,
                ttl_min.as_secs(),
                ttl_max.as_secs()
            );
        }
        if args.advertise.is_none() && args.listen.ip().is_unspecified() {
            bail!(
                "--listen {} is not an address others can connect to: give --advertise HOST:PORT",
                args.listen
            );
        }
        // The registration lives from the hook that makes it (once the worker listens) to the one that revokes it
        // (when the worker starts draining, so that frontends stop routing here at once).
        let registration = std::sync::Arc::new(std::sync::Mutex::new(None::<cleave_discovery::Registration>));
        let registered = registration.clone();
        let (endpoints, namespace, advertise, worker_id) = (args.etcd, args.namespace, args.advertise, args.worker_id);
        let (role_name, model) = (args.role.clone(), resolved.name.clone());
        let on_listening: cleave_worker::Hook = Box::new(move |bound, runtime| {
            let addr = advertise.unwrap_or_else(|| bound.to_string());
            let record = cleave_discovery::WorkerRecord {
                id: worker_id.unwrap_or_else(|| format!("{role_name}-{addr}")),
                role,
                addr,
                model,
            };
            let id = record.id.clone();
            let register = cleave_discovery::Registration::register(&endpoints, &namespace, record, lease_ttl);
            match runtime.block_on(register) {
                Ok(done) => {
                    tracing::info!(id, namespace, "registered in etcd");
                    *registered.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
                }
                Err(e) => {
                    // The hook cannot return an error: end the process the way `main` ends it for one.
                    eprintln!("error: registering this worker in etcd: {e}");
                    std::process::exit(1);
                }
            }
        });
        let on_drain: cleave_worker::Hook = Box::new(move |_, runtime| {
            let taken = registration.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(done) = taken
                && let Err(e) = runtime.block_on(done.deregister())
            {
                // Draining goes on: frontends see the worker leave when its lease expires.
                tracing::warn!("cannot deregister from etcd ({e}); the record expires with its lease");
            }
        });
        (Some(on_listening), Some(on_drain))
    };
    let mut prefill_workers = args.prefill_worker;
    if args.colocated_prefill {
        if role != cleave_wire::Role::Decode {
            bail!("--colocated-prefill is for decode workers (--role decode)");
        }
        let mut prefill_engine = args.engine.clone();
        prefill_engine.device = args.colocated_prefill_device.unwrap_or(args.engine.device);
        prefill_workers.push(start_colocated_prefill(prefill_engine)?);
    }
    let worker_config = cleave_worker::WorkerConfig {
        role,
        listen: args.listen,
        prefill_workers,
        remote_prefill_tokens_min: args.remote_prefill_tokens_min,
        remote_queue_tokens_max: args.remote_queue_tokens_max,
        drain_on_stdin_eof: args.drain_on_stdin_eof,
        announce: true,
        on_listening,
        on_drain,
    };
    with_engine!(&args.engine, resolved, config, |engine| {
        cleave_worker::serve(engine, worker_config).context("serving")
    })
}

/// Starts a prefill worker on a thread of this process, on loopback, and returns its address once it listens. It
/// drains on SIGTERM/SIGINT like its decode partner and ends with the process.
fn start_colocated_prefill(engine_args: EngineArgs) -> Result<String> {
    let config = engine_config(&engine_args)?;
    let (listening_tx, listening_rx) = std::sync::mpsc::sync_channel(1);
    let on_listening: cleave_worker::Hook = Box::new(move |addr, _| {
        let _ = listening_tx.send(addr);
    });
    let worker_config = cleave_worker::WorkerConfig {
        role: cleave_wire::Role::Prefill,
        listen: "127.0.0.1:0".parse().expect("a literal address"),
        prefill_workers: Vec::new(),
        remote_prefill_tokens_min: 0,
        remote_queue_tokens_max: 0,
        drain_on_stdin_eof: false,
        announce: false,
        on_listening: Some(on_listening),
        on_drain: None,
    };
    let thread = std::thread::Builder::new().name("colocated-prefill".into());
    thread.spawn(move || {
        let served: Result<()> = (|| {
            let resolved = resolve_engine_model(&engine_args)?;
            with_engine!(&engine_args, resolved, config, |engine| {
                cleave_worker::serve(engine, worker_config).context("serving")
            })
        })();
        if let Err(e) = served {
            eprintln!("error: the colocated prefill worker stopped: {e:#}");
        }
    })?;
    let addr = listening_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the colocated prefill worker failed to start (see the error above)"))?;
    Ok(addr.to_string())
}

/// Pins this process to `cpus` (threads started later inherit the mask) and sizes the compute thread pool to
/// match. Before the engine exists, so every compute thread is pinned.
fn pin_to_cpus(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays inside it (ids checked against CPU_SETSIZE);
    // sched_setaffinity(0, ..) applies to the calling thread, which starts every other thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                bail!("--cpus: CPU {cpu} is out of range");
            }
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("--cpus {cpus:?}: {}", std::io::Error::last_os_error());
        }
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(cpus.len())
        .build_global()
        .context("sizing the compute thread pool")
}

/// The model `args` name, as the chosen backend needs it: the mock reads no weights, so a model directory needs
/// none for it.
pub fn resolve_engine_model(args: &EngineArgs) -> Result<ResolvedModel> {
    let resolved = match args.backend.as_str() {
        "mock" => resolve_model_without_weights(&args.model),
        _ => resolve_model(&args.model),
    };
    resolved.with_context(|| format!("loading model {:?}", args.model))
}

/// Which backend runs the engine.
pub enum BackendChoice {
    /// `ranks` simulated tensor-parallel ranks (1: the plain CPU backend).
    Cpu { ranks: usize },
    /// The mock backend (one rank), with its step cost.
    Mock(MockTiming),
    /// One rank per GPU ordinal.
    #[cfg(feature = "cuda")]
    Cuda { devices: Vec<usize> },
}

/// The GPU ordinals of the tensor-parallel ranks: `--devices`, else `--tp` ordinals from `--device`.
fn rank_devices(args: &EngineArgs) -> Result<Vec<usize>> {
    let tp = args.tp.unwrap_or(args.devices.len().max(1));
    if tp == 0 {
        bail!("--tp must be at least 1");
    }
    if args.devices.is_empty() {
        return Ok((args.device..args.device + tp).collect());
    }
    if args.devices.len() != tp {
        bail!("--tp {tp} needs {tp} GPUs but --devices lists {}", args.devices.len());
    }
    let mut unique = args.devices.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != args.devices.len() {
        bail!(
            "--devices {:?} lists a GPU twice; each rank needs its own",
            args.devices
        );
    }
    Ok(args.devices.clone())
}

/// `auto` takes the GPU when one is usable and otherwise says why it runs on the CPU.
pub fn choose_backend(args: &EngineArgs) -> Result<BackendChoice> {
    if args.mock_timing.is_some() && args.backend != "mock" {
        bail!(
            "--mock-timing is for --backend mock (the backend is {:?})",
            args.backend
        );
    }
    let devices = rank_devices(args)?;
    let cpu = BackendChoice::Cpu { ranks: devices.len() };
    match args.backend.as_str() {
        "cpu" => Ok(cpu),
        // Tensor-parallel ranks split weight values, which the mock does not have.
        "mock" if devices.len() > 1 => bail!("the mock backend runs one rank: leave out --tp and --devices"),
        "mock" => Ok(BackendChoice::Mock(args.mock_timing.unwrap_or_default())),
        #[cfg(feature = "cuda")]
        "cuda" => {
            cleave_engine::backend::cuda::probe()?;
            Ok(BackendChoice::Cuda { devices })
        }
        #[cfg(feature = "cuda")]
        "auto" => match cleave_engine::backend::cuda::probe() {
            Ok(_) => Ok(BackendChoice::Cuda { devices }),
            Err(e) => {
                eprintln!("cleave: running on the CPU backend ({e})");
                Ok(cpu)
            }
        },
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!("this cleave was built without the cuda feature"),
        #[cfg(not(feature = "cuda"))]
        "auto" => Ok(cpu),
        other => bail!("unknown backend {other:?} (auto, cpu, cuda, mock)"),
    }
}

/// Builds an engine on the chosen backend and runs `$body` with it: the engine is generic over its backend, so each
/// backend gets its own monomorphised copy of the body (one rank, or tensor-parallel ranks).
#[macro_export]
macro_rules! with_engine {
    ($args:expr, $resolved:expr, $config:expr, |$engine:ident| $body:expr) => {
        match $crate::choose_backend($args)? {
            $crate::BackendChoice::Cpu { ranks: 1 } => {
                let $engine =
                    cleave_engine::engine::Engine::new(cleave_engine::backend::cpu::CpuBackend, $resolved, $config)?;
                $body
            }
            $crate::BackendChoice::Cpu { ranks } => {
                let ranks = vec![cleave_engine::backend::cpu::CpuBackend; ranks];
                let backend = cleave_engine::backend::tensor_parallel::Tp::new(ranks)?;
                let $engine = cleave_engine::engine::Engine::new(backend, $resolved, $config)?;
                $body
            }
            $crate::BackendChoice::Mock(timing) => {
                let backend = cleave_engine::backend::mock::MockBackend::new(timing);
                let $engine = cleave_engine::engine::Engine::new(backend, $resolved, $config)?;
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::BackendChoice::Cuda { devices } if devices.len() == 1 => {
                let backend = cleave_engine::backend::cuda::CudaBackend::new(devices[0], &$resolved.config)?;
                let $engine = cleave_engine::engine::Engine::new(backend, $resolved, $config)?;
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::BackendChoice::Cuda { devices } => {
                let backend = cleave_engine::backend::cuda::tensor_parallel(&devices, &$resolved.config)?;
                let $engine = cleave_engine::engine::Engine::new(backend, $resolved, $config)?;
                $body
            }
        }
    };
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
        Command::BenchEngine(args) => bench_engine::run(args),
        Command::BenchKvTransfer(args) => bench_kv_transfer::run(args),
        Command::Selftest(args) => selftest::run(args),
        Command::Worker(args) => worker(args),
        Command::Bench(args) => cleave_bench::run(*args),
        Command::Serve(args) => serve::serve(args),
        Command::Frontend(args) => serve::frontend(args),
        Command::Info { model } => info(&model),
    }
}

pub fn engine_config(args: &EngineArgs) -> Result<EngineConfig> {
    Ok(EngineConfig {
        block_size: args.block_size,
        kv_cache_bytes: args
            .kv_cache_mib
            .unwrap_or(256)
            .checked_mul(1 << 20)
            .context("--kv-cache-mib is too large")?,
        kv_cache_memory_fraction: args.kv_cache_mib.is_none().then_some(args.kv_cache_fraction),
        policy: SchedulerPolicy::parse(&args.scheduler, args.step_tokens).map_err(anyhow::Error::msg)?,
        prefix_caching: !args.no_prefix_caching,
        ..EngineConfig::default()
    })
}

fn generate(args: GenerateArgs) -> Result<()> {
    let resolved = resolve_engine_model(&args.engine)?;
    let config = engine_config(&args.engine)?;
    with_engine!(&args.engine, resolved, config, |engine| generate_with(engine, &args))
}

fn generate_with<B: Backend>(mut engine: Engine<B>, args: &GenerateArgs) -> Result<()> {
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), None) => engine.tokenizer().encode(text)?,
        (None, Some(ids)) => ids.clone(),
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
        stop: args.stop.clone(),
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
        resolve_model_without_weights(model).with_context(|| format!("loading model {model:?}"))?;
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
