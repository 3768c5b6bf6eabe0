//! cleave's worker protocol, version 1: what frontends, decode workers and prefill workers say to each other over
//! a byte stream (TCP today). This crate is the only place that defines wire types; docs/protocol.md documents the
//! format and the request flow.
//!
//! A stream is a sequence of frames. Each frame is a 12-byte header — magic `CLVW`, protocol version (u16 LE),
//! message kind (u16 LE), payload length (u32 LE) — then the payload. Control messages carry JSON (small, rare, easy
//! to debug); [`KvChunk`] carries a 16-byte binary header and the raw KV bytes, because it is the bulk of the
//! traffic. [`FrameCodec`] decodes and encodes [`Message`]s for `tokio_util::codec::Framed`; every malformed input
//! (wrong magic or version, unknown kind, bad JSON, a frame over the configured limit, a truncated stream) is an
//! [`WireError`] naming the problem, never a panic and never an allocation of the claimed size.
//!
//! ```
//! use bytes::BytesMut;
//! use cleave_wire::{FrameCodec, Message};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = FrameCodec::default();
//! let mut buf = BytesMut::new();
//! codec.encode(Message::Cancel { id: 7 }, &mut buf)?;
//! assert_eq!(codec.decode(&mut buf)?, Some(Message::Cancel { id: 7 }));
//! # Ok::<(), cleave_wire::WireError>(())
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

pub const MAGIC: [u8; 4] = *b"CLVW";
pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 12;
/// Starts the `error` message of a request a worker refuses because it is shutting down: the sender should retry
/// it on another worker.
pub const DRAINING: &str = "worker is draining";
/// Default bound on one frame's payload. A KV chunk is one block of one layer (Llama-3-70B, bf16, 16 tokens:
/// 64 KiB); requests with long prompts are the largest control messages (a 128k-token prompt is ~1 MiB of JSON).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 << 20;
const KV_CHUNK_HEADER_BYTES: usize = 16;

/// Which engine role a peer plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Aggregated,
    Prefill,
    Decode,
    Frontend,
}

impl Role {
    /// The role's name, as in `hello`, on the command line and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Aggregated => "aggregated",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Frontend => "frontend",
        }
    }

    /// A worker role from its name; the error lists the names.
    pub fn parse_worker(name: &str) -> Result<Role, String> {
        match name {
            "aggregated" => Ok(Role::Aggregated),
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            other => Err(format!("unknown role {other:?} (aggregated, prefill, decode)")),
        }
    }
}

/// First message on every connection, both ways. Peers refuse each other when the model or the KV layout differ,
/// since KV computed for one cannot be used by the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub role: Role,
    /// The model's name (directory or preset) and a fingerprint of its config and weights source.
    pub model: String,
    pub model_fingerprint: u64,
    pub block_size: u32,
    pub n_layers: u32,
    /// Bytes of one block of one layer on the sender's backend (which also fixes the KV element type).
    pub kv_block_bytes: u64,
    /// Decode worker → prefill worker: its KV pool, for a prefill worker on the same host to write into directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_share: Option<KvPoolShare>,
    /// Prefill worker → decode worker: how KV will move on this link (absent: TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

/// A decode worker's KV pool as peers can reach it: same-host processes through CUDA IPC, engines of the same
/// process by address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPoolShare {
    /// Identifies the host (machine id and boot id): the handle means nothing elsewhere.
    pub host: String,
    /// Per tensor-parallel rank, the backend's CUDA IPC handle to that rank's pool, hex; empty where the backend has
    /// none (the CPU). A prefill worker maps them only if it has as many ranks (rank `r` writes into rank `r`'s).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handles: Vec<String>,
    /// Identifies the process (pid and a random nonce): `in_process_handles` mean nothing outside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Per rank, the pool's address in that process, hex (8 bytes, little endian).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_process_handles: Vec<String>,
    /// Bytes from one layer to the next in one rank's pool.
    pub layer_bytes: u64,
    /// Bytes of one block of one layer in one rank's pool.
    pub block_bytes: u64,
    pub n_layers: u32,
}

/// How KV moves from a prefill worker to a decode worker, chosen per link at handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// `kv_chunk` frames on the link itself.
    Tcp,
    /// The prefill worker copies device to device into the decode worker's pool; only `prefill_done` crosses.
    CudaIpc,
    /// Both workers live in one process: the prefill worker copies straight into the decode worker's pool (host or
    /// device memory); only `prefill_done` crosses.
    InProcess,
}

