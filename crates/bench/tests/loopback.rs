//! `cleave bench` against a mock OpenAI-style server on a real loopback socket: tokens counted from usage, chunks
//! of several tokens, HTTP errors, open-loop sending while the server stalls, the concurrency limit, sweeps,
//! reproducible bodies, the JSON file and the plots.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: cleave_bench::BenchArgs,
}

/// How the mock behaves; set per test.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Before the first token.
    first_token_delay: Duration,
    /// Between tokens.
    token_delay: Duration,
    /// Send usage.completion_tokens with every chunk (vLLM's continuous_usage_stats).
    usage: bool,
}

/// A mock server on its own thread and runtime. It streams `max_tokens` tokens, every third chunk carrying two
/// tokens; a token-id prompt of exactly 13 tokens gets HTTP 400. It keeps every body it was sent.
struct Mock {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Mock {
    fn start(behaviour: Behaviour) -> Mock {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = bodies.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    tokio::spawn(serve(socket, behaviour, sink.clone()));
                }
            });
        });
        let addr = rx.recv().unwrap();
        Mock {
            url: format!("http://{addr}"),
            bodies,
        }
    }

    fn sorted_bodies(&self) -> Vec<String> {
        let mut bodies: Vec<String> = self.bodies.lock().unwrap().iter().map(Value::to_string).collect();
        bodies.sort();
        bodies
    }
}

async fn serve(socket: TcpStream, behaviour: Behaviour, bodies: Arc<Mutex<Vec<Value>>>) {
    let mut reader = BufReader::new(socket);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await.unwrap();
    let mut content_length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body).await.unwrap();
    let mut socket = reader.into_inner();
    let path = request_line.split(' ').nth(1).unwrap_or_default().to_string();
    let respond = |status: &str, body: String| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    if path == "/v1/models" {
        let reply = respond(
            "200 OK",
            json!({"object": "list", "data": [{"id": "mock-model"}]}).to_string(),
        );
        let _ = socket.write_all(reply.as_bytes()).await;
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap();
    bodies.lock().unwrap().push(body.clone());
    if body["prompt"].as_array().is_some_and(|p| p.len() == 13) {
        let error = json!({"error": {"message": "prompt has 13 tokens; the limit is 12", "type": "invalid_request"}});
        let _ = socket
            .write_all(respond("400 Bad Request", error.to_string()).as_bytes())
            .await;
        return;
    }
    let n = body["max_tokens"].as_u64().unwrap();
    let words = |v: &Value| v.as_str().map(|s| s.split(' ').count());
    let prompt_tokens = (body["prompt"].as_array().map(Vec::len))
        .or_else(|| words(&body["prompt"]))
        .or_else(|| words(&body["messages"][0]["content"]))
        .unwrap();
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    socket.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(behaviour.first_token_delay).await;
    let mut sent = 0;
    for k in chunk_sizes(n) {
        if sent > 0 {
            tokio::time::sleep(behaviour.token_delay).await;
        }
        sent += k;
        let mut chunk = json!({"choices": [{"index": 0, "text": "ab"}]});
        if behaviour.usage {
            chunk["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": sent});
        }
        // Split each event over two writes, so the client sees events cut in the middle.
        let event = format!("data: {chunk}\n\n");
        let (a, b) = event.as_bytes().split_at(event.len() / 2);
        socket.write_all(a).await.unwrap();
        socket.flush().await.unwrap();
        socket.write_all(b).await.unwrap();
    }
    let usage = json!({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n}});
    let _ = socket
        .write_all(format!("data: {usage}\n\ndata: [DONE]\n\n").as_bytes())
        .await;
}

/// Tokens per chunk for `n` tokens: every third chunk has two, where two are left.
fn chunk_sizes(n: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut sent = 0;
    while sent < n {
        let k = if sizes.len() % 3 == 2 && sent + 2 <= n { 2 } else { 1 };
        sizes.push(k);
        sent += k;
    }
    sizes
}

fn bench(args: &[&str]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).unwrap();
    cleave_bench::run(cli.bench)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cleave-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const FAST: Behaviour = Behaviour {
    first_token_delay: Duration::from_millis(5),
    token_delay: Duration::from_millis(2),
    usage: true,
};

