//! Block hashes: chaining, partial blocks, and the pinned format that routers in other processes rely on.

use cleave_kv::{BlockHash, ROOT_PARENT_HASH, block_hashes, hash_block};
use xxhash_rust::xxh3::xxh3_64;

#[test]
fn same_tokens_with_different_parents_hash_differently() {
    let tokens = [7, 8, 9, 10];
    let root = hash_block(None, &tokens);
    let after_a = hash_block(Some(BlockHash(1)), &tokens);
    let after_b = hash_block(Some(BlockHash(2)), &tokens);
    assert_ne!(root, after_a);
    assert_ne!(after_a, after_b);
}

#[test]
fn block_hashes_chain_each_block_onto_the_previous_one() {
    let tokens: Vec<u32> = (0..12).collect();
    let hashes = block_hashes(&tokens, 4);
    let h0 = hash_block(None, &tokens[0..4]);
    let h1 = hash_block(Some(h0), &tokens[4..8]);
    let h2 = hash_block(Some(h1), &tokens[8..12]);
    assert_eq!(hashes, [h0, h1, h2]);
    // The same block contents at another position hash differently.
    assert_ne!(
        block_hashes(&[1, 1, 1, 1, 1, 1, 1, 1], 4).first(),
        block_hashes(&[1, 1, 1, 1, 1, 1, 1, 1], 4).get(1)
    );
}

#[test]
fn a_partial_trailing_block_has_no_hash() {
    let tokens: Vec<u32> = (0..11).collect();
    assert_eq!(block_hashes(&tokens, 4).len(), 2);
    assert_eq!(block_hashes(&tokens[..3], 4), []);
    assert_eq!(block_hashes(&[], 4), []);
    // Appending to the partial block does not change the hashes of the full ones.
    assert_eq!(block_hashes(&tokens, 4), block_hashes(&tokens[..8], 4));
}

#[test]
fn hash_is_xxh3_over_parent_le_then_tokens_le() {
    // The documented format, rebuilt byte by byte: what a router in another language would implement.
    let parent = BlockHash(0x0123_4567_89ab_cdef);
    let tokens = [1u32, 0x0102_0304, u32::MAX];
    let mut bytes = parent.0.to_le_bytes().to_vec();
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    assert_eq!(hash_block(Some(parent), &tokens), BlockHash(xxh3_64(&bytes)));

    let mut bytes = ROOT_PARENT_HASH.to_le_bytes().to_vec();
    bytes.extend_from_slice(&5u32.to_le_bytes());
    assert_eq!(hash_block(None, &[5]), BlockHash(xxh3_64(&bytes)));
}

#[test]
fn hashes_are_pinned_literals() {
    // Computed once with the implementation; routers and engines of different versions must agree on them, so an
    // accidental change of algorithm, seed or byte order must fail here.
    assert_eq!(ROOT_PARENT_HASH, 0x636c_6561_7665_6b76);
    let hashes = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
    assert_eq!(
        hashes,
        [BlockHash(0x3715_1599_e072_0610), BlockHash(0x929b_555a_bfb0_6ef7)]
    );
}
