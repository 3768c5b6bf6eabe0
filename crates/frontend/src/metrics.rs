//! The frontend's Prometheus metrics (names and meanings: docs/metrics.md). Request-level figures are measured
//! here; worker-level ones mirror the status each worker streams (its load now, and its running totals, turned
//! into counters by adding what grew since the previous status).

use std::collections::HashMap;
use std::sync::Mutex;

use cleave_wire::{WorkerStatus, WorkerTotals};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub requests_in_flight: IntGauge,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: Histogram,
    pub e2e_latency: HistogramVec,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub route_seconds: Histogram,
    worker_up: IntGaugeVec,
    worker_kv_blocks_total: IntGaugeVec,
    worker_kv_blocks_active: IntGaugeVec,
    worker_queued_prefill_tokens: IntGaugeVec,
    worker_requests_running: IntGaugeVec,
    worker_requests_waiting: IntGaugeVec,
    worker_remote_prefills_pending: IntGaugeVec,
    prefill_decisions: IntCounterVec,
    prefill_fallbacks: IntCounterVec,
    worker_prompt_tokens: IntCounterVec,
    worker_cached_prompt_tokens: IntCounterVec,
    kv_transfer_bytes: IntCounterVec,
    kv_transfer_seconds: prometheus::CounterVec,
    preemptions: IntCounterVec,
    /// Each worker's previous totals, to turn them into counter increments.
    last_totals: Mutex<HashMap<String, WorkerTotals>>,
}

