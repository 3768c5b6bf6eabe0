//! Errors of this crate: a configuration the router cannot work with, or a worker table it cannot change.

use std::fmt;

use crate::WorkerId;

/// Why a [`Router`](crate::Router) refused a configuration or a worker.
///
/// Routing itself never fails: with no eligible worker the `pick_*` methods return `None`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RouterError {
    /// `block_size` was 0; it must equal the workers' KV block size (at least 1 token).
    ZeroBlockSize,
    /// A weight or the temperature was negative, NaN or infinite.
    InvalidParameter {
        /// The field of [`RouterConfig`](crate::RouterConfig).
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// [`Router::add_worker`](crate::Router::add_worker) for a worker the router already has. To change a
    /// worker's role, remove it first.
    DuplicateWorker {
        /// The worker.
        worker: WorkerId,
    },
    /// [`Router::add_worker`](crate::Router::add_worker) beyond
    /// [`KvIndexConfig::workers_max`](crate::KvIndexConfig::workers_max) workers.
    TooManyWorkers {
        /// The limit.
        workers_max: usize,
    },
}

impl fmt::Display for RouterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroBlockSize => write!(f, "router: block_size is 0; it must equal the workers' KV block size"),
            Self::InvalidParameter { name, value } => {
                write!(f, "router: {name} is {value}; it must be finite and at least 0")
            }
            Self::DuplicateWorker { worker } => {
                write!(
                    f,
                    "router: {worker} is already registered; remove it before adding it again"
                )
            }
            Self::TooManyWorkers { workers_max } => {
                write!(f, "router: already {workers_max} workers, the configured workers_max")
            }
        }
    }
}

impl std::error::Error for RouterError {}
