//! A worker's registration: its record under a lease that a background task keeps alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::Code;
use tracing::{info, warn};

use crate::etcd::Etcd;
use crate::{DiscoveryError, LEASE_TTL_MAX, LEASE_TTL_MIN, WorkerRecord, check_name, check_record, workers_prefix};

/// Bound on the calls `register` and `deregister` make.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds on the keepalive task's calls, which are also bounded by its tick (a third of the lease).
const KEEPALIVE_CALL_TIMEOUT_MIN: Duration = Duration::from_millis(500);
const KEEPALIVE_CALL_TIMEOUT_MAX: Duration = CALL_TIMEOUT;

/// A worker's record in etcd, kept alive until [`Registration::deregister`] or drop.
///
/// Dropping it without `deregister` stops the keepalives and leaves the key to expire with its lease: that is what
/// a crashed worker looks like to watchers, `ttl` later.
pub struct Registration {
    etcd: Etcd,
    key: String,
    /// The lease the record was last put under, or 0 while the task is between leases. Set as soon as a lease is
    /// granted, before the put, so that `deregister` revokes whatever the task may have put.
    lease_id: Arc<AtomicI64>,
    keepalive: JoinHandle<()>,
}

impl Registration {
    /// Grants a lease of `ttl` (whole seconds, rounded up), puts `record` under
    /// `/cleave/<namespace>/workers/<record.id>` with it, and keeps the lease alive from a background task on the
    /// current tokio runtime, at a third of the lease's ttl. If the lease is lost (etcd out of reach for longer than
    /// the ttl, or the lease revoked by someone else), the task grants a new one and puts the record again as soon
    /// as etcd answers.
    ///
    /// A record already under that key (a previous run of the same worker that has not expired yet) is replaced.
    pub async fn register(
        endpoints: &[String],
        namespace: &str,
        record: WorkerRecord,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        check_name("namespace", namespace)?;
        check_record(&record)?;
        if !(LEASE_TTL_MIN..=LEASE_TTL_MAX).contains(&ttl) {
            return Err(DiscoveryError::Invalid {
                what: "lease ttl",
                value: format!("{ttl:?}"),
                reason: format!("must be from {LEASE_TTL_MIN:?} to {LEASE_TTL_MAX:?}"),
            });
        }
        let ttl_s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let lease = Lease {
            key: format!("{}{}", workers_prefix(namespace), record.id),
            value: serde_json::to_vec(&record).expect("a WorkerRecord always serializes"),
            ttl_s: i64::try_from(ttl_s).expect("ttl is at most LEASE_TTL_MAX"),
        };

        let mut etcd = Etcd::new(endpoints, CALL_TIMEOUT).await?;
        let lease_id = Arc::new(AtomicI64::new(0));
        let granted_ttl = lease.grant_and_put(&mut etcd, &lease_id).await?;
        info!(
            key = lease.key,
            lease_id = lease_id.load(Ordering::SeqCst),
            "registered"
        );

        let key = lease.key.clone();
        let call_timeout = (granted_ttl / 3).clamp(KEEPALIVE_CALL_TIMEOUT_MIN, KEEPALIVE_CALL_TIMEOUT_MAX);
        let keepalive = tokio::spawn(lease.keep_alive(etcd.fork(call_timeout), lease_id.clone(), granted_ttl));
        Ok(Registration {
            etcd,
            key,
            lease_id,
            keepalive,
        })
    }

