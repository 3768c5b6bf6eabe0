//! A cleave worker: one engine with a role, serving the worker protocol (`cleave-wire`, docs/protocol.md) on TCP.
//!
//! Two halves, joined by bounded channels. The engine loop owns the [`Engine`] on the calling thread: it drains a
//! bounded inbox of commands, runs one step, and sends each request's output to the connection that asked for it.
//! Connections live on a tokio runtime: each reads frames, checks the peer's `hello`, turns messages into commands
//! and writes replies back. A slow or vanished client never stalls the engine: its requests are cancelled when its
//! outbox is full or its connection closes.
//!
//! Roles:
//! - `aggregated`: serves whole requests (`generate` → `tokens`).
//! - `decode`: the same, but prompts of at least `remote_prefill_tokens_min` tokens are prefilled by the prefill
//!   worker it links to: the request is parked with its blocks allocated, the prefill worker streams every layer's
//!   KV as it computes it, and decoding starts from the first token it sampled. If the prefill worker fails or the
//!   link drops, the request is prefilled here; nothing is lost.
//! - `prefill`: serves `prefill_request` from decode workers (`kv_chunk`s, then `prefill_done`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use bytes::Bytes;
use cleave_engine::backend::Backend;
use cleave_engine::engine::{Engine, FinishReason, KvBlockChunk, RemotePrefill, RequestOutput, RequestParams};
use cleave_engine::sampler::SamplingParams;
use cleave_wire::{FrameCodec, Generate, Hello, KvChunk, Message, PrefillRequest, Role, Tokens, WireParams};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// Commands queued for the engine loop at most; beyond it new requests are refused with "worker overloaded".
pub const INBOX_MAX: usize = 4096;
/// Frames queued for one connection at most; a client that falls this far behind loses its requests.
pub const OUTBOX_MAX: usize = 1024;
/// Remote prefills in flight at most: beyond it the prefill worker is backed up and prompts are prefilled locally.
pub const REMOTE_PENDING_MAX: usize = 64;
/// Pause between attempts to (re)connect to the prefill worker.
const PREFILL_LINK_RETRY: Duration = Duration::from_millis(200);

pub struct WorkerConfig {
    pub role: Role,
    pub listen: SocketAddr,
    /// Decode role: the prefill worker long prompts go to. Without one (or while it is unreachable) the decode
    /// worker prefills everything itself.
    pub prefill_worker: Option<SocketAddr>,
    /// Decode role: prompts of at least this many tokens are prefilled remotely.
    pub remote_prefill_tokens_min: usize,
}

