//! `cleave serve` and `cleave frontend`: the one command that starts a whole deployment (worker processes it
//! supervises plus the HTTP frontend in this process), and the frontend alone for workers started elsewhere.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use cleave_discovery::{DiscoveryEvent, WorkerRecord, WorkerWatch, watch_workers};
use cleave_frontend::metrics::Metrics;
use cleave_frontend::model::ServedModel;
use cleave_frontend::workers::WorkerPool;
use cleave_frontend::{AppState, FrontendConfig};
use cleave_router::RouterConfig;
use cleave_wire::Role;
use serde::Deserialize;

/// How long workers get to finish their requests after the frontend stopped, before they are killed.
const WORKER_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker may take to load its model and listen.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(600);

/// A deployment: what `--config FILE` holds (YAML; every field optional) and what the flags override.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentSpec {
    /// A Hugging Face model directory or a preset.
    pub model: String,
    /// The name clients use in `model`; default: `model`.
    pub served_model_name: Option<String>,
    /// auto, cpu, cuda or mock; default cpu for the tiny preset, else auto.
    pub backend: Option<String>,
    /// The mock backend's step cost (`base_ms=6,prefill_token_us=60,...`, see `cleave worker --help`); only with
    /// `backend: mock`. Default: zero, as fast as the host allows.
    pub mock_timing: Option<String>,
    pub host: String,
    pub port: u16,
    pub block_size: usize,
    pub kv_cache_mib: Option<usize>,
    pub kv_cache_fraction: f64,
    /// Decode workers prefill remotely when the uncached part of a prompt has at least this many tokens.
    pub remote_prefill_tokens_min: usize,
    /// Decode workers prefill short prompts locally while more than this many tokens wait at the prefill worker.
    pub remote_queue_tokens_max: usize,
    pub max_in_flight: usize,
    pub router: RouterSpec,
    pub aggregated: PoolSpec,
    pub prefill: PoolSpec,
    pub decode: PoolSpec,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSpec {
    pub overlap_weight: f64,
    pub load_weight: f64,
    pub temperature: f64,
}

/// One pool of workers of a role.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSpec {
    pub count: usize,
    /// Tensor-parallel ranks per worker (GPUs on cuda, simulated ranks on the CPU).
    pub tp: usize,
    /// GPU ordinals, `tp` per worker, given out in order (wrapping around). Empty in every pool: each worker gets
    /// GPUs of its own (`DeploymentSpec::place_on_gpus`).
    pub devices: Vec<usize>,
    /// CPU cores, one per worker, given out in order (wrapping around): the worker is pinned there with one compute
    /// thread (CPU backend: so pools on one machine do not compete for cores). Empty: not pinned.
    pub cpus: Vec<usize>,
    /// prefill-first or chunked.
    pub scheduler: String,
    pub step_tokens: usize,
}

impl Default for DeploymentSpec {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            served_model_name: None,
            backend: None,
            mock_timing: None,
            host: "127.0.0.1".into(),
            port: 8000,
            block_size: 16,
            kv_cache_mib: None,
            kv_cache_fraction: 0.85,
            remote_prefill_tokens_min: 256,
            remote_queue_tokens_max: cleave_worker::REMOTE_QUEUE_TOKENS_MAX_DEFAULT,
            max_in_flight: FrontendConfig::default().max_in_flight,
            router: RouterSpec::default(),
            aggregated: PoolSpec::default(),
            prefill: PoolSpec {
                count: 1,
                scheduler: "prefill-first".into(),
                step_tokens: 8192,
                ..PoolSpec::default()
            },
            decode: PoolSpec {
                count: 1,
                ..PoolSpec::default()
            },
        }
    }
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            overlap_weight: 1.0,
            load_weight: 1.0,
            temperature: 0.0,
        }
    }
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            count: 0,
            tp: 1,
            devices: Vec::new(),
            cpus: Vec::new(),
            scheduler: "chunked".into(),
            step_tokens: 512,
        }
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// A YAML deployment spec (see docs/serve.md); flags override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A Hugging Face model directory or a preset (tiny, small, llama3-8b, llama3-70b, qwen2.5-7b).
    #[arg(long)]
    model: Option<String>,
    /// The model name clients send (default: --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// auto, cpu, cuda or mock (default: cpu for the tiny preset, else auto).
    #[arg(long)]
    backend: Option<String>,
    /// The mock backend's step cost, e.g. base_ms=6,prefill_token_us=60,decode_seq_us=40 (see `cleave worker
    /// --help`).
    #[arg(long, value_name = "SPEC")]
    mock_timing: Option<String>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    #[arg(long)]
    aggregated_workers: Option<usize>,
    #[arg(long)]
    prefill_workers: Option<usize>,
    #[arg(long)]
    decode_workers: Option<usize>,
    /// Scheduler policy of aggregated and decode workers: prefill-first or chunked.
    #[arg(long)]
    scheduler: Option<String>,
    /// Token budget per step of aggregated and decode workers.
    #[arg(long)]
    step_tokens: Option<usize>,
    /// Decode workers prefill remotely when the uncached part of a prompt has at least this many tokens.
    #[arg(long)]
    remote_prefill_tokens_min: Option<usize>,
    /// KV cache per worker in MiB (default: 256 on the CPU, --kv-cache-fraction of free memory on a GPU).
    #[arg(long)]
    kv_cache_mib: Option<usize>,
    /// Print the resolved spec as JSON and exit.
    #[arg(long)]
    print_spec: bool,
}

