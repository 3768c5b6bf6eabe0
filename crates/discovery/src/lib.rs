//! Worker discovery for multi-host cleave, through etcd.
//!
//! A worker announces itself with [`Registration::register`]: it grants an etcd lease of `ttl`, puts its
//! [`WorkerRecord`] under that lease and keeps the lease alive from a background task. A frontend calls
//! [`watch_workers`] and gets a [`WorkerWatch`]: the records present now, then a [`DiscoveryEvent`] each time a
//! worker comes or goes. A worker disappears in one of three ways, each seen by watchers as
//! [`DiscoveryEvent::Down`]:
//!
//! - [`Registration::deregister`] revokes the lease (the worker's SIGTERM drain): watchers see `Down` at once.
//! - The process dies or drops its [`Registration`]: keepalives stop and etcd deletes the key when the lease expires,
//!   at most `ttl` later.
//! - etcd stays out of the worker's reach for longer than `ttl` and the lease expires; the registration grants a new
//!   lease and puts its record again once etcd answers, so watchers see `Down`, then `Up`.
//!
//! While etcd is unreachable, watchers keep the workers they know (the workers themselves may be fine) and catch up
//! when etcd answers again: every break in the watch (lost connection, compaction) is followed by a fresh read of all
//! records, and the differences are emitted as events.
//!
//! # Key layout
//!
//! ```text
//! /cleave/<namespace>/workers/<id>  ->  {"id":"<id>","role":"decode","addr":"10.0.0.7:7100","model":"llama-3-8b"}
//! ```
//!
//! One key per worker, attached to the worker's lease; the value is the [`WorkerRecord`] as JSON. `namespace`
//! separates clusters sharing one etcd; `id` is unique within a namespace and is both the key's last segment and the
//! record's `id`. Neither may be empty, longer than [`NAME_BYTES_MAX`] or contain `/`. Watchers log and skip values that
//! do not parse as a record or whose `id` differs from the key's.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use cleave_discovery::{DiscoveryEvent, Registration, WorkerRecord, watch_workers};
//! use cleave_wire::Role;
//!
//! # async fn run() -> Result<(), cleave_discovery::DiscoveryError> {
//! let etcd = vec!["http://10.0.0.2:2379".to_string()];
//! // On a worker:
//! let record = WorkerRecord {
//!     id: "decode-0".into(),
//!     role: Role::Decode,
//!     addr: "10.0.0.7:7100".into(),
//!     model: "llama-3-8b".into(),
//! };
//! let registration = Registration::register(&etcd, "prod", record, Duration::from_secs(10)).await?;
//!
//! // On a frontend:
//! let mut watch = watch_workers(&etcd, "prod").await?;
//! for worker in watch.snapshot() {
//!     println!("{} ({:?}) at {}", worker.id, worker.role, worker.addr);
//! }
//! while let Some(event) = watch.recv().await {
//!     match event {
//!         DiscoveryEvent::Up(worker) => println!("up: {}", worker.id),
//!         DiscoveryEvent::Down { id } => println!("down: {id}"),
//!     }
//! }
//!
//! // The worker's drain, on SIGTERM:
//! registration.deregister().await?;
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use cleave_wire::Role;
use serde::{Deserialize, Serialize};

mod etcd;
mod registration;
mod watch;

pub use registration::Registration;
pub use watch::{WorkerWatch, watch_workers};

/// Longest namespace or worker id, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Shortest lease a worker may ask for. etcd may grant more: it raises every lease to its own minimum (2 s with
/// etcd's default heartbeat and election timeout).
pub const LEASE_TTL_MIN: Duration = Duration::from_secs(1);
/// Longest lease a worker may ask for. A longer one would keep a crashed worker routable for too long.
pub const LEASE_TTL_MAX: Duration = Duration::from_secs(3600);
/// Events a [`WorkerWatch`] holds for a reader that falls behind; beyond that the watch waits for the reader.
pub const EVENTS_QUEUED_MAX: usize = 1024;

/// What a worker publishes about itself: the value of its key, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique within the namespace; the key's last segment.
    pub id: String,
    pub role: Role,
    /// `host:port` of the worker's protocol listener (docs/protocol.md).
    pub addr: String,
    /// The model the worker serves, as in the protocol's `Hello`.
    pub model: String,
}

/// A change after a [`WorkerWatch`]'s snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A worker registered, or its record changed.
    Up(WorkerRecord),
    /// A worker deregistered, its lease expired, or its record was deleted or became unreadable.
    Down { id: String },
}

