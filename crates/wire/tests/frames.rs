//! Every message survives the wire; every malformed byte stream is refused with an error naming the problem, never
//! a panic, and a server keeps serving other connections after one sends garbage.

use bytes::{BufMut, Bytes, BytesMut};
use cleave_wire::*;
use futures::{SinkExt, StreamExt};
use tokio_util::codec::{Decoder, Encoder, Framed};

fn params() -> WireParams {
    WireParams {
        max_tokens: 16,
        min_tokens: 2,
        temperature: 0.7,
        top_p: 0.9,
        top_k: 40,
        seed: Some(3),
        stop_token_ids: vec![2],
        stop: vec!["\n\n".into()],
        ignore_eos: false,
    }
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            role: Role::Decode,
            model: "tiny".into(),
            model_fingerprint: 0xdead_beef,
            block_size: 16,
            n_layers: 2,
            kv_block_bytes: 4096,
            kv_share: Some(KvPoolShare {
                host: "0123abcd-1".into(),
                handles: vec!["00ff".repeat(32), "ff00".repeat(32)],
                process: Some("4242-00ff00ff00ff00ff".into()),
                in_process_handles: vec!["0010203040506070".into(), "0011223344556677".into()],
                layer_bytes: 1 << 30,
                block_bytes: 65536,
                n_layers: 32,
            }),
            transport: Some(Transport::CudaIpc),
        }),
        Message::Generate(Generate {
            id: 1,
            prompt_ids: vec![256, 72, 105],
            params: params(),
            prefill_worker: Some("10.0.0.7:7001".into()),
        }),
        Message::Tokens(Tokens {
            id: 1,
            token_ids: vec![5],
            text: "héllo 🚀".into(),
            finish: Some("length".into()),
            n_prompt_tokens: 3,
            n_cached_tokens: 0,
        }),
        Message::Cancel { id: 9 },
        Message::Error {
            id: None,
            kind: ErrorKind::Draining,
            message: "shutting down".into(),
        },
        Message::Error {
            id: Some(3),
            kind: ErrorKind::InvalidRequest,
            message: "prompt too long".into(),
        },
        Message::PrefillRequest(PrefillRequest {
            id: 4,
            prompt_ids: (0..300).collect(),
            n_cached_blocks: 2,
            n_blocks: 19,
            params: params(),
            dst_blocks: Some((100..119).collect()),
        }),
        Message::KvChunk(KvChunk {
            id: 4,
            layer_idx: 1,
            block_index: 18,
            bytes: Bytes::from((0..=255u8).cycle().take(4096).collect::<Vec<_>>()),
        }),
        Message::PrefillDone { id: 4, first_token: 77 },
        Message::PrefillFailed {
            id: 4,
            message: "out of KV blocks".into(),
        },
        Message::Subscribe,
        Message::WorkerStatus(WorkerStatus {
            total_blocks: 1000,
            active_blocks: 12,
            queued_prefill_tokens: 4096,
            running_requests: 3,
            waiting_requests: 1,
            remote_prefills_pending: 1,
            draining: false,
            kv_events: vec![
                WireKvEvent::Cleared,
                WireKvEvent::Stored {
                    hash: u64::MAX,
                    parent: None,
                    block: 3,
                },
                WireKvEvent::Removed { hash: 1, block: 3 },
            ],
            totals: WorkerTotals {
                prefills_remote: 2,
                kv_transfer_bytes: 1 << 40,
                kv_transfer_seconds: 0.25,
                ..WorkerTotals::default()
            },
        }),
    ]
}

fn encode(messages: &[Message]) -> BytesMut {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    for m in messages {
        codec.encode(m.clone(), &mut buf).unwrap();
    }
    buf
}

fn header(kind: u16, len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(b"CLVW");
    b.put_u16_le(PROTOCOL_VERSION);
    b.put_u16_le(kind);
    b.put_u32_le(len);
    b
}

#[test]
fn every_message_round_trips_even_byte_by_byte() {
    let messages = all_messages();
    let bytes = encode(&messages);
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for &b in bytes.iter() {
        buf.put_u8(b);
        while let Some(m) = codec.decode(&mut buf).unwrap() {
            decoded.push(m);
        }
    }
    assert_eq!(decoded, messages);
    assert!(codec.decode_eof(&mut buf).unwrap().is_none());
}

#[test]
fn garbage_is_refused_at_once() {
    let mut codec = FrameCodec::default();
    let e = codec
        .decode(&mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]))
        .unwrap_err();
    assert!(matches!(e, WireError::BadMagic(_)), "{e}");
    // Even before a whole header has arrived.
    let e = codec.decode(&mut BytesMut::from(&b"XY"[..])).unwrap_err();
    assert!(e.to_string().contains("not a cleave stream"), "{e}");
}