impl ServeArgs {
    fn spec(&self) -> Result<DeploymentSpec> {
        let mut spec = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                serde_yaml_ng::from_str(&text)
                    .with_context(|| format!("{} is not a valid deployment spec", path.display()))?
            }
            None => DeploymentSpec::default(),
        };
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(self.model, spec.model);
        if self.served_model_name.is_some() {
            spec.served_model_name = self.served_model_name.clone();
        }
        if self.backend.is_some() {
            spec.backend = self.backend.clone();
        }
        if self.mock_timing.is_some() {
            spec.mock_timing = self.mock_timing.clone();
        }
        set!(self.host, spec.host);
        set!(self.port, spec.port);
        set!(self.aggregated_workers, spec.aggregated.count);
        set!(self.prefill_workers, spec.prefill.count);
        set!(self.decode_workers, spec.decode.count);
        if let Some(s) = &self.scheduler {
            spec.aggregated.scheduler = s.clone();
            spec.decode.scheduler = s.clone();
        }
        if let Some(n) = self.step_tokens {
            spec.aggregated.step_tokens = n;
            spec.decode.step_tokens = n;
        }
        set!(self.remote_prefill_tokens_min, spec.remote_prefill_tokens_min);
        if self.kv_cache_mib.is_some() {
            spec.kv_cache_mib = self.kv_cache_mib;
        }
        spec.validate()?;
        if let Some(warning) = spec.place_on_gpus(visible_gpus())? {
            eprintln!("cleave: {warning}");
        }
        Ok(spec)
    }
}

impl DeploymentSpec {
    fn validate(&self) -> Result<()> {
        if let Some(timing) = &self.mock_timing {
            cleave_engine::backend::mock::MockTiming::parse(timing).map_err(anyhow::Error::msg)?;
            if self.backend() != "mock" {
                bail!(
                    "mock_timing is for the mock backend; the backend is {:?}",
                    self.backend()
                );
            }
        }
        if self.aggregated.count + self.decode.count == 0 {
            bail!("the deployment has no worker that decodes: give --aggregated-workers or --decode-workers");
        }
        if self.prefill.count > 0 && self.decode.count == 0 {
            bail!("prefill workers serve decode workers: add --decode-workers");
        }
        for (name, pool) in [
            ("aggregated", &self.aggregated),
            ("prefill", &self.prefill),
            ("decode", &self.decode),
        ] {
            cleave_engine::scheduler::SchedulerPolicy::parse(&pool.scheduler, pool.step_tokens)
                .map_err(|e| anyhow::anyhow!("{name} pool: {e}"))?;
            if pool.tp == 0 {
                bail!("{name} pool: tp must be at least 1");
            }
        }
        Ok(())
    }

