//! `Router`: scoring by cached prefix and load, tie-breaking, the optimistic load update, temperature sampling,
//! prefill choice and the worker table.

use cleave_kv::{BlockHash, KvEvent, block_hashes};
use cleave_router::{Decision, KvIndexConfig, Role, Router, RouterConfig, RouterError, WorkerId, WorkerLoad};

const BLOCK_SIZE: usize = 16;

/// A 64-block prompt (1,024 tokens) whose tokens start at `first_token`.
fn prompt(first_token: u32) -> Vec<u32> {
    (first_token..).take(64 * BLOCK_SIZE).collect()
}

fn load(active_blocks: u64, queued_prefill_tokens: u64) -> WorkerLoad {
    WorkerLoad {
        active_blocks,
        total_blocks: 1000,
        queued_prefill_tokens,
        running_requests: 0,
    }
}

/// A router with decode workers `0..n`, all reporting `load(0, 0)`.
fn router_with(n: u64, config: RouterConfig) -> Router {
    let mut router = Router::new(config).unwrap();
    for w in 0..n {
        router.add_worker(WorkerId(w), Role::Decode).unwrap();
        router.report_load(WorkerId(w), load(0, 0));
    }
    router
}

/// Announces that `worker` cached the first `n_blocks` blocks of `tokens`.
fn cache(router: &mut Router, worker: u64, tokens: &[u32], n_blocks: usize) {
    let hashes = block_hashes(tokens, BLOCK_SIZE);
    for i in 0..n_blocks {
        let event = KvEvent::Stored {
            hash: hashes[i],
            parent: i.checked_sub(1).map(|p| hashes[p]),
            block: i as u32,
        };
        assert!(router.apply_kv_event(WorkerId(worker), &event));
    }
}

fn pick(router: &mut Router, tokens: &[u32]) -> Decision {
    router.pick_decode_worker(tokens).expect("there are decode workers")
}

#[test]
fn prefers_the_worker_holding_the_prefix_when_loads_are_equal() {
    let mut router = router_with(4, RouterConfig::new(BLOCK_SIZE));
    let tokens = prompt(0);
    cache(&mut router, 1, &tokens, 10);
    cache(&mut router, 2, &tokens, 40);
    let decision = pick(&mut router, &tokens);
    assert_eq!(
        (decision.worker, decision.cached_blocks, decision.request_blocks),
        (WorkerId(2), 40, 64)
    );
}

#[test]
fn prefers_the_less_loaded_worker_when_overlaps_are_equal() {
    let mut router = router_with(3, RouterConfig::new(BLOCK_SIZE));
    let tokens = prompt(0);
    for w in 0..3 {
        cache(&mut router, w, &tokens, 20);
    }
    router.report_load(WorkerId(0), load(300, 0));
    router.report_load(WorkerId(1), load(100, 0));
    router.report_load(WorkerId(2), load(200, 0));
    assert_eq!(pick(&mut router, &tokens).worker, WorkerId(1));

    // The prefill queue counts too: worker 1 now has the longest queue.
    router.report_load(WorkerId(1), load(100, 5000));
    assert_eq!(pick(&mut router, &tokens).worker, WorkerId(2));
}

#[test]
fn score_follows_the_documented_formula() {
    let mut router = router_with(2, RouterConfig::new(BLOCK_SIZE));
    let tokens = prompt(0);
    cache(&mut router, 0, &tokens, 48);
    // Worker 0: 48/64 cached, KV 50% used, queue 300 of the longest 600.
    router.report_load(WorkerId(0), load(500, 300));
    router.report_load(WorkerId(1), load(900, 600));
    let decision = pick(&mut router, &tokens);
    assert_eq!(decision.worker, WorkerId(0));
    let expected = 1.0 * 48.0 / 64.0 - 1.0 * 0.5 * (0.5 + 300.0 / 600.0);
    assert!(
        (decision.score - expected).abs() < 1e-12,
        "{} != {expected}",
        decision.score
    );
}

#[test]
fn load_weight_can_outweigh_a_cached_prefix() {
    let mut config = RouterConfig::new(BLOCK_SIZE);
    config.load_weight = 4.0;
    let mut router = router_with(2, config);
    let tokens = prompt(0);
    cache(&mut router, 0, &tokens, 64);
    router.report_load(WorkerId(0), load(800, 0));
    // Worker 0: 1 - 4 * 0.4 = -0.6; worker 1: 0 - 0 = 0.
    assert_eq!(pick(&mut router, &tokens).worker, WorkerId(1));
}

#[test]
fn ties_go_to_the_lower_load_then_the_lower_worker_id() {
    let mut config = RouterConfig::new(BLOCK_SIZE);
    config.overlap_weight = 0.0;
    config.load_weight = 0.0; // every score is 0
    let mut router = Router::new(config).unwrap();
    for w in [7, 3, 5] {
        router.add_worker(WorkerId(w), Role::Decode).unwrap();
        router.report_load(WorkerId(w), load(100, 0));
    }
    router.report_load(WorkerId(5), load(50, 0));
    assert_eq!(pick(&mut router, &prompt(0)).worker, WorkerId(5));
    router.report_load(WorkerId(5), load(100, 0));
    assert_eq!(pick(&mut router, &prompt(0)).worker, WorkerId(3));
}

