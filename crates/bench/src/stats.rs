//! Summaries of one run: exact percentiles, throughput, SLO attainment and goodput.
//!
//! Percentiles are exact, over every sample, interpolated linearly between the two nearest ranks (numpy's default,
//! so figures match vLLM's benchmark on the same samples): p(q) of sorted x_0..x_{n-1} is x at rank q/100·(n-1).
//!
//! Goodput follows DistServe: the rate of requests that meet every SLO given, over the run's duration (first planned
//! send to last response). A request meets the SLOs when it succeeded and
//! - its TTFT ≤ `--slo-ttft-ms`;
//! - its own p99 inter-token gap (over its gaps, as above; with fewer than 100 gaps this is close to its largest)
//!   ≤ `--slo-itl-ms`. A per-request p99 rather than the mean, because a stall is what a reader of the stream notices;
//! - its TPOT ≤ `--slo-tpot-ms`.
//!
//! A request with one output token has no gaps and no TPOT, and passes those two. Attainment is the share of all
//! planned requests (failed ones included) that met them.

use serde::{Deserialize, Serialize};

use crate::runner::RequestRecord;

/// A send later than its planned time by more than this is counted as late in the report.
pub const LATE_SEND_MS: f64 = 10.0;
/// How many distinct error messages a summary keeps.
const ERRORS_KEPT_MAX: usize = 5;

/// The value at percentile `q` (0..=100) of sorted, non-empty `sorted`, interpolated linearly between ranks.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    assert!((0.0..=100.0).contains(&q), "percentile {q} outside 0..=100");
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let (below, above) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[below] + (sorted[above] - sorted[below]) * (rank - below as f64)
}

/// Percentiles of one metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for no samples.
    pub fn of(mut values: Vec<f64>) -> Option<Percentiles> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Percentiles {
            n: values.len(),
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: percentile(&values, 50.0),
            p90: percentile(&values, 90.0),
            p99: percentile(&values, 99.0),
            p99_9: percentile(&values, 99.9),
            max: values[values.len() - 1],
        })
    }
}

/// Service-level objectives; each one not given is not checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    /// The TTFT objective applies only to prompts of at most this many tokens (a 32k-token prompt cannot have the
    /// TTFT of a chat turn); longer prompts are judged on the other objectives.
    #[serde(default)]
    pub ttft_input_tokens_max: Option<u32>,
    /// Bound on each request's own inter-token gap at quantile `itl_quantile` (its p99 unless set).
    pub itl_p99_ms: Option<f64>,
    /// The quantile of each request's gaps that `itl_p99_ms` bounds, in percent: 99 when absent; 100 bounds its
    /// longest gap (no stall at all).
    #[serde(default)]
    pub itl_quantile: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.itl_p99_ms.is_some() || self.tpot_ms.is_some()
    }

    /// The quantile of a request's gaps the ITL objective bounds, in percent.
    pub fn itl_quantile(&self) -> f64 {
        self.itl_quantile.unwrap_or(99.0)
    }

    /// Whether `record` succeeded and met every objective given.
    pub fn meets(&self, record: &RequestRecord) -> bool {
        let within = |value: Option<f64>, bound: Option<f64>| match (value, bound) {
            (_, None) | (None, Some(_)) => true,
            (Some(value), Some(bound)) => value <= bound,
        };
        let ttft_applies = self.ttft_input_tokens_max.is_none_or(|max| record.input_len <= max);
        record.ok()
            && record
                .ttft_ms
                .is_some_and(|ttft| !ttft_applies || self.ttft_ms.is_none_or(|bound| ttft <= bound))
            && within(request_itl_quantile_ms(record, self.itl_quantile()), self.itl_p99_ms)
            && within(record.tpot_ms, self.tpot_ms)
    }
}

/// The mean of `xs`; 0 when empty.
fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The `q`-th percentile of one request's inter-token gaps; `None` without gaps.
pub fn request_itl_quantile_ms(record: &RequestRecord, q: f64) -> Option<f64> {
    if record.itl_ms.is_empty() {
        return None;
    }
    let mut gaps = record.itl_ms.clone();
    gaps.sort_by(f64::total_cmp);
    Some(percentile(&gaps, q))
}

