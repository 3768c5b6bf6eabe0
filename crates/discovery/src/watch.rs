//! A frontend's view of the workers: a snapshot, then the changes, without losing any in between.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::etcd::{Etcd, describe};
use crate::{DiscoveryError, DiscoveryEvent, EVENTS_QUEUED_MAX, WorkerRecord, check_name, key_id, parse_record};

/// Bound on each read or watch request.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between attempts to read the workers again after the watch broke, doubling from the first to the last.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(200);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);

/// The workers of a namespace: those present when the watch began ([`WorkerWatch::snapshot`]), then every change
/// ([`WorkerWatch::recv`]). A background task follows etcd; dropping the watch stops it.
pub struct WorkerWatch {
    snapshot: Vec<WorkerRecord>,
    events: mpsc::Receiver<DiscoveryEvent>,
    follower: JoinHandle<()>,
}

/// Reads all workers of `namespace`, then watches from the revision after that read, so that no change between the
/// two is lost. If the watch breaks (etcd restarted or out of reach, or the revision compacted away), the task reads
/// all workers again, emits the differences from what it had, and watches from there; until etcd answers, it keeps
/// the workers it knows and retries with backoff.
pub async fn watch_workers(endpoints: &[String], namespace: &str) -> Result<WorkerWatch, DiscoveryError> {
    check_name("namespace", namespace)?;
    let mut etcd = Etcd::new(endpoints, CALL_TIMEOUT).await?;
    let prefix = crate::workers_prefix(namespace);
    let (workers, revision) = read_workers(&mut etcd, &prefix).await?;
    let stream = watch_from(&mut etcd, &prefix, revision + 1).await?;
    let snapshot = workers.values().cloned().collect();
    let (sender, events) = mpsc::channel(EVENTS_QUEUED_MAX);
    let follower = Follower {
        etcd,
        prefix,
        workers,
        events: sender,
    };
    Ok(WorkerWatch {
        snapshot,
        events,
        follower: tokio::spawn(follower.follow(stream)),
    })
}

impl WorkerWatch {
    /// The workers registered when the watch began, ordered by id.
    pub fn snapshot(&self) -> &[WorkerRecord] {
        &self.snapshot
    }

    /// The next change after the snapshot, waiting for one as long as it takes (also while etcd is out of reach).
    /// `None` only if the background task has stopped, which it does not do by itself.
    pub async fn recv(&mut self) -> Option<DiscoveryEvent> {
        self.events.recv().await
    }
}

impl Drop for WorkerWatch {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// The background task's state.
struct Follower {
    etcd: Etcd,
    prefix: String,
    /// What the reader has been told: the snapshot plus every event sent since, by id.
    workers: BTreeMap<String, WorkerRecord>,
    events: mpsc::Sender<DiscoveryEvent>,
}

/// The reader dropped its [`WorkerWatch`]: the task stops.
struct ReaderGone;

impl Follower {
    async fn follow(mut self, mut stream: WatchStream) {
        loop {
            let Ok(why) = self.pass_events(&mut stream).await else {
                return;
            };
            warn!(prefix = self.prefix, "watch broke ({why}); reading all workers again");
            let mut delay = RETRY_DELAY_MIN;
            stream = loop {
                match self.resync().await {
                    Ok(Some(stream)) => break stream,
                    Ok(None) => return,
                    Err(e) => {
                        if delay == RETRY_DELAY_MIN {
                            warn!(prefix = self.prefix, "cannot read workers, will retry: {e}");
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(RETRY_DELAY_MAX);
                    }
                }
            };
            info!(prefix = self.prefix, n_workers = self.workers.len(), "watching again");
        }
    }

    /// Turns watch responses into events until the watch breaks; returns why it broke.
    async fn pass_events(&mut self, stream: &mut WatchStream) -> Result<String, ReaderGone> {
        loop {
            // No time limit: a watch is quiet while nothing changes; HTTP/2 pings notice a dead connection.
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok("etcd closed the watch stream".to_string()),
                Err(e) => return Ok(describe(&e)),
            };
            if response.canceled() {
                return Ok(match response.compact_revision() {
                    0 => format!("canceled by etcd: {}", response.cancel_reason()),
                    revision => format!("history compacted up to revision {revision}"),
                });
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(id) = key_id(&self.prefix, kv.key()) else {
                    continue;
                };
                let id = id.to_string();
                match event.event_type() {
                    EventType::Delete => self.down(id).await?,
                    EventType::Put => match parse_record(&self.prefix, kv.key(), kv.value()) {
                        Some(Ok(record)) => self.up(record).await?,
                        Some(Err(why)) => {
                            warn!(key = %String::from_utf8_lossy(kv.key()), "skipping malformed worker record: {why}");
                            // A worker whose record became unreadable cannot be routed to.
                            self.down(id).await?;
                        }
                        None => {}
                    },
                }
            }
        }
    }

    /// Reads all workers, emits the differences from what the reader knows, and watches from there.
    /// `Ok(None)` when the reader is gone.
    async fn resync(&mut self) -> Result<Option<WatchStream>, DiscoveryError> {
        let (now, revision) = read_workers(&mut self.etcd, &self.prefix).await?;
        let stream = watch_from(&mut self.etcd, &self.prefix, revision + 1).await?;
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if self.down(id).await.is_err() {
                return Ok(None);
            }
        }
        for record in now.into_values() {
            if self.up(record).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(stream))
    }

    /// Tells the reader about a new or changed record; an unchanged one (put again) is not news.
    async fn up(&mut self, record: WorkerRecord) -> Result<(), ReaderGone> {
        if self.workers.get(&record.id) == Some(&record) {
            return Ok(());
        }
        self.workers.insert(record.id.clone(), record.clone());
        self.send(DiscoveryEvent::Up(record)).await
    }

    /// Tells the reader a worker is gone, if it knew of it.
    async fn down(&mut self, id: String) -> Result<(), ReaderGone> {
        if self.workers.remove(&id).is_none() {
            return Ok(());
        }
        self.send(DiscoveryEvent::Down { id }).await
    }

    async fn send(&self, event: DiscoveryEvent) -> Result<(), ReaderGone> {
        self.events.send(event).await.map_err(|_| ReaderGone)
    }
}

/// All well-formed records under `prefix`, by id, and the revision they were read at.
async fn read_workers(etcd: &mut Etcd, prefix: &str) -> Result<(BTreeMap<String, WorkerRecord>, i64), DiscoveryError> {
    let key = prefix.to_string();
    let read =
        |mut client: etcd_client::Client| async move { client.get(key, Some(GetOptions::new().with_prefix())).await };
    let response = etcd.call("read workers", read).await?;
    let revision = response.header().map_or(0, |header| header.revision());
    let mut workers = BTreeMap::new();
    for kv in response.kvs() {
        match parse_record(prefix, kv.key(), kv.value()) {
            Some(Ok(record)) => {
                workers.insert(record.id.clone(), record);
            }
            Some(Err(why)) => {
                warn!(key = %String::from_utf8_lossy(kv.key()), "skipping malformed worker record: {why}");
            }
            None => {}
        }
    }
    Ok((workers, revision))
}

/// Watches every key under `prefix` from `revision` on (inclusive).
async fn watch_from(etcd: &mut Etcd, prefix: &str, revision: i64) -> Result<WatchStream, DiscoveryError> {
    let key = prefix.to_string();
    let options = WatchOptions::new().with_prefix().with_start_revision(revision);
    etcd.call(
        "watch",
        |mut client| async move { client.watch(key, Some(options)).await },
    )
    .await
}