#[test]
fn wrong_version_and_unknown_kind_are_named() {
    let mut codec = FrameCodec::default();
    let mut b = header(4, 0);
    b[4] = 9;
    assert_eq!(
        codec.decode(&mut b).unwrap_err().to_string(),
        "protocol version 9 is not supported (this build speaks version 1)"
    );
    assert_eq!(
        codec.decode(&mut header(77, 0)).unwrap_err().to_string(),
        "unknown message kind 77"
    );
}

#[test]
fn oversized_frames_are_refused_before_their_payload_arrives() {
    let mut codec = FrameCodec::with_limit(1 << 20);
    let mut b = header(2, u32::MAX);
    let e = codec.decode(&mut b).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("frame of {} bytes exceeds the limit of 1048576 bytes", u32::MAX)
    );
    assert!(b.capacity() < 1 << 20, "nothing was reserved for the claimed size");
    // And nothing oversized is sent either.
    let big = Message::KvChunk(KvChunk {
        id: 1,
        layer_idx: 0,
        block_index: 0,
        bytes: Bytes::from(vec![0u8; 2 << 20]),
    });
    assert!(matches!(
        codec.encode(big, &mut BytesMut::new()),
        Err(WireError::FrameTooLarge { .. })
    ));
}

#[test]
fn malformed_payloads_name_the_message() {
    let mut codec = FrameCodec::default();
    let mut b = header(2, 9);
    b.extend_from_slice(b"{not json");
    let e = codec.decode(&mut b).unwrap_err().to_string();
    assert!(e.starts_with("malformed generate message"), "{e}");
    let mut b = header(2, 2);
    b.extend_from_slice(b"{}");
    assert!(
        codec
            .decode(&mut b)
            .unwrap_err()
            .to_string()
            .contains("missing field `id`")
    );
    let mut b = header(7, 3);
    b.extend_from_slice(&[1, 2, 3]);
    assert!(
        codec
            .decode(&mut b)
            .unwrap_err()
            .to_string()
            .contains("shorter than its 16-byte header")
    );
}

#[test]
fn a_stream_cut_inside_a_frame_is_truncated_not_silently_dropped() {
    let bytes = encode(&[
        Message::Cancel { id: 1 },
        Message::PrefillDone { id: 2, first_token: 3 },
    ]);
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(&bytes[..bytes.len() - 5]);
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(Message::Cancel { id: 1 }));
    assert!(matches!(codec.decode_eof(&mut buf), Err(WireError::Truncated(_))));
}

#[test]
fn random_bytes_never_panic() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        // Half the inputs start with a valid magic and version so the decoder gets past the first checks.
        let mut b = if next() % 2 == 0 {
            header((next() % 12) as u16, (next() % 48) as u32)
        } else {
            BytesMut::new()
        };
        for _ in 0..len {
            b.put_u8(next() as u8);
        }
        let mut codec = FrameCodec::with_limit(1 << 16);
        while let Ok(Some(_)) = codec.decode(&mut b) {}
    }
}

#[tokio::test]
async fn a_server_survives_a_garbage_connection_and_serves_the_next() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An echo server: answers each frame with the same frame; on a decode error sends Error and closes.
    let server = tokio::spawn(async move {
        let mut errors = Vec::new();
        for _ in 0..2 {
            let (socket, _) = listener.accept().await.unwrap();
            let mut framed = Framed::new(socket, FrameCodec::default());
            while let Some(frame) = framed.next().await {
                match frame {
                    Ok(m) => framed.send(m).await.unwrap(),
                    Err(e) => {
                        errors.push(e.to_string());
                        let _ = framed
                            .send(Message::Error {
                                id: None,
                                kind: ErrorKind::Internal,
                                message: e.to_string(),
                            })
                            .await;
                        break;
                    }
                }
            }
        }
        errors
    });

    use tokio::io::AsyncWriteExt;
    let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
    bad.write_all(b"\x00\x01garbage garbage garbage").await.unwrap();
    let mut bad = Framed::new(bad, FrameCodec::default());
    match bad.next().await {
        Some(Ok(Message::Error { id: None, message, .. })) => {
            assert!(message.contains("not a cleave stream"), "{message}")
        }
        other => panic!("expected an error frame, got {other:?}"),
    }

    let good = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut good = Framed::new(good, FrameCodec::default());
    for m in all_messages() {
        good.send(m.clone()).await.unwrap();
        assert_eq!(good.next().await.unwrap().unwrap(), m);
    }
    drop(good);
    let errors = server.await.unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
}
