//! `cleave serve` for real: two deployments of the tiny preset on loopback (disaggregated: one prefill and one
//! decode worker; aggregated: one worker), checked through the official `openai` Python client and raw HTTP by
//! tests/openai/check_serve.py, which ends by sending SIGINT to the disaggregated one: it must drain and exit 0.

mod common;

use common::start_serve;
use std::process::Command;
use std::time::Duration;

#[test]
fn openai_client_against_cleave_serve() {
    let python_ok = Command::new("python3")
        .args(["-c", "import openai, httpx"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        python_ok,
        "python3 with the openai package is needed: run scripts/test, which installs it"
    );
    let mut disaggregated = start_serve(&["--remote-prefill-tokens-min", "64"]);
    let aggregated = start_serve(&[
        "--aggregated-workers",
        "1",
        "--prefill-workers",
        "0",
        "--decode-workers",
        "0",
    ]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/openai/check_serve.py");
    let status = Command::new("python3")
        .arg(script)
        .args(["--url", &disaggregated.url, "--aggregated-url", &aggregated.url])
        .args(["--pid", &disaggregated.child.id().to_string()])
        .status()
        .expect("python3 runs");
    assert!(status.success(), "check_serve.py failed (its output is above)");
    // The script sent SIGINT: the server drains and exits by itself, successfully.
    for _ in 0..200 {
        if let Some(exit) = disaggregated.child.try_wait().unwrap() {
            assert!(exit.success(), "cleave serve exited with {exit}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("cleave serve did not exit within 10 s of SIGINT");
}

/// The worker processes a `cleave serve` runs, in start order (prefill workers first). Linux lists children per
/// thread, and restarted workers are children of the supervisor's thread: every thread is read.
fn children(pid: u32) -> Vec<u32> {
    let mut threads: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    threads.sort();
    let mut pids: Vec<u32> = threads
        .iter()
        .flat_map(|tid| {
            let list = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort();
    pids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_dies_is_restarted_and_serving_resumes() {
    let serve = start_serve(&[]);
    let workers = children(serve.child.id());
    assert_eq!(workers.len(), 2, "one prefill and one decode worker: {workers:?}");
    let decode = workers[1];
    let killed = Command::new("kill").args(["-9", &decode.to_string()]).status().unwrap();
    assert!(killed.success());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let request = serde_json::json!({ "model": "tiny", "prompt": "after the crash", "max_tokens": 4 });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = children(serve.child.id());
        let restarted = now.len() == 2 && !now.contains(&decode);
        let response = http
            .post(format!("{}/v1/completions", serve.url))
            .header("content-type", "application/json")
            .body(request.to_string())
            .send()
            .await;
        if restarted && response.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no restarted decode worker serving within 30 s (workers now {now:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs `body` to `url` and returns the response body; panics on a non-200 status.
async fn post(http: &reqwest::Client, url: &str, body: &serde_json::Value) -> String {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "POST {url}: {status} {text}");
    text
}

/// The sum of a Prometheus metric over the series whose labels contain `label` (e.g. `decision="remote"`).
async fn metric_sum(http: &reqwest::Client, base: &str, name: &str, label: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The mock backend through whole deployments of a model directory that has no weights (the llama fixture's config
/// and tokenizer): served aggregated, and as one prefill plus one decode worker with a step cost. Greedy text is the
/// same in both (so every layer of every KV block reached the decode worker over TCP), streamed or not, and the same
/// as `cleave generate --backend mock` prints.
#[tokio::test(flavor = "multi_thread")]
async fn mock_backend_deployments_answer_through_the_openai_api() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/hf/llama");
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(format!("{fixture}/{file}"), dir.path().join(file)).unwrap();
    }
    let model = dir.path().to_str().unwrap();
    let aggregated = start_serve(&[
        "--model",
        model,
        "--backend",
        "mock",
        "--aggregated-workers",
        "1",
        "--prefill-workers",
        "0",
        "--decode-workers",
        "0",
    ]);
    let split = start_serve(&[
        "--model",
        model,
        "--backend",
        "mock",
        "--mock-timing",
        "base_ms=1,prefill_token_us=20",
        "--remote-prefill-tokens-min",
        "32",
    ]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(5);
    for prompt in ["Hello", long.as_str()] {
        let request = serde_json::json!({
            "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true,
        });
        let completion = |body: &str| -> (String, u64) {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["usage"]["completion_tokens"].as_u64().unwrap(),
            )
        };
        let (text, n_tokens) = completion(&post(&http, &format!("{}/v1/completions", aggregated.url), &request).await);
        assert_eq!(n_tokens, 12);
        assert!(
            !text.is_empty(),
            "the fixture's tokenizer decodes the mock's tokens to text"
        );
        let (split_text, _) = completion(&post(&http, &format!("{}/v1/completions", split.url), &request).await);
        assert_eq!(
            split_text, text,
            "prompt {prompt:?}: disaggregated and aggregated differ"
        );

        let mut streaming = request.clone();
        streaming["stream"] = true.into();
        let events = post(&http, &format!("{}/v1/completions", split.url), &streaming).await;
        let streamed: String = events
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| {
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                v["choices"][0]["text"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(streamed, text, "prompt {prompt:?}: streamed text differs");

        let generated = Command::new(env!("CARGO_BIN_EXE_cleave"))
            .args(["generate", "--backend", "mock", "--model", model, "--prompt", prompt])
            .args(["--max-tokens", "12", "--ignore-eos", "--json"])
            .output()
            .unwrap();
        assert!(
            generated.status.success(),
            "{}",
            String::from_utf8_lossy(&generated.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&generated.stdout).unwrap();
        assert_eq!(v["backend"], "mock");
        assert_eq!(v["text"].as_str().unwrap(), text, "cleave generate differs");
    }
    let remote = metric_sum(
        &http,
        &split.url,
        "cleave_prefill_decisions_total",
        "decision=\"remote\"",
    )
    .await;
    // The first long request is prefilled remotely; its repeats find the prompt in the decode worker's cache.
    assert!(remote >= 1.0, "the long prompt is prefilled remotely: {remote}");
    let bytes = metric_sum(&http, &split.url, "cleave_kv_transfer_bytes_total", "role=\"decode\"").await;
    assert!(bytes > 0.0, "KV crossed from the prefill worker");
}
