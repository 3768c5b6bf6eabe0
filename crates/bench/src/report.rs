//! The report: a table per run on stdout, a comparison table for several runs, and the JSON file.

use std::fmt::Write as _;

use serde::{Serialize, Serializer};

use crate::runner::RequestRecord;
use crate::stats::{LATE_SEND_MS, Percentiles, Summary};

/// The JSON format's name and version; bumped on any incompatible change.
pub const SCHEMA: &str = "cleave-bench/1";

/// The whole JSON file.
#[derive(Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub cleave_version: &'static str,
    pub started_unix_s: f64,
    pub command_line: Vec<String>,
    /// The resolved configuration (see `Config` in lib.rs).
    pub config: serde_json::Value,
    pub runs: Vec<Run>,
    /// For each deployment of a rate sweep with SLOs: the highest rate whose attainment reached the target.
    pub sweep_goodput: Vec<SweepGoodput>,
    /// For `--compare`: how each server went.
    pub deployments: Vec<Deployment>,
}

/// One run: one deployment at one rate.
#[derive(Clone, Serialize)]
pub struct Run {
    /// The deployment spec for `--compare`, else the URL.
    pub target: String,
    /// The model name sent (`--model`, else the first one the server listed).
    pub model: String,
    /// Requests per second; "inf" for everything at once; null for a trace.
    #[serde(serialize_with = "rate_json")]
    pub rate: Option<f64>,
    pub summary: Summary,
    pub requests: Vec<RequestRecord>,
}

#[derive(Clone, Serialize)]
pub struct SweepGoodput {
    pub target: String,
    pub attainment_min: f64,
    /// Null when no rate of the sweep reached the attainment.
    pub goodput_rate: Option<f64>,
}

#[derive(Clone, Serialize)]
pub struct Deployment {
    pub spec: String,
    pub port: u16,
    pub seconds_to_healthy: f64,
    /// How `cleave serve` exited after SIGTERM ("exit status: 0" when it drained cleanly).
    pub exit: String,
}

fn rate_json<S: Serializer>(rate: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
    match rate {
        Some(rate) if rate.is_infinite() => serializer.serialize_str("inf"),
        Some(rate) => serializer.serialize_f64(*rate),
        None => serializer.serialize_none(),
    }
}

pub fn rate_label(rate: Option<f64>) -> String {
    match rate {
        None => "trace".to_string(),
        Some(rate) if rate.is_infinite() => "inf".to_string(),
        Some(rate) => format!("{rate}"),
    }
}

/// The table of one run.
pub fn run_table(run: &Run) -> String {
    let s = &run.summary;
    let mut out = String::new();
    let rate = match run.rate {
        None => "trace arrivals".to_string(),
        Some(rate) => format!("rate {} req/s", rate_label(Some(rate))),
    };
    let _ = writeln!(out, "== {}, model {}, {rate}", run.target, run.model);
    let _ = writeln!(
        out,
        "requests     {} sent, {} ok, {} failed, in {:.2} s",
        s.n_requests, s.n_ok, s.n_failed, s.duration_s
    );
    let _ = writeln!(
        out,
        "throughput   {:.2} req/s; tokens/s in {:.1}, out {:.1}, total {:.1}; per GPU ({}) out {:.1}, total {:.1}; \
         per user out {:.1}",
        s.requests_per_s,
        s.input_tokens_per_s,
        s.output_tokens_per_s,
        s.total_tokens_per_s,
        s.gpus,
        s.output_tokens_per_s_per_gpu,
        s.total_tokens_per_s_per_gpu,
        s.output_tokens_per_s_per_user
    );
    let _ = writeln!(
        out,
        "{:<14}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}",
        "", "mean", "p50", "p90", "p99", "p99.9", "max", "n"
    );
    let rows = [
        ("TTFT ms", &s.ttft_ms),
        ("ITL ms", &s.itl_ms),
        ("TPOT ms", &s.tpot_ms),
        ("E2E ms", &s.e2e_ms),
        ("send delay ms", &s.send_delay_ms),
    ];
    for (name, p) in rows {
        let _ = match p {
            Some(p) => writeln!(
                out,
                "{name:<14}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}",
                ms(p.mean),
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p99_9),
                ms(p.max),
                p.n
            ),
            None => writeln!(out, "{name:<14}{:>10}", "-"),
        };
    }
    if let Some(slo) = &s.slo {
        let _ = writeln!(
            out,
            "SLO          {}: {}/{} met ({:.1}%), goodput {:.2} req/s",
            slo_text(&slo.slo),
            slo.n_met,
            s.n_requests,
            slo.attainment * 100.0,
            slo.goodput_requests_per_s
        );
    }
    for note in notes(s) {
        let _ = writeln!(out, "note         {note}");
    }
    for (message, count) in &s.errors {
        let _ = writeln!(out, "error        {count} x {message}");
    }
    out
}