/// Everything the report says about one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n_requests: usize,
    pub n_ok: usize,
    pub n_failed: usize,
    pub duration_s: f64,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Prompt tokens of successful requests per second (the server's count when it reported one).
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub gpus: u32,
    pub output_tokens_per_s_per_gpu: f64,
    pub total_tokens_per_s_per_gpu: f64,
    /// Decode speed one user sees: the mean over requests of 1000 / TPOT (output tokens/s/user, the x-axis of
    /// throughput-per-GPU curves); 0 without a request of two or more tokens.
    #[serde(default)]
    pub output_tokens_per_s_per_user: f64,
    pub ttft_ms: Option<Percentiles>,
    /// All gaps of all successful requests, pooled.
    pub itl_ms: Option<Percentiles>,
    pub tpot_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
    /// Actual minus planned send time, every request.
    pub send_delay_ms: Option<Percentiles>,
    /// Requests sent more than `LATE_SEND_MS` after their planned time.
    pub n_late_sends: usize,
    /// Requests that found the in-flight limit reached when due.
    pub n_waited_for_slot: usize,
    /// Successful requests that returned fewer tokens than asked (the server ignored min_tokens/ignore_eos).
    pub n_short_outputs: usize,
    pub slo: Option<SloSummary>,
    /// The most frequent error messages with their counts.
    pub errors: Vec<(String, usize)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SloSummary {
    pub slo: Slo,
    pub n_met: usize,
    /// n_met / n_requests, 0..=1.
    pub attainment: f64,
    /// n_met / duration_s.
    pub goodput_requests_per_s: f64,
}

impl Summary {
    pub fn new(records: &[RequestRecord], duration_s: f64, gpus: u32, slo: Slo) -> Summary {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
        let per_s = |x: f64| if duration_s > 0.0 { x / duration_s } else { 0.0 };
        let input_tokens: f64 = ok
            .iter()
            .map(|r| r.prompt_tokens.unwrap_or(u64::from(r.input_len)) as f64)
            .sum();
        let output_tokens: f64 = ok.iter().map(|r| r.output_tokens as f64).sum();
        let gpus_f = f64::from(gpus.max(1));
        let slo_summary = slo.is_set().then(|| {
            let n_met = records.iter().filter(|r| slo.meets(r)).count();
            SloSummary {
                slo,
                n_met,
                attainment: if records.is_empty() {
                    0.0
                } else {
                    n_met as f64 / records.len() as f64
                },
                goodput_requests_per_s: per_s(n_met as f64),
            }
        });
        let send_delays: Vec<f64> = records.iter().map(|r| (r.sent_s - r.scheduled_s) * 1e3).collect();
        Summary {
            n_requests: records.len(),
            n_ok: ok.len(),
            n_failed: records.len() - ok.len(),
            duration_s,
            requests_per_s: per_s(ok.len() as f64),
            input_tokens_per_s: per_s(input_tokens),
            output_tokens_per_s: per_s(output_tokens),
            total_tokens_per_s: per_s(input_tokens + output_tokens),
            gpus,
            output_tokens_per_s_per_gpu: per_s(output_tokens) / gpus_f,
            total_tokens_per_s_per_gpu: per_s(input_tokens + output_tokens) / gpus_f,
            output_tokens_per_s_per_user: mean(ok.iter().filter_map(|r| r.tpot_ms).map(|t| 1e3 / t)),
            ttft_ms: Percentiles::of(ok.iter().filter_map(|r| r.ttft_ms).collect()),
            itl_ms: Percentiles::of(ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect()),
            tpot_ms: Percentiles::of(ok.iter().filter_map(|r| r.tpot_ms).collect()),
            e2e_ms: Percentiles::of(ok.iter().filter_map(|r| r.e2e_ms).collect()),
            n_late_sends: send_delays.iter().filter(|&&d| d > LATE_SEND_MS).count(),
            send_delay_ms: Percentiles::of(send_delays),
            n_waited_for_slot: records.iter().filter(|r| r.waited_for_slot).count(),
            n_short_outputs: ok.iter().filter(|r| r.output_tokens < u64::from(r.output_len)).count(),
            slo: slo_summary,
            errors: top_errors(records),
        }
    }
}

fn top_errors(records: &[RequestRecord]) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for error in records.iter().filter_map(|r| r.error.as_deref()) {
        let found = counts.iter().position(|(message, _)| message == error);
        match found {
            Some(i) => counts[i].1 += 1,
            // Bounded: past a few hundred distinct messages the rest are counted under the last.
            None if counts.len() < 256 => counts.push((error.to_string(), 1)),
            None => counts.last_mut().expect("256 entries").1 += 1,
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(ERRORS_KEPT_MAX);
    counts
}

/// The goodput of a rate sweep: the highest rate whose attainment is at least `attainment_min`; `None` if none is.
pub fn goodput_rate(points: &[(f64, f64)], attainment_min: f64) -> Option<f64> {
    points
        .iter()
        .filter(|(_, attainment)| *attainment >= attainment_min)
        .map(|(rate, _)| *rate)
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The linear-interpolation percentile computed the long way: walk the empirical points (i/(n-1), x_i) until
    /// the segment holding q/100, then interpolate along it.
    fn naive_percentile(values: &[f64], q: f64) -> f64 {
        let mut sorted = values.to_vec();
        // Insertion sort, unlike the code under test.
        for i in 1..sorted.len() {
            let mut j = i;
            while j > 0 && sorted[j - 1] > sorted[j] {
                sorted.swap(j - 1, j);
                j -= 1;
            }
        }
        let n = sorted.len();
        if n == 1 {
            return sorted[0];
        }
        let p = q / 100.0;
        for i in 0..n - 1 {
            let (p_lo, p_hi) = (i as f64 / (n - 1) as f64, (i + 1) as f64 / (n - 1) as f64);
            if p <= p_hi {
                return sorted[i] + (sorted[i + 1] - sorted[i]) * (p - p_lo) / (p_hi - p_lo);
            }
        }
        sorted[n - 1]
    }

    #[test]
    fn percentiles_match_numpy_and_a_naive_walk() {
        // numpy.percentile(..., method="linear").
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 90.0), 3.7);
        assert_eq!(percentile(&[15.0, 20.0, 35.0, 40.0, 50.0], 40.0), 29.0);
        assert_eq!(percentile(&[7.0], 99.9), 7.0);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for n in [1, 2, 3, 10, 99, 100, 101, 1000] {
            let values: Vec<f64> = (0..n).map(|_| rng.random_range(0.0..100.0f64).powi(2)).collect();
            let got = Percentiles::of(values.clone()).unwrap();
            for (q, value) in [
                (50.0, got.p50),
                (90.0, got.p90),
                (99.0, got.p99),
                (99.9, got.p99_9),
                (100.0, got.max),
            ] {
                let want = naive_percentile(&values, q);
                assert!(
                    (value - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "n {n} p{q}: {value} vs {want}"
                );
            }
            let mean = values.iter().sum::<f64>() / n as f64;
            assert!((got.mean - mean).abs() < 1e-9 * mean);
        }
        assert_eq!(Percentiles::of(vec![]), None);
    }

    fn record(idx: usize, ttft_ms: f64, itl_ms: Vec<f64>, error: Option<&str>) -> RequestRecord {
        let n_out = itl_ms.len() as u64 + 1;
        let e2e_ms = ttft_ms + itl_ms.iter().sum::<f64>();
        RequestRecord {
            idx,
            scheduled_s: idx as f64,
            sent_s: idx as f64 + 0.001,
            waited_for_slot: false,
            input_len: 100,
            output_len: n_out as u32,
            prompt_tokens: Some(100),
            output_tokens: n_out,
            ttft_ms: Some(ttft_ms),
            tpot_ms: (n_out >= 2).then(|| (e2e_ms - ttft_ms) / (n_out - 1) as f64),
            e2e_ms: Some(e2e_ms),
            itl_ms,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn slo_checks_each_objective_as_documented() {
        let slo = Slo {
            ttft_ms: Some(100.0),
            ttft_input_tokens_max: None,
            itl_p99_ms: Some(50.0),
            itl_quantile: None,
            tpot_ms: Some(20.0),
        };
        let fast = record(0, 90.0, vec![10.0; 10], None);
        assert!(slo.meets(&fast));
        assert!(!slo.meets(&record(0, 101.0, vec![10.0; 10], None)), "TTFT");
        // One 60 ms stall among 10 gaps puts the request's p99 above 50 ms though its TPOT is 15 ms.
        let mut stall = vec![10.0; 10];
        stall[3] = 60.0;
        assert!(!slo.meets(&record(0, 90.0, stall, None)), "p99 ITL");
        assert!(!slo.meets(&record(0, 90.0, vec![25.0; 10], None)), "TPOT");
        assert!(slo.meets(&record(0, 90.0, vec![], None)), "one token: no gaps, no TPOT");
        assert!(!slo.meets(&record(0, 1.0, vec![1.0], Some("HTTP 500"))), "failed");
        assert!(Slo::default().meets(&fast) && !Slo::default().is_set());
        // The TTFT bound binds short prompts only.
        let long_prompts_exempt = Slo {
            ttft_input_tokens_max: Some(1000),
            ..slo
        };
        let mut slow_long = record(0, 5000.0, vec![10.0; 10], None);
        slow_long.input_len = 1001;
        assert!(long_prompts_exempt.meets(&slow_long) && !slo.meets(&slow_long));
        slow_long.input_len = 1000;
        assert!(!long_prompts_exempt.meets(&slow_long));
        // One 60 ms stall among 255 gaps stays under the p99 but not under the longest-gap bound.
        let mut one_stall = vec![10.0; 255];
        one_stall[100] = 60.0;
        let one_stall = record(0, 90.0, one_stall, None);
        let no_stall = Slo {
            itl_quantile: Some(100.0),
            tpot_ms: None,
            ..slo
        };
        assert!(slo.meets(&one_stall) && !no_stall.meets(&one_stall));
        assert!(no_stall.meets(&fast));
    }

    #[test]
    fn summary_matches_a_naive_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let records: Vec<RequestRecord> = (0..500)
            .map(|idx| {
                let gaps = (0..rng.random_range(0..40))
                    .map(|_| rng.random_range(1.0..80.0))
                    .collect();
                let error = rng.random_bool(0.05).then_some("HTTP 503 Service Unavailable: busy");
                record(idx, rng.random_range(10.0..400.0), gaps, error)
            })
            .collect();
        let slo = Slo {
            ttft_ms: Some(300.0),
            ttft_input_tokens_max: None,
            itl_p99_ms: Some(70.0),
            itl_quantile: None,
            tpot_ms: Some(45.0),
        };
        let summary = Summary::new(&records, 50.0, 2, slo);
        let mut n_met = 0;
        for r in &records {
            let ok = r.error.is_none();
            let ttft_ok = r.ttft_ms.unwrap() <= 300.0;
            let itl_ok = r.itl_ms.is_empty() || naive_percentile(&r.itl_ms, 99.0) <= 70.0;
            let tpot_ok = r.itl_ms.is_empty() || r.itl_ms.iter().sum::<f64>() / r.itl_ms.len() as f64 <= 45.0;
            n_met += usize::from(ok && ttft_ok && itl_ok && tpot_ok);
        }
        let got = summary.slo.clone().unwrap();
        assert_eq!(got.n_met, n_met);
        assert!(n_met > 50 && n_met < 450, "the case exercises both outcomes: {n_met}");
        assert_eq!(got.goodput_requests_per_s, n_met as f64 / 50.0);
        assert_eq!(got.attainment, n_met as f64 / 500.0);
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
        assert_eq!((summary.n_ok, summary.n_failed), (ok.len(), 500 - ok.len()));
        let out: u64 = ok.iter().map(|r| r.output_tokens).sum();
        assert_eq!(summary.output_tokens_per_s, out as f64 / 50.0);
        assert_eq!(summary.output_tokens_per_s_per_gpu, out as f64 / 100.0);
        assert_eq!(
            summary.total_tokens_per_s,
            (out as f64 + 100.0 * ok.len() as f64) / 50.0
        );
        // Per user: each request with gaps contributes (gaps) / (decode time) tokens per second.
        let speeds: Vec<f64> = ok
            .iter()
            .filter(|r| !r.itl_ms.is_empty())
            .map(|r| r.itl_ms.len() as f64 / (r.itl_ms.iter().sum::<f64>() / 1e3))
            .collect();
        let per_user = speeds.iter().sum::<f64>() / speeds.len() as f64;
        assert!((summary.output_tokens_per_s_per_user - per_user).abs() < 1e-9 * per_user);
        let all_gaps: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.clone()).collect();
        assert_eq!(summary.itl_ms.clone().unwrap().n, all_gaps.len());
        assert!((summary.itl_ms.unwrap().p99 - naive_percentile(&all_gaps, 99.0)).abs() < 1e-9);
        assert_eq!(
            summary.errors,
            vec![("HTTP 503 Service Unavailable: busy".to_string(), 500 - ok.len())]
        );
        assert_eq!(summary.n_late_sends, 0);
        assert!(Summary::new(&records, 50.0, 1, Slo::default()).slo.is_none());
    }

    #[test]
    fn sweep_goodput_is_the_highest_rate_meeting_the_attainment() {
        let points = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.80), (8.0, 0.91), (16.0, 0.2)];
        assert_eq!(goodput_rate(&points, 0.9), Some(8.0));
        assert_eq!(goodput_rate(&points, 0.96), Some(1.0));
        assert_eq!(goodput_rate(&points, 1.0), Some(1.0));
        assert_eq!(goodput_rate(&points[2..3], 0.9), None);
        assert_eq!(goodput_rate(&[], 0.9), None);
    }
}
