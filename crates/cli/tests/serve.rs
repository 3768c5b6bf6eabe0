//! `cleave serve` for real: two deployments of the tiny preset on loopback (disaggregated: one prefill and one
//! decode worker; aggregated: one worker), checked through the official `openai` Python client and raw HTTP by
//! tests/openai/check_serve.py, which ends by sending SIGINT to the disaggregated one: it must drain and exit 0.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_serve(args: &[&str]) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cleave serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .split_once(" on ")
        .map(|(_, url)| url.to_string())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    Serve { child, url }
}

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
