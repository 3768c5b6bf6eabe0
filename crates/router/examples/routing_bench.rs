//! Routing decision latency and index memory at fleet scale (1,000 decode workers, 1M indexed blocks).
//!
//! ```text
//! cargo run --release -p cleave-router --example routing_bench -- --json bench/results/router-decision-latency.json
//! ```
//!
//! 1. **Build.** Each worker holds ~`blocks / workers` blocks: conversations made of a random-length prefix (1 to 32
//!    blocks) of one of 300 shared "system prompts", then a unique tail (4 to 32 blocks). All of it enters the
//!    router as `KvEvent::Stored` events; RSS (`/proc/self/status`) is read before and after applying them.
//! 2. **Mixed traffic** (`--repeat` repetitions of `--decisions` each): requests of 1,024 tokens (64 blocks of 16);
//!    half start with a full 32-block system prompt, half are random. Each decision (`Router::pick_decode_worker`
//!    on the token ids, prompt hashing included) is timed alone into an HDR histogram. Between decisions, as a live
//!    fleet would: the chosen worker announces the request's blocks it did not hold (`Stored`) and evicts its oldest
//!    blocks to stay at its share (`Removed`), so the index stays at ~1M entries while its contents turn over; and one
//!    random worker reports a new load.
//! 3. **Hot prompt**: one more system prompt is cached on *every* worker, then requests all start with it (1,000
//!    workers match the first 32 blocks): the worst case for the overlap walk.
//!
//! A correctness check runs in the same process: every 500th request, the index's overlaps are compared with a
//! naive count over the benchmark's own record of what each worker holds, and the decision's `cached_blocks` with
//! the chosen worker's naive count.

use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::time::Instant;

use cleave_kv::{BlockHash, KvEvent, block_hashes};
use cleave_router::{Role, Router, RouterConfig, WorkerId, WorkerLoad};
use hdrhistogram::Histogram;

const BLOCK_SIZE: usize = 16;
const REQUEST_BLOCKS: usize = 64;
const SYSTEM_PROMPTS: usize = 300;
const SYSTEM_PROMPT_BLOCKS: usize = 32;
const WARMUP_DECISIONS: usize = 1_000;
const CHECK_EVERY: usize = 500;
/// Each worker's KV pool in blocks (Llama-3-8B on an H100 at block size 16 has ~27k), for the load reports.
const WORKER_TOTAL_BLOCKS: u64 = 27_000;

struct Args {
    workers: usize,
    blocks: usize,
    decisions: usize,
    hot_decisions: usize,
    repeat: usize,
    seed: u64,
    json: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        workers: 1_000,
        blocks: 1_000_000,
        decisions: 100_000,
        hot_decisions: 20_000,
        repeat: 3,
        seed: 1,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--workers" => args.workers = value().parse().expect("--workers: a number"),
            "--blocks" => args.blocks = value().parse().expect("--blocks: a number"),
            "--decisions" => args.decisions = value().parse().expect("--decisions: a number"),
            "--hot-decisions" => args.hot_decisions = value().parse().expect("--hot-decisions: a number"),
            "--repeat" => args.repeat = value().parse().expect("--repeat: a number"),
            "--seed" => args.seed = value().parse().expect("--seed: a number"),
            "--json" => args.json = Some(value()),
            other => panic!("unknown argument {other}; see the file's docs"),
        }
    }
    args
}

/// SplitMix64 for the workload (the router has its own, private).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        lo + self.below(hi_inclusive - lo + 1)
    }

    fn tokens(&mut self, out: &mut Vec<u32>, n: usize) {
        out.extend((0..n).map(|_| (self.next() % 128_000) as u32));
    }
}

/// What the benchmark knows each worker holds: the reference for the correctness check, and the eviction order.
struct SimWorker {
    held: HashSet<BlockHash>,
    /// Insertion order, oldest first; every entry is in `held`.
    fifo: VecDeque<BlockHash>,
}

struct Fleet {
    router: Router,
    sims: Vec<SimWorker>,
    share: usize,
    rng: Rng,
    n_events: u64,
}