/// What connections ask of the engine loop.
enum Command {
    Generate {
        id: u64,
        client_id: u64,
        prompt_ids: Vec<u32>,
        params: WireParams,
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
    /// Decode role, from the prefill link.
    PrefillLinkUp(mpsc::Sender<Message>),
    PrefillLinkDown,
    RemoteKv(KvChunk),
    RemoteDone {
        id: u64,
        first_token: u32,
    },
    RemoteFailed {
        id: u64,
        message: String,
    },
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

/// Serves until the process ends. Prints `listening on ADDR` (with the bound port) once ready.
pub fn serve<B: Backend>(mut engine: Engine<B>, config: WorkerConfig) -> std::io::Result<()> {
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
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(TcpListener::bind(config.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let (inbox_tx, inbox_rx) = sync_channel::<Command>(INBOX_MAX);
    let cancelled = CancelledPrefills::default();
    runtime.spawn(accept_loop(
        listener,
        inbox_tx.clone(),
        hello.clone(),
        cancelled.clone(),
    ));
    if let (Role::Decode, Some(addr)) = (config.role, config.prefill_worker) {
        runtime.spawn(prefill_link(addr, inbox_tx, hello));
    }
    EngineLoop {
        engine: &mut engine,
        role: config.role,
        remote_prefill_tokens_min: config.remote_prefill_tokens_min,
        cancelled,
    }
    .run(inbox_rx);
    Ok(())
}

/// Prefills a decode worker cancelled, by (connection, request id): the prefill stops at its next layer.
#[derive(Clone, Default)]
struct CancelledPrefills(Arc<std::sync::Mutex<HashSet<(u64, u64)>>>);

impl CancelledPrefills {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u64)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn accept_loop(listener: TcpListener, inbox: SyncSender<Command>, hello: Hello, cancelled: CancelledPrefills) {
    let next_id = Arc::new(AtomicU64::new(1));
    let next_conn = AtomicU64::new(1);
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let (inbox, hello, next_id) = (inbox.clone(), hello.clone(), next_id.clone());
                let (conn, cancelled) = (next_conn.fetch_add(1, Ordering::Relaxed), cancelled.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(socket, inbox, hello, next_id, conn, &cancelled).await {
                        tracing::debug!(%peer, "connection closed: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accept failed: {e}"),
        }
    }
}

/// One peer: `hello` first, then requests. Malformed frames end this connection only, after an `error` frame.
async fn serve_connection(
    socket: TcpStream,
    inbox: SyncSender<Command>,
    hello: Hello,
    next_id: Arc<AtomicU64>,
    conn: u64,
    cancelled: &CancelledPrefills,
) -> Result<(), String> {
    let (mut sink, mut stream) = Framed::new(socket, FrameCodec::default()).split();
    let (outbox, mut outbox_rx) = mpsc::channel::<Message>(OUTBOX_MAX);
    let writer = tokio::spawn(async move {
        while let Some(m) = outbox_rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    // Ids this connection's requests have in the engine, by the client's id.
    let mut ids: HashMap<u64, u64> = HashMap::new();
    let result = async {
        let peer = match stream.next().await {
            Some(Ok(Message::Hello(peer))) => peer,
            Some(Ok(other)) => return Err(format!("expected hello, got {other:?}")),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(()),
        };
        if hello.role == Role::Prefill && !compatible(&hello, &peer) {
            return Err(format!(
                "incompatible peer: it runs {:?}, this prefill worker runs {:?}",
                peer, hello
            ));
        }
        outbox
            .send(Message::Hello(hello.clone()))
            .await
            .map_err(|e| e.to_string())?;
        while let Some(frame) = stream.next().await {
            match (hello.role, frame.map_err(|e| e.to_string())?) {
                (Role::Aggregated | Role::Decode, Message::Generate(g)) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    ids.insert(g.id, id);
                    submit(&inbox, &outbox, id, g).await?;
                }
                (Role::Aggregated | Role::Decode, Message::Cancel { id }) => {
                    if let Some(&engine_id) = ids.get(&id) {
                        let _ = inbox.try_send(Command::Cancel { id: engine_id });
                    }
                }
                (Role::Prefill, Message::PrefillRequest(request)) => {
                    let command = Command::Prefill {
                        conn,
                        request,
                        outbox: outbox.clone(),
                    };
                    inbox
                        .try_send(command)
                        .map_err(|_| "prefill worker overloaded".to_string())?;
                }
                // A decode worker cancelling a prefill: it stops at its next layer and frees its blocks.
                (Role::Prefill, Message::Cancel { id }) => {
                    cancelled.lock().insert((conn, id));
                }
                (_, other) => return Err(format!("unexpected message for a {:?} worker: {other:?}", hello.role)),
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        let _ = outbox
            .send(Message::Error {
                id: None,
                message: e.clone(),
            })
            .await;
    }
    // The client is gone or broke the protocol: nothing it asked for may keep running.
    cancelled.lock().retain(|&(c, _)| c != conn);
    for engine_id in ids.into_values() {
        let _ = inbox.try_send(Command::Cancel { id: engine_id });
    }
    drop(outbox);
    let _ = writer.await;
    result
}

async fn submit(
    inbox: &SyncSender<Command>,
    outbox: &mpsc::Sender<Message>,
    id: u64,
    g: Generate,
) -> Result<(), String> {
    let command = Command::Generate {
        id,
        client_id: g.id,
        prompt_ids: g.prompt_ids,
        params: g.params,
        outbox: outbox.clone(),
    };
    match inbox.try_send(command) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => outbox
            .send(Message::Error {
                id: Some(g.id),
                message: format!("worker overloaded: {INBOX_MAX} commands queued"),
            })
            .await
            .map_err(|e| e.to_string()),
        Err(TrySendError::Disconnected(_)) => Err("the engine has stopped".into()),
    }
}

/// Decode role: keeps a connection to the prefill worker, reconnecting after failures, and feeds what it sends to
/// the engine loop.
async fn prefill_link(addr: SocketAddr, inbox: SyncSender<Command>, hello: Hello) {
    loop {
        match link_once(addr, &inbox, &hello).await {
            Ok(()) => tracing::info!(%addr, "prefill worker closed the link"),
            Err(e) => tracing::debug!(%addr, "prefill link: {e}"),
        }
        if inbox.send(Command::PrefillLinkDown).is_err() {
            return;
        }
        tokio::time::sleep(PREFILL_LINK_RETRY).await;
    }
}

async fn link_once(addr: SocketAddr, inbox: &SyncSender<Command>, hello: &Hello) -> Result<(), String> {
    let socket = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = Framed::new(socket, FrameCodec::default()).split();
    sink.send(Message::Hello(hello.clone()))
        .await
        .map_err(|e| e.to_string())?;
    match stream.next().await {
        Some(Ok(Message::Hello(peer))) if peer.role == Role::Prefill && compatible(hello, &peer) => {}
        other => {
            return Err(format!(
                "prefill worker at {addr} refused or is incompatible: {other:?}"
            ));
        }
    }
    tracing::info!(%addr, "linked to prefill worker");
    let (outbox, mut outbox_rx) = mpsc::channel::<Message>(OUTBOX_MAX);
    inbox.send(Command::PrefillLinkUp(outbox)).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            out = outbox_rx.recv() => match out {
                Some(m) => sink.send(m).await.map_err(|e| e.to_string())?,
                None => return Ok(()),
            },
            frame = stream.next() => {
                let command = match frame {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(Message::KvChunk(chunk))) => Command::RemoteKv(chunk),
                    Some(Ok(Message::PrefillDone { id, first_token })) => Command::RemoteDone { id, first_token },
                    Some(Ok(Message::PrefillFailed { id, message })) => Command::RemoteFailed { id, message },
                    Some(Ok(Message::Error { message, .. })) => return Err(message),
                    Some(Ok(other)) => return Err(format!("unexpected message from the prefill worker: {other:?}")),
                };
                // Blocking here applies backpressure to the prefill worker through TCP.
                inbox.send(command).map_err(|e| e.to_string())?;
            }
        }
    }
}

/// A request in the engine: where its output goes and under which id the client knows it.
struct Client {
    client_id: u64,
    outbox: mpsc::Sender<Message>,
}

struct EngineLoop<'a, B: Backend> {
    engine: &'a mut Engine<B>,
    role: Role,
    remote_prefill_tokens_min: usize,
    cancelled: CancelledPrefills,
}

/// The engine loop's view of remote prefills (decode role).
#[derive(Default)]
struct Remote {
    link: Option<mpsc::Sender<Message>>,
    /// Requests parked while their KV comes from the prefill worker.
    pending: HashSet<u64>,
}

impl<B: Backend> EngineLoop<'_, B> {
    fn run(mut self, inbox: Receiver<Command>) {
        let mut clients: HashMap<u64, Client> = HashMap::new();
        let mut remote = Remote::default();
        loop {
            // Block for work only when idle; otherwise take what is queued and step.
            // Parked requests (waiting for remote KV) are not work for the engine loop.
            let busy = self.engine.n_waiting() + self.engine.n_running() > 0;
            let first = if busy {
                inbox.try_recv().ok()
            } else {
                match inbox.recv_timeout(Duration::from_millis(100)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            for command in first.into_iter().chain(std::iter::from_fn(|| inbox.try_recv().ok())) {
                self.handle(command, &mut clients, &mut remote);
            }
            if self.engine.n_waiting() + self.engine.n_running() == 0 {
                continue;
            }
            match self.engine.step() {
                Ok(outputs) => {
                    for out in outputs {
                        self.route(out, &mut clients);
                    }
                }
                Err(e) => {
                    tracing::error!("engine step failed: {e}");
                    for (id, client) in clients.drain() {
                        self.engine.cancel(id);
                        let message = e.to_string();
                        let _ = client.outbox.try_send(Message::Error {
                            id: Some(client.client_id),
                            message,
                        });
                    }
                }
            }
        }
    }

    fn handle(&mut self, command: Command, clients: &mut HashMap<u64, Client>, remote: &mut Remote) {
        match command {
            Command::Generate {
                id,
                client_id,
                prompt_ids,
                params,
                outbox,
            } => {
                let client = Client { client_id, outbox };
                let remote_prefill = self.role == Role::Decode && self.prefill_remotely(&prompt_ids, remote);
                let added = match (&remote.link, remote_prefill) {
                    (Some(link), true) => self.start_remote_prefill(id, prompt_ids, &params, link).map(|sent| {
                        if sent {
                            remote.pending.insert(id);
                        }
                    }),
                    _ => self.engine.add_request(id, prompt_ids, request_params(&params)),
                };
                match added {
                    Ok(()) => {
                        clients.insert(id, client);
                    }
                    Err(e) => {
                        let _ = client.outbox.try_send(Message::Error {
                            id: Some(client_id),
                            message: e.to_string(),
                        });
                    }
                }
            }
            Command::Cancel { id } => {
                // A cancelled remote prefill is stopped on the prefill worker too.
                if remote.pending.remove(&id)
                    && let Some(link) = &remote.link
                {
                    let _ = link.try_send(Message::Cancel { id });
                }
                if let (Some(out), Some(client)) = (self.engine.cancel(id), clients.remove(&id)) {
                    deliver(&client, out);
                }
            }
            Command::Prefill { conn, request, outbox } => self.prefill_for(conn, request, &outbox),
            Command::PrefillLinkUp(link) => remote.link = Some(link),
            Command::PrefillLinkDown => {
                remote.link = None;
                for id in remote.pending.drain() {
                    tracing::warn!(request = id, "prefill link lost: prefilling locally");
                    let _ = self.engine.fall_back_to_local_prefill(id);
                }
            }
            Command::RemoteKv(chunk) => {
                if !remote.pending.contains(&chunk.id) {
                    return; // cancelled or fallen back: late chunks are dropped
                }
                let kv = KvBlockChunk {
                    layer_idx: chunk.layer_idx as usize,
                    block_index: chunk.block_index as usize,
                    bytes: &chunk.bytes,
                };
                if let Err(e) = self.engine.import_kv_block(chunk.id, &kv) {
                    tracing::warn!(
                        request = chunk.id,
                        "bad KV from the prefill worker ({e}): prefilling locally"
                    );
                    remote.pending.remove(&chunk.id);
                    let _ = self.engine.fall_back_to_local_prefill(chunk.id);
                }
            }
            Command::RemoteDone { id, first_token } => {
                if !remote.pending.remove(&id) {
                    return;
                }
                match self.engine.finish_remote_prefill(id, first_token) {
                    Ok(out) => {
                        tracing::info!(request = id, "prefilled remotely");
                        self.route(out, clients);
                    }
                    Err(e) => {
                        tracing::warn!(
                            request = id,
                            "finishing the remote prefill failed ({e}): prefilling locally"
                        );
                        let _ = self.engine.fall_back_to_local_prefill(id);
                    }
                }
            }
            Command::RemoteFailed { id, message } => {
                if remote.pending.remove(&id) {
                    tracing::warn!(request = id, "remote prefill failed ({message}): prefilling locally");
                    let _ = self.engine.fall_back_to_local_prefill(id);
                }
            }
        }
    }

    /// Conditional disaggregation: prefill remotely only when it pays — the part of the prompt not already in this
    /// worker's prefix cache is long enough that computing it here would stall the running decodes, and the
    /// prefill worker is not backed up. Each decision is logged with its inputs.
    fn prefill_remotely(&self, prompt_ids: &[u32], remote: &Remote) -> bool {
        let cached = self.engine.cached_prefix_tokens(prompt_ids);
        let uncached = prompt_ids.len() - cached;
        let linked = remote.link.is_some();
        let decision =
            linked && uncached >= self.remote_prefill_tokens_min && remote.pending.len() < REMOTE_PENDING_MAX;
        tracing::debug!(
            prompt = prompt_ids.len(),
            cached,
            uncached,
            threshold = self.remote_prefill_tokens_min,
            pending = remote.pending.len(),
            linked,
            "{} prefill",
            if decision { "remote" } else { "local" }
        );
        decision
    }

    /// Parks the request and asks the prefill worker for its KV. Ok(false): the link could not take it, so the
    /// request was queued for local prefill instead.
    fn start_remote_prefill(
        &mut self,
        id: u64,
        prompt_ids: Vec<u32>,
        params: &WireParams,
        link: &mpsc::Sender<Message>,
    ) -> cleave_engine::Result<bool> {
        let plan = self
            .engine
            .add_remote_prefill_request(id, prompt_ids, request_params(params))?;
        let request = PrefillRequest {
            id,
            prompt_ids: plan.prompt_ids,
            n_cached_blocks: plan.n_cached_blocks as u32,
            n_blocks: plan.n_blocks as u32,
            params: params.clone(),
        };
        if link.try_send(Message::PrefillRequest(request)).is_err() {
            self.engine.fall_back_to_local_prefill(id)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Prefill role: one decode worker's prompt, its KV streamed layer by layer.
    fn prefill_for(&mut self, conn: u64, request: PrefillRequest, outbox: &mpsc::Sender<Message>) {
        let id = request.id;
        let cancelled = self.cancelled.clone();
        let plan = RemotePrefill {
            prompt_ids: request.prompt_ids,
            n_cached_blocks: request.n_cached_blocks as usize,
            n_blocks: request.n_blocks as usize,
        };
        let mut sink = |chunk: KvBlockChunk| {
            if cancelled.lock().contains(&(conn, id)) {
                return Err(cleave_engine::Error::InvalidRequest(format!(
                    "prefill of request {id} cancelled"
                )));
            }
            let message = Message::KvChunk(KvChunk {
                id,
                layer_idx: chunk.layer_idx as u32,
                block_index: chunk.block_index as u32,
                bytes: Bytes::copy_from_slice(chunk.bytes),
            });
            // Blocking: the link's bounded outbox and TCP pace the prefill to what the decode worker takes.
            outbox
                .blocking_send(message)
                .map_err(|_| cleave_engine::Error::Backend {
                    backend: "worker",
                    message: "the decode worker's link closed".into(),
                })
        };
        let reply = match self
            .engine
            .prefill_remote(&plan, &request_params(&request.params), &mut sink)
        {
            Ok(first_token) => Message::PrefillDone { id, first_token },
            Err(e) => Message::PrefillFailed {
                id,
                message: e.to_string(),
            },
        };
        if self.cancelled.lock().remove(&(conn, id)) {
            tracing::info!(request = id, "prefill cancelled by the decode worker");
        }
        let _ = outbox.blocking_send(reply);
    }

    fn route(&mut self, out: RequestOutput, clients: &mut HashMap<u64, Client>) {
        let id = out.id;
        let finished = out.finish.is_some();
        let delivered = clients.get(&id).is_some_and(|c| deliver(c, out));
        if finished || !delivered {
            clients.remove(&id);
        }
        if !delivered && !finished {
            // The client is gone or too slow: free the request's blocks now.
            self.engine.cancel(id);
        }
    }
}

fn request_params(p: &WireParams) -> RequestParams {
    RequestParams {
        max_tokens: p.max_tokens as usize,
        min_tokens: p.min_tokens as usize,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k as usize,
            seed: p.seed,
        },
        stop_token_ids: p.stop_token_ids.clone(),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
    }
}

/// Sends one output; false when the client's outbox is full or closed.
fn deliver(client: &Client, out: RequestOutput) -> bool {
    let finish = out.finish.map(|f| match f {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Cancelled => "cancelled",
    });
    let tokens = Tokens {
        id: client.client_id,
        token_ids: out.token_ids,
        text: out.text,
        finish: finish.map(str::to_string),
        n_prompt_tokens: out.n_prompt_tokens as u32,
        n_cached_tokens: out.n_cached_tokens as u32,
    };
    client.outbox.try_send(Message::Tokens(tokens)).is_ok()
}
