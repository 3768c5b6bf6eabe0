//! Discovery end to end: a real etcd (a child process) and real `cleave frontend` and `cleave worker` processes on
//! loopback, with no worker named on any command line. Workers register themselves; frontends follow them from the
//! snapshot and the watch; a drained worker leaves at once and a killed one when its lease expires.

// The fixture crates/discovery's tests start etcd with, shared rather than copied.
#[path = "../../discovery/tests/discovery/server.rs"]
#[allow(dead_code)] // this test needs only start, endpoints and closed_port
mod etcd_server;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_server::{EtcdServer, closed_port};
use serde_json::{Value, json};

/// Bound on anything that should happen promptly (generous: the test machine is shared and busy).
const PROMPT: Duration = Duration::from_secs(10);
/// The prefill worker's lease: short, so that its SIGKILL is seen within the test. 2 s is etcd's minimum.
const PREFILL_LEASE_TTL_S: u64 = 2;
/// The decode worker keeps the default lease (10 s): it leaving well before that shows its drain revoked the lease.
const DECODE_LEASE_TTL: Duration = Duration::from_secs(10);
/// The decode worker prefills remotely from this many uncached prompt tokens; the long prompts have twice that.
const REMOTE_PREFILL_TOKENS_MIN: usize = 32;

/// A `cleave` process. Its stderr (logs at info for cleave's own discovery lines) is collected by a thread; killed
/// when dropped.
struct Process {
    child: Child,
    /// What the first line of stdout announced: the worker's address or the frontend's URL.
    announced: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `cleave ARGS` and waits for its first line of stdout, which must start with `prefix`.
    fn start(args: &[&str], prefix: &str) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cleave"))
            .args(args)
            .env("CLEAVE_LOG", "warn,cleave=info,cleave_frontend::workers=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cleave starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let Some(announced) = first.strip_prefix(prefix) else {
            let _ = child.kill();
            panic!(
                "`cleave {}` printed {first:?} first; its log: {:#?}",
                args.join(" "),
                log.lock().unwrap()
            );
        };
        // Keep reading, so that the process never blocks on (or dies of) a closed pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Process {
            child,
            announced: announced.trim().to_string(),
            log,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    fn has_logged(&self, words: &[&str]) -> bool {
        let log = self.log.lock().unwrap();
        log.iter().any(|line| words.iter().all(|w| line.contains(w)))
    }