/// 0.5 ms to ~65 s, doubling: spans a fast decode step and a 32k-token prefill behind a queue.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 18).expect("valid buckets")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let worker = ["worker", "role"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &worker).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(latency_buckets()), labels)
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let requests = counter(
            "cleave_requests_total",
            "Requests finished, by endpoint and outcome (success, client_error, overloaded, cancelled, error).",
            &["endpoint", "outcome"],
        );
        let requests_in_flight =
            IntGauge::new("cleave_requests_in_flight", "Requests being served now.").expect("valid metric");
        registry
            .register(Box::new(requests_in_flight.clone()))
            .expect("unique metric");
        let time_to_first_token = histogram(
            "cleave_time_to_first_token_seconds",
            "From the request's arrival to its first token leaving the frontend.",
            &["endpoint"],
        );
        let inter_token_latency = histogram(
            "cleave_inter_token_latency_seconds",
            "Gap between consecutive tokens of a request (a message carrying k tokens counts one gap and k-1 zeros).",
            &[],
        )
        .with_label_values(&[] as &[&str]);
        let e2e_latency = histogram(
            "cleave_e2e_request_latency_seconds",
            "From the request's arrival to its last token.",
            &["endpoint"],
        );
        let plain = |name: &str, help: &str| counter(name, help, &[]).with_label_values(&[] as &[&str]);
        let prompt_tokens = plain("cleave_prompt_tokens_total", "Prompt tokens of admitted requests.");
        let generation_tokens = plain("cleave_generation_tokens_total", "Tokens generated.");
        let cached_prompt_tokens = plain(
            "cleave_cached_prompt_tokens_total",
            "Prompt tokens served from a worker's prefix cache (prefix hit rate = this / cleave_prompt_tokens_total).",
        );
        let route_seconds = histogram(
            "cleave_router_decision_seconds",
            "Time to pick the decode and prefill workers for a request.",
            &[],
        )
        .with_label_values(&[] as &[&str]);
        let worker_counter = |name: &str, help: &str| counter(name, help, &worker);
        let kv_transfer_seconds = prometheus::CounterVec::new(
            Opts::new(
                "cleave_kv_transfer_seconds_total",
                "Time spent on remote prefills: request to last KV chunk (decode workers), compute and send (prefill workers).",
            ),
            &worker,
        )
        .expect("valid metric");
        registry
            .register(Box::new(kv_transfer_seconds.clone()))
            .expect("unique metric");
        Self {
            requests,
            requests_in_flight,
            time_to_first_token,
            inter_token_latency,
            e2e_latency,
            prompt_tokens,
            generation_tokens,
            cached_prompt_tokens,
            route_seconds,
            worker_up: gauge(
                "cleave_worker_up",
                "1 while the frontend is connected to the worker and it is not draining.",
            ),
            worker_kv_blocks_total: gauge("cleave_worker_kv_blocks_total", "KV blocks in the worker's pool."),
            worker_kv_blocks_active: gauge(
                "cleave_worker_kv_blocks_active",
                "KV blocks held by the worker's requests (cached blocks nobody holds are not counted).",
            ),
            worker_queued_prefill_tokens: gauge(
                "cleave_worker_queued_prefill_tokens",
                "Prompt tokens waiting for or in prefill on the worker.",
            ),
            worker_requests_running: gauge("cleave_worker_requests_running", "Requests running on the worker."),
            worker_requests_waiting: gauge("cleave_worker_requests_waiting", "Requests queued on the worker."),
            worker_remote_prefills_pending: gauge(
                "cleave_worker_remote_prefills_pending",
                "Decode worker: requests waiting for KV from a prefill worker.",
            ),
            prefill_decisions: counter(
                "cleave_prefill_decisions_total",
                "Prefill placement decided by decode and aggregated workers (decision: local, remote).",
                &["worker", "role", "decision"],
            ),
            prefill_fallbacks: worker_counter(
                "cleave_prefill_fallbacks_total",
                "Remote prefills that failed or were abandoned and were redone locally.",
            ),
            worker_prompt_tokens: worker_counter("cleave_worker_prompt_tokens_total", "Prompt tokens the worker took."),
            worker_cached_prompt_tokens: worker_counter(
                "cleave_worker_cached_prompt_tokens_total",
                "Prompt tokens the worker found in its prefix cache.",
            ),
            kv_transfer_bytes: worker_counter(
                "cleave_kv_transfer_bytes_total",
                "KV bytes received from (decode workers) or sent to (prefill workers) peers.",
            ),
            kv_transfer_seconds,
            preemptions: worker_counter("cleave_preemptions_total", "Requests preempted (recomputed later)."),
            last_totals: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// Mirrors a worker's status.
    pub fn worker_status(&self, worker: &str, role: &str, status: &WorkerStatus) {
        let labels = [worker, role];
        let set = |g: &IntGaugeVec, v: u64| g.with_label_values(&labels).set(v as i64);
        set(&self.worker_up, u64::from(!status.draining));
        set(&self.worker_kv_blocks_total, status.total_blocks.into());
        set(&self.worker_kv_blocks_active, status.active_blocks.into());
        set(&self.worker_queued_prefill_tokens, status.queued_prefill_tokens);
        set(&self.worker_requests_running, status.running_requests.into());
        set(&self.worker_requests_waiting, status.waiting_requests.into());
        set(
            &self.worker_remote_prefills_pending,
            status.remote_prefills_pending.into(),
        );
        let mut last_totals = self.last_totals.lock().unwrap_or_else(|e| e.into_inner());
        let last = last_totals.entry(worker.to_string()).or_default();
        let now = &status.totals;
        // A worker restarted under the same address starts from zero: count its totals afresh.
        let restarted = now.prompt_tokens < last.prompt_tokens;
        let grew = |now: u64, last: u64| if restarted { now } else { now.saturating_sub(last) };
        let inc = |c: &IntCounterVec, now: u64, last: u64| c.with_label_values(&labels).inc_by(grew(now, last));
        if role != "prefill" {
            let decision = |d: &str| self.prefill_decisions.with_label_values(&[worker, role, d]);
            decision("local").inc_by(grew(now.prefills_local, last.prefills_local));
            decision("remote").inc_by(grew(now.prefills_remote, last.prefills_remote));
        }
        inc(&self.prefill_fallbacks, now.prefill_fallbacks, last.prefill_fallbacks);
        inc(&self.worker_prompt_tokens, now.prompt_tokens, last.prompt_tokens);
        inc(
            &self.worker_cached_prompt_tokens,
            now.cached_prompt_tokens,
            last.cached_prompt_tokens,
        );
        inc(&self.kv_transfer_bytes, now.kv_transfer_bytes, last.kv_transfer_bytes);
        inc(&self.preemptions, now.preemptions, last.preemptions);
        let seconds = if restarted {
            now.kv_transfer_seconds
        } else {
            now.kv_transfer_seconds - last.kv_transfer_seconds
        };
        self.kv_transfer_seconds
            .with_label_values(&labels)
            .inc_by(seconds.max(0.0));
        *last = now.clone();
    }

    /// The worker is gone (disconnected or drained): its load gauges no longer mean anything.
    pub fn worker_down(&self, worker: &str, role: &str) {
        let labels = [worker, role];
        self.worker_up.with_label_values(&labels).set(0);
        for g in [
            &self.worker_kv_blocks_active,
            &self.worker_queued_prefill_tokens,
            &self.worker_requests_running,
            &self.worker_requests_waiting,
            &self.worker_remote_prefills_pending,
        ] {
            g.with_label_values(&labels).set(0);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
