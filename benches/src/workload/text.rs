//! Deterministic prompt text of an exact estimated token length.
//!
//! Workloads describe most prompts as segments (`seed`, `tokens`) instead of
//! text, so a Mooncake block id or a shared system prompt becomes the same
//! text every time it is sent. Each segment renders to `tokens - 1` short
//! words (at most four letters, so each is one estimated token) and a final
//! newline. The newline is a token of its own and a piece boundary, so a
//! segment's token ids never depend on what follows it: prompts that share
//! leading segments share their token prefix under
//! [`sluice_policies::tokens::estimate_token_ids`].

/// Short English-like words; none longer than four letters so each is exactly one estimated token.
const WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "but", "have", "an", "they",
    "one", "had", "were", "her", "all", "she", "them", "when", "we", "can", "what", "said", "data",
    "node", "fast", "load", "path", "tree", "root", "cell", "wave", "gold", "blue", "kind", "fire",
    "rock", "leaf", "moon", "star", "ship", "road", "bird", "seed", "rain", "snow", "lake", "iron",
];

/// SplitMix64: a tiny, well-mixed, stable generator (its sequence never changes between versions).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Appends the text of segment (`seed`, `tokens`) to `out`.
pub fn push_segment_text(out: &mut String, seed: u64, tokens: u32) {
    if tokens == 0 {
        return;
    }
    let mut rng = SplitMix(seed);
    out.reserve(tokens as usize * 5);
    for i in 0..tokens - 1 {
        let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
    out.push('\n');
}

/// The text of segment (`seed`, `tokens`).
pub fn segment_text(seed: u64, tokens: u32) -> String {
    let mut s = String::new();
    push_segment_text(&mut s, seed, tokens);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policies::tokens::{estimate_token_count, estimate_token_ids};

    #[test]
    fn segments_have_exact_token_counts() {
        for tokens in [0, 1, 2, 3, 17, 512, 2048] {
            for seed in 0..5 {
                assert_eq!(
                    estimate_token_count(&segment_text(seed, tokens)),
                    tokens as usize
                );
            }
        }
    }

    #[test]
    fn shared_leading_segments_share_token_prefix() {
        let mut a = segment_text(1, 300);
        a.push_str(&segment_text(2, 100));
        let mut b = segment_text(1, 300);
        b.push_str(&segment_text(3, 50));
        let (ta, tb) = (estimate_token_ids(&a), estimate_token_ids(&b));
        assert_eq!(ta[..300], tb[..300]);
        assert_ne!(ta[300..310], tb[300..310]);
    }

    #[test]
    fn different_seeds_give_different_text() {
        assert_ne!(segment_text(1, 64), segment_text(2, 64));
        assert_eq!(segment_text(7, 64), segment_text(7, 64));
    }
}