    /// Waits until a line of the log holds all of `words`; returns how long that took.
    async fn wait_for_log(&self, words: &[&str], within: Duration) -> Duration {
        let started = Instant::now();
        while !self.has_logged(words) {
            assert!(
                started.elapsed() < within,
                "no log line with {words:?} within {within:?}: {:#?}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_frontend(etcd: &str) -> Process {
    Process::start(
        &[
            "frontend",
            "--model",
            "tiny",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            etcd,
            "--namespace",
            "e2e",
        ],
        "serving tiny on ",
    )
}

fn start_worker(etcd: &str, role: &str, more: &[&str]) -> Process {
    let mut args = vec![
        "worker",
        "--role",
        role,
        "--backend",
        "cpu",
        "--model",
        "tiny",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend(["--etcd", etcd, "--namespace", "e2e"]);
    args.extend(more);
    Process::start(&args, "listening on ")
}

/// The frontend's `/health`: status code and (decode_workers, prefill_workers).
async fn health(http: &reqwest::Client, frontend: &Process) -> (u16, (u64, u64)) {
    let response = http.get(format!("{}/health", frontend.announced)).send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let count = |key: &str| {
        body[key]
            .as_u64()
            .unwrap_or_else(|| panic!("/health has no {key}: {body}"))
    };
    (status, (count("decode_workers"), count("prefill_workers")))
}

/// Polls `/health` until it answers `want`; returns how long that took.
async fn wait_for_health(http: &reqwest::Client, frontend: &Process, want: (u16, (u64, u64))) -> Duration {
    let started = Instant::now();
    loop {
        let got = health(http, frontend).await;
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PROMPT,
            "/health still says {got:?} after {PROMPT:?}, expected {want:?}; frontend log: {:#?}",
            frontend.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A completion of 4 tokens for a prompt of token ids; panics unless it succeeds.
async fn complete(http: &reqwest::Client, frontend: &Process, prompt_ids: &[u32]) {
    let request = json!({ "model": "tiny", "prompt": prompt_ids, "max_tokens": 4, "temperature": 0 });
    let response = http
        .post(format!("{}/v1/completions", frontend.announced))
        .header("content-type", "application/json")
        .body(request.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert!(status.is_success(), "completion failed with {status}: {body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
}

/// Prompts that share no prefix block with each other, so all of each is uncached.
fn long_prompt(index: u32) -> Vec<u32> {
    (0..2 * REMOTE_PREFILL_TOKENS_MIN as u32)
        .map(|k| 1 + (index * 131 + k * 7) % 250)
        .collect()
}

/// Sum of `cleave_prefill_decisions_total{decision="remote"}` over workers, from `/metrics`.
async fn remote_prefills(http: &reqwest::Client, frontend: &Process) -> f64 {
    let text = http
        .get(format!("{}/metrics", frontend.announced))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with("cleave_prefill_decisions_total{") && line.contains(r#"decision="remote""#))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn workers_join_and_leave_frontends_through_etcd() {
    let etcd = EtcdServer::start().await;
    let etcd = etcd.endpoints().remove(0);
    let http = reqwest::Client::builder().timeout(PROMPT).build().unwrap();

    // A frontend with no worker yet is up but not ready.
    let frontend = start_frontend(&etcd);
    assert_eq!(health(&http, &frontend).await, (503, (0, 0)));

    // A decode worker registers: the frontend adds it and serves through it.
    let tokens_min = REMOTE_PREFILL_TOKENS_MIN.to_string();
    let mut decode = start_worker(&etcd, "decode", &["--remote-prefill-tokens-min", &tokens_min]);
    wait_for_health(&http, &frontend, (200, (1, 0))).await;
    complete(&http, &frontend, &[1, 2, 3]).await;

    // A prefill worker registers: the router names it to the decode worker, which links to it on first use; after
    // that, long prompts are prefilled there.
    let ttl = PREFILL_LEASE_TTL_S.to_string();
    let mut prefill = start_worker(&etcd, "prefill", &["--lease-ttl-secs", &ttl]);
    wait_for_health(&http, &frontend, (200, (1, 1))).await;
    complete(&http, &frontend, &long_prompt(0)).await;
    let mut index = 1;
    while remote_prefills(&http, &frontend).await == 0.0 {
        assert!(
            index <= 20,
            "20 long prompts and no remote prefill; decode log: {:#?}",
            decode.log.lock().unwrap()
        );
        complete(&http, &frontend, &long_prompt(index)).await;
        index += 1;
    }

    // A new frontend finds both workers in the snapshot.
    drop(frontend);
    let frontend = start_frontend(&etcd);
    wait_for_health(&http, &frontend, (200, (1, 1))).await;
    assert!(frontend.has_logged(&["worker discovered", &decode.announced]));
    assert!(frontend.has_logged(&["worker discovered", &prefill.announced]));

    // SIGKILL: no deregistration; the frontend drops the worker once its lease expires. Until then it is merely
    // unreachable, and prompts are prefilled on the decode worker.
    prefill.child.kill().unwrap();
    prefill.child.wait().unwrap();
    let left_after = frontend
        .wait_for_log(&["worker left", &prefill.announced], PROMPT)
        .await;
    assert!(frontend.has_logged(&["worker removed", &prefill.announced]));
    assert!(
        left_after >= Duration::from_millis(500),
        "left after {left_after:?}: before its lease could expire"
    );
    complete(&http, &frontend, &long_prompt(100)).await;

    // SIGTERM: the decode worker drains, revokes its lease (the frontend sees it leave long before the lease could
    // expire), and exits 0.
    // SAFETY: kill(2) on the pid of a child we have not waited for yet.
    assert_eq!(unsafe { libc::kill(decode.pid(), libc::SIGTERM) }, 0);
    let unready_after = wait_for_health(&http, &frontend, (503, (0, 0))).await;
    let left_after = frontend.wait_for_log(&["worker left", &decode.announced], PROMPT).await;
    assert!(
        unready_after < Duration::from_secs(2),
        "still ready {unready_after:?} after SIGTERM"
    );
    assert!(
        left_after < DECODE_LEASE_TTL / 2,
        "left after {left_after:?}: the lease expired, not revoked"
    );
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = decode.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < PROMPT,
            "the decode worker did not exit within {PROMPT:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        exit.success(),
        "the decode worker exited with {exit}; its log: {:#?}",
        decode.log.lock().unwrap()
    );
}

#[tokio::test]
async fn etcd_out_of_reach_at_start_is_a_clear_error() {
    let etcd = format!("http://127.0.0.1:{}", closed_port());
    let worker = [
        "worker",
        "--backend",
        "cpu",
        "--model",
        "tiny",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd,
    ];
    let frontend = [
        "frontend",
        "--model",
        "tiny",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd,
    ];
    for (args, message) in [
        (&worker[..], "error: registering this worker in etcd: cannot reach etcd"),
        (&frontend[..], "error: watching etcd for workers: cannot reach etcd"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cleave"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cleave starts");
        let started = Instant::now();
        let exit = loop {
            if let Some(exit) = child.try_wait().unwrap() {
                break exit;
            }
            if started.elapsed() > PROMPT {
                let _ = child.kill();
                panic!("`cleave {}` still runs after {PROMPT:?} without etcd", args.join(" "));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(exit.code(), Some(1), "`cleave {}`: {stderr}", args.join(" "));
        assert!(stderr.contains(message), "`cleave {}` said: {stderr}", args.join(" "));
    }
}

#[test]
fn worker_refuses_to_advertise_an_unspecified_address() {
    let output = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args([
            "worker",
            "--backend",
            "cpu",
            "--listen",
            "0.0.0.0:0",
            "--etcd",
            "http://127.0.0.1:1",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("cleave runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("give --advertise HOST:PORT"), "{stderr}");
}