    /// The key the record lives under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stops the keepalives and revokes the lease, which deletes the record at once: watchers see
    /// [`DiscoveryEvent::Down`](crate::DiscoveryEvent::Down) without waiting for the ttl. If etcd cannot be reached,
    /// the error says so and the record disappears when the lease expires.
    pub async fn deregister(mut self) -> Result<(), DiscoveryError> {
        // Wait for the task to stop, so that it cannot put the record again after the revoke.
        self.keepalive.abort();
        let _ = (&mut self.keepalive).await;
        let lease_id = self.lease_id.load(Ordering::SeqCst);
        if lease_id == 0 {
            // Between leases: the old one is gone with its key and no new one was put.
            return Ok(());
        }
        let revoke = |mut client: etcd_client::Client| async move {
            match client.lease_revoke(lease_id).await {
                // Expired already, and the key with it.
                Err(etcd_client::Error::GRpcStatus(status)) if status.code() == Code::NotFound => Ok(()),
                other => other.map(drop),
            }
        };
        self.etcd.call("lease revoke", revoke).await?;
        info!(key = self.key, lease_id, "deregistered");
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// What the keepalive task needs to put the record again under a new lease.
struct Lease {
    key: String,
    value: Vec<u8>,
    ttl_s: i64,
}

/// How one keepalive round went.
enum Renewal {
    Renewed,
    /// etcd answered that the lease does not exist: it expired or was revoked, and the key with it.
    Gone,
}

impl Lease {
    /// Grants a lease, publishes its id in `lease_id`, puts the record under it; returns the ttl etcd granted.
    async fn grant_and_put(&self, etcd: &mut Etcd, lease_id: &AtomicI64) -> Result<Duration, DiscoveryError> {
        let ttl_s = self.ttl_s;
        let granted = etcd
            .call("lease grant", |mut client| async move {
                client.lease_grant(ttl_s, None).await
            })
            .await?;
        lease_id.store(granted.id(), Ordering::SeqCst);
        let (key, value) = (self.key.clone(), self.value.clone());
        let options = PutOptions::new().with_lease(granted.id());
        let put = |mut client: etcd_client::Client| async move { client.put(key, value, Some(options)).await };
        if let Err(e) = etcd.call("put", put).await {
            // The lease has no key (or, if the put did land, one that expires with it): forget it.
            lease_id.store(0, Ordering::SeqCst);
            return Err(e);
        }
        Ok(Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0).max(1)))
    }

    /// Renews the lease every third of its ttl, forever; when the lease is lost, registers again. Every failure is
    /// retried at the next tick; the first of a run is logged as a warning, the recovery as info.
    async fn keep_alive(self, mut etcd: Etcd, lease_id: Arc<AtomicI64>, mut granted_ttl: Duration) {
        let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut renewed_at = Instant::now();
        let mut failing = false;
        let mut tick = tokio::time::interval_at(Instant::now() + granted_ttl / 3, granted_ttl / 3);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let id = lease_id.load(Ordering::SeqCst);
            if id != 0 {
                match renew(&mut etcd, &mut stream, id).await {
                    Ok(Renewal::Renewed) => {
                        renewed_at = Instant::now();
                        if failing {
                            info!(key = self.key, lease_id = id, "etcd answers again; lease renewed");
                            failing = false;
                        }
                        continue;
                    }
                    Ok(Renewal::Gone) => {
                        warn!(
                            key = self.key,
                            lease_id = id,
                            "lease is gone (expired or revoked); registering again"
                        );
                        lease_id.store(0, Ordering::SeqCst);
                    }
                    Err(e) => {
                        stream = None;
                        if !failing {
                            warn!(key = self.key, lease_id = id, "cannot renew lease, will retry: {e}");
                            failing = true;
                        }
                        if renewed_at.elapsed() < granted_ttl {
                            continue;
                        }
                        // etcd has expired the lease by now, or will as soon as it runs again.
                        lease_id.store(0, Ordering::SeqCst);
                    }
                }
            }
            match self.grant_and_put(&mut etcd, &lease_id).await {
                Ok(ttl) => {
                    info!(
                        key = self.key,
                        lease_id = lease_id.load(Ordering::SeqCst),
                        "registered again"
                    );
                    if ttl != granted_ttl {
                        granted_ttl = ttl;
                        tick = tokio::time::interval_at(Instant::now() + ttl / 3, ttl / 3);
                        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                    renewed_at = Instant::now();
                    stream = None;
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        warn!(key = self.key, "cannot register again, will retry: {e}");
                        failing = true;
                    }
                }
            }
        }
    }
}

/// One keepalive round trip, on the open keepalive stream or a new one.
async fn renew(
    etcd: &mut Etcd,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    lease_id: i64,
) -> Result<Renewal, DiscoveryError> {
    let Some((keeper, responses)) = stream else {
        let open = |mut client: etcd_client::Client| async move {
            match client.lease_keep_alive(lease_id).await {
                Ok(pair) => Ok(Some(pair)),
                // What etcd-client returns when the first response has ttl 0.
                Err(etcd_client::Error::LeaseKeepAliveError(e)) if e.contains("not found") => Ok(None),
                Err(e) => Err(e),
            }
        };
        return Ok(match etcd.call("lease keepalive", open).await? {
            Some(pair) => {
                *stream = Some(pair);
                Renewal::Renewed
            }
            None => Renewal::Gone,
        });
    };
    let round_trip = async {
        keeper.keep_alive().await?;
        responses.message().await
    };
    match etcd.bounded("lease keepalive", round_trip).await? {
        Some(response) if response.ttl() > 0 => Ok(Renewal::Renewed),
        Some(_) => Ok(Renewal::Gone),
        None => Err(etcd.unreachable("lease keepalive", "etcd closed the keepalive stream".to_string())),
    }
}