fn notes(s: &Summary) -> Vec<String> {
    let mut notes = Vec::new();
    if s.n_waited_for_slot > 0 {
        notes.push(format!(
            "{} requests found the in-flight limit reached and waited for a slot: the load was not fully open-loop \
             (raise --max-concurrency)",
            s.n_waited_for_slot
        ));
    }
    if s.n_late_sends > 0 {
        let max = s.send_delay_ms.as_ref().map_or(0.0, |p| p.max);
        notes.push(format!(
            "{} requests were sent more than {LATE_SEND_MS} ms late (at most {:.1} ms)",
            s.n_late_sends, max
        ));
    }
    if s.n_short_outputs > 0 {
        notes.push(format!(
            "{} requests returned fewer tokens than asked: the server ignores min_tokens/ignore_eos",
            s.n_short_outputs
        ));
    }
    notes
}

pub fn slo_text(slo: &crate::stats::Slo) -> String {
    let mut parts = Vec::new();
    match (slo.ttft_ms, slo.ttft_input_tokens_max) {
        (Some(ms), None) => parts.push(format!("TTFT <= {ms} ms")),
        (Some(ms), Some(max)) => parts.push(format!("TTFT <= {ms} ms (prompts <= {max} tokens)")),
        _ => {}
    }
    if let Some(ms) = slo.itl_p99_ms {
        let q = slo.itl_quantile();
        parts.push(match q >= 100.0 {
            true => format!("every gap <= {ms} ms"),
            false => format!("request p{q} ITL <= {ms} ms"),
        });
    }
    if let Some(ms) = slo.tpot_ms {
        parts.push(format!("TPOT <= {ms} ms"));
    }
    parts.join(", ")
}

fn ms(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// One line per run, for sweeps and comparisons.
pub fn comparison_table(runs: &[Run]) -> String {
    let p = |p: &Option<Percentiles>, f: fn(&Percentiles) -> f64| p.as_ref().map_or("-".to_string(), |p| ms(f(p)));
    let width = runs
        .iter()
        .map(|r| r.target.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(6, 40);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$} {:>6} {:>7} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8} {:>6}",
        "target",
        "rate",
        "req/s",
        "out tok/s",
        "/GPU",
        "/user",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "TPOT p99",
        "E2E p99",
        "attain",
        "goodput",
        "failed"
    );
    for run in runs {
        let s = &run.summary;
        let (attain, goodput) = match &s.slo {
            Some(slo) => (
                format!("{:.1}%", slo.attainment * 100.0),
                format!("{:.2}", slo.goodput_requests_per_s),
            ),
            None => ("-".to_string(), "-".to_string()),
        };
        // Long spec paths keep their end, which names the file.
        let n_chars = run.target.chars().count();
        let target: String = run.target.chars().skip(n_chars.saturating_sub(width)).collect();
        let _ = writeln!(
            out,
            "{:<width$} {:>6} {:>7.2} {:>9.1} {:>9.1} {:>8.1} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8} {:>6}",
            target,
            rate_label(run.rate),
            s.requests_per_s,
            s.output_tokens_per_s,
            s.output_tokens_per_s_per_gpu,
            s.output_tokens_per_s_per_user,
            p(&s.ttft_ms, |p| p.p50),
            p(&s.ttft_ms, |p| p.p99),
            p(&s.itl_ms, |p| p.p50),
            p(&s.itl_ms, |p| p.p99),
            p(&s.tpot_ms, |p| p.p99),
            p(&s.e2e_ms, |p| p.p99),
            attain,
            goodput,
            s.n_failed
        );
    }
    out
}
