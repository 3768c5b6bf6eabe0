//! Chained block hashes: the names under which KV blocks are cached and announced to routers.

use xxhash_rust::xxh3::xxh3_64;

/// The identity of a full block of tokens *in its context*: the hash of its tokens chained onto the hash of every
/// block before it.
///
/// Two blocks with the same tokens at different positions (or after different prefixes) hold different KV, so the
/// hash must name the whole prefix, not just the block. Chaining makes that O(block_size) per block instead of
/// O(prefix length).
///
/// The value is a compatibility promise: routers in other processes (and other versions) recompute it from token ids
/// and compare it with the hashes the engine announces in [`KvEvent`](crate::KvEvent)s. It is `xxh3_64` (default
/// secret, seed 0) over the parent's hash as 8 little-endian bytes ([`ROOT_PARENT_HASH`] for the first block),
/// followed by the block's token ids as `u32` little-endian. Change it only together with every consumer.
///
/// The hash does not cover the model or the block size; a router keeps its index per worker (and so per model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// The value that stands in for the parent hash of a sequence's first block (the ASCII bytes of `"cleavekv"`).
///
/// A fixed non-zero value rather than "no bytes" keeps every block's input the same shape, so a first block can
/// never hash like a later one by accident of its length.
pub const ROOT_PARENT_HASH: u64 = u64::from_be_bytes(*b"cleavekv");

/// Hashes of every *full* block of `tokens`, in order, each chained onto the one before
/// (`hash_i = hash_block(hash_{i-1}, block_i)`).
///
/// A partial trailing block has no hash: its KV is still being written, so it can be neither shared nor announced.
///
/// # Panics
/// If `block_size` is 0 (a configuration the [`BlockPool`](crate::BlockPool) refuses, so a caller holding a valid
/// block size never hits it).
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    assert!(block_size > 0, "block_hashes: block_size must be at least 1");
    let mut hashes = Vec::with_capacity(tokens.len() / block_size);
    // One scratch buffer for the whole prompt: a 30k-token prompt is ~2k blocks, and a router hashes every request.
    let mut scratch = Vec::with_capacity(8 + 4 * block_size);
    let mut parent = None;
    for block_tokens in tokens.chunks_exact(block_size) {
        let hash = hash_block_with(&mut scratch, parent, block_tokens);
        hashes.push(hash);
        parent = Some(hash);
    }
    hashes
}

/// Hash of one block whose predecessor has hash `parent` (`None` for a sequence's first block).
///
/// This is what the engine calls as blocks fill up one at a time during prefill and decode; [`block_hashes`] is the
/// same chain over a whole prompt. `block_tokens` is normally exactly one block long; the hash does not check that.
pub fn hash_block(parent: Option<BlockHash>, block_tokens: &[u32]) -> BlockHash {
    let mut scratch = Vec::with_capacity(8 + 4 * block_tokens.len());
    hash_block_with(&mut scratch, parent, block_tokens)
}

/// [`hash_block`] writing its input into `scratch` (cleared first), so loops reuse one allocation.
fn hash_block_with(scratch: &mut Vec<u8>, parent: Option<BlockHash>, block_tokens: &[u32]) -> BlockHash {
    scratch.clear();
    let parent = parent.map_or(ROOT_PARENT_HASH, |p| p.0);
    scratch.extend_from_slice(&parent.to_le_bytes());
    for token in block_tokens {
        scratch.extend_from_slice(&token.to_le_bytes());
    }
    BlockHash(xxh3_64(scratch))
}
