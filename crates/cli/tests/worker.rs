//! A real `cleave worker` process on loopback, spoken to through the worker protocol: tokens equal the in-process
//! engine's, cancellation ends a stream, and a client sending garbage or vanishing never harms the others.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use cleave_wire::{FrameCodec, Generate, Hello, Message, Role, Tokens, WireParams};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

struct Worker {
    child: Child,
    addr: String,
    /// The worker's log lines (CLEAVE_LOG=info), collected by a thread.
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_worker() -> Worker {
    start_worker_with(&["--role", "aggregated"])
}

fn start_worker_with(args: &[&str]) -> Worker {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["worker", "--backend", "cpu", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("CLEAVE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Worker { child, addr, log }
}

impl Worker {
    fn log_count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    async fn wait_for_log(&self, needle: &str) {
        for _ in 0..100 {
            if self.log_count(needle) > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("worker never logged {needle:?}: {:?}", self.log.lock().unwrap());
    }
}

async fn connect(addr: &str) -> Framed<TcpStream, FrameCodec> {
    let mut conn = Framed::new(TcpStream::connect(addr).await.unwrap(), FrameCodec::default());
    let hello = Hello {
        role: Role::Frontend,
        model: String::new(),
        model_fingerprint: 0,
        block_size: 0,
        n_layers: 0,
        kv_block_bytes: 0,
        kv_share: None,
        transport: None,
    };
    conn.send(Message::Hello(hello)).await.unwrap();
    match conn.next().await {
        Some(Ok(Message::Hello(h))) => {
            assert!(matches!(h.role, Role::Aggregated | Role::Decode), "{h:?}");
            assert!(!h.model.is_empty() && h.block_size == 16, "{h:?}");
        }
        other => panic!("expected hello, got {other:?}"),
    }
    conn
}

fn params(max_tokens: u32) -> WireParams {
    WireParams {
        max_tokens,
        min_tokens: 0,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: None,
        stop_token_ids: vec![],
        stop: vec![],
        ignore_eos: true,
    }
}

/// Reads `tokens` frames until every listed request finished; returns their token ids by request.
async fn collect(conn: &mut Framed<TcpStream, FrameCodec>, n: usize) -> Vec<(u64, Vec<u32>, String)> {
    let mut done = Vec::new();
    let mut partial: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    while done.len() < n {
        match conn.next().await {
            Some(Ok(Message::Tokens(Tokens {
                id, token_ids, finish, ..
            }))) => {
                partial.entry(id).or_default().extend(token_ids);
                if let Some(f) = finish {
                    done.push((id, partial.remove(&id).unwrap(), f));
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    done.sort();
    done
}

fn in_process(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let resolved = cleave_engine::presets::resolve_model("tiny").unwrap();
    let mut engine = cleave_engine::engine::Engine::new(
        cleave_engine::backend::cpu::CpuBackend,
        resolved,
        cleave_engine::engine::EngineConfig::default(),
    )
    .unwrap();
    let params = cleave_engine::engine::RequestParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    engine
        .generate(vec![(prompt.to_vec(), params)])
        .unwrap()
        .remove(0)
        .token_ids
}

#[tokio::test]
async fn worker_streams_the_same_tokens_as_the_engine_and_survives_bad_clients() {
    let worker = start_worker();

    // A client speaking HTTP gets an error frame and is disconnected.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut bad = TcpStream::connect(&worker.addr).await.unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        bad.read_to_end(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf).contains("not a cleave stream"));
    }
    // A client that vanishes mid-stream.
    {
        let mut gone = connect(&worker.addr).await;
        gone.send(Message::Generate(Generate {
            id: 1,
            prompt_ids: vec![256, 1, 2],
            params: params(500),
            prefill_worker: None,
        }))
        .await
        .unwrap();
        let _ = gone.next().await;
    }

    let mut conn = connect(&worker.addr).await;
    let prompts: Vec<Vec<u32>> = vec![
        vec![256, 72, 105],
        (0..40).map(|i| (i * 7) % 256).collect(),
        vec![256; 17],
    ];
    for (i, p) in prompts.iter().enumerate() {
        conn.send(Message::Generate(Generate {
            id: 10 + i as u64,
            prompt_ids: p.clone(),
            params: params(12),
            prefill_worker: None,
        }))
        .await
        .unwrap();
    }
    let done = collect(&mut conn, prompts.len()).await;
    for ((id, tokens, finish), p) in done.iter().zip(&prompts) {
        assert_eq!(finish, "length", "request {id}");
        assert_eq!(
            tokens,
            &in_process(p, 12),
            "request {id}: the worker's tokens differ from the engine's"
        );
    }

    // Cancel a long request: its stream ends with "cancelled".
    conn.send(Message::Generate(Generate {
        id: 99,
        prompt_ids: vec![256, 3],
        params: params(3000),
        prefill_worker: None,
    }))
    .await
    .unwrap();
    let _first = conn.next().await;
    conn.send(Message::Cancel { id: 99 }).await.unwrap();
    let done = collect(&mut conn, 1).await;
    assert_eq!((done[0].0, done[0].2.as_str()), (99, "cancelled"));
    assert!(done[0].1.len() < 3000);

    // A request the engine refuses gets an error naming the problem; the connection stays usable.
    conn.send(Message::Generate(Generate {
        id: 7,
        prompt_ids: vec![9999],
        params: params(4),
        prefill_worker: None,
    }))
    .await
    .unwrap();
    match conn.next().await {
        Some(Ok(Message::Error {
            id: Some(7),
            kind,
            message,
        })) => {
            assert!(message.contains("vocabulary"), "{message}");
            assert_eq!(
                kind,
                cleave_wire::ErrorKind::InvalidRequest,
                "the client's fault, marked so"
            );
        }
        other => panic!("expected an error for request 7, got {other:?}"),
    }
    conn.send(Message::Generate(Generate {
        id: 8,
        prompt_ids: vec![256, 5],
        params: params(3),
        prefill_worker: None,
    }))
    .await
    .unwrap();
    assert_eq!(collect(&mut conn, 1).await[0].1.len(), 3);
}

fn long_prompts() -> Vec<Vec<u32>> {
    [40usize, 17, 3, 70]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n as u32).map(|j| (j * 31 + i as u32 * 7) % 256).collect())
        .collect()
}

/// A prefill worker and a decode worker linked to it; prompts of 16 tokens or more are prefilled remotely.
async fn linked_pair(model: &str) -> (Worker, Worker) {
    linked_pair_tp(model, 1, 1).await
}

/// [`linked_pair`] with `prefill_tp` and `decode_tp` tensor-parallel ranks.
async fn linked_pair_tp(model: &str, prefill_tp: usize, decode_tp: usize) -> (Worker, Worker) {
    let (prefill_tp, decode_tp) = (prefill_tp.to_string(), decode_tp.to_string());
    linked_pair_with(model, &["--tp", &prefill_tp], &["--tp", &decode_tp]).await
}

/// [`linked_pair`] with more arguments for each worker.
async fn linked_pair_with(model: &str, prefill_args: &[&str], decode_args: &[&str]) -> (Worker, Worker) {
    let prefill = start_worker_with(&[&["--model", model, "--role", "prefill"], prefill_args].concat());
    let decode = start_worker_with(
        &[
            &["--model", model, "--role", "decode"],
            &["--prefill-worker", &prefill.addr, "--remote-prefill-tokens-min", "16"],
            decode_args,
        ]
        .concat(),
    );
    decode.wait_for_log("linked to prefill worker").await;
    (prefill, decode)
}

async fn send_all(conn: &mut Framed<TcpStream, FrameCodec>, prompts: &[Vec<u32>], max_tokens: u32) {
    for (i, p) in prompts.iter().enumerate() {
        let generate = Generate {
            id: i as u64,
            prompt_ids: p.clone(),
            params: params(max_tokens),
            prefill_worker: None,
        };
        conn.send(Message::Generate(generate)).await.unwrap();
    }
}

/// Sends [`long_prompts`] to a decode worker linked to a prefill worker: each gets the in-process engine's tokens,
/// and the three of 16 tokens or more went to the prefill worker (the 3-token one stayed local). Returns the
/// connection.
async fn long_prompts_give_the_aggregated_tokens(decode: &Worker) -> Framed<TcpStream, FrameCodec> {
    let mut conn = connect(&decode.addr).await;
    let prompts = long_prompts();
    send_all(&mut conn, &prompts, 10).await;
    let done = collect(&mut conn, prompts.len()).await;
    for ((id, tokens, _), p) in done.iter().zip(&prompts) {
        assert_eq!(tokens, &in_process(p, 10), "request {id} ({} prompt tokens)", p.len());
    }
    assert_eq!(
        decode.log_count("prefilled remotely"),
        3,
        "{:?}",
        decode.log.lock().unwrap()
    );
    conn
}

#[tokio::test]
async fn disaggregated_workers_give_the_aggregated_tokens() {
    let (_prefill, decode) = linked_pair("tiny").await;
    let mut conn = long_prompts_give_the_aggregated_tokens(&decode).await;

    // 45 tokens, but the first 32 are in the decode worker's prefix cache: 13 uncached tokens stay local.
    let extended: Vec<u32> = long_prompts()[0].iter().copied().chain([1, 2, 3, 4, 5]).collect();
    conn.send(Message::Generate(Generate {
        id: 20,
        prompt_ids: extended.clone(),
        params: params(10),
        prefill_worker: None,
    }))
    .await
    .unwrap();
    let done = collect(&mut conn, 1).await;
    assert_eq!(done[0].1, in_process(&extended, 10));
    assert_eq!(
        decode.log_count("prefilled remotely"),
        3,
        "a mostly cached prompt must not go remote"
    );
}

/// A decode worker whose KV pool holds only a few of the prompts at once: the others wait for blocks instead of
/// being refused, and every request gets the aggregated tokens.
#[tokio::test]
async fn remote_prefills_wait_for_kv_blocks_instead_of_being_refused() {
    // 1 MiB holds 128 blocks of 16 tokens of the tiny model (f32): four of these 410-token requests.
    let (_prefill, decode) = linked_pair_with("tiny", &[], &["--kv-cache-mib", "1"]).await;
    let prompts: Vec<Vec<u32>> = (0..10u32)
        .map(|i| (0..400u32).map(|j| (j * 13 + i * 101) % 256).collect())
        .collect();
    let mut conn = connect(&decode.addr).await;
    send_all(&mut conn, &prompts, 10).await;
    let done = collect(&mut conn, prompts.len()).await;
    for ((id, tokens, _), p) in done.iter().zip(&prompts) {
        assert_eq!(tokens, &in_process(p, 10), "request {id}");
    }
    assert_eq!(
        decode.log_count("prefilled remotely"),
        prompts.len(),
        "{:?}",
        decode.log.lock().unwrap()
    );
}

/// A request waiting for KV blocks can be cancelled: it ends as cancelled, is never prefilled, and the requests
/// ahead of it are served.
#[tokio::test]
async fn a_request_waiting_for_kv_blocks_can_be_cancelled() {
    // `small`: 24 KiB of KV per token in f32, so 20 MiB hold two of these prompts; each takes about a second to
    // prefill on two cores, long enough to cancel the third while it waits.
    let (_prefill, decode) = linked_pair_with("small", &[], &["--kv-cache-mib", "20"]).await;
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|i| (0..380u32).map(|j| (j * 7 + i * 53) % 256).collect())
        .collect();
    let mut conn = connect(&decode.addr).await;
    send_all(&mut conn, &prompts, 4).await;
    decode.wait_for_log("waits for KV blocks").await;
    conn.send(Message::Cancel { id: 2 }).await.unwrap();
    let done = collect(&mut conn, prompts.len()).await;
    assert_eq!((done[2].0, done[2].1.len(), done[2].2.as_str()), (2, 0, "cancelled"));
    assert_eq!((done[0].1.len(), done[1].1.len()), (4, 4));
    assert_eq!(
        decode.log_count("prefilled remotely"),
        2,
        "{:?}",
        decode.log.lock().unwrap()
    );
}

/// Both roles in one process (`--colocated-prefill`): the prefill worker writes KV straight into the decode
/// worker's pool (the in-process transport; at 2 ranks each rank into its own), and the tokens are the aggregated
/// engine's.
#[tokio::test]
async fn a_colocated_prefill_worker_writes_kv_in_process_and_gives_the_aggregated_tokens() {
    for tp in ["1", "2"] {
        let decode = start_worker_with(&[
            "--role",
            "decode",
            "--colocated-prefill",
            "--tp",
            tp,
            "--remote-prefill-tokens-min",
            "16",
        ]);
        decode.wait_for_log("linked to prefill worker").await;
        assert_eq!(
            decode.log_count("KV in process"),
            1,
            "tp {tp}: {:?}",
            decode.log.lock().unwrap()
        );
        long_prompts_give_the_aggregated_tokens(&decode).await;
    }
    // The same pair in two processes moves KV over TCP.
    let (_prefill, apart) = linked_pair("tiny").await;
    assert_eq!(apart.log_count("KV over TCP"), 1, "{:?}", apart.log.lock().unwrap());
}

/// KV crosses between workers of different tensor-parallel layouts as whole blocks, resharded on the way in: the
/// tokens are the one-rank aggregated engine's either way.
#[tokio::test]
async fn prefill_and_decode_at_different_tensor_parallel_degrees_give_the_aggregated_tokens() {
    for (prefill_tp, decode_tp) in [(2, 1), (1, 2), (2, 2)] {
        let (_prefill, decode) = linked_pair_tp("tiny", prefill_tp, decode_tp).await;
        let mut conn = connect(&decode.addr).await;
        let prompts = long_prompts();
        send_all(&mut conn, &prompts, 10).await;
        let done = collect(&mut conn, prompts.len()).await;
        for ((id, tokens, _), p) in done.iter().zip(&prompts) {
            assert_eq!(
                tokens,
                &in_process(p, 10),
                "prefill tp {prefill_tp}, decode tp {decode_tp}: request {id}"
            );
        }
        assert_eq!(
            decode.log_count("prefilled remotely"),
            3,
            "prefill tp {prefill_tp}, decode tp {decode_tp}: {:?}",
            decode.log.lock().unwrap()
        );
    }
}

#[tokio::test]
async fn a_tensor_parallel_degree_the_model_cannot_divide_is_refused_at_start() {
    // tiny has 2 KV heads: 4 ranks cannot share them.
    let output = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["worker", "--backend", "cpu", "--tp", "4", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("KV heads") && stderr.contains("4 ranks"), "{stderr}");
}

#[tokio::test]
async fn requests_complete_when_the_prefill_worker_dies() {
    let (mut prefill, decode) = linked_pair("tiny").await;
    let mut conn = connect(&decode.addr).await;
    let prompts = long_prompts();
    send_all(&mut conn, &prompts, 10).await;
    // Killed while (or before) it prefills them: every request still completes, prefilled locally if need be.
    prefill.child.kill().unwrap();
    let done = collect(&mut conn, prompts.len()).await;
    for ((id, tokens, finish), p) in done.iter().zip(&prompts) {
        assert_eq!(finish, "length");
        assert_eq!(tokens, &in_process(p, 10), "request {id}");
    }
    // Later requests are served too, locally.
    conn.send(Message::Generate(Generate {
        id: 50,
        prompt_ids: prompts[0].clone(),
        params: params(10),
        prefill_worker: None,
    }))
    .await
    .unwrap();
    assert_eq!(collect(&mut conn, 1).await[0].1, in_process(&prompts[0], 10));
}

#[tokio::test]
async fn cancelling_a_remote_prefill_stops_it_on_the_prefill_worker() {
    // The `small` preset prefills a 1,500-token prompt for seconds on two cores: time to cancel it mid-way.
    let (prefill, decode) = linked_pair("small").await;
    let mut conn = connect(&decode.addr).await;
    let prompt: Vec<u32> = (0..1500).map(|i| (i * 13 % 256) as u32).collect();
    conn.send(Message::Generate(Generate {
        id: 1,
        prompt_ids: prompt,
        params: params(5),
        prefill_worker: None,
    }))
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    conn.send(Message::Cancel { id: 1 }).await.unwrap();
    let done = collect(&mut conn, 1).await;
    assert_eq!((done[0].0, done[0].2.as_str()), (1, "cancelled"));
    // The prefill worker stops at its next layer rather than finishing the prompt.
    prefill.wait_for_log("prefill cancelled by the decode worker").await;
    assert_eq!(decode.log_count("prefilled remotely"), 0);
}

/// A prefill peer written here that answers every prefill request with malformed KV: the decode worker must refuse
/// it, prefill locally, and still return the right tokens.
#[tokio::test]
async fn malformed_kv_from_a_prefill_peer_falls_back_to_local_prefill() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut link = Framed::new(socket, FrameCodec::default());
        // Claim the decode worker's own model and layout, as a prefill worker.
        let Some(Ok(Message::Hello(mut hello))) = link.next().await else {
            panic!("no hello")
        };
        hello.role = Role::Prefill;
        link.send(Message::Hello(hello)).await.unwrap();
        let mut n = 0u32;
        while let Some(Ok(Message::PrefillRequest(r))) = link.next().await {
            // Alternately a block past the request's and a chunk of the wrong size.
            let (block_index, bytes) = if n.is_multiple_of(2) {
                (r.n_blocks + 5, vec![0u8; 64])
            } else {
                (r.n_blocks - 1, vec![7u8; 10])
            };
            n += 1;
            let chunk = cleave_wire::KvChunk {
                id: r.id,
                layer_idx: 0,
                block_index,
                bytes: bytes.into(),
            };
            link.send(Message::KvChunk(chunk)).await.unwrap();
            link.send(Message::PrefillDone {
                id: r.id,
                first_token: 0,
            })
            .await
            .unwrap();
        }
    });
    let decode = start_worker_with(&[
        "--role",
        "decode",
        "--prefill-worker",
        &fake_addr,
        "--remote-prefill-tokens-min",
        "16",
    ]);
    decode.wait_for_log("linked to prefill worker").await;
    let mut conn = connect(&decode.addr).await;
    let prompts: Vec<Vec<u32>> = long_prompts().into_iter().filter(|p| p.len() >= 16).collect();
    send_all(&mut conn, &prompts, 8).await;
    let done = collect(&mut conn, prompts.len()).await;
    for ((id, tokens, _), p) in done.iter().zip(&prompts) {
        assert_eq!(tokens, &in_process(p, 8), "request {id}");
    }
    assert_eq!(
        decode.log_count("bad KV from the prefill worker"),
        prompts.len(),
        "{:?}",
        decode.log.lock().unwrap()
    );
    assert_eq!(decode.log_count("prefilled remotely"), 0);
}
