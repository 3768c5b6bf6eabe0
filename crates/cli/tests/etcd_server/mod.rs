//! A real etcd server for one test: the `etcd` binary (Debian package etcd-server, installed by scripts/test) as a
//! child process on free loopback ports, with its data in a temporary directory. Killed when dropped, also when the
//! test panics; then the tail of its log is printed. (The same fixture as crates/discovery's tests, checking
//! readiness through etcd's HTTP `/health` instead of an etcd client.)

use std::fs::File;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long etcd may take to answer after its start; on a busy 2-core machine it usually takes about a second.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct EtcdServer {
    child: Child,
    dir: tempfile::TempDir,
    client_port: u16,
}

impl EtcdServer {
    pub async fn start() -> EtcdServer {
        let dir = tempfile::tempdir().expect("create a temporary directory for etcd");
        let (client_port, peer_port) = free_ports();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = File::create(dir.path().join("etcd.log")).expect("create etcd's log file");
        let spawned = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("test={peer_url}"),
                "--initial-cluster-state",
                "new",
            ])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(log.try_clone().expect("clone etcd's log file"))
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!(
                    "the etcd binary is not on PATH: run scripts/test, which installs it (Debian package etcd-server)"
                )
            }
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        let mut server = EtcdServer {
            child,
            dir,
            client_port,
        };
        server.wait_ready().await;
        server
    }

    /// The client URL, as `--etcd` takes it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    async fn wait_ready(&mut self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll etcd") {
                panic!(
                    "etcd exited with {status} while starting; its log:\n{}",
                    self.log_tail()
                );
            }
            let health = http.get(format!("{}/health", self.endpoint())).send().await;
            if let Ok(response) = health
                && response
                    .text()
                    .await
                    .is_ok_and(|body| body.contains(r#""health":"true""#))
            {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "etcd did not answer within {START_TIMEOUT:?}; its log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("etcd's log (last lines):\n{}", self.log_tail());
        }
    }
}

/// Two ports that were free a moment ago. Another process could take one before etcd binds it; on a test machine
/// that is rare enough, and etcd then fails to start with a clear log.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// A port nothing listens on (for as long as nothing takes it).
pub fn closed_port() -> u16 {
    free_ports().0
}
