//! Decode role: a connection to one prefill worker, reconnecting after failures, feeding what it sends to the
//! engine loop.

use std::sync::mpsc::SyncSender;
use std::time::Duration;

use cleave_wire::{FrameCodec, Hello, Message, Role, Transport};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::{Command, OUTBOX_MAX, compatible};

/// Pause before the first reconnection attempt; doubled after each failure up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Runs until the engine loop stops.
pub(crate) async fn prefill_link(addr: String, inbox: SyncSender<Command>, hello: Hello) {
    let mut retry = RETRY_MIN;
    loop {
        match link_once(&addr, &inbox, &hello).await {
            Ok(()) => {
                tracing::info!(%addr, "prefill worker closed the link");
                retry = RETRY_MIN;
            }
            Err(e) => tracing::debug!(%addr, "prefill link: {e}"),
        }
        let down = Command::PrefillLinkDown { addr: addr.clone() };
        if inbox.send(down).is_err() {
            return;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

async fn link_once(addr: &str, inbox: &SyncSender<Command>, hello: &Hello) -> Result<(), String> {
    let started = std::time::Instant::now();
    let socket = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = socket.set_nodelay(true);
    let (mut sink, mut stream) = Framed::new(socket, FrameCodec::default()).split();
    sink.send(Message::Hello(hello.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let transport = match stream.next().await {
        Some(Ok(Message::Hello(peer))) if peer.role == Role::Prefill && compatible(hello, &peer) => {
            peer.transport.unwrap_or(Transport::Tcp)
        }
        other => {
            return Err(format!(
                "prefill worker at {addr} refused or is incompatible: {other:?}"
            ));
        }
    };

    let handshake_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(%addr, handshake_ms, "linked to prefill worker, KV {}", transport.describe());
    let (outbox, mut outbox_rx) = mpsc::channel::<Message>(OUTBOX_MAX);
    let up = Command::PrefillLinkUp {
        addr: addr.to_string(),
        outbox,
        direct: transport.is_direct(),
    };
    inbox.send(up).map_err(|e| e.to_string())?;
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
