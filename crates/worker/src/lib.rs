//! A cleave worker: one engine with a role, serving the worker protocol (`cleave-wire`, docs/protocol.md) on TCP.
//!
//! Two halves, joined by bounded channels. The engine loop ([`engine_loop`]) owns the [`Engine`] on the calling
//! thread: it drains a bounded inbox of [`Command`]s, runs one step, sends each request's output to the connection
//! that asked for it, and publishes the worker's status (load, KV events, totals) to subscribers. Connections
//! ([`connection`], [`prefill_link`]) live on a tokio runtime: each reads frames, checks the peer's `hello`, turns
//! messages into commands and writes replies back. A slow or vanished client never stalls the engine: its requests
//! are cancelled when its outbox is full or its connection closes.
//!
//! Roles:
//! - `aggregated`: serves whole requests (`generate` → `tokens`).
//! - `decode`: the same, but prompts whose uncached part is at least `remote_prefill_tokens_min` tokens are
//!   prefilled by a prefill worker — the one the frontend's router named in `generate`, else the least busy of
//!   those given at start: the request is parked with its blocks allocated, the prefill worker streams every
//!   layer's KV as it computes it, and decoding starts from the first token it sampled. If the prefill worker fails
//!   or the link drops, the request is prefilled here; nothing is lost.
//! - `prefill`: serves `prefill_request` from decode workers (`kv_chunk`s, then `prefill_done`).
//!
//! Shutdown: SIGTERM, SIGINT or (when supervised) the end of stdin starts a drain — the worker tells its
//! subscribers, refuses new requests with a retryable error, finishes the ones it has, and returns.

mod connection;
mod engine_loop;
mod prefill_link;

use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::mpsc::{SyncSender, sync_channel};

use cleave_engine::backend::Backend;
use cleave_engine::engine::Engine;
use cleave_wire::{Hello, KvChunk, KvPoolShare, Message, PrefillRequest, Role, WireParams};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Commands queued for the engine loop at most; beyond it new requests are refused with "worker overloaded".
pub const INBOX_MAX: usize = 4096;
/// Frames queued for one connection at most; a client that falls this far behind loses its requests.
pub const OUTBOX_MAX: usize = 1024;
/// Remote prefills in flight at most: beyond it the prefill pool is backed up and prompts are prefilled locally.
pub const REMOTE_PENDING_MAX: usize = 64;
/// Requests bound for remote prefill that wait for this worker's KV pool to hold their prompt, at most; beyond it
/// they are refused as overloaded.
pub const AWAITING_BLOCKS_MAX: usize = 1024;
/// Default of [`WorkerConfig::remote_queue_tokens_max`].
pub const REMOTE_QUEUE_TOKENS_MAX_DEFAULT: usize = 8192;
/// Prompts (uncached part) below this many tokens may be prefilled locally when the prefill worker is backed up;
/// longer ones always go remote, since prefilling them here would stall every running decode for long.
pub const LOCAL_PREFILL_TOKENS_MAX: usize = 2048;
/// Prefill workers a decode worker keeps links to at most (each link is one task and one socket).
pub const PREFILL_LINKS_MAX: usize = 256;

/// Called once the worker listens (with its bound address and the runtime, to start e.g. a discovery
/// registration), and again when it starts draining.
pub type Hook = Box<dyn FnOnce(SocketAddr, &tokio::runtime::Handle) + Send>;

pub struct WorkerConfig {
    pub role: Role,
    pub listen: SocketAddr,
    /// Decode role: prefill workers (`host:port`) to link to at start. The frontend may name others per request.
    /// With none linked the decode worker prefills everything itself.
    pub prefill_workers: Vec<String>,
    /// Decode role: prompts whose uncached part has at least this many tokens are prefilled remotely.
    pub remote_prefill_tokens_min: usize,
    /// Decode role: prompt tokens queued at a prefill worker (from this decode worker) beyond which it counts as
    /// backed up for short prompts, which are then prefilled locally rather than wait behind long ones. Higher
    /// favours steady decode over the TTFT of short prompts.
    pub remote_queue_tokens_max: usize,
    /// Drain when stdin closes: set by a supervisor (`cleave serve`) so workers never outlive it.
    pub drain_on_stdin_eof: bool,
    /// Print `listening on ADDR` on stdout once ready (what supervisors and tests read). Off for a second worker of
    /// the same process, whose address its partner learns from `on_listening`.
    pub announce: bool,
    pub on_listening: Option<Hook>,
    pub on_drain: Option<Hook>,
}

/// What connections ask of the engine loop.
enum Command {
    Generate {
        id: u64,
        client_id: u64,
        prompt_ids: Vec<u32>,
        params: WireParams,
        prefill_worker: Option<String>,
        outbox: mpsc::Sender<Message>,
    },
    Cancel {
        id: u64,
    },
    /// Prefill role: compute a decode worker's prompt and stream its KV back through `outbox`.
    Prefill {
        conn: u64,
        request: PrefillRequest,
        outbox: mpsc::Sender<Message>,
    },
    /// Stream this worker's status to `outbox`.
    Subscribe(mpsc::Sender<Message>),
    /// Prefill role: a decode worker on this host offers its KV pool; map it for connection `conn` and answer
    /// whether that worked (then its prefills are copied device to device).
    OpenPeer {
        conn: u64,
        share: KvPoolShare,
        /// By address (same process) rather than through its CUDA IPC handle.
        in_process: bool,
        reply: tokio::sync::oneshot::Sender<bool>,
    },
    ClosePeer {
        conn: u64,
    },
    /// Decode role, from the link to the prefill worker at `addr`; `direct`: it writes KV straight into our pool.
    PrefillLinkUp {
        addr: String,
        outbox: mpsc::Sender<Message>,
        direct: bool,
    },
    PrefillLinkDown {
        addr: String,
    },
    RemoteKv(KvChunk),
    RemoteDone {
        id: u64,
        first_token: u32,
    },
    RemoteFailed {
        id: u64,
        message: String,
    },
    /// Finish what is running, take nothing new, then return.
    Drain,
}