impl Fleet {
    /// Announces that `worker` now holds all of `hashes` (a prefix chain), then evicts its oldest blocks beyond its
    /// share. Returns the events applied, for timing.
    fn cache_chain(&mut self, worker: usize, hashes: &[BlockHash], events: &mut Vec<KvEvent>) {
        events.clear();
        let sim = &mut self.sims[worker];
        for (i, &hash) in hashes.iter().enumerate() {
            if sim.held.insert(hash) {
                sim.fifo.push_back(hash);
                events.push(KvEvent::Stored {
                    hash,
                    parent: i.checked_sub(1).map(|p| hashes[p]),
                    block: 0,
                });
            }
        }
        while sim.held.len() > self.share {
            let hash = sim.fifo.pop_front().expect("fifo lists every held block");
            sim.held.remove(&hash);
            events.push(KvEvent::Removed { hash, block: 0 });
        }
    }

    fn random_load(&mut self) -> WorkerLoad {
        WorkerLoad {
            active_blocks: self.rng.next() % (WORKER_TOTAL_BLOCKS * 8 / 10),
            total_blocks: WORKER_TOTAL_BLOCKS,
            queued_prefill_tokens: self.rng.next() % 16_384,
            running_requests: (self.rng.next() % 64) as u32,
        }
    }