    /// Gives each worker GPUs of its own when no pool lists `devices` (on a GPU-capable backend): pools in start
    /// order — prefill, decode, aggregated — `tp` GPUs per worker; left empty, every worker would take GPUs 0 to
    /// tp - 1. On a machine with fewer GPUs than that the assignment wraps around and workers share GPUs (the warning
    /// says so). Where pools list `devices`, they are kept, and a GPU given to two workers is refused unless
    /// `kv_cache_mib` is set: each worker would size its KV pool from the memory the other left.
    fn place_on_gpus(&mut self, n_gpus: Option<usize>) -> Result<Option<String>> {
        if matches!(self.backend().as_str(), "cpu" | "mock") {
            return Ok(None);
        }
        let pools = [
            (Role::Prefill, &self.prefill),
            (Role::Decode, &self.decode),
            (Role::Aggregated, &self.aggregated),
        ];
        if pools.iter().any(|(_, pool)| pool.count > 0 && !pool.devices.is_empty()) {
            if self.kv_cache_mib.is_none() {
                let mut owner: HashMap<usize, String> = HashMap::new();
                for (role, pool) in pools {
                    for index in 0..pool.count {
                        let worker = format!("{} worker {index}", role.as_str());
                        for device in worker_devices(pool, index).split(',').filter_map(|d| d.parse().ok()) {
                            if let Some(first) = owner.insert(device, worker.clone()) {
                                bail!(
                                    "GPU {device} would serve both {first} and {worker}: give each worker GPUs of its \
                                     own (`devices` in each pool), or set kv_cache_mib to share GPUs on purpose"
                                );
                            }
                        }
                    }
                }
            }
            return Ok(None);
        }
        let needed: usize = pools.iter().map(|(_, pool)| pool.count * pool.tp).sum();
        let n = n_gpus.unwrap_or(needed).max(1);
        let mut next = 0;
        for pool in [&mut self.prefill, &mut self.decode, &mut self.aggregated] {
            pool.devices = (next..next + pool.count * pool.tp).map(|i| i % n).collect();
            next += pool.count * pool.tp;
        }
        Ok((needed > n).then(|| {
            format!(
                "the deployment's workers need {needed} GPUs and this machine shows {n}: workers share GPUs, each \
                 sizing its KV pool from the memory the others left"
            )
        }))
    }

    fn backend(&self) -> String {
        self.backend
            .clone()
            .unwrap_or_else(|| if self.model == "tiny" { "cpu" } else { "auto" }.into())
    }

    fn served_name(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| self.model.clone())
    }

    fn router_config(&self) -> RouterConfig {
        RouterConfig {
            overlap_weight: self.router.overlap_weight,
            load_weight: self.router.load_weight,
            temperature: self.router.temperature,
            ..RouterConfig::new(self.block_size)
        }
    }
}

