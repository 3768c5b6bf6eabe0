//! The frontend's side of the worker protocol: one connection per worker (reconnecting while the worker is
//! listed), the router fed from the workers' status streams, and requests multiplexed over those connections.
//!
//! Workers join and leave at run time ([`WorkerPool::add_worker`], [`WorkerPool::remove_worker`]) — from
//! `cleave serve`'s supervisor or from etcd. A worker is routed to only while it is connected and not draining. If
//! a connection drops, every request on it fails with an error naming the worker; nothing waits forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cleave_kv::{BlockHash, KvEvent};
use cleave_router::{Router, RouterConfig, WorkerId, WorkerLoad};
use cleave_wire::{
    ErrorKind, FrameCodec, Generate, Hello, Message, Role, Tokens, WireKvEvent, WireParams, WorkerStatus,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::metrics::Metrics;

/// Frames queued towards one worker at most.
const OUTBOX_MAX: usize = 4096;
/// Updates queued for one request at most; a client that reads slower than this loses its request.
const REQUEST_EVENTS_MAX: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What a request hears from its worker.
#[derive(Debug)]
pub enum WorkerEvent {
    Tokens(Tokens),
    /// The request failed; `kind` says whether it was the request's fault and whether another worker may well
    /// succeed ([`ErrorKind::is_retryable`]).
    Failed {
        message: String,
        kind: ErrorKind,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no {0} worker is available")]
    NoWorker(&'static str),
    #[error("worker {0} is overloaded")]
    Overloaded(String),
}

/// One worker as the pool knows it.
struct WorkerEntry {
    addr: String,
    role: Role,
    /// Set while connected: frames to the worker.
    outbox: Option<mpsc::Sender<Message>>,
    /// Latest status (without its KV events).
    status: Option<WorkerStatus>,
    /// The connection task; aborted when the worker is removed.
    task: tokio::task::AbortHandle,
}

struct InFlight {
    worker: WorkerId,
    events: mpsc::Sender<WorkerEvent>,
}

struct PoolState {
    router: Router,
    workers: HashMap<WorkerId, WorkerEntry>,
    requests: HashMap<u64, InFlight>,
}

struct Shared {
    hello: Hello,
    model: String,
    block_size: usize,
    state: Mutex<PoolState>,
    next_worker: AtomicU64,
    next_request: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The workers behind one frontend. Cheap to clone.
#[derive(Clone)]
pub struct WorkerPool {
    shared: Arc<Shared>,
}

/// A routed request: its updates, and a cancel sent to the worker if dropped before it finished (the HTTP client
/// went away).
pub struct RequestStream {
    pub id: u64,
    /// The decode (or aggregated) worker serving it.
    pub worker: String,
    /// Prompt blocks the router believed that worker had cached.
    pub cached_blocks_expected: usize,
    events: mpsc::Receiver<WorkerEvent>,
    shared: Arc<Shared>,
    finished: bool,
}

impl RequestStream {
    pub async fn next(&mut self) -> Option<WorkerEvent> {
        let event = self.events.recv().await;
        match &event {
            Some(WorkerEvent::Tokens(t)) if t.finish.is_none() => {}
            _ => self.finished = true,
        }
        event
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = self.shared.lock();
        if let Some(request) = state.requests.remove(&self.id)
            && let Some(outbox) = state.workers.get(&request.worker).and_then(|w| w.outbox.as_ref())
        {
            let _ = outbox.try_send(Message::Cancel { id: self.id });
        }
    }
}

fn router_role(role: Role) -> cleave_router::Role {
    match role {
        Role::Prefill => cleave_router::Role::Prefill,
        Role::Decode => cleave_router::Role::Decode,
        Role::Aggregated | Role::Frontend => cleave_router::Role::Aggregated,
    }
}

impl WorkerPool {
    /// A pool for workers serving `model` with KV blocks of `block_size` tokens; workers that differ are refused.
    pub fn new(model: &str, block_size: usize, router: RouterConfig, metrics: Arc<Metrics>) -> Self {
        let hello = Hello {
            role: Role::Frontend,
            model: model.to_string(),
            model_fingerprint: 0,
            block_size: block_size as u32,
            n_layers: 0,
            kv_block_bytes: 0,
            kv_share: None,
            transport: None,
        };
        let router = Router::new(RouterConfig { block_size, ..router }).expect("a valid router configuration");
        Self {
            shared: Arc::new(Shared {
                hello,
                model: model.to_string(),
                block_size,
                state: Mutex::new(PoolState {
                    router,
                    workers: HashMap::new(),
                    requests: HashMap::new(),
                }),
                next_worker: AtomicU64::new(1),
                next_request: AtomicU64::new(1),
                metrics,
            }),
        }
    }

    /// Starts connecting to the worker at `addr` (and reconnecting whenever the connection drops, until
    /// [`remove_worker`](Self::remove_worker)). Must be called inside a tokio runtime. A worker already known is
    /// left as it is.
    pub fn add_worker(&self, addr: &str, role: Role) {
        let mut state = self.shared.lock();
        if state.workers.values().any(|w| w.addr == addr) {
            return;
        }
        let id = WorkerId(self.shared.next_worker.fetch_add(1, Ordering::Relaxed));
        let task = tokio::spawn(run_connection(self.shared.clone(), id, addr.to_string(), role));
        let entry = WorkerEntry {
            addr: addr.to_string(),
            role,
            outbox: None,
            status: None,
            task: task.abort_handle(),
        };
        state.workers.insert(id, entry);
        tracing::info!(addr, role = role.as_str(), "worker added");
    }

    /// Forgets the worker at `addr`: no new requests go there; its in-flight requests fail.
    pub fn remove_worker(&self, addr: &str) {
        let mut state = self.shared.lock();
        let Some((&id, _)) = state.workers.iter().find(|(_, w)| w.addr == addr) else {
            return;
        };
        let entry = state.workers.remove(&id).expect("found above");
        entry.task.abort();
        disconnected(
            &self.shared,
            &mut state,
            id,
            (&entry.addr, entry.role),
            "it left the pool",
        );
        tracing::info!(addr, "worker removed");
    }

    /// Workers that can take requests now: (decode or aggregated, prefill).
    pub fn ready(&self) -> (usize, usize) {
        let state = self.shared.lock();
        let up = |w: &&WorkerEntry| w.outbox.is_some() && !w.status.as_ref().is_some_and(|s| s.draining);
        let decoders = state
            .workers
            .values()
            .filter(up)
            .filter(|w| w.role != Role::Prefill)
            .count();
        let prefillers = state
            .workers
            .values()
            .filter(up)
            .filter(|w| w.role == Role::Prefill)
            .count();
        (decoders, prefillers)
    }

    /// Tokens the largest ready decode worker's KV pool holds (prompt plus output must fit): `None` before any
    /// worker reported.
    pub fn capacity_tokens(&self) -> Option<usize> {
        let state = self.shared.lock();
        state
            .workers
            .values()
            .filter(|w| w.role != Role::Prefill && w.outbox.is_some())
            .filter_map(|w| w.status.as_ref())
            .map(|s| s.total_blocks as usize * self.shared.block_size)
            .max()
    }

    /// Routes a request and sends it. The decode worker is picked by cached prefix and load; a prefill worker, if
    /// any, is named so the decode worker can prefill there should it decide to.
    pub fn generate(&self, prompt_ids: Vec<u32>, params: WireParams) -> Result<RequestStream, PoolError> {
        let started = Instant::now();
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let hashes = cleave_kv::block_hashes(&prompt_ids, self.shared.block_size);
        let mut state = self.shared.lock();
        let decision = state
            .router
            .pick_decode_worker_for_hashes(&hashes, prompt_ids.len())
            .ok_or(PoolError::NoWorker("decode or aggregated"))?;
        let worker = &state.workers[&decision.worker];
        let (addr, outbox) = (worker.addr.clone(), worker.outbox.clone());
        let prefill_worker = if worker.role == Role::Decode {
            let uncached = prompt_ids
                .len()
                .saturating_sub(decision.cached_blocks * self.shared.block_size);
            let pick = state.router.pick_prefill_worker(uncached as u64);
            pick.and_then(|p| state.workers.get(&p)).map(|p| p.addr.clone())
        } else {
            None
        };
        let outbox = outbox.ok_or(PoolError::NoWorker("connected decode"))?;
        let (events_tx, events) = mpsc::channel(REQUEST_EVENTS_MAX);
        let generate = Message::Generate(Generate {
            id,
            prompt_ids,
            params,
            prefill_worker,
        });
        if outbox.try_send(generate).is_err() {
            return Err(PoolError::Overloaded(addr));
        }
        state.requests.insert(
            id,
            InFlight {
                worker: decision.worker,
                events: events_tx,
            },
        );
        drop(state);
        self.shared
            .metrics
            .route_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(RequestStream {
            id,
            worker: addr,
            cached_blocks_expected: decision.cached_blocks,
            events,
            shared: self.shared.clone(),
            finished: false,
        })
    }
}

/// Keeps one worker connected until it is removed.
async fn run_connection(shared: Arc<Shared>, id: WorkerId, addr: String, role: Role) {
    let mut retry = RETRY_MIN;
    loop {
        let connected_at = Instant::now();
        let result = connect_once(&shared, id, &addr, role).await;
        {
            let mut state = shared.lock();
            let Some(entry) = state.workers.get_mut(&id) else {
                return;
            };
            entry.outbox = None;
            entry.status = None;
            let reason = match &result {
                Ok(()) => "it closed the connection".to_string(),
                Err(e) => e.clone(),
            };
            disconnected(&shared, &mut state, id, (&addr, role), &reason);
        }
        if connected_at.elapsed() > RETRY_MAX {
            retry = RETRY_MIN;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Takes the worker out of routing and fails its in-flight requests.
fn disconnected(shared: &Shared, state: &mut PoolState, id: WorkerId, (addr, role): (&str, Role), reason: &str) {
    state.router.remove_worker(id);
    let lost: Vec<u64> = state
        .requests
        .iter()
        .filter(|(_, r)| r.worker == id)
        .map(|(&rid, _)| rid)
        .collect();
    for rid in lost {
        let request = state.requests.remove(&rid).expect("listed above");
        let message = format!("{} worker {addr} failed: {reason}", role.as_str());
        let _ = request.events.try_send(WorkerEvent::Failed {
            message,
            kind: ErrorKind::Internal,
        });
    }
    shared.metrics.worker_down(addr, role.as_str());
}

async fn connect_once(shared: &Shared, id: WorkerId, addr: &str, role: Role) -> Result<(), String> {
    let socket = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = socket.set_nodelay(true);
    let (mut sink, mut stream) = Framed::new(socket, FrameCodec::default()).split();
    sink.send(Message::Hello(shared.hello.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let peer = match stream.next().await {
        Some(Ok(Message::Hello(peer))) => peer,
        other => return Err(format!("expected hello, got {other:?}")),
    };
    if peer.model != shared.model || peer.block_size as usize != shared.block_size || peer.role != role {
        let message = format!(
            "worker serves model {:?} with {}-token blocks as {:?}; this frontend expects {:?}, {}, {:?}",
            peer.model, peer.block_size, peer.role, shared.model, shared.block_size, role
        );
        tracing::error!(addr, "{message}");
        return Err(message);
    }
    sink.send(Message::Subscribe).await.map_err(|e| e.to_string())?;
    let (outbox, mut outbox_rx) = mpsc::channel::<Message>(OUTBOX_MAX);
    {
        let mut state = shared.lock();
        let Some(entry) = state.workers.get_mut(&id) else {
            return Ok(());
        };
        entry.outbox = Some(outbox);
        state
            .router
            .add_worker(id, router_role(role))
            .map_err(|e| e.to_string())?;
    }
    tracing::info!(addr, "connected to worker");
    let role_label = role.as_str();
    loop {
        tokio::select! {
            out = outbox_rx.recv() => match out {
                Some(m) => sink.send(m).await.map_err(|e| e.to_string())?,
                None => return Ok(()),
            },
            frame = stream.next() => match frame {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Message::Tokens(tokens))) => deliver(shared, tokens),
                Some(Ok(Message::Error { id: Some(rid), kind, message })) => {
                    if let Some(request) = shared.lock().requests.remove(&rid) {
                        let _ = request.events.try_send(WorkerEvent::Failed { message, kind });
                    }
                }
                Some(Ok(Message::Error { id: None, message, .. })) => return Err(message),
                Some(Ok(Message::WorkerStatus(status))) => {
                    shared.metrics.worker_status(addr, role_label, &status);
                    apply_status(shared, id, status);
                }
                Some(Ok(other)) => return Err(format!("unexpected message from a worker: {other:?}")),
            }
        }
    }
}

fn deliver(shared: &Shared, tokens: Tokens) {
    let mut state = shared.lock();
    let rid = tokens.id;
    let finished = tokens.finish.is_some();
    let Some(request) = state.requests.get(&rid) else {
        return;
    };
    let (worker, sent) = (request.worker, request.events.try_send(WorkerEvent::Tokens(tokens)));
    if finished || sent.is_err() {
        state.requests.remove(&rid);
    }
    if sent.is_err() && !finished {
        // The client stopped reading: free the request's blocks on the worker.
        if let Some(outbox) = state.workers.get(&worker).and_then(|w| w.outbox.as_ref()) {
            let _ = outbox.try_send(Message::Cancel { id: rid });
        }
    }
}

fn apply_status(shared: &Shared, id: WorkerId, mut status: WorkerStatus) {
    let mut state = shared.lock();
    let PoolState { router, workers, .. } = &mut *state;
    let Some(entry) = workers.get_mut(&id) else { return };
    if status.draining {
        // Finishing its requests; route nothing new there.
        router.remove_worker(id);
    } else {
        if router.role(id).is_none() {
            let _ = router.add_worker(id, router_role(entry.role));
        }
        for event in status.kv_events.drain(..) {
            router.apply_kv_event(id, &kv_event(event));
        }
        router.report_load(
            id,
            WorkerLoad {
                active_blocks: status.active_blocks.into(),
                total_blocks: status.total_blocks.into(),
                queued_prefill_tokens: status.queued_prefill_tokens,
                running_requests: status.running_requests,
            },
        );
    }
    status.kv_events.clear();
    entry.status = Some(status);
}

fn kv_event(event: WireKvEvent) -> KvEvent {
    match event {
        WireKvEvent::Stored { hash, parent, block } => KvEvent::Stored {
            hash: BlockHash(hash),
            parent: parent.map(BlockHash),
            block,
        },
        WireKvEvent::Removed { hash, block } => KvEvent::Removed {
            hash: BlockHash(hash),
            block,
        },
        WireKvEvent::Cleared => KvEvent::Cleared,
    }
}