impl Transport {
    pub fn describe(self) -> &'static str {
        match self {
            Transport::Tcp => "over TCP",
            Transport::CudaIpc => "over CUDA IPC",
            Transport::InProcess => "in process",
        }
    }

    /// Whether KV moves outside the link (only `prefill_done` crosses it).
    pub fn is_direct(self) -> bool {
        matches!(self, Transport::CudaIpc | Transport::InProcess)
    }
}

/// Sampling and stopping, as the engine's `RequestParams`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireParams {
    pub max_tokens: u32,
    #[serde(default)]
    pub min_tokens: u32,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: u32,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub ignore_eos: bool,
}

fn one() -> f32 {
    1.0
}

/// Frontend → worker: run a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generate {
    pub id: u64,
    pub prompt_ids: Vec<u32>,
    pub params: WireParams,
    /// Decode role: the prefill worker (`host:port`) the router picked for this prompt, should the decode worker
    /// decide to prefill it remotely. Absent: the decode worker's own `--prefill-worker`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_worker: Option<String>,
}

/// A change to a worker's cached KV blocks, as `cleave_kv::KvEvent` (which this crate does not depend on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum WireKvEvent {
    /// `parent` is absent in the snapshot a worker sends a new subscriber (its pool does not keep parents).
    Stored {
        hash: u64,
        parent: Option<u64>,
        block: u32,
    },
    Removed {
        hash: u64,
        block: u32,
    },
    /// Forget everything known about this worker's blocks; the events that follow rebuild it.
    Cleared,
}

/// Worker → subscriber (after `subscribe`): its load, the KV events since the last status, and running totals.
/// Sent when something changed, at most every few milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub total_blocks: u32,
    /// Blocks held by requests (cached blocks nobody uses are free: they are evictable).
    pub active_blocks: u32,
    /// Prompt tokens waiting for or in prefill on this worker.
    pub queued_prefill_tokens: u64,
    pub running_requests: u32,
    pub waiting_requests: u32,
    /// Decode role: requests waiting for their KV from a prefill worker.
    pub remote_prefills_pending: u32,
    /// The worker is shutting down: it finishes what it has and takes nothing new.
    pub draining: bool,
    pub kv_events: Vec<WireKvEvent>,
    pub totals: WorkerTotals,
}

/// Monotonic counters since the worker started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerTotals {
    pub prefills_local: u64,
    pub prefills_remote: u64,
    /// Remote prefills that failed or were abandoned and were redone locally.
    pub prefill_fallbacks: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// KV received from (decode role) or sent to (prefill role) peers.
    pub kv_transfer_bytes: u64,
    /// Time from a remote prefill's request to its last KV chunk, summed.
    pub kv_transfer_seconds: f64,
    pub preemptions: u64,
}

/// Worker → frontend: what a request produced since the last update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub id: u64,
    pub token_ids: Vec<u32>,
    pub text: String,
    /// "length", "stop" or "cancelled" on the last update.
    pub finish: Option<String>,
    pub n_prompt_tokens: u32,
    pub n_cached_tokens: u32,
}

/// Decode worker → prefill worker: compute this prompt and send blocks `n_cached_blocks..n_blocks` of every layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefillRequest {
    pub id: u64,
    pub prompt_ids: Vec<u32>,
    pub n_cached_blocks: u32,
    pub n_blocks: u32,
    pub params: WireParams,
    /// CUDA IPC links: the decode worker's block id for each block of the prompt; the prefill worker writes there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_blocks: Option<Vec<u32>>,
}

/// Prefill worker → decode worker: one layer of one block of a request's KV (block_index is the position in the
/// request's sequence; each side maps it to its own block id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvChunk {
    pub id: u64,
    pub layer_idx: u32,
    pub block_index: u32,
    pub bytes: Bytes,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Hello(Hello),
    Generate(Generate),
    Tokens(Tokens),
    Cancel {
        id: u64,
    },
    /// A request failed (`id`) or the peer is about to close the connection (`None`).
    Error {
        id: Option<u64>,
        kind: ErrorKind,
        message: String,
    },
    PrefillRequest(PrefillRequest),
    KvChunk(KvChunk),
    PrefillDone {
        id: u64,
        first_token: u32,
    },
    PrefillFailed {
        id: u64,
        message: String,
    },
    /// Ask a worker to stream its [`WorkerStatus`] on this connection.
    Subscribe,
    WorkerStatus(WorkerStatus),
}