#[test]
fn optimistic_load_update_spreads_identical_requests_over_equal_workers() {
    let mut router = router_with(4, RouterConfig::new(BLOCK_SIZE));
    let tokens = prompt(0);
    let mut per_worker = [0u32; 4];
    for _ in 0..100 {
        per_worker[pick(&mut router, &tokens).worker.0 as usize] += 1;
    }
    assert_eq!(per_worker, [25; 4]);
    // Each request added its 64 uncached blocks plus 1 for decode growth; a report overwrites the estimate.
    assert_eq!(router.load(WorkerId(0)).unwrap().active_blocks, 25 * 65);
    router.report_load(WorkerId(0), load(7, 0));
    assert_eq!(router.load(WorkerId(0)).unwrap().active_blocks, 7);
}

#[test]
fn optimistic_update_counts_only_uncached_blocks_and_the_partial_one() {
    let mut router = router_with(1, RouterConfig::new(BLOCK_SIZE));
    let mut tokens = prompt(0);
    tokens.truncate(10 * BLOCK_SIZE + 3); // 10 full blocks and a partial one
    cache(&mut router, 0, &tokens, 4);
    let decision = pick(&mut router, &tokens);
    assert_eq!((decision.cached_blocks, decision.request_blocks), (4, 10));
    // 11 blocks in all, 4 cached, plus 1 for decode growth.
    assert_eq!(router.load(WorkerId(0)).unwrap().active_blocks, 8);
}

#[test]
fn seeded_temperature_sampling_is_reproducible_and_spreads_identical_requests() {
    let decisions = |seed: u64| -> Vec<u64> {
        let mut config = RouterConfig::new(BLOCK_SIZE);
        config.temperature = 0.5;
        config.seed = seed;
        let mut router = router_with(4, config);
        let tokens = prompt(0);
        cache(&mut router, 0, &tokens, 32);
        (0..200)
            .map(|_| {
                let worker = pick(&mut router, &tokens).worker;
                // Keep loads fixed so only the sampling varies.
                router.report_load(worker, load(0, 0));
                worker.0
            })
            .collect()
    };
    let (a, b, c) = (decisions(42), decisions(42), decisions(43));
    assert_eq!(a, b, "same seed, same decisions");
    assert_ne!(a, c, "another seed, other decisions");

    // Worker 0 holds half the prompt: score 0.5 against 0, so it gets e^(0.5/0.5) = e times the share of each other.
    let n0 = a.iter().filter(|&&w| w == 0).count();
    let expected = 200.0 * std::f64::consts::E / (std::f64::consts::E + 3.0);
    assert!(
        (n0 as f64 - expected).abs() < 25.0,
        "worker 0 got {n0} of 200, expected ~{expected:.0}"
    );
    for w in 1..4 {
        assert!(a.contains(&w), "worker {w} never chosen");
    }
}

#[test]
fn workers_without_a_capacity_report_are_measured_against_the_largest_reported() {
    let mut router = router_with(1, RouterConfig::new(BLOCK_SIZE));
    router.add_worker(WorkerId(1), Role::Decode).unwrap();
    // Worker 1 reported nothing: taken as 1000 blocks like worker 0, so 500 active blocks is 50% used.
    router.report_load(WorkerId(0), load(400, 0));
    router.report_load(
        WorkerId(1),
        WorkerLoad {
            active_blocks: 500,
            ..WorkerLoad::default()
        },
    );
    assert_eq!(pick(&mut router, &prompt(0)).worker, WorkerId(0));
}

#[test]
fn short_prompts_without_a_full_block_are_routed_by_load() {
    let mut router = router_with(2, RouterConfig::new(BLOCK_SIZE));
    router.report_load(WorkerId(0), load(10, 0));
    let decision = pick(&mut router, &[1, 2, 3]);
    assert_eq!(
        (decision.worker, decision.request_blocks, decision.cached_blocks),
        (WorkerId(1), 0, 0)
    );
}

#[test]
fn only_decode_and_aggregated_workers_are_decode_candidates() {
    let mut router = Router::new(RouterConfig::new(BLOCK_SIZE)).unwrap();
    assert_eq!(router.pick_decode_worker(&prompt(0)), None);
    router.add_worker(WorkerId(1), Role::Prefill).unwrap();
    assert_eq!(router.pick_decode_worker(&prompt(0)), None);
    router.add_worker(WorkerId(2), Role::Aggregated).unwrap();
    assert_eq!(pick(&mut router, &prompt(0)).worker, WorkerId(2));
}