/// Why a discovery call failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// An argument cannot be used: no endpoints, an endpoint that is not a URL, a namespace or id that would not
    /// make a well-formed key, an address that is not `host:port`, a ttl out of range.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
    /// etcd did not answer: connection refused or broken, or no answer within the time limit.
    #[error("cannot reach etcd at {endpoints}: {op}: {reason}")]
    Unreachable {
        endpoints: String,
        op: &'static str,
        reason: String,
    },
    /// etcd answered with an error.
    #[error("etcd at {endpoints} refused {op}: {reason}")]
    Rejected {
        endpoints: String,
        op: &'static str,
        reason: String,
    },
}

/// The prefix under which all workers of `namespace` live: `/cleave/<namespace>/workers/`.
fn workers_prefix(namespace: &str) -> String {
    format!("/cleave/{namespace}/workers/")
}

fn check_name(what: &'static str, name: &str) -> Result<(), DiscoveryError> {
    let reason = if name.is_empty() {
        "must not be empty".to_string()
    } else if name.len() > NAME_BYTES_MAX {
        format!("has {} bytes; the limit is {NAME_BYTES_MAX}", name.len())
    } else if name.contains('/') {
        "must not contain '/'".to_string()
    } else if name.chars().any(char::is_control) {
        "must not contain control characters".to_string()
    } else {
        return Ok(());
    };
    Err(DiscoveryError::Invalid {
        what,
        value: name.to_string(),
        reason,
    })
}

fn check_record(record: &WorkerRecord) -> Result<(), DiscoveryError> {
    check_name("worker id", &record.id)?;
    let port = record
        .addr
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => Ok(()),
        _ => Err(DiscoveryError::Invalid {
            what: "worker addr",
            value: record.addr.clone(),
            reason: "must be host:port with a port from 1 to 65535".to_string(),
        }),
    }
}

/// Parses the value under `key` into a record, or says why it is not one (the caller logs and skips it).
/// `None` for keys under the prefix that are not a worker's (`<prefix><id>/more`), which are ignored.
fn parse_record(prefix: &str, key: &[u8], value: &[u8]) -> Option<Result<WorkerRecord, String>> {
    let id = key_id(prefix, key)?;
    let record = match serde_json::from_slice::<WorkerRecord>(value) {
        Ok(record) => record,
        Err(e) => return Some(Err(format!("not a worker record: {e}"))),
    };
    if record.id != id {
        return Some(Err(format!("its record's id is {:?}", record.id)));
    }
    Some(check_record(&record).map(|()| record).map_err(|e| e.to_string()))
}

/// The id a key under `prefix` names, if it is a worker's key.
fn key_id<'k>(prefix: &str, key: &'k [u8]) -> Option<&'k str> {
    let id = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, addr: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            role: Role::Prefill,
            addr: addr.into(),
            model: "m".into(),
        }
    }

    #[test]
    fn record_json_is_stable() {
        let json = serde_json::to_string(&record("p0", "10.0.0.7:7100")).unwrap();
        assert_eq!(
            json,
            r#"{"id":"p0","role":"prefill","addr":"10.0.0.7:7100","model":"m"}"#
        );
    }

    #[test]
    fn names_that_would_break_the_key_are_refused() {
        for bad in ["", "a/b", "a\nb", &"x".repeat(NAME_BYTES_MAX + 1)] {
            assert!(check_name("worker id", bad).is_err(), "{bad:?}");
        }
        check_name("worker id", "decode-0.host_1").unwrap();
    }

    #[test]
    fn addr_must_be_host_and_port() {
        for good in ["10.0.0.7:7100", "[::1]:7100", "worker-3.local:1"] {
            check_record(&record("w", good)).unwrap();
        }
        for bad in ["10.0.0.7", ":7100", "host:0", "host:70000", "host:x"] {
            let err = check_record(&record("w", bad)).unwrap_err().to_string();
            assert!(err.contains("invalid worker addr"), "{bad}: {err}");
        }
    }

    #[test]
    fn parse_record_skips_foreign_keys_and_rejects_bad_values() {
        let prefix = workers_prefix("ns");
        let good = serde_json::to_vec(&record("w1", "h:1")).unwrap();
        assert_eq!(
            parse_record(&prefix, b"/cleave/ns/workers/w1", &good),
            Some(Ok(record("w1", "h:1")))
        );
        assert_eq!(parse_record(&prefix, b"/cleave/ns/workers/w1/extra", &good), None);
        assert_eq!(parse_record(&prefix, b"/cleave/other/workers/w1", &good), None);
        assert!(matches!(
            parse_record(&prefix, b"/cleave/ns/workers/w2", &good),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_record(&prefix, b"/cleave/ns/workers/w1", b"{"),
            Some(Err(_))
        ));
        let bad_addr = serde_json::to_vec(&record("w1", "nope")).unwrap();
        assert!(matches!(
            parse_record(&prefix, b"/cleave/ns/workers/w1", &bad_addr),
            Some(Err(_))
        ));
    }
}