    fn naive_overlap(&self, worker: usize, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.sims[worker].held.contains(h)).count()
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

#[derive(Default)]
struct PhaseResult {
    name: String,
    repetition: usize,
    decisions: usize,
    latency_ns: Vec<(&'static str, u64)>,
    latency_mean_ns: f64,
    hash_only_ns: Vec<(&'static str, u64)>,
    event_apply_ns: Vec<(&'static str, u64)>,
    n_events: u64,
    shared_requests: usize,
    shared_with_hit: usize,
    shared_cached_blocks_mean: f64,
    distinct_workers_chosen: usize,
    checks: usize,
    index_blocks_end: usize,
}

fn percentiles(h: &Histogram<u64>) -> Vec<(&'static str, u64)> {
    vec![
        ("p50", h.value_at_quantile(0.50)),
        ("p90", h.value_at_quantile(0.90)),
        ("p99", h.value_at_quantile(0.99)),
        ("p99.9", h.value_at_quantile(0.999)),
        ("max", h.max()),
    ]
}

/// Runs `n` timed decisions (after `warmup` untimed ones) of requests made by `make_request`, which fills the token
/// buffer and says whether the request starts with a system prompt.
fn run_phase(
    fleet: &mut Fleet,
    name: &str,
    repetition: usize,
    warmup: usize,
    n: usize,
    make_request: &mut dyn FnMut(&mut Rng, &mut Vec<u32>) -> bool,
) -> PhaseResult {
    let mut latency = histogram();
    let mut hash_only = histogram();
    let mut apply = histogram();
    let mut tokens = Vec::with_capacity(REQUEST_BLOCKS * BLOCK_SIZE);
    let mut events = Vec::new();
    let mut result = PhaseResult {
        name: name.to_string(),
        repetition,
        decisions: n,
        ..PhaseResult::default()
    };
    let mut shared_cached_sum = 0usize;
    let mut chosen = HashSet::new();
    let n_events_start = fleet.n_events;
    for i in 0..warmup + n {
        tokens.clear();
        let shared = make_request(&mut fleet.rng, &mut tokens);

        let start = Instant::now();
        let decision = fleet.router.pick_decode_worker(&tokens).expect("decode workers exist");
        let elapsed = start.elapsed().as_nanos() as u64;

        let start = Instant::now();
        let hashes = block_hashes(&tokens, BLOCK_SIZE);
        let hash_elapsed = start.elapsed().as_nanos() as u64;

        let worker = decision.worker.0 as usize;
        if i % CHECK_EVERY == 0 {
            let overlaps = fleet.router.index().overlaps(&hashes);
            for w in 0..fleet.sims.len() {
                let naive = fleet.naive_overlap(w, &hashes);
                assert_eq!(overlaps.get(WorkerId(w as u64)), naive, "{name}: overlap of worker {w}");
            }
            assert_eq!(decision.cached_blocks, fleet.naive_overlap(worker, &hashes));
            result.checks += 1;
        }

        // The chosen worker computes and caches the request; one random worker reports its load.
        fleet.cache_chain(worker, &hashes, &mut events);
        for event in &events {
            let start = Instant::now();
            fleet.router.apply_kv_event(decision.worker, event);
            if i >= warmup {
                apply.record(start.elapsed().as_nanos() as u64).unwrap();
            }
        }
        fleet.n_events += events.len() as u64;
        let reporter = fleet.rng.below(fleet.sims.len());
        let load = fleet.random_load();
        fleet.router.report_load(WorkerId(reporter as u64), load);

        if i < warmup {
            continue;
        }
        latency.record(elapsed).unwrap();
        hash_only.record(hash_elapsed).unwrap();
        chosen.insert(worker);
        if shared {
            result.shared_requests += 1;
            shared_cached_sum += decision.cached_blocks;
            result.shared_with_hit += usize::from(decision.cached_blocks > 0);
        }
    }
    result.latency_ns = percentiles(&latency);
    result.latency_mean_ns = latency.mean();
    result.hash_only_ns = percentiles(&hash_only);
    result.event_apply_ns = percentiles(&apply);
    result.n_events = fleet.n_events - n_events_start;
    result.shared_cached_blocks_mean = shared_cached_sum as f64 / result.shared_requests.max(1) as f64;
    result.distinct_workers_chosen = chosen.len();
    result.index_blocks_end = fleet.router.index().stats().n_indexed_blocks;
    result
}

fn git(args: &[&str]) -> String {
    std::process::Command::new("git")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn json_pairs(pairs: &[(&'static str, u64)]) -> String {
    let body: Vec<String> = pairs.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
    format!("{{{}}}", body.join(", "))
}

fn main() {
    let args = parse_args();
    let loadavg_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rng = Rng(args.seed);

    // Shared system prompts: 300 chains of 32 blocks, plus the hot one every worker will get in phase 3.
    let prompt_tokens: Vec<Vec<u32>> = (0..=SYSTEM_PROMPTS)
        .map(|_| {
            let mut t = Vec::new();
            rng.tokens(&mut t, SYSTEM_PROMPT_BLOCKS * BLOCK_SIZE);
            t
        })
        .collect();
    let hot_tokens = prompt_tokens[SYSTEM_PROMPTS].clone();

    let mut config = RouterConfig::new(BLOCK_SIZE);
    config.index.indexed_blocks_max = args.blocks + args.blocks / 2;
    config.index.workers_max = args.workers;
    let mut router = Router::new(config).unwrap();
    for w in 0..args.workers {
        router.add_worker(WorkerId(w as u64), Role::Decode).unwrap();
    }
    let share = args.blocks / args.workers;
    let mut fleet = Fleet {
        router,
        sims: (0..args.workers)
            .map(|_| SimWorker {
                held: HashSet::new(),
                fifo: VecDeque::new(),
            })
            .collect(),
        share,
        rng,
        n_events: 0,
    };

    // 1. Build: generate every worker's events first, so RSS around applying them measures the index alone.
    let mut build_events: Vec<(WorkerId, KvEvent)> = Vec::with_capacity(args.blocks + args.blocks / 8);
    let mut scratch_events = Vec::new();
    let mut tokens = Vec::new();
    for w in 0..args.workers {
        while fleet.sims[w].held.len() < share {
            let chain = fleet.rng.below(SYSTEM_PROMPTS);
            let prefix_blocks = fleet.rng.range(1, SYSTEM_PROMPT_BLOCKS);
            let tail_blocks = fleet.rng.range(4, 32);
            tokens.clear();
            tokens.extend_from_slice(&prompt_tokens[chain][..prefix_blocks * BLOCK_SIZE]);
            fleet.rng.tokens(&mut tokens, tail_blocks * BLOCK_SIZE);
            let mut hashes = block_hashes(&tokens, BLOCK_SIZE);
            let room = share - fleet.sims[w].held.len();
            // Truncate the tail so the worker ends at exactly its share (the prefix may already be held).
            let new_blocks = hashes.iter().filter(|h| !fleet.sims[w].held.contains(h)).count();
            if new_blocks > room {
                hashes.truncate(hashes.len() - (new_blocks - room));
            }
            fleet.cache_chain(w, &hashes, &mut scratch_events);
            build_events.extend(scratch_events.drain(..).map(|e| (WorkerId(w as u64), e)));
        }
    }
    let rss_before_kib = rss_kib();
    let start = Instant::now();
    for (worker, event) in &build_events {
        fleet.router.apply_kv_event(*worker, event);
    }
    let build_s = start.elapsed().as_secs_f64();
    let rss_after_kib = rss_kib();
    let n_build_events = build_events.len();
    drop(build_events);
    for w in 0..args.workers {
        let load = fleet.random_load();
        fleet.router.report_load(WorkerId(w as u64), load);
    }
    let stats = fleet.router.index().stats();
    let heap_estimate = fleet.router.index().heap_bytes_estimate();
    let n_indexed = stats.n_indexed_blocks;
    let rss_bytes_per_block = (rss_after_kib - rss_before_kib) as f64 * 1024.0 / n_indexed as f64;
    let heap_bytes_per_block = heap_estimate as f64 / n_indexed as f64;
    println!(
        "build: {n_build_events} Stored events in {build_s:.2} s ({:.2} M events/s); {} workers, {n_indexed} indexed \
         blocks ({} distinct hashes)",
        n_build_events as f64 / build_s / 1e6,
        stats.n_workers,
        stats.n_unique_blocks
    );
    println!(
        "memory: RSS {rss_before_kib} -> {rss_after_kib} KiB = {rss_bytes_per_block:.1} bytes per indexed block; \
         heap estimate {heap_estimate} bytes = {heap_bytes_per_block:.1} bytes per indexed block"
    );

    // 2. Mixed traffic.
    let mut results = Vec::new();
    let mut mixed = |rng: &mut Rng, tokens: &mut Vec<u32>| {
        let shared = rng.below(2) == 0;
        if shared {
            tokens.extend_from_slice(&prompt_tokens[rng.below(SYSTEM_PROMPTS)]);
        }
        let rest = REQUEST_BLOCKS * BLOCK_SIZE - tokens.len();
        rng.tokens(tokens, rest);
        shared
    };
    for repetition in 0..args.repeat {
        let warmup = if repetition == 0 { WARMUP_DECISIONS } else { 0 };
        results.push(run_phase(
            &mut fleet,
            "mixed",
            repetition,
            warmup,
            args.decisions,
            &mut mixed,
        ));
    }

    // 3. Hot prompt on every worker.
    let hot_hashes = block_hashes(&hot_tokens, BLOCK_SIZE);
    let mut events = Vec::new();
    for w in 0..args.workers {
        fleet.cache_chain(w, &hot_hashes, &mut events);
        for event in &events {
            fleet.router.apply_kv_event(WorkerId(w as u64), event);
        }
    }
    let mut hot = |rng: &mut Rng, tokens: &mut Vec<u32>| {
        tokens.extend_from_slice(&hot_tokens);
        rng.tokens(tokens, (REQUEST_BLOCKS - SYSTEM_PROMPT_BLOCKS) * BLOCK_SIZE);
        true
    };
    results.push(run_phase(&mut fleet, "hot-prompt", 0, 0, args.hot_decisions, &mut hot));

    let final_stats = fleet.router.index().stats();
    let loadavg_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\n{:<11} {:>3} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>9} {:>9} | {:>10} {:>10} | {:>7} {:>7}",
        "phase",
        "rep",
        "decis.",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "mean µs",
        "hash p50",
        "hash p99",
        "event p50",
        "event p99",
        "hit %",
        "cached"
    );
    for r in &results {
        let us = |k: &str, v: &[(&str, u64)]| v.iter().find(|(n, _)| *n == k).unwrap().1 as f64 / 1000.0;
        println!(
            "{:<11} {:>3} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>8.2} | {:>9.2} {:>9.2} | {:>10.3} {:>10.3} | {:>7.1} {:>7.1}",
            r.name,
            r.repetition,
            r.decisions,
            us("p50", &r.latency_ns),
            us("p99", &r.latency_ns),
            us("p99.9", &r.latency_ns),
            us("max", &r.latency_ns),
            r.latency_mean_ns / 1000.0,
            us("p50", &r.hash_only_ns),
            us("p99", &r.hash_only_ns),
            us("p50", &r.event_apply_ns),
            us("p99", &r.event_apply_ns),
            100.0 * r.shared_with_hit as f64 / r.shared_requests.max(1) as f64,
            r.shared_cached_blocks_mean,
        );
    }
    let checks: usize = results.iter().map(|r| r.checks).sum();
    println!(
        "\ncorrectness: {checks} sampled requests, overlaps equal to the naive count for all {} workers each; \
         index ended at {} indexed blocks, {} Stored dropped by the bound",
        args.workers, final_stats.n_indexed_blocks, final_stats.stored_dropped
    );
    println!(
        "load average: start {} / end {}",
        loadavg_start.trim(),
        loadavg_end.trim()
    );

    if let Some(path) = args.json {
        let commit = git(&["rev-parse", "HEAD"]);
        let dirty = !git(&["status", "--porcelain", "--", "crates/router"]).is_empty();
        let mut out = String::new();
        writeln!(out, "{{").unwrap();
        writeln!(
            out,
            " \"what\": \"cleave-router decision latency: Router::pick_decode_worker on 1,024-token prompts (hashing \
             included), 1 thread\","
        )
        .unwrap();
        writeln!(
            out,
            " \"command\": \"cargo run --release -p cleave-router --example routing_bench -- --json {path}\","
        )
        .unwrap();
        writeln!(out, " \"commit\": \"{commit}\",").unwrap();
        writeln!(out, " \"crate_uncommitted\": {dirty},").unwrap();
        writeln!(out, " \"machine\": \"2-vCPU AMD EPYC dev machine\",").unwrap();
        writeln!(
            out,
            " \"loadavg\": {{\"start\": \"{}\", \"end\": \"{}\"}},",
            loadavg_start.trim(),
            loadavg_end.trim()
        )
        .unwrap();
        writeln!(
            out,
            " \"target\": {{\"decision_p99_us_max\": 50, \"workers\": 1000, \"indexed_blocks\": 1000000}},"
        )
        .unwrap();
        writeln!(
            out,
            " \"setup\": {{\"workers\": {}, \"indexed_blocks\": {n_indexed}, \"unique_blocks\": {}, \"block_size\": \
             {BLOCK_SIZE}, \"request_blocks\": {REQUEST_BLOCKS}, \"system_prompts\": {SYSTEM_PROMPTS}, \
             \"system_prompt_blocks\": {SYSTEM_PROMPT_BLOCKS}, \"seed\": {}}},",
            args.workers, stats.n_unique_blocks, args.seed
        )
        .unwrap();
        writeln!(
            out,
            " \"build\": {{\"stored_events\": {n_build_events}, \"seconds\": {build_s:.4}}},"
        )
        .unwrap();
        writeln!(
            out,
            " \"memory\": {{\"rss_before_kib\": {rss_before_kib}, \"rss_after_kib\": {rss_after_kib}, \
             \"rss_bytes_per_indexed_block\": {rss_bytes_per_block:.1}, \"heap_estimate_bytes\": {heap_estimate}, \
             \"heap_estimate_bytes_per_indexed_block\": {heap_bytes_per_block:.1}}},"
        )
        .unwrap();
        writeln!(out, " \"runs\": [").unwrap();
        for (i, r) in results.iter().enumerate() {
            let comma = if i + 1 < results.len() { "," } else { "" };
            writeln!(
                out,
                "  {{\"phase\": \"{}\", \"repetition\": {}, \"decisions\": {}, \"decision_ns\": {}, \
                 \"decision_mean_ns\": {:.0}, \"hash_only_ns\": {}, \"event_apply_ns\": {}, \"events\": {}, \
                 \"shared_prefix_requests\": {}, \"shared_with_cache_hit\": {}, \"shared_cached_blocks_mean\": {:.2}, \
                 \"distinct_workers_chosen\": {}, \"correctness_checks\": {}, \"indexed_blocks_end\": {}}}{comma}",
                r.name,
                r.repetition,
                r.decisions,
                json_pairs(&r.latency_ns),
                r.latency_mean_ns,
                json_pairs(&r.hash_only_ns),
                json_pairs(&r.event_apply_ns),
                r.n_events,
                r.shared_requests,
                r.shared_with_hit,
                r.shared_cached_blocks_mean,
                r.distinct_workers_chosen,
                r.checks,
                r.index_blocks_end
            )
            .unwrap();
        }
        writeln!(out, " ],").unwrap();
        writeln!(
            out,
            " \"index_end\": {{\"indexed_blocks\": {}, \"unique_blocks\": {}, \"stored_dropped\": {}, \
             \"removed_unknown\": {}}}",
            final_stats.n_indexed_blocks,
            final_stats.n_unique_blocks,
            final_stats.stored_dropped,
            final_stats.removed_unknown
        )
        .unwrap();
        writeln!(out, "}}").unwrap();
        std::fs::write(&path, out).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        println!("wrote {path}");
    }
}