#[test]
fn pick_prefill_worker_takes_the_shortest_queue_and_spreads_a_burst() {
    let mut router = Router::new(RouterConfig::new(BLOCK_SIZE)).unwrap();
    assert_eq!(router.pick_prefill_worker(100), None);
    router.add_worker(WorkerId(0), Role::Decode).unwrap();
    router.add_worker(WorkerId(1), Role::Aggregated).unwrap();
    assert_eq!(
        router.pick_prefill_worker(100),
        None,
        "only prefill workers prefill for others"
    );
    for w in [4, 2, 3] {
        router.add_worker(WorkerId(w), Role::Prefill).unwrap();
        router.report_load(WorkerId(w), load(0, 1000));
    }
    router.report_load(WorkerId(3), load(0, 200));
    assert_eq!(router.pick_prefill_worker(1000), Some(WorkerId(3)));
    // Worker 3's queue is now 1200 (optimistically); 2 and 4 tie at 1000 and 2 has the lower id.
    assert_eq!(router.pick_prefill_worker(1000), Some(WorkerId(2)));
    assert_eq!(router.pick_prefill_worker(1000), Some(WorkerId(4)));
    assert_eq!(router.load(WorkerId(3)).unwrap().queued_prefill_tokens, 1200);
}

#[test]
fn kv_events_of_unregistered_and_prefill_workers_are_ignored() {
    let mut router = Router::new(RouterConfig::new(BLOCK_SIZE)).unwrap();
    router.add_worker(WorkerId(1), Role::Prefill).unwrap();
    let hash = block_hashes(&prompt(0), BLOCK_SIZE)[0];
    let event = KvEvent::Stored {
        hash,
        parent: None,
        block: 0,
    };
    assert!(!router.apply_kv_event(WorkerId(1), &event));
    assert!(!router.apply_kv_event(WorkerId(9), &event));
    assert!(!router.report_load(WorkerId(9), load(0, 0)));
    assert_eq!(router.index().stats().n_indexed_blocks, 0);
}

#[test]
fn remove_worker_drops_it_from_decisions_and_the_index() {
    let mut router = router_with(2, RouterConfig::new(BLOCK_SIZE));
    let tokens = prompt(0);
    cache(&mut router, 1, &tokens, 64);
    assert_eq!(pick(&mut router, &tokens).worker, WorkerId(1));
    assert!(router.remove_worker(WorkerId(1)));
    assert!(!router.remove_worker(WorkerId(1)));
    assert_eq!(router.index().stats().n_indexed_blocks, 0);
    let decision = pick(&mut router, &tokens);
    assert_eq!((decision.worker, decision.cached_blocks), (WorkerId(0), 0));
    // Re-added, it starts with nothing cached.
    router.add_worker(WorkerId(1), Role::Decode).unwrap();
    let hashes: Vec<BlockHash> = block_hashes(&tokens, BLOCK_SIZE);
    assert_eq!(router.index().overlaps(&hashes).get(WorkerId(1)), 0);
}

#[test]
fn invalid_configurations_and_worker_table_changes_are_refused() {
    let mut config = RouterConfig::new(0);
    assert_eq!(Router::new(config).unwrap_err(), RouterError::ZeroBlockSize);
    config.block_size = 16;
    config.temperature = -1.0;
    let err = Router::new(config).unwrap_err();
    assert_eq!(
        err,
        RouterError::InvalidParameter {
            name: "temperature",
            value: -1.0
        }
    );
    assert_eq!(
        err.to_string(),
        "router: temperature is -1; it must be finite and at least 0"
    );
    config.temperature = 0.0;
    config.overlap_weight = f64::NAN;
    assert!(matches!(
        Router::new(config),
        Err(RouterError::InvalidParameter {
            name: "overlap_weight",
            ..
        })
    ));

    let mut config = RouterConfig::new(16);
    config.index = KvIndexConfig {
        workers_max: 2,
        ..KvIndexConfig::default()
    };
    let mut router = Router::new(config).unwrap();
    router.add_worker(WorkerId(1), Role::Decode).unwrap();
    assert_eq!(
        router.add_worker(WorkerId(1), Role::Prefill),
        Err(RouterError::DuplicateWorker { worker: WorkerId(1) })
    );
    router.add_worker(WorkerId(2), Role::Prefill).unwrap();
    assert_eq!(
        router.add_worker(WorkerId(3), Role::Decode),
        Err(RouterError::TooManyWorkers { workers_max: 2 })
    );
    assert_eq!(router.role(WorkerId(1)), Some(Role::Decode));
    let workers: Vec<(WorkerId, Role)> = router.workers().collect();
    assert_eq!(workers, [(WorkerId(1), Role::Decode), (WorkerId(2), Role::Prefill)]);
}

#[test]
#[should_panic(expected = "hashes for")]
fn hashes_of_another_block_size_are_a_caller_bug() {
    let mut router = router_with(1, RouterConfig::new(BLOCK_SIZE));
    let tokens = prompt(0);
    let hashes = block_hashes(&tokens, 8);
    router.pick_decode_worker_for_hashes(&hashes, tokens.len());
}