#[test]
fn every_token_is_counted_and_errors_are_recorded() {
    let mock = Mock::start(FAST);
    let dir = temp_dir("tokens");
    let json_path = dir.join("out.json");
    let plots = dir.join("plots");
    #[rustfmt::skip]
    bench(&["--url", &mock.url, "--num-requests", "40", "--rate", "200", "--input-len", "uniform:10:16",
        "--output-len", "uniform:1:12", "--vocab-size", "256", "--seed", "3", "--slo-ttft-ms", "2000",
        "--long-prompt-tokens", "14", "--output-json", json_path.to_str().unwrap(), "--plot-dir", plots.to_str().unwrap()])
    .unwrap();
    let report = read_json(&json_path);
    assert_eq!(report["schema"], "cleave-bench/1");
    assert_eq!(report["config"]["seed"], 3);
    let run = &report["runs"][0];
    let requests = run["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 40);
    let mut n_bad = 0;
    for r in requests {
        let (input_len, output_len) = (r["input_len"].as_u64().unwrap(), r["output_len"].as_u64().unwrap());
        if input_len == 13 {
            n_bad += 1;
            let error = r["error"].as_str().unwrap();
            assert!(
                error.contains("HTTP 400 Bad Request") && error.contains("the limit is 12"),
                "{error}"
            );
            continue;
        }
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["output_tokens"].as_u64(), Some(output_len));
        assert_eq!(r["prompt_tokens"].as_u64(), Some(input_len));
        let itl: Vec<f64> = r["itl_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        assert_eq!(itl.len() as u64, output_len - 1, "one gap per token after the first");
        // The mock puts two tokens in every third chunk: each such chunk gives a zero gap (and a busy client may
        // read two chunks at once, which gives more).
        let n_double_chunks = chunk_sizes(output_len).iter().filter(|&&k| k == 2).count() as u64;
        let zeros = itl.iter().filter(|&&g| g == 0.0).count() as u64;
        assert!(zeros >= n_double_chunks, "{r}");
        let (ttft, e2e) = (r["ttft_ms"].as_f64().unwrap(), r["e2e_ms"].as_f64().unwrap());
        assert!(ttft >= 5.0, "{ttft}");
        // The gaps end at the last token, e2e at `data: [DONE]`, which a busy client may read later.
        assert!(
            ttft + itl.iter().sum::<f64>() <= e2e + 0.01,
            "the gaps fit in e2e - ttft: {r}"
        );
        if output_len >= 2 {
            let tpot = r["tpot_ms"].as_f64().unwrap();
            assert!((tpot - (e2e - ttft) / (output_len - 1) as f64).abs() < 1e-2);
        }
    }
    assert!(n_bad > 0, "the seed gives some 13-token prompts");
    let summary = &run["summary"];
    assert_eq!(summary["n_failed"], n_bad);
    assert_eq!(summary["slo"]["n_met"], 40 - n_bad, "every success meets a 2 s TTFT");
    assert!(summary["errors"][0][0].as_str().unwrap().contains("HTTP 400"));
    assert_eq!(summary["n_short_outputs"], 0);
    for name in ["itl_over_time_rate200.svg", "ttft_cdf.svg", "itl_cdf.svg"] {
        let svg = std::fs::read_to_string(plots.join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{name}");
    }
    let itl_plot = std::fs::read_to_string(plots.join("itl_over_time_rate200.svg")).unwrap();
    let n_long = requests
        .iter()
        .filter(|r| r["input_len"].as_u64().unwrap() > 14)
        .count();
    assert!(n_long > 0);
    assert!(
        itl_plot.contains(&format!("long prompt sent ({n_long})")),
        "long prompts are marked"
    );
}

#[test]
fn same_seed_sends_the_same_bodies_other_seed_others() {
    let run = |seed: &str| {
        let mock = Mock::start(FAST);
        #[rustfmt::skip]
        bench(&["--url", &mock.url, "--num-requests", "15", "--rate", "inf", "--input-len", "lognormal:20:0.5:1:60",
            "--output-len", "3", "--seed", seed, "--shared-prefix-len", "4"]).unwrap();
        mock.sorted_bodies()
    };
    let (a, b, c) = (run("11"), run("11"), run("12"));
    assert_eq!(a.len(), 16, "the probe and 15 requests");
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn open_loop_sends_on_time_while_the_server_stalls() {
    let stalling = Behaviour {
        first_token_delay: Duration::from_millis(400),
        ..FAST
    };
    let mock = Mock::start(stalling);
    let dir = temp_dir("open-loop");
    let json_path = dir.join("out.json");
    #[rustfmt::skip]
    bench(&["--url", &mock.url, "--num-requests", "30", "--rate", "100", "--input-len", "8", "--output-len", "2",
        "--output-json", json_path.to_str().unwrap()]).unwrap();
    let report = read_json(&json_path);
    let summary = &report["runs"][0]["summary"];
    // All 30 were sent on time (planned over ~0.3 s) although each took 0.4 s to answer: none waited for another.
    // The bounds leave room for a loaded machine but not for a 400 ms wait.
    assert_eq!(summary["n_waited_for_slot"], 0);
    assert!(summary["send_delay_ms"]["max"].as_f64().unwrap() < 150.0, "{summary}");
    let last_sent = report["runs"][0]["requests"][29]["sent_s"].as_f64().unwrap();
    let last_planned = report["runs"][0]["requests"][29]["scheduled_s"].as_f64().unwrap();
    assert!(
        last_planned < 0.35 && last_sent < 0.4,
        "planned at {last_planned}, sent at {last_sent}: before any answer"
    );
    assert!(summary["ttft_ms"]["p50"].as_f64().unwrap() >= 400.0);

    // With two slots, the requests queue behind the stalled ones and the report says so.
    #[rustfmt::skip]
    bench(&["--url", &mock.url, "--num-requests", "6", "--rate", "100", "--input-len", "8", "--output-len", "2",
        "--max-concurrency", "2", "--output-json", json_path.to_str().unwrap()]).unwrap();
    let report = read_json(&json_path);
    let summary = &report["runs"][0]["summary"];
    assert_eq!(summary["n_waited_for_slot"], 4);
    assert!(summary["send_delay_ms"]["max"].as_f64().unwrap() >= 700.0, "{summary}");
}

#[test]
fn sweep_reports_goodput_and_counts_one_token_per_chunk_without_usage() {
    let mock = Mock::start(Behaviour { usage: false, ..FAST });
    let dir = temp_dir("sweep");
    let (json_path, plots) = (dir.join("out.json"), dir.join("plots"));
    #[rustfmt::skip]
    bench(&["--url", &mock.url, "--rates", "50,100", "--num-requests", "10", "--input-len", "8", "--output-len", "7",
        "--slo-ttft-ms", "10000", "--slo-itl-ms", "10000", "--output-json", json_path.to_str().unwrap(),
        "--plot-dir", plots.to_str().unwrap(), "--endpoint", "chat"]).unwrap();
    let report = read_json(&json_path);
    assert_eq!(report["runs"].as_array().unwrap().len(), 2);
    assert_eq!(report["sweep_goodput"][0]["goodput_rate"], 100.0);
    let request = &report["runs"][1]["requests"][0];
    // Without usage, each chunk counts as one token: 7 tokens arrive in 6 chunks (one of two tokens); the final
    // usage-only chunk corrects the count to 7 without inventing gaps.
    assert_eq!(request["output_tokens"], 7);
    assert_eq!(request["itl_ms"].as_array().unwrap().len(), 5);
    assert!(plots.join("vs_rate.svg").exists());
    // One point per rate, labelled with it.
    let curve = std::fs::read_to_string(plots.join("throughput_per_gpu_vs_per_user.svg")).unwrap();
    assert!(curve.contains("50 req/s") && curve.contains("100 req/s"), "{curve}");
    // Chat sends one user message of text.
    let body = &mock.bodies.lock().unwrap()[1];
    assert_eq!(body["messages"][0]["role"], "user");
    assert_eq!(body["messages"][0]["content"].as_str().unwrap().split(' ').count(), 8);
}

/// `--rescore` judges the saved requests again under other SLOs without sending anything: each request counts as
/// met exactly when its own gaps at the chosen quantile are within the bound (its median here, its longest gap
/// with `--slo-itl-quantile 100`), as a naive count over the saved records says.
#[test]
fn rescore_judges_saved_requests_under_other_slos() {
    let mock = Mock::start(FAST);
    let dir = temp_dir("rescore");
    let saved = dir.join("out.json");
    #[rustfmt::skip]
    bench(&["--url", &mock.url, "--rates", "100,200", "--num-requests", "30", "--input-len", "8",
        "--output-len", "uniform:4:12", "--seed", "5", "--output-json", saved.to_str().unwrap()]).unwrap();
    let sent = mock.bodies.lock().unwrap().len();
    let runs = read_json(&saved)["runs"].clone();
    // A bound between the requests' median gaps and their longest ones.
    let gaps = |r: &Value| -> Vec<f64> {
        let mut g: Vec<f64> = r["itl_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        g.sort_by(f64::total_cmp);
        g
    };
    let mut longest: Vec<f64> = runs
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|run| {
            run["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| *gaps(r).last().unwrap())
        })
        .collect();
    longest.sort_by(f64::total_cmp);
    let bound = longest[longest.len() / 2];
    let mut n_met_by_quantile = Vec::new();
    for quantile in ["50", "100"] {
        let out = dir.join(format!("rescored-{quantile}.json"));
        #[rustfmt::skip]
        bench(&["--rescore", saved.to_str().unwrap(), "--slo-itl-ms", &bound.to_string(),
            "--slo-itl-quantile", quantile, "--output-json", out.to_str().unwrap()]).unwrap();
        let rescored = read_json(&out);
        assert_eq!(
            rescored["config"]["slo"]["itl_quantile"],
            quantile.parse::<f64>().unwrap()
        );
        let mut n_met = 0;
        for (run, saved_run) in rescored["runs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(runs.as_array().unwrap())
        {
            let naive = saved_run["requests"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| {
                    let g = gaps(r);
                    let at = match quantile {
                        "100" => g[g.len() - 1],
                        _ => naive_percentile(&g, 50.0),
                    };
                    at <= bound
                })
                .count();
            assert_eq!(run["summary"]["slo"]["n_met"], naive, "quantile {quantile}");
            n_met += naive;
        }
        n_met_by_quantile.push(n_met);
    }
    assert!(
        n_met_by_quantile[0] > n_met_by_quantile[1],
        "the bound separates the two readings: {n_met_by_quantile:?}"
    );
    assert_eq!(mock.bodies.lock().unwrap().len(), sent, "rescoring sends nothing");
}

/// Linear interpolation between the two nearest ranks of sorted `xs`.
fn naive_percentile(xs: &[f64], p: f64) -> f64 {
    let k = (xs.len() - 1) as f64 * p / 100.0;
    let (lo, hi) = (k.floor() as usize, k.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (k - lo as f64)
}

#[test]
fn a_server_that_is_not_there_fails_fast_with_the_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let err = bench(&["--url", &url, "--model", "m", "--num-requests", "3"]).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("probe request failed") && err.to_lowercase().contains("connection refused"),
        "{err}"
    );
}

#[test]
fn trace_and_sharegpt_files_drive_the_workload() {
    let mock = Mock::start(FAST);
    let dir = temp_dir("files");
    let trace = dir.join("trace.jsonl");
    let mut file = std::fs::File::create(&trace).unwrap();
    for (t, i, o) in [(100.0, 5, 2), (100.05, 30, 3), (100.1, 9, 1)] {
        writeln!(file, "{}", json!({"timestamp": t, "input_len": i, "output_len": o})).unwrap();
    }
    let json_path = dir.join("out.json");
    bench(&[
        "--url",
        &mock.url,
        "--trace",
        trace.to_str().unwrap(),
        "--output-json",
        json_path.to_str().unwrap(),
    ])
    .unwrap();
    let requests = read_json(&json_path)["runs"][0]["requests"].clone();
    let got: Vec<(f64, u64, u64)> = requests
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["scheduled_s"].as_f64().unwrap(),
                r["input_len"].as_u64().unwrap(),
                r["output_tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![(0.0, 5, 2), (0.05, 30, 3), (0.1, 9, 1)]);

    let sharegpt = dir.join("sharegpt.json");
    let conversations = json!([
        {"conversations": [{"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": "Paris."}]},
        {"conversations": [{"from": "gpt", "value": "unused"}]}
    ]);
    std::fs::write(&sharegpt, conversations.to_string()).unwrap();
    #[rustfmt::skip]
    bench(&["--url", &mock.url, "--sharegpt", sharegpt.to_str().unwrap(), "--num-requests", "2", "--rate", "inf",
        "--prompt-format", "text", "--output-json", json_path.to_str().unwrap()]).unwrap();
    let report = read_json(&json_path);
    assert_eq!(report["config"]["workload"]["source"]["conversations_skipped"], 1);
    let request = &report["runs"][0]["requests"][0];
    // ceil(30 / 4) and ceil(6 / 4) tokens.
    assert_eq!(
        (request["input_len"].as_u64(), request["output_tokens"].as_u64()),
        (Some(8), Some(2))
    );
    let bodies = mock.bodies.lock().unwrap();
    assert_eq!(bodies.last().unwrap()["prompt"], "What is the capital of France?");
}
