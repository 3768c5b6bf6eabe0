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