/// Message kinds on the wire. Numbers are part of the protocol: never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
enum Kind {
    Hello = 1,
    Generate = 2,
    Tokens = 3,
    Cancel = 4,
    Error = 5,
    PrefillRequest = 6,
    KvChunk = 7,
    PrefillDone = 8,
    PrefillFailed = 9,
    Subscribe = 10,
    WorkerStatus = 11,
}

impl Kind {
    fn from_u16(k: u16) -> Option<Kind> {
        Some(match k {
            1 => Kind::Hello,
            2 => Kind::Generate,
            3 => Kind::Tokens,
            4 => Kind::Cancel,
            5 => Kind::Error,
            6 => Kind::PrefillRequest,
            7 => Kind::KvChunk,
            8 => Kind::PrefillDone,
            9 => Kind::PrefillFailed,
            10 => Kind::Subscribe,
            11 => Kind::WorkerStatus,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a cleave stream: frame starts with {0:02x?}, expected \"CLVW\"")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this build speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { size: usize, limit: usize },
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("stream ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Frames [`Message`]s on a byte stream. After an error the stream cannot be resynchronised: close it.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    frame_bytes_max: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
        }
    }
}

impl FrameCodec {
    /// A codec refusing frames over `frame_bytes_max` bytes (at most u32::MAX, the header's length field).
    pub fn with_limit(frame_bytes_max: usize) -> Self {
        Self {
            frame_bytes_max: frame_bytes_max.min(u32::MAX as usize),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CancelBody {
    id: u64,
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    id: Option<u64>,
    /// Absent from peers that predate it: read as `internal`.
    #[serde(default)]
    kind: ErrorKind,
    message: String,
}

/// What an `error` reports, so that a frontend answers with the right status without reading the message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request cannot be served as sent (prompt over the context, token id out of the vocabulary...).
    InvalidRequest,
    /// The worker cannot take more work now; another worker, or a later try, may.
    Overloaded,
    /// The worker is shutting down and takes no new requests; another worker should.
    Draining,
    /// Anything else: the worker's or the engine's fault.
    #[default]
    Internal,
}

impl ErrorKind {
    /// Whether another worker may well succeed where this one refused.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Overloaded | ErrorKind::Draining)
    }
}

#[derive(Serialize, Deserialize)]
struct PrefillDoneBody {
    id: u64,
    first_token: u32,
}

#[derive(Serialize, Deserialize)]
struct PrefillFailedBody {
    id: u64,
    message: String,
}

fn json<T: for<'de> Deserialize<'de>>(kind: &'static str, payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(|e| WireError::Malformed {
        kind,
        reason: e.to_string(),
    })
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        if src.len() < HEADER_BYTES {
            // Check the magic as soon as it is there, so garbage is refused without waiting for more.
            let n = src.len().min(4);
            if src[..n] != MAGIC[..n] {
                let mut got = [0u8; 4];
                got[..n].copy_from_slice(&src[..n]);
                return Err(WireError::BadMagic(got));
            }
            return Ok(None);
        }
        let magic: [u8; 4] = src[..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([src[4], src[5]]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let kind_raw = u16::from_le_bytes([src[6], src[7]]);
        let kind = Kind::from_u16(kind_raw).ok_or(WireError::UnknownKind(kind_raw))?;
        let len = u32::from_le_bytes([src[8], src[9], src[10], src[11]]) as usize;
        if len > self.frame_bytes_max {
            return Err(WireError::FrameTooLarge {
                size: len,
                limit: self.frame_bytes_max,
            });
        }
        if src.len() < HEADER_BYTES + len {
            // Reserve at most what the (bounded) frame still needs.
            src.reserve(HEADER_BYTES + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_BYTES);
        let payload = src.split_to(len).freeze();
        let message = match kind {
            Kind::Hello => Message::Hello(json("hello", &payload)?),
            Kind::Generate => Message::Generate(json("generate", &payload)?),
            Kind::Tokens => Message::Tokens(json("tokens", &payload)?),
            Kind::Cancel => Message::Cancel {
                id: json::<CancelBody>("cancel", &payload)?.id,
            },
            Kind::Error => {
                let b: ErrorBody = json("error", &payload)?;
                Message::Error {
                    id: b.id,
                    kind: b.kind,
                    message: b.message,
                }
            }
            Kind::PrefillRequest => Message::PrefillRequest(json("prefill_request", &payload)?),
            Kind::KvChunk => {
                if payload.len() < KV_CHUNK_HEADER_BYTES {
                    return Err(WireError::Malformed {
                        kind: "kv_chunk",
                        reason: format!(
                            "{} bytes is shorter than its {KV_CHUNK_HEADER_BYTES}-byte header",
                            payload.len()
                        ),
                    });
                }
                let mut header = &payload[..KV_CHUNK_HEADER_BYTES];
                let (id, layer_idx, block_index) = (header.get_u64_le(), header.get_u32_le(), header.get_u32_le());
                Message::KvChunk(KvChunk {
                    id,
                    layer_idx,
                    block_index,
                    bytes: payload.slice(KV_CHUNK_HEADER_BYTES..),
                })
            }
            Kind::PrefillDone => {
                let b: PrefillDoneBody = json("prefill_done", &payload)?;
                Message::PrefillDone {
                    id: b.id,
                    first_token: b.first_token,
                }
            }
            Kind::PrefillFailed => {
                let b: PrefillFailedBody = json("prefill_failed", &payload)?;
                Message::PrefillFailed {
                    id: b.id,
                    message: b.message,
                }
            }
            Kind::Subscribe => Message::Subscribe,
            Kind::WorkerStatus => Message::WorkerStatus(json("worker_status", &payload)?),
        };
        Ok(Some(message))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
        match self.decode(buf)? {
            Some(message) => Ok(Some(message)),
            None if buf.is_empty() => Ok(None),
            None => Err(WireError::Truncated(buf.len())),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        let to_json = |v: serde_json::Result<Vec<u8>>| {
            v.map_err(|e| WireError::Malformed {
                kind: "outgoing",
                reason: e.to_string(),
            })
        };
        let (kind, payload): (Kind, Vec<u8>) = match message {
            Message::Hello(m) => (Kind::Hello, to_json(serde_json::to_vec(&m))?),
            Message::Generate(m) => (Kind::Generate, to_json(serde_json::to_vec(&m))?),
            Message::Tokens(m) => (Kind::Tokens, to_json(serde_json::to_vec(&m))?),
            Message::Cancel { id } => (Kind::Cancel, to_json(serde_json::to_vec(&CancelBody { id }))?),
            Message::Error { id, kind, message } => (
                Kind::Error,
                to_json(serde_json::to_vec(&ErrorBody { id, kind, message }))?,
            ),
            Message::PrefillRequest(m) => (Kind::PrefillRequest, to_json(serde_json::to_vec(&m))?),
            Message::PrefillDone { id, first_token } => (
                Kind::PrefillDone,
                to_json(serde_json::to_vec(&PrefillDoneBody { id, first_token }))?,
            ),
            Message::PrefillFailed { id, message } => (
                Kind::PrefillFailed,
                to_json(serde_json::to_vec(&PrefillFailedBody { id, message }))?,
            ),
            Message::Subscribe => (Kind::Subscribe, Vec::new()),
            Message::WorkerStatus(m) => (Kind::WorkerStatus, to_json(serde_json::to_vec(&m))?),
            Message::KvChunk(c) => {
                // Written straight into the output buffer: KV is the bulk of the traffic.
                let len = KV_CHUNK_HEADER_BYTES + c.bytes.len();
                self.check_size(len)?;
                put_header(dst, Kind::KvChunk, len);
                dst.put_u64_le(c.id);
                dst.put_u32_le(c.layer_idx);
                dst.put_u32_le(c.block_index);
                dst.extend_from_slice(&c.bytes);
                return Ok(());
            }
        };
        self.check_size(payload.len())?;
        put_header(dst, kind, payload.len());
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

impl FrameCodec {
    fn check_size(&self, len: usize) -> Result<(), WireError> {
        if len > self.frame_bytes_max {
            return Err(WireError::FrameTooLarge {
                size: len,
                limit: self.frame_bytes_max,
            });
        }
        Ok(())
    }
}

fn put_header(dst: &mut BytesMut, kind: Kind, len: usize) {
    dst.reserve(HEADER_BYTES + len);
    dst.extend_from_slice(&MAGIC);
    dst.put_u16_le(PROTOCOL_VERSION);
    dst.put_u16_le(kind as u16);
    dst.put_u32_le(len as u32);
}
