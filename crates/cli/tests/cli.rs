//! The `cleave` binary as a user runs it: JSON output, exit codes and error messages.

use std::process::Command;

fn cleave(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .output()
        .expect("cleave runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_json_reports_the_generated_ids_and_text() {
    let (ok, stdout, stderr) = cleave(&[
        "generate",
        "--backend",
        "cpu",
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(v["prompt_tokens"], 6, "BOS + 5 bytes");
    assert_eq!(v["finish_reason"], "length");
    assert!(v["text"].is_string());
}

#[test]
fn greedy_generation_is_reproducible_across_processes() {
    let run = || {
        cleave(&[
            "generate",
            "--backend",
            "cpu",
            "--prompt-ids",
            "1,2,3,4",
            "--max-tokens",
            "8",
            "--json",
        ])
        .1
    };
    let (a, b) = (run(), run());
    let ids = |s: &str| serde_json::from_str::<serde_json::Value>(s.trim()).unwrap()["token_ids"].clone();
    assert_eq!(ids(&a), ids(&b));
}

#[test]
fn bad_input_exits_non_zero_with_a_message_naming_the_problem() {
    let (ok, _, stderr) = cleave(&[
        "generate",
        "--backend",
        "cpu",
        "--prompt-ids",
        "1,2,300",
        "--max-tokens",
        "2",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("300") && stderr.contains("vocabulary of 258"),
        "{stderr}"
    );

    let (ok, _, stderr) = cleave(&["generate", "--model", "/no/such/model", "--prompt", "x"]);
    assert!(!ok);
    assert!(
        stderr.contains("/no/such/model") && stderr.contains("preset"),
        "{stderr}"
    );

    let (ok, _, stderr) = cleave(&["generate", "--backend", "tpu", "--prompt", "x"]);
    assert!(!ok);
    assert!(stderr.contains("unknown backend \"tpu\""), "{stderr}");
}

#[test]
fn info_prints_the_real_shapes() {
    let (ok, stdout, stderr) = cleave(&["info", "llama3-8b"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("8030261248 (8.03 B)"), "{stdout}");
    assert!(stdout.contains("131072 bytes in bf16"), "{stdout}");
}

#[test]
fn deployment_specs_parse_and_bad_ones_are_named() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let (ok, stdout, stderr) = cleave(&["serve", "--config", path.to_str().unwrap(), "--print-spec"]);
        assert!(ok, "{}: {stderr}", path.display());
        assert!(stdout.contains("model:"), "{stdout}");
        n += 1;
    }
    assert!(n >= 4, "the experiment's specs are in deploy/");
    // Flags override the spec.
    let (ok, stdout, _) = cleave(&["serve", "--print-spec", "--decode-workers", "3", "--port", "9"]);
    assert!(
        ok && stdout.contains("port: 9") && stdout.contains("count: 3"),
        "{stdout}"
    );
    let spec = std::env::temp_dir().join(format!("cleave-bad-spec-{}.yaml", std::process::id()));
    std::fs::write(&spec, "model: tiny\nprefil:\n  count: 1\n").unwrap();
    let (ok, _, stderr) = cleave(&["serve", "--config", spec.to_str().unwrap(), "--print-spec"]);
    assert!(
        !ok && stderr.contains("not a valid deployment spec") && stderr.contains("prefil"),
        "{stderr}"
    );
    let (ok, _, stderr) = cleave(&["serve", "--print-spec", "--decode-workers", "0"]);
    assert!(!ok && stderr.contains("decode"), "{stderr}");
    std::fs::remove_file(spec).unwrap();
}

#[test]
fn the_mock_backend_builds_any_shape_without_weights_and_names_bad_timings() {
    // Llama-3-70B's shape: 141 GB of weights the mock never generates.
    let (ok, stdout, stderr) = cleave(&[
        "generate",
        "--backend",
        "mock",
        "--mock-timing",
        "base_ms=1",
        "--model",
        "llama3-70b",
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["backend"], "mock");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4);

    let (ok, _, stderr) = cleave(&[
        "generate",
        "--backend",
        "mock",
        "--mock-timing",
        "base_ms=-1",
        "--prompt",
        "x",
    ]);
    assert!(
        !ok && stderr.contains("base_ms=-1 must be a finite number of at least 0"),
        "{stderr}"
    );
    let (ok, _, stderr) = cleave(&[
        "generate",
        "--backend",
        "cpu",
        "--mock-timing",
        "base_ms=1",
        "--prompt",
        "x",
    ]);
    assert!(
        !ok && stderr.contains("--mock-timing is for --backend mock"),
        "{stderr}"
    );
    let (ok, _, stderr) = cleave(&["generate", "--backend", "mock", "--tp", "2", "--prompt", "x"]);
    assert!(!ok && stderr.contains("the mock backend runs one rank"), "{stderr}");
    let (ok, _, stderr) = cleave(&["serve", "--print-spec", "--mock-timing", "base_ms=1"]);
    assert!(
        !ok && stderr.contains("mock_timing is for the mock backend"),
        "{stderr}"
    );
    let (ok, _, stderr) = cleave(&["serve", "--print-spec", "--backend", "mock", "--mock-timing", "base=1"]);
    assert!(!ok && stderr.contains("unknown key \"base\""), "{stderr}");
    let (ok, stdout, stderr) = cleave(&[
        "serve",
        "--print-spec",
        "--backend",
        "mock",
        "--mock-timing",
        "base_ms=2",
    ]);
    assert!(ok && stdout.contains("base_ms=2"), "{stderr}");
}