/// A worker process `cleave serve` started. Its stdin is a pipe that only we hold: when we close it (or die), the
/// worker drains and exits.
struct WorkerProcess {
    role: Role,
    /// Position in its pool (picks its device and CPU).
    index: usize,
    addr: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

/// GPUs this machine shows, where the CUDA libraries load (`None`: not known).
fn visible_gpus() -> Option<usize> {
    #[cfg(feature = "cuda")]
    return cleave_engine::backend::cuda::probe().ok();
    #[cfg(not(feature = "cuda"))]
    None
}

/// The GPUs of worker `index` of `pool`, as `--devices` takes them: the next `tp` ordinals of `devices` (wrapping
/// around), or 0 to tp - 1 when none are listed.
fn worker_devices(pool: &PoolSpec, index: usize) -> String {
    let ordinals: Vec<String> = (0..pool.tp)
        .map(|rank| match pool.devices.is_empty() {
            true => rank,
            false => pool.devices[(index * pool.tp + rank) % pool.devices.len()],
        })
        .map(|d| d.to_string())
        .collect();
    ordinals.join(",")
}

/// Starts one worker process; its address arrives later through `wait_listening`.
fn spawn_worker(
    spec: &DeploymentSpec,
    role: Role,
    index: usize,
    prefill_addrs: &[String],
) -> Result<(Child, ChildStdin)> {
    let pool = match role {
        Role::Aggregated => &spec.aggregated,
        Role::Prefill => &spec.prefill,
        _ => &spec.decode,
    };
    let devices = worker_devices(pool, index);
    let exe = std::env::current_exe().context("locating the cleave binary")?;
    let mut command = Command::new(exe);
    command
        .arg("worker")
        .args([
            "--role",
            role.as_str(),
            "--model",
            &spec.model,
            "--backend",
            &spec.backend(),
        ])
        .args(["--tp", &pool.tp.to_string(), "--devices", &devices])
        .args(["--listen", &format!("{}:0", spec.host)])
        .args([
            "--block-size",
            &spec.block_size.to_string(),
            "--scheduler",
            &pool.scheduler,
        ])
        .args(["--step-tokens", &pool.step_tokens.to_string()])
        .args(["--kv-cache-fraction", &spec.kv_cache_fraction.to_string()])
        .args([
            "--remote-prefill-tokens-min",
            &spec.remote_prefill_tokens_min.to_string(),
        ])
        .args(["--remote-queue-tokens-max", &spec.remote_queue_tokens_max.to_string()])
        .arg("--drain-on-stdin-eof");
    if let Some(mib) = spec.kv_cache_mib {
        command.args(["--kv-cache-mib", &mib.to_string()]);
    }
    if let Some(timing) = &spec.mock_timing {
        command.args(["--mock-timing", timing]);
    }
    for addr in prefill_addrs {
        command.args(["--prefill-worker", addr]);
    }
    if !pool.cpus.is_empty() {
        command.args(["--cpus", &pool.cpus[index % pool.cpus.len()].to_string()]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a worker process")?;
    let stdin = child.stdin.take().expect("piped");
    Ok((child, stdin))
}

/// Reads the worker's `listening on ADDR` line (waiting until `deadline` at most: a worker that hangs while loading
/// is killed), then keeps draining its stdout on a thread so it never blocks on a full pipe.
fn wait_listening(child: &mut Child, role: Role, deadline: Instant) -> Result<String> {
    let stdout = child.stdout.take().expect("piped");
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = first_tx.send(lines.next().transpose());
        for _ in lines.map_while(Result::ok) {}
    });
    let line = match first_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(line) => line.context("reading a worker's output")?,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the {} worker did not listen within {WORKER_START_TIMEOUT:?}: killed; its errors are above",
                role.as_str()
            );
        }
    };
    let Some(line) = line else {
        let status = child.wait().ok();
        bail!(
            "the {} worker exited before listening ({status:?}); its errors are above",
            role.as_str()
        );
    };
    let addr = line
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line from a worker: {line:?}"))?
        .to_string();
    Ok(addr)
}

/// Starts `count` workers of a role at once (models load in parallel) and waits until all listen.
fn start_pool(spec: &DeploymentSpec, role: Role, count: usize, prefill_addrs: &[String]) -> Result<Vec<WorkerProcess>> {
    let deadline = Instant::now() + WORKER_START_TIMEOUT;
    let mut spawned = Vec::new();
    for index in 0..count {
        spawned.push(spawn_worker(spec, role, index, prefill_addrs)?);
    }
    let mut workers = Vec::new();
    for (index, (mut child, stdin)) in spawned.into_iter().enumerate() {
        let addr = wait_listening(&mut child, role, deadline)?;
        workers.push(WorkerProcess {
            role,
            index,
            addr,
            child,
            stdin: Some(stdin),
        });
    }
    Ok(workers)
}

/// Closes the workers' stdin (they drain and exit), waits, and kills those that take too long.
fn stop_workers(workers: &mut [WorkerProcess]) {
    for w in workers.iter_mut() {
        w.stdin.take();
    }
    let deadline = Instant::now() + WORKER_DRAIN_TIMEOUT;
    for w in workers.iter_mut() {
        loop {
            match w.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!(
                        "cleave: {} worker {} did not drain in time: killing it",
                        w.role.as_str(),
                        w.addr
                    );
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let spec = args.spec()?;
    if args.print_spec {
        println!("{spec:#?}");
        return Ok(());
    }
    let model = ServedModel::load(&spec.model, Some(&spec.served_name()))
        .with_context(|| format!("loading model {:?}", spec.model))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Bind first: a taken port should fail before minutes of model loading.
    let listen = format!("{}:{}", spec.host, spec.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&listen))
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;

    let mut workers = start_pool(&spec, Role::Prefill, spec.prefill.count, &[])?;
    let prefill_addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let decoders = start_pool(&spec, Role::Decode, spec.decode.count, &prefill_addrs);
    let aggregated = decoders.and_then(|mut d| {
        d.extend(start_pool(&spec, Role::Aggregated, spec.aggregated.count, &[])?);
        Ok(d)
    });
    match aggregated {
        Ok(more) => workers.extend(more),
        Err(e) => {
            stop_workers(&mut workers);
            return Err(e);
        }
    }
    let metrics = Arc::new(Metrics::new());
    let pool = WorkerPool::new(&model.name, spec.block_size, spec.router_config(), metrics.clone());
    let workers = Arc::new(std::sync::Mutex::new(workers));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = runtime.block_on(async {
        for w in workers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            pool.add_worker(&w.addr, w.role);
        }
        let config = FrontendConfig {
            max_in_flight: spec.max_in_flight,
            ..FrontendConfig::default()
        };
        let state = Arc::new(AppState::new(model, pool.clone(), metrics, config));
        wait_ready(&pool, &spec).await?;
        let supervisor = Supervisor {
            spec: spec.clone(),
            workers: workers.clone(),
            pool: pool.clone(),
            runtime: tokio::runtime::Handle::current(),
            stopping: stopping.clone(),
        };
        std::thread::spawn(move || supervisor.run());
        println!("serving {} on http://{addr}", state.model.name);
        cleave_frontend::serve(listener, state, shutdown_signal())
            .await
            .context("serving HTTP")
    });
    eprintln!("cleave: stopping workers");
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    stop_workers(&mut workers.lock().unwrap_or_else(|e| e.into_inner()));
    result
}

