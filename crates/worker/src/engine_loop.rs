//! The engine loop: owns the engine, turns commands into engine calls, routes outputs to their connections,
//! decides local or remote prefill (decode role), serves prefill requests (prefill role), and publishes status.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cleave_engine::backend::{Backend, KvCacheExport, KvShareKind, PeerKvCache};
use cleave_engine::engine::{Engine, FinishReason, KvBlockChunk, RemotePrefill, RequestOutput, RequestParams};
use cleave_engine::sampler::SamplingParams;
use cleave_kv::KvEvent;
use cleave_wire::{
    DRAINING, ErrorKind, Hello, KvChunk, KvPoolShare, Message, PrefillRequest, Role, Tokens, WireKvEvent, WireParams,
    WorkerStatus, WorkerTotals,
};
use tokio::sync::mpsc;

use crate::connection::CancelledPrefills;
use crate::{
    AWAITING_BLOCKS_MAX, Command, LOCAL_PREFILL_TOKENS_MAX, PREFILL_LINKS_MAX, REMOTE_PENDING_MAX, WorkerConfig,
};

/// Status goes out at most this often while the worker is busy (KV events wait for it), and at least this often...
const STATUS_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// ...and at least this often when nothing changes, so subscribers can tell a live worker from a stuck one.
const STATUS_HEARTBEAT: Duration = Duration::from_secs(1);
/// Status subscribers at most (frontends and standalone routers).
const SUBSCRIBERS_MAX: usize = 64;

/// A request in the engine: where its output goes and under which id the client knows it.
struct Client {
    client_id: u64,
    outbox: mpsc::Sender<Message>,
}

/// A request parked while a prefill worker computes its KV.
struct PendingRemote {
    link: String,
    sent_at: Instant,
    /// Prompt tokens the prefill worker computes.
    tokens: usize,
    /// KV bytes the prefill worker sends.
    bytes: u64,
    /// The prefill worker writes straight into this request's blocks (CUDA IPC or in-process).
    direct: bool,
    /// Cancelled while the prefill worker may still be writing into its blocks: they are freed only once it
    /// answers (or its link is gone), never handed to another request before.
    cancelled: bool,
}

/// A request bound for remote prefill while this worker's KV pool cannot hold its prompt. It waits, in arrival
/// order, until finishing sequences free enough blocks: refusing it would lose a request the pool can take in a few
/// steps, and prefilling it locally would stall every running decode for the whole prompt — the spike
/// disaggregation removes.
struct AwaitingBlocks {
    id: u64,
    prompt_ids: Vec<u32>,
    params: WireParams,
    /// The prefill worker the router named, if any.
    prefill_worker: Option<String>,
}

/// What became of a request offered to the engine.
enum Admitted {
    Yes,
    /// Bound for remote prefill, but the KV pool cannot hold its prompt now.
    NoBlocks,
    No(cleave_engine::Error),
}

/// A link to a prefill worker, once up.
#[derive(Clone)]
struct Link {
    outbox: mpsc::Sender<Message>,
    /// KV moves outside the link (CUDA IPC or in-process).
    direct: bool,
}

struct Subscriber {
    outbox: mpsc::Sender<Message>,
    /// A status was dropped (outbox full): the next one starts with a full snapshot of the cached blocks.
    resync: bool,
}

pub(crate) struct EngineLoop<'a, B: Backend> {
    engine: &'a mut Engine<B>,
    role: Role,
    hello: Hello,
    remote_prefill_tokens_min: usize,
    remote_queue_tokens_max: usize,
    cancelled: CancelledPrefills,
    runtime: tokio::runtime::Handle,
    inbox: SyncSender<Command>,
    clients: HashMap<u64, Client>,
    /// Decode role: prefill workers by address; `None` while (re)connecting.
    links: HashMap<String, Option<Link>>,
    pending: HashMap<u64, PendingRemote>,
    /// Decode role: requests waiting for KV blocks before their remote prefill (at most `AWAITING_BLOCKS_MAX`).
    awaiting_blocks: VecDeque<AwaitingBlocks>,
    /// Prefill role: decode workers' KV pools mapped into this process, by connection.
    peers: HashMap<u64, PeerKvCache>,
    subscribers: Vec<Subscriber>,
    /// KV events not yet published.
    kv_events: Vec<WireKvEvent>,
    totals: WorkerTotals,
    last_status: Option<(Instant, WorkerStatus)>,
    draining: bool,
}

