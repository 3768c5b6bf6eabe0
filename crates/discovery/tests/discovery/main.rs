//! Discovery against a real etcd server (one per test, so tests run in parallel and cannot see each other's keys).

mod server;

use std::time::Duration;

use cleave_discovery::{DiscoveryError, DiscoveryEvent, Registration, WorkerRecord, WorkerWatch, watch_workers};
use cleave_wire::Role;
use server::{EtcdServer, closed_port};
use tokio::time::{Instant, timeout};

/// Short leases keep the expiry tests short; 2 s is also etcd's minimum with its default timing.
const TTL_SHORT: Duration = Duration::from_secs(2);
/// Long enough that an event arriving well before it cannot be the lease's expiry.
const TTL_LONG: Duration = Duration::from_secs(30);
/// Bound on waiting for an event that should come promptly (generous: the test machine is shared and busy).
const PROMPT: Duration = Duration::from_secs(5);

fn worker(id: &str, role: Role, port: u16) -> WorkerRecord {
    WorkerRecord {
        id: id.into(),
        role,
        addr: format!("10.0.0.7:{port}"),
        model: "tiny-llama".into(),
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::new("cleave_discovery=info");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

async fn next_event(watch: &mut WorkerWatch, within: Duration) -> DiscoveryEvent {
    match timeout(within, watch.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no discovery event within {within:?}"),
    }
}

async fn assert_quiet(watch: &mut WorkerWatch, duration: Duration) {
    if let Ok(event) = timeout(duration, watch.recv()).await {
        panic!("expected no event for {duration:?}, got {event:?}");
    }
}

#[tokio::test]
async fn deregister_is_seen_as_down_at_once() {
    init_logs();
    let etcd = EtcdServer::start().await;
    let mut watch = watch_workers(&etcd.endpoints(), "ns").await.unwrap();
    assert_eq!(watch.snapshot(), &[]);

    let record = worker("decode-0", Role::Decode, 7100);
    let registration = Registration::register(&etcd.endpoints(), "ns", record.clone(), TTL_LONG)
        .await
        .unwrap();
    assert_eq!(registration.key(), "/cleave/ns/workers/decode-0");
    assert_eq!(next_event(&mut watch, PROMPT).await, DiscoveryEvent::Up(record));

    let started = Instant::now();
    registration.deregister().await.unwrap();
    assert_eq!(
        next_event(&mut watch, PROMPT).await,
        DiscoveryEvent::Down { id: "decode-0".into() }
    );
    assert!(
        started.elapsed() < TTL_LONG / 4,
        "Down took {:?}: the lease expired, not revoked",
        started.elapsed()
    );
}

#[tokio::test]
async fn dropped_registration_expires_after_ttl_and_the_id_can_register_again() {
    init_logs();
    let etcd = EtcdServer::start().await;
    let mut watch = watch_workers(&etcd.endpoints(), "ns").await.unwrap();
    let record = worker("prefill-0", Role::Prefill, 7200);
    let registration = Registration::register(&etcd.endpoints(), "ns", record.clone(), TTL_SHORT)
        .await
        .unwrap();
    assert_eq!(next_event(&mut watch, PROMPT).await, DiscoveryEvent::Up(record));

    // Keepalives hold the record well past one ttl.
    assert_quiet(&mut watch, TTL_SHORT * 3 / 2).await;

    // A crash: keepalives stop, nobody revokes.
    drop(registration);
    let dropped = Instant::now();
    assert_eq!(
        next_event(&mut watch, TTL_SHORT + PROMPT).await,
        DiscoveryEvent::Down { id: "prefill-0".into() }
    );
    // The last keepalive may have come up to a third of the ttl before the drop.
    assert!(
        dropped.elapsed() >= TTL_SHORT / 2,
        "Down after {:?}: before the lease could expire",
        dropped.elapsed()
    );

    // The worker comes back (same id, new address).
    let again = worker("prefill-0", Role::Prefill, 7201);
    let _registration = Registration::register(&etcd.endpoints(), "ns", again.clone(), TTL_SHORT)
        .await
        .unwrap();
    assert_eq!(next_event(&mut watch, PROMPT).await, DiscoveryEvent::Up(again));
}

#[tokio::test]
async fn a_later_watcher_gets_the_live_workers_only() {
    init_logs();
    let etcd = EtcdServer::start().await;
    let endpoints = etcd.endpoints();
    let mut first = watch_workers(&endpoints, "ns").await.unwrap();
    let live = worker("a-live", Role::Aggregated, 7300);
    let crashed = worker("b-crashed", Role::Decode, 7301);
    let drained = worker("c-drained", Role::Prefill, 7302);
    let other_namespace = worker("d-elsewhere", Role::Decode, 7303);
    let _live = Registration::register(&endpoints, "ns", live.clone(), TTL_SHORT)
        .await
        .unwrap();
    let crashed = Registration::register(&endpoints, "ns", crashed, TTL_SHORT)
        .await
        .unwrap();
    let drained = Registration::register(&endpoints, "ns", drained, TTL_LONG)
        .await
        .unwrap();
    let _elsewhere = Registration::register(&endpoints, "other", other_namespace, TTL_SHORT)
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(next_event(&mut first, PROMPT).await, DiscoveryEvent::Up(_)));
    }

    drop(crashed);
    drained.deregister().await.unwrap();
    let mut downs = vec![];
    for _ in 0..2 {
        match next_event(&mut first, TTL_SHORT + PROMPT).await {
            DiscoveryEvent::Down { id } => downs.push(id),
            up => panic!("expected Down, got {up:?}"),
        }
    }
    downs.sort();
    assert_eq!(downs, ["b-crashed", "c-drained"]);

    // A frontend that starts now.
    let second = watch_workers(&endpoints, "ns").await.unwrap();
    assert_eq!(second.snapshot(), &[live]);
}

