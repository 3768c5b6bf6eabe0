//! Errors of this crate: only configuration can fail; misuse of the pool is a programmer error and panics.

use std::fmt;

/// Why a [`BlockPoolConfig`](crate::BlockPoolConfig) was refused.
///
/// Each variant carries the value given where there is one worth printing, so the message says both the limit and
/// what broke it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvError {
    /// `n_blocks` was 0: a pool without blocks cannot hold a single token.
    ZeroBlocks,
    /// `block_size` was 0: a block must hold at least one token.
    ZeroBlockSize,
    /// `n_blocks` exceeds what a [`BlockId`](crate::BlockId) (`u32`) can name.
    TooManyBlocks {
        /// The number of blocks asked for.
        n_blocks: usize,
    },
    /// `events_max` was 0: the overflow marker [`KvEvent::Cleared`](crate::KvEvent::Cleared) itself needs one slot.
    ZeroEventsMax,
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroBlocks => write!(f, "KV block pool: n_blocks is 0; the pool needs at least 1 block"),
            Self::ZeroBlockSize => {
                write!(f, "KV block pool: block_size is 0; a block must hold at least 1 token")
            }
            Self::TooManyBlocks { n_blocks } => write!(
                f,
                "KV block pool: n_blocks is {n_blocks}; block ids are u32, so the pool holds at most {} blocks",
                u32::MAX
            ),
            Self::ZeroEventsMax => write!(
                f,
                "KV block pool: events_max is 0; the event buffer needs room for at least 1 event"
            ),
        }
    }
}

impl std::error::Error for KvError {}
