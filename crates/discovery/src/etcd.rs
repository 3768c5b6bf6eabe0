//! A lazily connected etcd client whose calls are bounded in time and whose errors name the endpoints.

use std::error::Error as _;
use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tonic::Code;

use crate::DiscoveryError;

/// Bound on opening a TCP connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on open streams, so that a watch or keepalive stream to a host that vanished without closing its
/// connections breaks instead of waiting forever. etcd answers pings more frequent than every 5 s
/// (`--grpc-keepalive-min-time`) by closing the connection.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// One user's handle on etcd. Each background task has its own, so that a broken connection in one does not
/// disturb the others.
pub(crate) struct Etcd {
    endpoints: Vec<String>,
    /// The endpoints, joined with ',' for messages.
    label: String,
    /// Bound on each call; a call that takes longer counts as etcd being unreachable.
    call_timeout: Duration,
    /// `None` until the first call, and after an error that suggests a broken connection, so that the next call
    /// dials afresh instead of relying on the old channel's reconnection.
    client: Option<Client>,
}

impl Etcd {
    /// Checks the endpoints' syntax. Connecting is lazy: the first call finds out whether etcd answers.
    pub(crate) async fn new(endpoints: &[String], call_timeout: Duration) -> Result<Etcd, DiscoveryError> {
        if endpoints.is_empty() {
            return Err(DiscoveryError::Invalid {
                what: "etcd endpoints",
                value: String::new(),
                reason: "give at least one, such as http://127.0.0.1:2379".to_string(),
            });
        }
        let mut etcd = Etcd {
            endpoints: endpoints.to_vec(),
            label: endpoints.join(","),
            call_timeout,
            client: None,
        };
        etcd.client().await?;
        Ok(etcd)
    }

    /// Another handle on the same endpoints, with its own connection.
    pub(crate) fn fork(&self, call_timeout: Duration) -> Etcd {
        Etcd {
            endpoints: self.endpoints.clone(),
            label: self.label.clone(),
            call_timeout,
            client: None,
        }
    }

    /// Runs one call on the client, bounded by the call timeout.
    pub(crate) async fn call<T, F, Fut>(&mut self, op: &'static str, call: F) -> Result<T, DiscoveryError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        self.bounded(op, call(client)).await
    }

    /// Bounds a call that does not need the client, such as a message on a stream opened through it.
    pub(crate) async fn bounded<T>(
        &mut self,
        op: &'static str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, DiscoveryError> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if is_unreachable(&e) => Err(self.unreachable(op, describe(&e))),
            Ok(Err(e)) => Err(DiscoveryError::Rejected {
                endpoints: self.label.clone(),
                op,
                reason: describe(&e),
            }),
            Err(_) => {
                let reason = format!("no answer within {} ms", self.call_timeout.as_millis());
                Err(self.unreachable(op, reason))
            }
        }
    }

    /// The error for a broken connection (also when a stream ends or fails); the next call dials afresh.
    pub(crate) fn unreachable(&mut self, op: &'static str, reason: String) -> DiscoveryError {
        self.client = None;
        DiscoveryError::Unreachable {
            endpoints: self.label.clone(),
            op,
            reason,
        }
    }

    async fn client(&mut self) -> Result<Client, DiscoveryError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
            // Without a leader, a member's view may be stale: refuse rather than serve it.
            .with_require_leader(true);
        let client = Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(|e| DiscoveryError::Invalid {
                what: "etcd endpoints",
                value: self.label.clone(),
                reason: describe(&e),
            })?;
        self.client = Some(client.clone());
        Ok(client)
    }
}

/// Whether an error means etcd did not answer (as opposed to answering with an error).
fn is_unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // tonic reports refused, reset and dropped connections as Unavailable or Unknown.
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            )
        }
        etcd_client::Error::WatchError(_) | etcd_client::Error::LeaseKeepAliveError(_) => true,
        _ => false,
    }
}

/// A one-line description: the gRPC status message (not its metadata) and the chain of causes beneath it, which is
/// where "Connection refused" lives.
pub(crate) fn describe(e: &etcd_client::Error) -> String {
    let (mut text, mut source) = match e {
        etcd_client::Error::GRpcStatus(status) => {
            (format!("{:?}: {}", status.code(), status.message()), status.source())
        }
        other => (other.to_string(), other.source()),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