/// Restarts workers that exit while the deployment runs (their in-flight requests fail with an error naming the
/// worker; new ones go to the others until the replacement is up). A worker that keeps dying is left down.
struct Supervisor {
    spec: DeploymentSpec,
    workers: Arc<std::sync::Mutex<Vec<WorkerProcess>>>,
    pool: WorkerPool,
    runtime: tokio::runtime::Handle,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Restarts of one worker slot allowed within [`RESTART_WINDOW`].
const RESTARTS_MAX: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(300);

impl Supervisor {
    fn run(self) {
        let mut restarts: Vec<Vec<Instant>> = Vec::new();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            restarts.resize(workers.len(), Vec::new());
            for slot in 0..workers.len() {
                let Ok(Some(status)) = workers[slot].child.try_wait() else {
                    continue;
                };
                let (role, index, old) = (workers[slot].role, workers[slot].index, workers[slot].addr.clone());
                restarts[slot].retain(|t| t.elapsed() < RESTART_WINDOW);
                if restarts[slot].len() >= RESTARTS_MAX {
                    continue; // left down: already reported
                }
                restarts[slot].push(Instant::now());
                eprintln!(
                    "cleave: the {} worker at {old} exited ({status}); restarting it",
                    role.as_str()
                );
                let prefill_addrs: Vec<String> = workers
                    .iter()
                    .filter(|w| w.role == Role::Prefill)
                    .map(|w| w.addr.clone())
                    .collect();
                let started = spawn_worker(&self.spec, role, index, &prefill_addrs).and_then(|(mut child, stdin)| {
                    let addr = wait_listening(&mut child, role, Instant::now() + WORKER_START_TIMEOUT)?;
                    Ok(WorkerProcess {
                        role,
                        index,
                        addr,
                        child,
                        stdin: Some(stdin),
                    })
                });
                match started {
                    Ok(worker) => {
                        let (pool, new) = (self.pool.clone(), worker.addr.clone());
                        self.runtime.spawn(async move {
                            pool.remove_worker(&old);
                            pool.add_worker(&new, role);
                        });
                        workers[slot] = worker;
                    }
                    Err(e) => eprintln!("cleave: restarting the {} worker failed: {e:#}", role.as_str()),
                }
                if restarts[slot].len() == RESTARTS_MAX {
                    eprintln!(
                        "cleave: the {} worker died {RESTARTS_MAX} times in {RESTART_WINDOW:?}: leaving it down",
                        role.as_str()
                    );
                }
            }
        }
    }
}