/// Identifies a model and its KV layout for the `hello` check.
fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Two engines can exchange KV only if they run the same model with the same KV layout.
fn compatible(a: &Hello, b: &Hello) -> bool {
    a.model_fingerprint == b.model_fingerprint
        && a.block_size == b.block_size
        && a.n_layers == b.n_layers
        && a.kv_block_bytes == b.kv_block_bytes
}

/// Serves until drained. Prints `listening on ADDR` (with the bound port) once ready, if `config.announce`.
pub fn serve<B: Backend>(mut engine: Engine<B>, mut config: WorkerConfig) -> std::io::Result<()> {
    if config.role == Role::Frontend {
        return Err(std::io::Error::other(
            "a worker's role is aggregated, prefill or decode",
        ));
    }
    let hello = Hello {
        role: config.role,
        model: engine.model_name().to_string(),
        model_fingerprint: fingerprint(&format!("{}{:?}", engine.model_name(), engine.model_config())),
        block_size: engine.kv_layout().block_size as u32,
        n_layers: engine.kv_layout().n_layers as u32,
        kv_block_bytes: engine.kv_block_bytes() as u64,
        // CLEAVE_KV_TRANSPORT=tcp keeps KV on TCP even where CUDA IPC or in-process copies would work (to measure
        // one against the other).
        kv_share: match config.role {
            Role::Decode if std::env::var("CLEAVE_KV_TRANSPORT").as_deref() != Ok("tcp") => kv_pool_share(&engine),
            _ => None,
        },
        transport: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(TcpListener::bind(config.listen))?;
    let addr = listener.local_addr()?;
    if config.announce {
        println!("listening on {addr}");
    }
    let (inbox_tx, inbox_rx) = sync_channel::<Command>(INBOX_MAX);
    let cancelled = connection::CancelledPrefills::default();
    runtime.spawn(connection::accept_loop(
        listener,
        inbox_tx.clone(),
        hello.clone(),
        cancelled.clone(),
    ));
    runtime.spawn(drain_on_signal(inbox_tx.clone()));
    if config.drain_on_stdin_eof {
        drain_on_stdin_eof(inbox_tx.clone());
    }
    if let Some(hook) = config.on_listening.take() {
        hook(addr, runtime.handle());
    }
    let on_drain = config.on_drain.take().map(|hook| {
        let handle = runtime.handle().clone();
        Box::new(move || hook(addr, &handle)) as Box<dyn FnOnce()>
    });
    let shared_in_process = hello
        .kv_share
        .as_ref()
        .is_some_and(|s| !s.in_process_handles.is_empty());
    engine_loop::EngineLoop::new(
        &mut engine,
        &config,
        hello,
        cancelled,
        runtime.handle().clone(),
        inbox_tx,
    )
    .run(inbox_rx, on_drain);
    if shared_in_process {
        // A prefill worker of this process may still hold the pool's address (a copy in flight when the link
        // dropped): the memory stays allocated until the process exits.
        std::mem::forget(engine);
    }
    Ok(())
}

/// A decode engine's pool as peers may reach it: through CUDA IPC from this host, by address from this process.
fn kv_pool_share<B: Backend>(engine: &Engine<B>) -> Option<KvPoolShare> {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let (ipc, local) = (engine.export_kv_cache(), engine.export_kv_cache_in_process());
    let geometry = ipc.as_ref().or(local.as_ref())?;
    Some(KvPoolShare {
        host: host_id(),
        handles: ipc.iter().flat_map(|e| e.handles.iter().map(|h| hex(h))).collect(),
        process: local.as_ref().map(|_| process_id().to_string()),
        in_process_handles: local.iter().flat_map(|e| e.handles.iter().map(|h| hex(h))).collect(),
        layer_bytes: geometry.layer_bytes,
        block_bytes: geometry.block_bytes,
        n_layers: geometry.n_layers,
    })
}

/// Identifies this process for the in-process transport: the pid and a random nonce (pids are reused).
pub(crate) fn process_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let nonce = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
        format!("{}-{nonce:016x}", std::process::id())
    })
}

/// Identifies this host for same-host transports: a CUDA IPC handle only means something to processes on the machine
/// (and boot) that made it.
pub(crate) fn host_id() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
    format!(
        "{}-{}",
        read("/etc/machine-id"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

async fn drain_on_signal(inbox: SyncSender<Command>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT: the worker can only be killed");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    let _ = tokio::task::spawn_blocking(move || inbox.send(Command::Drain).is_ok()).await;
}

fn drain_on_stdin_eof(inbox: SyncSender<Command>) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        tracing::info!("stdin closed: draining");
        let _ = inbox.send(Command::Drain);
    });
}
