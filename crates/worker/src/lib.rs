//! A cleave worker: one engine with a role, serving the worker protocol (`cleave-wire`, docs/protocol.md) on TCP.
//!
//! Two halves, joined by bounded channels. The engine loop owns the [`Engine`] on the calling thread: it drains a
//! bounded inbox of [`Command`]s, runs one step, and sends each request's output to the connection that asked for
//! it. Connections live on a tokio runtime: each reads frames, checks the peer's `hello`, turns `generate` and
//! `cancel` into commands, and writes `tokens` back. A slow or vanished client never stalls the engine: its
//! requests are cancelled when its outbox is full or its connection closes.
//!
//! Roles: `aggregated` serves whole requests today; `prefill` and `decode` (remote prefill over the same protocol)
//! build on `Engine::prefill_remote` and `Engine::add_remote_prefill_request`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use cleave_engine::backend::Backend;
use cleave_engine::engine::{Engine, FinishReason, RequestOutput, RequestParams};
use cleave_engine::sampler::SamplingParams;
use cleave_wire::{FrameCodec, Generate, Hello, Message, Role, Tokens, WireParams};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// Commands queued for the engine loop at most; beyond it new requests are refused with "worker overloaded".
pub const INBOX_MAX: usize = 4096;
/// Frames queued for one connection at most; a client that falls this far behind loses its requests.
pub const OUTBOX_MAX: usize = 1024;

pub struct WorkerConfig {
    pub role: Role,
    pub listen: SocketAddr,
}

/// What connections ask of the engine loop.
enum Command {
    Generate {
        id: u64,
        client_id: u64,
        prompt_ids: Vec<u32>,
        params: RequestParams,
        outbox: mpsc::Sender<Message>,
    },
    Cancel {
        id: u64,
    },
}

/// Identifies a model and its KV layout for the `hello` check.
fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Serves until the process ends. Prints `listening on ADDR` (with the bound port) once ready.
pub fn serve<B: Backend>(mut engine: Engine<B>, config: WorkerConfig) -> std::io::Result<()> {
    if config.role != Role::Aggregated {
        return Err(std::io::Error::other(format!(
            "role {:?} is not served yet: this worker runs aggregated requests only",
            config.role
        )));
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
    runtime.spawn(accept_loop(listener, inbox_tx, hello));
    engine_loop(&mut engine, inbox_rx);
    Ok(())
}

async fn accept_loop(listener: TcpListener, inbox: SyncSender<Command>, hello: Hello) {
    let next_id = std::sync::Arc::new(AtomicU64::new(1));
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let (inbox, hello, next_id) = (inbox.clone(), hello.clone(), next_id.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(socket, inbox, hello, next_id).await {
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
    next_id: std::sync::Arc<AtomicU64>,
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
        match stream.next().await {
            Some(Ok(Message::Hello(_peer))) => outbox.send(Message::Hello(hello)).await.map_err(|e| e.to_string())?,
            Some(Ok(other)) => return Err(format!("expected hello, got {other:?}")),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(()),
        }
        while let Some(frame) = stream.next().await {
            match frame.map_err(|e| e.to_string())? {
                Message::Generate(g) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    ids.insert(g.id, id);
                    submit(&inbox, &outbox, id, g).await?;
                }
                Message::Cancel { id } => {
                    if let Some(&engine_id) = ids.get(&id) {
                        let _ = inbox.try_send(Command::Cancel { id: engine_id });
                    }
                }
                other => return Err(format!("unexpected message on the request plane: {other:?}")),
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
    let p: WireParams = g.params;
    let params = RequestParams {
        max_tokens: p.max_tokens as usize,
        min_tokens: p.min_tokens as usize,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k as usize,
            seed: p.seed,
        },
        stop_token_ids: p.stop_token_ids,
        stop: p.stop,
        ignore_eos: p.ignore_eos,
    };
    let command = Command::Generate {
        id,
        client_id: g.id,
        prompt_ids: g.prompt_ids,
        params,
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

/// A request in the engine: where its output goes and under which id the client knows it.
struct Client {
    client_id: u64,
    outbox: mpsc::Sender<Message>,
}

fn engine_loop<B: Backend>(engine: &mut Engine<B>, inbox: Receiver<Command>) {
    let mut clients: HashMap<u64, Client> = HashMap::new();
    loop {
        // Block for work only when idle; otherwise take what is queued and step.
        let first = if engine.has_unfinished() {
            inbox.try_recv().ok()
        } else {
            match inbox.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        for command in first.into_iter().chain(std::iter::from_fn(|| inbox.try_recv().ok())) {
            match command {
                Command::Generate {
                    id,
                    client_id,
                    prompt_ids,
                    params,
                    outbox,
                } => match engine.add_request(id, prompt_ids, params) {
                    Ok(()) => {
                        clients.insert(id, Client { client_id, outbox });
                    }
                    Err(e) => {
                        let _ = outbox.try_send(Message::Error {
                            id: Some(client_id),
                            message: e.to_string(),
                        });
                    }
                },
                Command::Cancel { id } => {
                    if let (Some(out), Some(client)) = (engine.cancel(id), clients.remove(&id)) {
                        deliver(&client, out);
                    }
                }
            }
        }
        if !engine.has_unfinished() {
            continue;
        }
        match engine.step() {
            Ok(outputs) => {
                for out in outputs {
                    let id = out.id;
                    let finished = out.finish.is_some();
                    let delivered = clients.get(&id).is_some_and(|c| deliver(c, out));
                    if finished || !delivered {
                        clients.remove(&id);
                    }
                    if !delivered && !finished {
                        // The client is gone or too slow: free the request's blocks now.
                        engine.cancel(id);
                    }
                }
            }
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                for (id, client) in clients.drain() {
                    engine.cancel(id);
                    let _ = client.outbox.try_send(Message::Error {
                        id: Some(client.client_id),
                        message: e.to_string(),
                    });
                }
            }
        }
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
