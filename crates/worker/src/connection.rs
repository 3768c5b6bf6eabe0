//! The listening side: one task per peer connection (frontends, and decode workers asking a prefill worker).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};

use cleave_wire::{ErrorKind, FrameCodec, Generate, Hello, Message, Role, Transport};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::{Command, INBOX_MAX, OUTBOX_MAX, compatible};

/// Prefills a decode worker cancelled, by (connection, request id): the prefill stops at its next layer.
#[derive(Clone, Default)]
pub(crate) struct CancelledPrefills(Arc<std::sync::Mutex<HashSet<(u64, u64)>>>);

impl CancelledPrefills {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u64)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    inbox: SyncSender<Command>,
    hello: Hello,
    cancelled: CancelledPrefills,
) {
    let next_id = Arc::new(AtomicU64::new(1));
    let next_conn = AtomicU64::new(1);
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
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
        // Frontends only watch a prefill worker's status; decode workers must share its model and KV layout.
        if hello.role == Role::Prefill && peer.role != Role::Frontend && !compatible(&hello, &peer) {
            return Err(format!(
                "incompatible peer: it runs {:?}, this prefill worker runs {:?}",
                peer, hello
            ));
        }
        // A decode worker in this process or on this host offering its KV pool: map it, and tell it KV will be
        // written straight into it.
        let mut reply = hello.clone();
        if hello.role == Role::Prefill && peer.role == Role::Decode {
            let offered = peer.kv_share.as_ref().and_then(|share| {
                if share.process.as_deref() == Some(crate::process_id()) && !share.in_process_handles.is_empty() {
                    Some((share, Transport::InProcess))
                } else if share.host == crate::host_id() && !share.handles.is_empty() {
                    Some((share, Transport::CudaIpc))
                } else {
                    None
                }
            });
            let mut transport = Transport::Tcp;
            if let Some((share, direct)) = offered {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let open = Command::OpenPeer {
                    conn,
                    share: share.clone(),
                    in_process: direct == Transport::InProcess,
                    reply: tx,
                };
                if inbox.try_send(open).is_ok() && rx.await.unwrap_or(false) {
                    transport = direct;
                }
            }
            reply.transport = Some(transport);
        }
        outbox.send(Message::Hello(reply)).await.map_err(|e| e.to_string())?;
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
                (_, Message::Subscribe) => inbox
                    .try_send(Command::Subscribe(outbox.clone()))
                    .map_err(|_| "worker overloaded".to_string())?,
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
                kind: ErrorKind::Internal,
                message: e.clone(),
            })
            .await;
    }
    // The client is gone or broke the protocol: nothing it asked for may keep running.
    cancelled.lock().retain(|&(c, _)| c != conn);
    if hello.role == Role::Prefill {
        let _ = inbox.try_send(Command::ClosePeer { conn });
    }
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
        prefill_worker: g.prefill_worker,
        outbox: outbox.clone(),
    };
    match inbox.try_send(command) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => outbox
            .send(Message::Error {
                id: Some(g.id),
                kind: ErrorKind::Overloaded,
                message: format!("worker overloaded: {INBOX_MAX} commands queued"),
            })
            .await
            .map_err(|e| e.to_string()),
        Err(TrySendError::Disconnected(_)) => Err("the engine has stopped".into()),
    }
}
