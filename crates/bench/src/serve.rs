//! `--compare`: a `cleave serve` child process per deployment spec, started, waited on until healthy, and stopped.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::runner::error_chain;

/// Lines of the child's output kept for error messages.
const OUTPUT_TAIL_LINES: usize = 40;
/// How long a stopped server may take to drain and exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server process. Dropping it kills the process, so an error anywhere cannot leave one behind.
pub struct Server {
    child: Child,
    pub port: u16,
    description: String,
    output_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Starts `cleave serve --config SPEC --port PORT` from this very binary; its whole output goes to `log` if given.
    pub fn start_cleave_serve(spec: &Path, port: u16, log: Option<&Path>) -> Result<Server> {
        let exe = std::env::current_exe().context("finding the cleave binary")?;
        let args: Vec<OsString> = vec![
            "serve".into(),
            "--config".into(),
            spec.into(),
            "--port".into(),
            port.to_string().into(),
        ];
        Server::start(&exe, &args, port, log)
    }

    /// Starts `program args`, expected to serve HTTP on 127.0.0.1:`port`; its whole output goes to `log` if given.
    pub fn start(program: &Path, args: &[OsString], port: u16, log: Option<&Path>) -> Result<Server> {
        let description = std::iter::once(program.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {description}"))?;
        let output_tail = Arc::new(Mutex::new(VecDeque::new()));
        let log = match log {
            Some(path) => {
                let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
                Some(Arc::new(Mutex::new(std::io::LineWriter::new(file))))
            }
            None => None,
        };
        collect_lines(child.stdout.take().expect("piped"), output_tail.clone(), log.clone());
        collect_lines(child.stderr.take().expect("piped"), output_tail.clone(), log);
        Ok(Server {
            child,
            port,
            description,
            output_tail,
        })
    }

    /// Polls `GET /health` until it answers 200; returns how long that took. Fails, quoting the server's last output
    /// lines, if the process exits first or `timeout` passes.
    pub async fn wait_healthy(&mut self, client: &reqwest::Client, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let url = format!("http://127.0.0.1:{}/health", self.port);
        loop {
            if let Some(status) = self.child.try_wait().context("waiting on the server")? {
                bail!(
                    "{} exited ({status}) before {url} answered 200{}",
                    self.description,
                    self.tail()
                );
            }
            let last_error = match client.get(&url).timeout(Duration::from_secs(2)).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::OK => return Ok(started.elapsed()),
                Ok(response) => format!("HTTP {}", response.status()),
                Err(e) => error_chain(&e),
            };
            if started.elapsed() >= timeout {
                bail!(
                    "{} did not answer 200 at {url} within {timeout:?} (last: {last_error}){}",
                    self.description,
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the process to drain and exit; kills it after [`STOP_TIMEOUT`]. Returns how it
    /// exited, e.g. "exit status: 0".
    pub async fn stop(mut self) -> Result<String> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(format!("{status} (before SIGTERM)"));
        }
        signal(&self.child, libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.to_string());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait()?;
                return Ok(format!("{status} (killed: no exit {STOP_TIMEOUT:?} after SIGTERM)"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines the server printed, for an error message.
    pub fn tail(&self) -> String {
        // The reader threads may still be draining the pipes of a process that just exited.
        std::thread::sleep(Duration::from_millis(100));
        let lines = self.output_tail.lock().expect("not poisoned");
        if lines.is_empty() {
            return "; it printed nothing".to_string();
        }
        let mut text = format!("; its last {} output lines:", lines.len());
        for line in lines.iter() {
            text.push_str("\n  ");
            text.push_str(line);
        }
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped (so not reused).
    if unsafe { libc::kill(pid, signal) } != 0 {
        bail!("signalling pid {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

type LogFile = Arc<Mutex<std::io::LineWriter<std::fs::File>>>;

fn collect_lines(pipe: impl Read + Send + 'static, tail: Arc<Mutex<VecDeque<String>>>, log: Option<LogFile>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some(log) = &log {
                // A full disk loses log lines, not the benchmark.
                let _ = writeln!(log.lock().expect("not poisoned"), "{line}");
            }
            let mut tail = tail.lock().expect("not poisoned");
            if tail.len() == OUTPUT_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
}

/// A port that was free a moment ago on 127.0.0.1 (the OS picks it; the child binds it right after).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn sh(script: &str, port: u16) -> Server {
        Server::start(Path::new("/bin/sh"), &["-c".into(), script.into()], port, None).unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_server_that_exits_early_is_reported_with_its_output() {
        runtime().block_on(async {
            let client = crate::runner::client(4).unwrap();
            let mut server = sh(
                "echo starting; echo 'bad spec: no model' >&2; exit 3",
                free_port().unwrap(),
            );
            let err = server
                .wait_healthy(&client, Duration::from_secs(10))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("exited (exit status: 3)"), "{err}");
            assert!(err.contains("bad spec: no model") && err.contains("starting"), "{err}");
        });
    }

    #[test]
    fn the_whole_output_goes_to_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let script = "for i in $(seq 100); do echo line $i; done; echo 'worker panicked' >&2";
        let mut server = Server::start(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            free_port().unwrap(),
            Some(&log),
        )
        .unwrap();
        server.child.wait().unwrap();
        // More lines than the tail keeps, all in the file once the readers drained the pipes.
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&log).unwrap();
            if text.lines().count() == 101 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(text.lines().count(), 101, "{text}");
        assert!(text.contains("line 1\n") && text.contains("worker panicked"), "{text}");
    }

    #[test]
    fn a_server_that_never_answers_times_out_with_a_clear_error() {
        runtime().block_on(async {
            let client = crate::runner::client(4).unwrap();
            let mut server = sh("echo loading; exec sleep 30", free_port().unwrap());
            let err = server
                .wait_healthy(&client, Duration::from_millis(300))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("did not answer 200") && err.contains("loading"), "{err}");
            let pid = server.child.id();
            drop(server);
            // Dropping killed and reaped it.
            assert!(!Path::new(&format!("/proc/{pid}")).exists());
        });
    }

    #[test]
    fn healthy_then_sigterm_waits_for_the_exit() {
        runtime().block_on(async {
            // The "server" is this listener; the child only has to outlive the health check and honour SIGTERM.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                loop {
                    let (mut socket, _) = listener.accept().await.unwrap();
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
            let client = crate::runner::client(4).unwrap();
            let mut server = sh(
                "trap 'echo draining; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
                port,
            );
            server.wait_healthy(&client, Duration::from_secs(10)).await.unwrap();
            // SIGTERM before the trap is set would kill the shell instead.
            while !server.output_tail.lock().unwrap().contains(&"ready".to_string()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(server.stop().await.unwrap(), "exit status: 0");
            let server = sh("exec sleep 30", port);
            assert_eq!(server.stop().await.unwrap(), "signal: 15 (SIGTERM)");
        });
    }
}
