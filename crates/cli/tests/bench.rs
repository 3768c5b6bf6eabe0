//! `cleave bench` against a real `cleave serve` of the tiny preset on loopback: token-id prompts arrive with their
//! exact lengths, output lengths are pinned, every token is timed; and `--compare` starts, measures and stops two
//! deployments (aggregated and disaggregated) one after the other.

mod common;

use common::start_serve;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cleave-bench-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bench(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .arg("bench")
        .args(args)
        .output()
        .expect("cleave bench runs");
    assert!(
        output.status.success(),
        "cleave bench failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Every request of a run succeeded with exactly the planned lengths and one gap per token after the first.
fn assert_exact_lengths(run: &Value) {
    for r in run["requests"].as_array().unwrap() {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(
            r["prompt_tokens"], r["input_len"],
            "token-id prompts arrive as they are: {r}"
        );
        assert_eq!(
            r["output_tokens"], r["output_len"],
            "max_tokens = min_tokens with ignore_eos: {r}"
        );
        let n_gaps = r["itl_ms"].as_array().unwrap().len() as u64;
        assert_eq!(n_gaps, r["output_len"].as_u64().unwrap() - 1, "{r}");
        assert!(r["ttft_ms"].as_f64().unwrap() > 0.0);
    }
}

// The byte-vocabulary presets take ids below 256; short and long prompts (remote prefill from 128 tokens).
const WORKLOAD: [&str; 12] = [
    "--num-requests",
    "16",
    "--rate",
    "20",
    "--input-len",
    "mix:0.75*uniform:8:64,0.25*uniform:200:400",
    "--output-len",
    "uniform:2:24",
    "--vocab-size",
    "256",
    "--seed",
    "5",
];

#[test]
fn bench_measures_cleave_serve() {
    let serve = start_serve(&["--remote-prefill-tokens-min", "128"]);
    let dir = temp_dir("serve");
    let (json_path, plots) = (dir.join("out.json"), dir.join("plots"));
    let mut args = vec![
        "--url",
        &serve.url,
        "--slo-ttft-ms",
        "60000",
        "--long-prompt-tokens",
        "128",
    ];
    args.extend(WORKLOAD);
    args.extend([
        "--output-json",
        json_path.to_str().unwrap(),
        "--plot-dir",
        plots.to_str().unwrap(),
    ]);
    let output = bench(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("TTFT ms") && stdout.contains("16 sent, 16 ok, 0 failed"),
        "{stdout}"
    );
    let report = read_json(&json_path);
    assert_eq!(
        report["config"]["workload"]["source"]["input_len"],
        "mix:0.75*uniform:8:64,0.25*uniform:200:400"
    );
    let run = &report["runs"][0];
    assert_exact_lengths(run);
    assert_eq!(run["summary"]["slo"]["n_met"], 16);
    for name in ["itl_over_time_rate20.svg", "ttft_cdf.svg", "itl_cdf.svg"] {
        assert!(
            std::fs::read_to_string(plots.join(name)).unwrap().contains("</svg>"),
            "{name}"
        );
    }
}

#[test]
fn compare_starts_measures_and_stops_each_deployment() {
    let dir = temp_dir("compare");
    let aggregated = dir.join("aggregated.yaml");
    std::fs::write(
        &aggregated,
        "model: tiny\naggregated: {count: 1}\nprefill: {count: 0}\ndecode: {count: 0}\n",
    )
    .unwrap();
    let disaggregated = dir.join("disaggregated.yaml");
    std::fs::write(&disaggregated, "model: tiny\nremote_prefill_tokens_min: 128\n").unwrap();
    let json_path = dir.join("out.json");
    let (a, d) = (aggregated.to_str().unwrap(), disaggregated.to_str().unwrap());
    let mut args = vec![
        "--compare",
        a,
        d,
        "--gpus",
        "1,2",
        "--output-json",
        json_path.to_str().unwrap(),
    ];
    args.extend(WORKLOAD);
    let output = bench(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("target") && stdout.contains("aggregated.yaml") && stdout.contains("disaggregated.yaml"));
    let report = read_json(&json_path);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (runs[0]["target"].as_str(), runs[1]["target"].as_str()),
        (Some(a), Some(d))
    );
    assert_eq!(
        (runs[0]["summary"]["gpus"].as_u64(), runs[1]["summary"]["gpus"].as_u64()),
        (Some(1), Some(2))
    );
    for run in runs {
        assert_exact_lengths(run);
    }
    // The same seeded workload went to both.
    let lengths = |run: &Value| -> Vec<(u64, u64)> {
        let requests = run["requests"].as_array().unwrap();
        requests
            .iter()
            .map(|r| (r["input_len"].as_u64().unwrap(), r["output_len"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(lengths(&runs[0]), lengths(&runs[1]));
    for deployment in report["deployments"].as_array().unwrap() {
        assert_eq!(
            deployment["exit"], "exit status: 0",
            "SIGTERM drains and exits 0: {deployment}"
        );
    }
}