/// Waits until the frontend is connected to every worker (each has reported its status).
async fn wait_ready(pool: &WorkerPool, spec: &DeploymentSpec) -> Result<()> {
    let want = (spec.aggregated.count + spec.decode.count, spec.prefill.count);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = pool.ready();
        if ready == want && pool.capacity_tokens().is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("workers started but the frontend could not reach them all: {ready:?} of {want:?} ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("cleave: draining in-flight requests");
}

#[derive(Args)]
pub struct FrontendArgs {
    /// The model the workers serve (a Hugging Face directory or a preset): its tokenizer and chat template.
    #[arg(long, default_value = "tiny")]
    model: String,
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Tokens per KV block, as the workers were started with.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// A worker as ROLE=HOST:PORT (aggregated, prefill or decode); repeatable.
    #[arg(long = "worker", value_parser = parse_worker)]
    workers: Vec<(Role, String)>,
    /// etcd endpoint (URL) to discover workers in (those started with --etcd); repeatable or comma-separated.
    /// Workers of other models are skipped. Works alongside --worker.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Discovery namespace: separates clusters that share one etcd.
    #[arg(long, default_value = "default")]
    namespace: String,
}

fn parse_worker(s: &str) -> Result<(Role, String), String> {
    let (role, addr) = s.split_once('=').ok_or("expected ROLE=HOST:PORT")?;
    Ok((Role::parse_worker(role)?, addr.to_string()))
}

pub fn frontend(args: FrontendArgs) -> Result<()> {
    let model = ServedModel::load(&args.model, args.served_model_name.as_deref())
        .with_context(|| format!("loading model {:?}", args.model))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let metrics = Arc::new(Metrics::new());
        let pool = WorkerPool::new(
            &model.name,
            args.block_size,
            RouterConfig::new(args.block_size),
            metrics.clone(),
        );
        for (role, addr) in &args.workers {
            pool.add_worker(addr, *role);
        }
        if !args.etcd.is_empty() {
            let watch = watch_workers(&args.etcd, &args.namespace)
                .await
                .context("watching etcd for workers")?;
            let static_addrs = args.workers.iter().map(|(_, addr)| addr.clone()).collect();
            let mut discovered = DiscoveredWorkers::new(pool.clone(), &model.name, static_addrs);
            for record in watch.snapshot() {
                discovered.up(record.clone());
            }
            tokio::spawn(discovered.follow(watch));
        }
        let state = Arc::new(AppState::new(model, pool, metrics, FrontendConfig::default()));
        println!("serving {} on http://{}", state.model.name, listener.local_addr()?);
        cleave_frontend::serve(listener, state, shutdown_signal())
            .await
            .context("serving HTTP")
    })
}

/// The workers a frontend found through etcd, kept in step with the pool: discovery names workers by id, the pool by
/// address.
struct DiscoveredWorkers {
    pool: WorkerPool,
    /// Only workers of this model are added (the pool would refuse the others at their `hello`).
    model: String,
    /// Addresses given with --worker: they stay whatever discovery says.
    static_addrs: HashSet<String>,
    /// id -> (address, role) of the workers added.
    known: HashMap<String, (String, Role)>,
}

impl DiscoveredWorkers {
    fn new(pool: WorkerPool, model: &str, static_addrs: HashSet<String>) -> Self {
        Self {
            pool,
            model: model.to_string(),
            static_addrs,
            known: HashMap::new(),
        }
    }

    /// Applies every change until the watch ends (it does not while the process lives; etcd outages are retried
    /// inside it).
    async fn follow(mut self, mut watch: WorkerWatch) {
        while let Some(event) = watch.recv().await {
            match event {
                DiscoveryEvent::Up(record) => self.up(record),
                DiscoveryEvent::Down { id } => self.down(&id),
            }
        }
        tracing::error!("the etcd watch ended: workers that come or go are no longer seen");
    }

    /// A worker registered, or its record changed (then it is replaced).
    fn up(&mut self, record: WorkerRecord) {
        if self.known.get(&record.id) == Some(&(record.addr.clone(), record.role)) {
            return;
        }
        self.down(&record.id);
        if record.model != self.model || record.role == Role::Frontend {
            tracing::warn!(
                id = record.id,
                addr = record.addr,
                model = record.model,
                role = record.role.as_str(),
                "skipping a discovered worker: this frontend serves {:?} from aggregated, prefill and decode workers",
                self.model
            );
            return;
        }
        tracing::info!(
            id = record.id,
            addr = record.addr,
            role = record.role.as_str(),
            "worker discovered"
        );
        self.pool.add_worker(&record.addr, record.role);
        self.known.insert(record.id, (record.addr, record.role));
    }

