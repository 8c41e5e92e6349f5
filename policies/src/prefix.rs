//! Chained prefix block hashes, as vLLM's automatic prefix caching computes them.
//!
//! A prompt's token ids are cut into full blocks of `block_size` tokens; block
//! `i`'s hash covers its parent's hash and its own tokens (and, on the first
//! block, an optional cache salt), so two prompts share block hash `i` exactly
//! when they share every token up to the end of block `i`. A trailing partial
//! block gets no hash, as in vLLM.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Hash of one full block, chained to its parent.
pub type BlockHash = u64;

/// Seed of the first block's parent (vLLM uses a random `NONE_HASH`; a fixed
/// one keeps proxy and simulator deterministic).
const ROOT_PARENT: u64 = 0x736c_7569_6365_0001;

/// Extends `hashes` (the chain of `tokens`' first `hashes.len()` full blocks,
/// as [`block_hashes`] gives it) over the full blocks of `tokens` after them,
/// so a sequence that grows by decoding hashes each new block once.
pub fn extend_block_hashes(
    hashes: &mut Vec<BlockHash>,
    tokens: &[u32],
    block_size: usize,
    salt: Option<&str>,
) {
    if block_size == 0 {
        return;
    }
    let done = hashes.len() * block_size;
    let Some(rest) = tokens.get(done..) else {
        return;
    };
    let parent = match (hashes.last(), salt) {
        (Some(&h), _) => h,
        (None, Some(s)) => xxh3_64_with_seed(s.as_bytes(), ROOT_PARENT),
        (None, None) => ROOT_PARENT,
    };
    chain_blocks(rest, block_size, parent, |h| hashes.push(h));
}

/// Blocks of up to this many tokens are hashed from a buffer on the stack.
const STACK_BLOCK_TOKENS: usize = 32;

/// Hashes each full `block_size`-token block of `tokens` in order, chained
/// from `parent`: xxh3 of the block's little-endian token bytes, seeded with
/// the previous hash. Called once per decoded block by the simulated engine,
/// so a usual block size costs no allocation.
fn chain_blocks(tokens: &[u32], block_size: usize, mut parent: u64, mut out: impl FnMut(u64)) {
    let mut stack = [0u8; STACK_BLOCK_TOKENS * 4];
    let mut heap = Vec::new();
    for block in tokens.chunks_exact(block_size) {
        let buf: &mut [u8] = if block_size <= STACK_BLOCK_TOKENS {
            &mut stack[..block_size * 4]
        } else {
            heap.resize(block_size * 4, 0);
            &mut heap
        };
        for (b, t) in buf.chunks_exact_mut(4).zip(block) {
            b.copy_from_slice(&t.to_le_bytes());
        }
        parent = xxh3_64_with_seed(buf, parent);
        out(parent);
    }
}

/// Chained hashes of every full `block_size`-token block of `tokens`.
/// `salt` (vLLM's `cache_salt`) changes every hash, so salted prompts never
/// share blocks with unsalted or differently salted ones.
pub fn block_hashes(tokens: &[u32], block_size: usize, salt: Option<&str>) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let parent = match salt {
        Some(s) => xxh3_64_with_seed(s.as_bytes(), ROOT_PARENT),
        None => ROOT_PARENT,
    };
    let mut hashes = Vec::with_capacity(tokens.len() / block_size);
    chain_blocks(tokens, block_size, parent, |h| hashes.push(h));
    hashes
}

/// A stable 64-bit hash of a string (endpoint keys, tenant names), for
/// consistent hashing and sharding.
pub fn stable_hash(s: &str) -> u64 {
    xxh3_64(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_full_blocks_hash() {
        let t: Vec<u32> = (0..40).collect();
        assert_eq!(block_hashes(&t, 16, None).len(), 2);
        assert!(block_hashes(&t[..15], 16, None).is_empty());
        assert!(block_hashes(&t, 0, None).is_empty());
    }

    #[test]
    fn extending_equals_hashing_at_once() {
        let t: Vec<u32> = (0..100).collect();
        for salt in [None, Some("s")] {
            let mut h = block_hashes(&t[..40], 16, salt);
            extend_block_hashes(&mut h, &t, 16, salt);
            assert_eq!(h, block_hashes(&t, 16, salt));
            let mut empty = Vec::new();
            extend_block_hashes(&mut empty, &t, 16, salt);
            assert_eq!(empty, block_hashes(&t, 16, salt));
        }
    }

    /// The chain as first written: every block's bytes gathered in a `Vec`.
    fn reference_hashes(tokens: &[u32], block_size: usize, salt: Option<&str>) -> Vec<BlockHash> {
        let mut parent = salt.map_or(ROOT_PARENT, |s| {
            xxh3_64_with_seed(s.as_bytes(), ROOT_PARENT)
        });
        tokens
            .chunks_exact(block_size)
            .map(|block| {
                let buf: Vec<u8> = block.iter().flat_map(|t| t.to_le_bytes()).collect();
                parent = xxh3_64_with_seed(&buf, parent);
                parent
            })
            .collect()
    }

    #[test]
    fn stack_and_heap_buffers_hash_as_the_reference_does() {
        let t: Vec<u32> = (0..500u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        for bs in [1, 2, 15, 16, 17, 31, 32, 33, 64, 100] {
            for salt in [None, Some("s")] {
                let want = reference_hashes(&t, bs, salt);
                assert_eq!(block_hashes(&t, bs, salt), want, "block size {bs}");
                let mut h = block_hashes(&t[..bs * 2 + 1], bs, salt);
                extend_block_hashes(&mut h, &t, bs, salt);
                assert_eq!(h, want, "extended, block size {bs}");
            }
        }
    }

    #[test]
    fn salt_separates_tenants() {
        let t: Vec<u32> = (0..64).collect();
        let a = block_hashes(&t, 16, Some("tenant-a"));
        let b = block_hashes(&t, 16, Some("tenant-b"));
        let none = block_hashes(&t, 16, None);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert!(a.iter().zip(&none).all(|(x, y)| x != y));
    }

    proptest! {
        #[test]
        fn hashes_share_exactly_the_common_full_blocks(
            common in proptest::collection::vec(0u32..1000, 0..100),
            x in proptest::collection::vec(0u32..1000, 1..50),
            y in proptest::collection::vec(0u32..1000, 1..50),
        ) {
            prop_assume!(x[0] != y[0]);
            let a: Vec<u32> = common.iter().chain(&x).copied().collect();
            let b: Vec<u32> = common.iter().chain(&y).copied().collect();
            let ha = block_hashes(&a, 8, None);
            let hb = block_hashes(&b, 8, None);
            let shared = ha.iter().zip(&hb).take_while(|(p, q)| p == q).count();
            prop_assert_eq!(shared, common.len() / 8);
        }
    }
}