impl<'a, B: Backend> EngineLoop<'a, B> {
    pub(crate) fn new(
        engine: &'a mut Engine<B>,
        config: &WorkerConfig,
        hello: Hello,
        cancelled: CancelledPrefills,
        runtime: tokio::runtime::Handle,
        inbox: SyncSender<Command>,
    ) -> Self {
        let mut this = Self {
            engine,
            role: config.role,
            hello,
            remote_prefill_tokens_min: config.remote_prefill_tokens_min,
            remote_queue_tokens_max: config.remote_queue_tokens_max,
            cancelled,
            runtime,
            inbox,
            clients: HashMap::new(),
            links: HashMap::new(),
            pending: HashMap::new(),
            awaiting_blocks: VecDeque::new(),
            peers: HashMap::new(),
            subscribers: Vec::new(),
            kv_events: Vec::new(),
            totals: WorkerTotals::default(),
            last_status: None,
            draining: false,
        };
        if config.role == Role::Decode {
            for addr in &config.prefill_workers {
                this.ensure_link(addr);
            }
        }
        this
    }

    /// Runs until drained (or until every sender of the inbox is gone).
    pub(crate) fn run(mut self, inbox: Receiver<Command>, mut on_drain: Option<Box<dyn FnOnce()>>) {
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
                self.handle(command);
            }
            if self.draining
                && let Some(hook) = on_drain.take()
            {
                hook();
            }
            self.admit_awaiting_blocks();
            if self.engine.n_waiting() + self.engine.n_running() > 0 {
                self.step();
            }
            self.publish_status();
            if self.draining && self.clients.is_empty() && self.pending.is_empty() && !self.engine.has_unfinished() {
                tracing::info!("drained");
                return;
            }
        }
    }

    fn step(&mut self) {
        match self.engine.step() {
            Ok(outputs) => {
                for out in outputs {
                    self.route(out);
                }
            }
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                for (id, client) in self.clients.drain() {
                    self.engine.cancel(id);
                    let _ = client.outbox.try_send(Message::Error {
                        id: Some(client.client_id),
                        kind: ErrorKind::Internal,
                        message: e.to_string(),
                    });
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Generate {
                id,
                client_id,
                prompt_ids,
                params,
                prefill_worker,
                outbox,
            } => self.generate(id, Client { client_id, outbox }, prompt_ids, &params, prefill_worker),
            Command::Cancel { id } => {
                if let Some(i) = self.awaiting_blocks.iter().position(|a| a.id == id) {
                    let awaiting = self.awaiting_blocks.remove(i).expect("position is in range");
                    if let Some(client) = self.clients.remove(&id) {
                        let cancelled = RequestOutput {
                            id,
                            token_ids: Vec::new(),
                            text: String::new(),
                            finish: Some(FinishReason::Cancelled),
                            n_prompt_tokens: awaiting.prompt_ids.len(),
                            n_cached_tokens: 0,
                        };
                        deliver(&client, cancelled);
                    }
                    return;
                }
                // A cancelled remote prefill is stopped on the prefill worker too.
                if let Some(pending) = self.pending.get_mut(&id) {
                    if pending.cancelled {
                        return;
                    }
                    if let Some(Some(link)) = self.links.get(&pending.link) {
                        let _ = link.outbox.try_send(Message::Cancel { id });
                    }
                    if pending.direct {
                        // Its blocks may still be written by the prefill worker: free them when it answers.
                        pending.cancelled = true;
                        self.clients.remove(&id);
                        return;
                    }
                    self.pending.remove(&id);
                }
                if let (Some(out), Some(client)) = (self.engine.cancel(id), self.clients.remove(&id)) {
                    deliver(&client, out);
                }
            }
            Command::Prefill { conn, request, outbox } => self.prefill_for(conn, request, &outbox),
            Command::Subscribe(outbox) => {
                if self.subscribers.len() < SUBSCRIBERS_MAX {
                    self.subscribers.push(Subscriber { outbox, resync: true });
                    self.last_status = None; // send the newcomer its snapshot now
                } else {
                    let message = format!("{SUBSCRIBERS_MAX} status subscribers already");
                    let _ = outbox.try_send(Message::Error {
                        id: None,
                        kind: ErrorKind::Overloaded,
                        message,
                    });
                }
            }
            Command::OpenPeer {
                conn,
                share,
                in_process,
                reply,
            } => {
                let opened = self.open_peer(conn, &share, in_process);
                let _ = reply.send(opened);
            }
            Command::ClosePeer { conn } => {
                if let Some(peer) = self.peers.remove(&conn) {
                    self.engine.close_peer_kv_cache(peer);
                }
            }
            Command::PrefillLinkUp { addr, outbox, direct } => {
                self.links.insert(addr, Some(Link { outbox, direct }));
            }
            Command::PrefillLinkDown { addr } => {
                if let Some(link) = self.links.get_mut(&addr) {
                    *link = None;
                }
                let lost: Vec<u64> = self
                    .pending
                    .iter()
                    .filter(|(_, p)| p.link == addr)
                    .map(|(&id, _)| id)
                    .collect();
                for id in lost {
                    if self.pending[&id].cancelled {
                        self.pending.remove(&id);
                        self.engine.cancel(id);
                        continue;
                    }
                    tracing::warn!(request = id, %addr, "prefill link lost: prefilling locally");
                    self.fall_back(id);
                }
            }
            Command::RemoteKv(chunk) => {
                if !self.pending.contains_key(&chunk.id) {
                    return; // cancelled or fallen back: late chunks are dropped
                }
                let kv = KvBlockChunk {
                    layer_idx: chunk.layer_idx as usize,
                    block_index: chunk.block_index as usize,
                    bytes: &chunk.bytes,
                };
                match self.engine.import_kv_block(chunk.id, &kv) {
                    Ok(()) => self.totals.kv_transfer_bytes += chunk.bytes.len() as u64,
                    Err(e) => {
                        tracing::warn!(
                            request = chunk.id,
                            "bad KV from the prefill worker ({e}): prefilling locally"
                        );
                        self.fall_back(chunk.id);
                    }
                }
            }
            Command::RemoteDone { id, first_token } => {
                let Some(pending) = self.pending.remove(&id) else {
                    return;
                };
                if pending.cancelled {
                    self.engine.cancel(id);
                    return;
                }
                match self.engine.finish_remote_prefill(id, first_token) {
                    Ok(out) => {
                        let seconds = pending.sent_at.elapsed().as_secs_f64();
                        tracing::info!(request = id, seconds, direct = pending.direct, "prefilled remotely");
                        self.totals.kv_transfer_seconds += seconds;
                        if pending.direct {
                            self.totals.kv_transfer_bytes += pending.bytes;
                        }
                        self.route(out);
                    }
                    Err(e) => {
                        tracing::warn!(
                            request = id,
                            "finishing the remote prefill failed ({e}): prefilling locally"
                        );
                        self.totals.prefill_fallbacks += 1;
                        let _ = self.engine.fall_back_to_local_prefill(id);
                    }
                }
            }
            Command::RemoteFailed { id, message } => {
                if self.pending.get(&id).is_some_and(|p| p.cancelled) {
                    self.pending.remove(&id);
                    self.engine.cancel(id);
                } else if self.pending.contains_key(&id) {
                    tracing::warn!(request = id, "remote prefill failed ({message}): prefilling locally");
                    self.fall_back(id);
                }
            }
            Command::Drain => {
                self.draining = true;
                self.last_status = None; // tell subscribers now
            }
        }
    }

    fn generate(
        &mut self,
        id: u64,
        client: Client,
        prompt_ids: Vec<u32>,
        params: &WireParams,
        prefill_worker: Option<String>,
    ) {
        if self.draining {
            let message = format!("{DRAINING}: retry on another worker");
            let _ = client.outbox.try_send(Message::Error {
                id: Some(client.client_id),
                kind: ErrorKind::Draining,
                message,
            });
            return;
        }
        let n_prompt = prompt_ids.len() as u64;
        let cached = self.engine.cached_prefix_tokens(&prompt_ids);
        // Requests already waiting for KV blocks go first.
        let admitted = if self.awaiting_blocks.is_empty() {
            self.admit(id, &prompt_ids, params, prefill_worker.clone())
        } else {
            Admitted::NoBlocks
        };
        let added = match admitted {
            Admitted::Yes => Ok(()),
            Admitted::No(e) => Err(e),
            Admitted::NoBlocks if self.awaiting_blocks.len() >= AWAITING_BLOCKS_MAX => Err(
                cleave_engine::Error::Overloaded(format!("{AWAITING_BLOCKS_MAX} requests already wait for KV blocks")),
            ),
            Admitted::NoBlocks => {
                tracing::info!(
                    request = id,
                    ahead = self.awaiting_blocks.len(),
                    "the KV pool is full: the request waits for KV blocks"
                );
                self.awaiting_blocks.push_back(AwaitingBlocks {
                    id,
                    prompt_ids,
                    params: params.clone(),
                    prefill_worker,
                });
                Ok(())
            }
        };
        match added {
            Ok(()) => {
                self.totals.prompt_tokens += n_prompt;
                self.totals.cached_prompt_tokens += cached as u64;
                self.clients.insert(id, client);
            }
            Err(e) => refuse(&client, &e),
        }
    }

    /// Offers a request to the engine: prefilled here, or parked with its KV blocks while a prefill worker
    /// computes them.
    fn admit(&mut self, id: u64, prompt_ids: &[u32], params: &WireParams, prefill_worker: Option<String>) -> Admitted {
        let link = match self.role {
            Role::Decode => {
                let cached = self.engine.cached_prefix_tokens(prompt_ids);
                self.remote_prefill_link(prompt_ids.len(), cached, prefill_worker)
            }
            _ => None,
        };
        let added = match link {
            Some((addr, link)) => match self.start_remote_prefill(id, prompt_ids.to_vec(), params, addr, &link) {
                // Parking is the only step there that reports overload: the pool cannot hold the prompt yet.
                Err(cleave_engine::Error::Overloaded(_)) => return Admitted::NoBlocks,
                other => other,
            },
            None => self
                .engine
                .add_request(id, prompt_ids.to_vec(), request_params(params))
                .map(|()| self.totals.prefills_local += 1),
        };
        match added {
            Ok(()) => Admitted::Yes,
            Err(e) => Admitted::No(e),
        }
    }

    /// Admits the requests waiting for KV blocks, in arrival order, while the pool holds the next one.
    fn admit_awaiting_blocks(&mut self) {
        while let Some(next) = self.awaiting_blocks.pop_front() {
            match self.admit(next.id, &next.prompt_ids, &next.params, next.prefill_worker.clone()) {
                Admitted::Yes => {}
                Admitted::NoBlocks => {
                    self.awaiting_blocks.push_front(next);
                    return;
                }
                Admitted::No(e) => {
                    if let Some(client) = self.clients.remove(&next.id) {
                        refuse(&client, &e);
                    }
                }
            }
        }
    }

    /// Conditional disaggregation: prefill remotely only when it pays — the part of the prompt not already in this
    /// worker's prefix cache is long enough that computing it here would stall the running decodes, and the
    /// prefill worker is not backed up: while more than `remote_queue_tokens_max` tokens are queued there (from
    /// this worker), a short prompt (under `LOCAL_PREFILL_TOKENS_MAX`) is computed here, where it stalls decodes
    /// for about one step instead of waiting behind long prompts. Returns the link to
    /// use. Each decision is logged with its inputs.
    fn remote_prefill_link(&mut self, prompt: usize, cached: usize, named: Option<String>) -> Option<(String, Link)> {
        let uncached = prompt - cached;
        let link = match named {
            Some(addr) => {
                self.ensure_link(&addr);
                self.links.get(&addr).cloned().flatten().map(|outbox| (addr, outbox))
            }
            None => self.least_busy_link(),
        };
        let queued: usize = link.as_ref().map_or(0, |(addr, _)| {
            self.pending
                .values()
                .filter(|p| &p.link == addr)
                .map(|p| p.tokens)
                .sum()
        });
        let wanted = prefill_remotely(
            uncached,
            self.remote_prefill_tokens_min,
            self.remote_queue_tokens_max,
            queued,
            self.pending.len(),
        );
        let decision = if wanted && link.is_some() { "remote" } else { "local" };
        tracing::debug!(
            prompt,
            cached,
            uncached,
            threshold = self.remote_prefill_tokens_min,
            queued,
            pending = self.pending.len(),
            link = link.as_ref().map(|(addr, _)| addr.as_str()),
            "{decision} prefill"
        );
        link.filter(|_| wanted)
    }

    fn least_busy_link(&self) -> Option<(String, Link)> {
        self.links
            .iter()
            .filter_map(|(addr, link)| Some((addr, link.as_ref()?)))
            .min_by_key(|(addr, _)| self.pending.values().filter(|p| &p.link == *addr).count())
            .map(|(addr, link)| (addr.clone(), link.clone()))
    }

    /// Starts linking to the prefill worker at `addr` unless a link exists or is being made.
    fn ensure_link(&mut self, addr: &str) {
        if self.links.contains_key(addr) || self.links.len() >= PREFILL_LINKS_MAX {
            return;
        }
        self.links.insert(addr.to_string(), None);
        let task = crate::prefill_link::prefill_link(addr.to_string(), self.inbox.clone(), self.hello.clone());
        self.runtime.spawn(task);
    }

    /// Parks the request and asks the prefill worker for its KV; if the link cannot take the request, it is
    /// queued for local prefill instead.
    fn start_remote_prefill(
        &mut self,
        id: u64,
        prompt_ids: Vec<u32>,
        params: &WireParams,
        addr: String,
        link: &Link,
    ) -> cleave_engine::Result<()> {
        let plan = self
            .engine
            .add_remote_prefill_request(id, prompt_ids, request_params(params))?;
        let n_layers = self.engine.kv_layout().n_layers as u64;
        let bytes = (plan.n_blocks - plan.n_cached_blocks) as u64 * n_layers * self.engine.kv_block_bytes() as u64;
        let request = PrefillRequest {
            id,
            prompt_ids: plan.prompt_ids,
            n_cached_blocks: plan.n_cached_blocks as u32,
            n_blocks: plan.n_blocks as u32,
            params: params.clone(),
            dst_blocks: if link.direct {
                self.engine.parked_blocks(id)
            } else {
                None
            },
        };
        if link.outbox.try_send(Message::PrefillRequest(request)).is_err() {
            self.totals.prefills_local += 1;
            return self.engine.fall_back_to_local_prefill(id);
        }
        self.totals.prefills_remote += 1;
        let pending = PendingRemote {
            link: addr,
            sent_at: Instant::now(),
            tokens: (plan.n_blocks - plan.n_cached_blocks) * self.engine.kv_layout().block_size,
            bytes,
            direct: link.direct,
            cancelled: false,
        };
        self.pending.insert(id, pending);
        Ok(())
    }

    /// Prefill role: maps a decode worker's KV pool, by address when it lives in this process, else through CUDA
    /// IPC. False (KV then moves over TCP) if it cannot.
    fn open_peer(&mut self, conn: u64, share: &KvPoolShare, in_process: bool) -> bool {
        let (kind, hexes) = match in_process {
            true => (KvShareKind::InProcess, &share.in_process_handles),
            false => (KvShareKind::CudaIpc, &share.handles),
        };
        let unhex = |hex: &str| -> Option<Vec<u8>> {
            (0..hex.len())
                .step_by(2)
                .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect()
        };
        let Some(handles) = hexes.iter().map(|h| unhex(h)).collect::<Option<Vec<_>>>() else {
            tracing::warn!(conn, "the decode worker's KV pool handle is not hex: KV moves over TCP");
            return false;
        };
        let export = KvCacheExport {
            kind,
            handles,
            layer_bytes: share.layer_bytes,
            block_bytes: share.block_bytes,
            n_layers: share.n_layers,
        };
        match self.engine.open_peer_kv_cache(&export) {
            Ok(peer) => {
                tracing::info!(
                    conn,
                    in_process,
                    "mapped a decode worker's KV pool: KV is written straight into it"
                );
                if let Some(old) = self.peers.insert(conn, peer) {
                    self.engine.close_peer_kv_cache(old);
                }
                true
            }
            Err(e) => {
                tracing::warn!(conn, "cannot map the decode worker's KV pool ({e}): KV moves over TCP");
                false
            }
        }
    }

    fn fall_back(&mut self, id: u64) {
        self.pending.remove(&id);
        self.totals.prefill_fallbacks += 1;
        let _ = self.engine.fall_back_to_local_prefill(id);
    }

    /// Prefill role: one decode worker's prompt, its KV written layer by layer into the decode worker's pool
    /// (CUDA IPC) or streamed on the link.
    fn prefill_for(&mut self, conn: u64, request: PrefillRequest, outbox: &mpsc::Sender<Message>) {
        let id = request.id;
        if self.draining {
            let message = DRAINING.to_string();
            let _ = outbox.blocking_send(Message::PrefillFailed { id, message });
            return;
        }
        let plan = RemotePrefill {
            prompt_ids: request.prompt_ids,
            n_cached_blocks: request.n_cached_blocks as usize,
            n_blocks: request.n_blocks as usize,
        };
        let params = request_params(&request.params);
        let started = Instant::now();
        let mut bytes_sent = 0u64;
        let cancelled = self.cancelled.clone();
        let check_cancelled = || {
            if cancelled.lock().contains(&(conn, id)) {
                return Err(cleave_engine::Error::InvalidRequest(format!(
                    "prefill of request {id} cancelled"
                )));
            }
            Ok(())
        };
        let result = match (&request.dst_blocks, self.peers.get(&conn)) {
            (Some(dst_blocks), Some(peer)) => {
                let mut keep_going = check_cancelled;
                let result = self
                    .engine
                    .prefill_remote_to_peer(&plan, &params, peer, dst_blocks, &mut keep_going);
                let blocks = (plan.n_blocks - plan.n_cached_blocks) as u64;
                bytes_sent = blocks * self.engine.kv_layout().n_layers as u64 * self.engine.kv_block_bytes() as u64;
                result
            }
            (Some(_), None) => Err(cleave_engine::Error::InvalidRequest(
                "destination blocks given, but this link has no mapped KV pool".into(),
            )),
            (None, _) => {
                let mut sink = |chunk: KvBlockChunk| {
                    check_cancelled()?;
                    bytes_sent += chunk.bytes.len() as u64;
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
                self.engine.prefill_remote(&plan, &params, &mut sink)
            }
        };
        self.totals.prefills_local += 1;
        self.totals.prompt_tokens += plan.prompt_ids.len() as u64;
        self.totals.kv_transfer_bytes += bytes_sent;
        self.totals.kv_transfer_seconds += started.elapsed().as_secs_f64();
        let reply = match result {
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

    fn route(&mut self, out: RequestOutput) {
        let id = out.id;
        let finished = out.finish.is_some();
        let delivered = self.clients.get(&id).is_some_and(|c| deliver(c, out));
        if finished || !delivered {
            self.clients.remove(&id);
        }
        if !delivered && !finished {
            // The client is gone or too slow: free the request's blocks now.
            self.engine.cancel(id);
        }
    }

    /// Sends the worker's status to its subscribers when something changed (at most every
    /// [`STATUS_INTERVAL_MIN`]) or when a heartbeat is due. KV events are collected every time so the pool's
    /// bounded buffer never overflows.
    fn publish_status(&mut self) {
        self.kv_events
            .extend(self.engine.drain_kv_events().iter().map(wire_kv_event));
        if self.subscribers.is_empty() {
            self.kv_events.clear();
            return;
        }
        let status = self.status();
        let due = match &self.last_status {
            None => true,
            Some((at, last)) => {
                let changed = !self.kv_events.is_empty() || *last != status;
                at.elapsed() >= STATUS_HEARTBEAT || (changed && at.elapsed() >= STATUS_INTERVAL_MIN)
            }
        };
        if !due {
            return;
        }
        let events = std::mem::take(&mut self.kv_events);
        let snapshot = || -> Vec<WireKvEvent> {
            let stored = self
                .engine
                .block_pool()
                .cached_blocks()
                .map(|(hash, block)| WireKvEvent::Stored {
                    hash: hash.0,
                    parent: None,
                    block,
                });
            std::iter::once(WireKvEvent::Cleared).chain(stored).collect()
        };
        self.subscribers.retain_mut(|sub| {
            let kv_events = if sub.resync { snapshot() } else { events.clone() };
            let message = Message::WorkerStatus(WorkerStatus {
                kv_events,
                ..status.clone()
            });
            match sub.outbox.try_send(message) {
                Ok(()) => {
                    sub.resync = false;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.resync = true;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.last_status = Some((Instant::now(), status));
    }

    /// The load part of the status (no KV events).
    fn status(&self) -> WorkerStatus {
        let pool = self.engine.block_pool();
        WorkerStatus {
            total_blocks: pool.n_blocks() as u32,
            active_blocks: pool.n_in_use() as u32,
            queued_prefill_tokens: self.engine.queued_prefill_tokens() as u64,
            running_requests: self.engine.n_running() as u32,
            // Requests waiting for KV blocks are waiting too (the router weighs load by it).
            waiting_requests: (self.engine.n_waiting() + self.awaiting_blocks.len()) as u32,
            remote_prefills_pending: self.pending.len() as u32,
            draining: self.draining,
            kv_events: Vec::new(),
            totals: WorkerTotals {
                preemptions: self.engine.n_preemptions(),
                ..self.totals.clone()
            },
        }
    }
}

/// The conditional-disaggregation rule for a prompt with `uncached` tokens to compute, given `queued` tokens already
/// waiting at the chosen prefill worker and `pending` remote prefills in flight from this worker.
fn prefill_remotely(uncached: usize, threshold: usize, queue_max: usize, queued: usize, pending: usize) -> bool {
    // Only a short prompt is worth computing here when the prefill worker is busy: a long one would stall every
    // running decode for long.
    let backed_up = (queued > queue_max && uncached < LOCAL_PREFILL_TOKENS_MAX) || pending >= REMOTE_PENDING_MAX;
    uncached >= threshold && !backed_up
}

fn wire_kv_event(event: &KvEvent) -> WireKvEvent {
    match *event {
        KvEvent::Stored { hash, parent, block } => WireKvEvent::Stored {
            hash: hash.0,
            parent: parent.map(|p| p.0),
            block,
        },
        KvEvent::Removed { hash, block } => WireKvEvent::Removed { hash: hash.0, block },
        KvEvent::Cleared => WireKvEvent::Cleared,
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

/// Tells the client its request was not taken, with the error's kind.
fn refuse(client: &Client, e: &cleave_engine::Error) {
    let kind = match e {
        cleave_engine::Error::InvalidRequest(_) => ErrorKind::InvalidRequest,
        cleave_engine::Error::Overloaded(_) => ErrorKind::Overloaded,
        _ => ErrorKind::Internal,
    };
    let _ = client.outbox.try_send(Message::Error {
        id: Some(client.client_id),
        kind,
        message: e.to_string(),
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_disaggregation_rule() {
        let (threshold, queue_max) = (256, 8192);
        let remotely = |uncached, queued, pending| prefill_remotely(uncached, threshold, queue_max, queued, pending);
        // Under the threshold: local; at or over it with an idle prefill worker: remote.
        assert!(!remotely(255, 0, 0));
        assert!(remotely(256, 0, 0));
        // A busy prefill worker keeps short prompts here...
        let busy = queue_max + 1;
        assert!(!remotely(LOCAL_PREFILL_TOKENS_MAX - 1, busy, 1));
        assert!(remotely(LOCAL_PREFILL_TOKENS_MAX - 1, queue_max, 1));
        // ...but never long ones: they would stall the decodes here for long.
        assert!(remotely(LOCAL_PREFILL_TOKENS_MAX, busy, 1));
        assert!(remotely(32_768, 10 * busy, 3));
        // Too many remote prefills in flight: everything stays here.
        assert!(!remotely(32_768, 0, REMOTE_PENDING_MAX));
    }
}