    /// A worker deregistered or its lease expired. Its address leaves the pool unless --worker named it or another
    /// live record still has it (a worker restarted on the same port under a new id).
    fn down(&mut self, id: &str) {
        let Some((addr, _)) = self.known.remove(id) else {
            return;
        };
        tracing::info!(id, addr, "worker left");
        let still_used = self.known.values().any(|(other, _)| *other == addr);
        if !still_used && !self.static_addrs.contains(&addr) {
            self.pool.remove_worker(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_gets_its_own_run_of_tp_devices() {
        let pool = |tp, devices: &[usize]| PoolSpec {
            tp,
            devices: devices.to_vec(),
            ..PoolSpec::default()
        };
        assert_eq!(worker_devices(&pool(1, &[]), 3), "0");
        assert_eq!(worker_devices(&pool(2, &[]), 1), "0,1");
        assert_eq!(worker_devices(&pool(2, &[0, 1, 2, 3]), 0), "0,1");
        assert_eq!(worker_devices(&pool(2, &[0, 1, 2, 3]), 1), "2,3");
        assert_eq!(worker_devices(&pool(2, &[4, 5, 6, 7]), 2), "4,5");
        assert_eq!(worker_devices(&pool(1, &[2, 3]), 1), "3");
    }

    fn gpu_spec(prefill: (usize, usize), decode: (usize, usize)) -> DeploymentSpec {
        let mut spec = DeploymentSpec {
            model: "llama3-8b".into(),
            backend: Some("cuda".into()),
            ..DeploymentSpec::default()
        };
        (spec.prefill.count, spec.prefill.tp) = prefill;
        (spec.decode.count, spec.decode.tp) = decode;
        spec
    }

    #[test]
    fn workers_without_devices_get_gpus_of_their_own() {
        let mut spec = gpu_spec((1, 1), (1, 1));
        assert_eq!(spec.place_on_gpus(Some(4)).unwrap(), None);
        assert_eq!((spec.prefill.devices, spec.decode.devices), (vec![0], vec![1]));

        let mut spec = gpu_spec((2, 2), (1, 4));
        assert_eq!(spec.place_on_gpus(Some(8)).unwrap(), None);
        assert_eq!(worker_devices(&spec.prefill, 1), "2,3");
        assert_eq!(worker_devices(&spec.decode, 0), "4,5,6,7");

        // One GPU for two workers: they share it, with a warning.
        let mut spec = gpu_spec((1, 1), (1, 1));
        let warning = spec.place_on_gpus(Some(1)).unwrap().expect("a warning");
        assert!(
            warning.contains("need 2 GPUs") && warning.contains("shows 1"),
            "{warning}"
        );
        assert_eq!((spec.prefill.devices, spec.decode.devices), (vec![0], vec![0]));

        // The CPU backend has no GPUs to place.
        let mut spec = DeploymentSpec::default();
        assert_eq!(spec.place_on_gpus(Some(4)).unwrap(), None);
        assert!(spec.prefill.devices.is_empty() && spec.decode.devices.is_empty());
    }

    #[test]
    fn listed_devices_are_kept_and_a_gpu_given_twice_is_refused() {
        let mut spec = gpu_spec((1, 1), (1, 1));
        (spec.prefill.devices, spec.decode.devices) = (vec![2], vec![3]);
        assert_eq!(spec.place_on_gpus(Some(4)).unwrap(), None);
        assert_eq!(
            (spec.prefill.devices.clone(), spec.decode.devices.clone()),
            (vec![2], vec![3])
        );

        // Two aggregated workers on one listed GPU (the list wraps around).
        let mut spec = gpu_spec((0, 1), (0, 1));
        (spec.aggregated.count, spec.aggregated.devices) = (2, vec![0]);
        let e = spec.place_on_gpus(Some(4)).unwrap_err().to_string();
        assert!(
            e.contains("GPU 0 would serve both aggregated worker 0 and aggregated worker 1"),
            "{e}"
        );
        // A decode pool without devices takes GPU 0, which the prefill pool lists.
        let mut spec = gpu_spec((1, 1), (1, 1));
        spec.prefill.devices = vec![0];
        let e = spec.place_on_gpus(Some(4)).unwrap_err().to_string();
        assert!(
            e.contains("GPU 0 would serve both prefill worker 0 and decode worker 0"),
            "{e}"
        );
        // Sharing on purpose: the KV pool is sized explicitly.
        spec.kv_cache_mib = Some(4096);
        assert_eq!(spec.place_on_gpus(Some(4)).unwrap(), None);
    }
}