#[tokio::test]
async fn a_lost_lease_is_replaced_and_the_record_put_again() {
    init_logs();
    let etcd = EtcdServer::start().await;
    let mut watch = watch_workers(&etcd.endpoints(), "ns").await.unwrap();
    let record = worker("decode-1", Role::Decode, 7400);
    let registration = Registration::register(&etcd.endpoints(), "ns", record.clone(), TTL_SHORT)
        .await
        .unwrap();
    assert_eq!(next_event(&mut watch, PROMPT).await, DiscoveryEvent::Up(record.clone()));

    // What an expiry during an etcd outage looks like to the worker, made on purpose: the lease disappears.
    let mut client = etcd.client().await;
    let stored = client.get(registration.key(), None).await.unwrap();
    let lease_id = stored.kvs()[0].lease();
    client.lease_revoke(lease_id).await.unwrap();

    assert_eq!(
        next_event(&mut watch, PROMPT).await,
        DiscoveryEvent::Down { id: "decode-1".into() }
    );
    assert_eq!(next_event(&mut watch, PROMPT).await, DiscoveryEvent::Up(record));
    let stored = client.get(registration.key(), None).await.unwrap();
    assert_ne!(stored.kvs()[0].lease(), lease_id, "the record is under a new lease");
}

#[tokio::test]
async fn registration_and_watch_survive_an_etcd_restart() {
    init_logs();
    let mut etcd = EtcdServer::start().await;
    let endpoints = etcd.endpoints();
    let mut watch = watch_workers(&endpoints, "ns").await.unwrap();
    let before = worker("decode-2", Role::Decode, 7500);
    let _before = Registration::register(&endpoints, "ns", before.clone(), TTL_SHORT)
        .await
        .unwrap();
    assert_eq!(next_event(&mut watch, PROMPT).await, DiscoveryEvent::Up(before.clone()));

    // Down for longer than the ttl: the registration's keepalives fail throughout.
    etcd.kill();
    tokio::time::sleep(TTL_SHORT + TTL_SHORT / 2).await;
    etcd.restart().await;

    // The watch follows again: a worker registering after the restart is seen.
    let after = worker("prefill-2", Role::Prefill, 7501);
    let _after = Registration::register(&endpoints, "ns", after.clone(), TTL_SHORT)
        .await
        .unwrap();
    let deadline = Instant::now() + PROMPT * 2;
    loop {
        match next_event(&mut watch, deadline - Instant::now()).await {
            DiscoveryEvent::Up(record) if record == after => break,
            // The first worker may flap, depending on whether its lease outlived the outage.
            DiscoveryEvent::Up(record) if record == before => {}
            DiscoveryEvent::Down { id } if id == before.id => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    // The worker registered before the outage is there again, and stays (its keepalives work again).
    let deadline = Instant::now() + PROMPT * 2;
    loop {
        let snapshot = watch_workers(&endpoints, "ns").await.unwrap().snapshot().to_vec();
        if snapshot == [before.clone(), after.clone()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart, the workers are {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(TTL_SHORT * 3 / 2).await;
    let snapshot = watch_workers(&endpoints, "ns").await.unwrap().snapshot().to_vec();
    assert_eq!(snapshot, [before, after]);
}

#[tokio::test]
async fn malformed_values_are_skipped() {
    init_logs();
    let etcd = EtcdServer::start().await;
    let mut client = etcd.client().await;
    let good = worker("good", Role::Decode, 7600);
    client
        .put("/cleave/ns/workers/good", serde_json::to_vec(&good).unwrap(), None)
        .await
        .unwrap();
    client
        .put("/cleave/ns/workers/garbage", "{not json", None)
        .await
        .unwrap();
    let wrong_id = serde_json::to_vec(&worker("someone-else", Role::Decode, 7601)).unwrap();
    client.put("/cleave/ns/workers/wrong-id", wrong_id, None).await.unwrap();
    client
        .put(
            "/cleave/ns/workers/bad-role",
            r#"{"id":"bad-role","role":"chef","addr":"h:1","model":"m"}"#,
            None,
        )
        .await
        .unwrap();
    client.put("/cleave/ns/workers/good/nested", "{}", None).await.unwrap();

    let mut watch = watch_workers(&etcd.endpoints(), "ns").await.unwrap();
    assert_eq!(watch.snapshot(), std::slice::from_ref(&good));

    // Garbage arriving while watching is skipped too.
    client
        .put("/cleave/ns/workers/garbage-2", vec![0xff, 0xfe], None)
        .await
        .unwrap();
    assert_quiet(&mut watch, Duration::from_millis(500)).await;
    // A worker whose record turns into garbage is gone.
    client.put("/cleave/ns/workers/good", "garbage", None).await.unwrap();
    assert_eq!(
        next_event(&mut watch, PROMPT).await,
        DiscoveryEvent::Down { id: "good".into() }
    );

    let record = worker("fine", Role::Prefill, 7602);
    let _registration = Registration::register(&etcd.endpoints(), "ns", record.clone(), TTL_SHORT)
        .await
        .unwrap();
    assert_eq!(next_event(&mut watch, PROMPT).await, DiscoveryEvent::Up(record));
}

#[tokio::test]
async fn unreachable_etcd_is_an_error_naming_the_endpoint() {
    let endpoints = vec![format!("http://127.0.0.1:{}", closed_port())];
    let expected = format!("cannot reach etcd at {}: ", endpoints[0]);

    let started = Instant::now();
    let err = Registration::register(&endpoints, "ns", worker("w", Role::Decode, 7700), TTL_SHORT)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, DiscoveryError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().starts_with(&expected), "{err}");
    let err = watch_workers(&endpoints, "ns").await.err().unwrap();
    assert!(err.to_string().starts_with(&expected), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn invalid_arguments_are_refused_before_calling_etcd() {
    let endpoints = vec![format!("http://127.0.0.1:{}", closed_port())];
    let ok = worker("w", Role::Decode, 7800);
    let cases: Vec<(Vec<String>, &str, WorkerRecord, Duration, &str)> = vec![
        (vec![], "ns", ok.clone(), TTL_SHORT, "invalid etcd endpoints"),
        (
            endpoints.clone(),
            "a/b",
            ok.clone(),
            TTL_SHORT,
            "invalid namespace \"a/b\"",
        ),
        (
            endpoints.clone(),
            "ns",
            WorkerRecord {
                id: String::new(),
                ..ok.clone()
            },
            TTL_SHORT,
            "invalid worker id",
        ),
        (
            endpoints.clone(),
            "ns",
            WorkerRecord {
                addr: "nohost".into(),
                ..ok.clone()
            },
            TTL_SHORT,
            "invalid worker addr",
        ),
        (
            endpoints.clone(),
            "ns",
            ok.clone(),
            Duration::from_millis(500),
            "invalid lease ttl",
        ),
    ];
    for (endpoints, namespace, record, ttl, expected) in cases {
        let err = Registration::register(&endpoints, namespace, record, ttl)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, DiscoveryError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().starts_with(expected), "{err}");
    }
    let err = watch_workers(&[], "ns").await.err().unwrap();
    assert!(matches!(err, DiscoveryError::Invalid { .. }), "{err:?}");
}
