//! Token ids without a tokenizer, and the one way chat messages become text.
//!
//! Routing and the engine simulator both need token ids for prefix caching,
//! and they must agree: equal text prefixes give equal token prefixes. When
//! no `tokenizer.json` is configured, text is split into word pieces the way
//! byte-level BPE roughly does (a leading space joins the word after it; long
//! words break into pieces of a few characters; punctuation stands alone) and
//! each piece is hashed to an id. That averages about four characters per
//! token on English text, close to real BPE counts.

use xxhash_rust::xxh3::xxh3_64;

/// Longest run of word characters one estimated token covers.
const MAX_PIECE_CHARS: usize = 4;

/// Vocabulary the estimated ids are folded into (ids are `< ESTIMATE_VOCAB`).
pub const ESTIMATE_VOCAB: u32 = 1 << 17;

/// Calls `f` with each word piece of `text`, in order.
fn for_each_piece(text: &str, f: impl FnMut(&str)) {
    if text.is_ascii() {
        for_each_ascii_piece(text, f);
    } else {
        for_each_char_piece(text, f);
    }
}

/// [`for_each_piece`] on ASCII text: the same pieces, found on bytes
/// (most prompts are ASCII, and the proxy splits every prompt it routes).
fn for_each_ascii_piece(text: &str, mut f: impl FnMut(&str)) {
    let b = text.as_bytes();
    let word = |i: usize| b.get(i).is_some_and(u8::is_ascii_alphanumeric);
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        if c == b' ' || c.is_ascii_alphanumeric() {
            if c == b' ' {
                i += 1;
                if !word(i) {
                    f(&text[start..i]);
                    continue;
                }
            }
            let mut count = 0;
            while count < MAX_PIECE_CHARS && word(i) {
                i += 1;
                count += 1;
            }
        } else {
            i += 1;
        }
        f(&text[start..i]);
    }
}

/// [`for_each_piece`] on any text, char by char.
fn for_each_char_piece(text: &str, mut f: impl FnMut(&str)) {
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        debug_assert_eq!(i, start);
        if c.is_alphanumeric() || c == ' ' {
            // An optional single leading space, then up to MAX_PIECE_CHARS word characters.
            let mut count = 0;
            let mut end = i;
            if c == ' ' {
                chars.next();
                end = i + 1;
                if !chars.peek().is_some_and(|&(_, n)| n.is_alphanumeric()) {
                    f(&text[start..end]);
                    start = end;
                    continue;
                }
            }
            while let Some(&(j, n)) = chars.peek() {
                if !n.is_alphanumeric() || count == MAX_PIECE_CHARS {
                    break;
                }
                chars.next();
                count += 1;
                end = j + n.len_utf8();
            }
            f(&text[start..end]);
            start = end;
        } else {
            chars.next();
            let end = i + c.len_utf8();
            f(&text[start..end]);
            start = end;
        }
    }
}

/// Deterministic token ids for `text` (see the module docs).
pub fn estimate_token_ids(text: &str) -> Vec<u32> {
    let mut ids = Vec::with_capacity(text.len() / 4 + 1);
    for_each_piece(text, |piece| {
        ids.push((xxh3_64(piece.as_bytes()) % u64::from(ESTIMATE_VOCAB)) as u32)
    });
    ids
}

/// Number of tokens [`estimate_token_ids`] would return, without allocating.
pub fn estimate_token_count(text: &str) -> usize {
    let mut n = 0;
    for_each_piece(text, |_| n += 1);
    n
}

/// One chat message, content already flattened to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text content (array-of-parts content joined in order).
    pub content: String,
}

/// Renders a conversation the same way every time (a ChatML-like template),
/// ending with the assistant header the model continues from. A conversation
/// that grows by turns renders to text that extends the previous rendering,
/// so its token prefix is shared.
pub fn render_chat(messages: &[ChatMessage]) -> String {
    let mut out = String::with_capacity(messages.iter().map(|m| m.content.len() + 32).sum());
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_cover_the_text() {
        let text = "Hello, world! The quick brown fox  jumps\nover 12345 lazy dogs — déjà vu.";
        let mut joined = String::new();
        for_each_piece(text, |p| joined.push_str(p));
        assert_eq!(joined, text);
    }

    #[test]
    fn about_four_chars_per_token_on_prose() {
        let text = "The proxy reads the body before routing, counts the prompt tokens and \
                    computes the prefix block hashes so that requests which share a long \
                    system prompt land on the replica that already holds it in cache.";
        let ratio = text.len() as f64 / estimate_token_count(text) as f64;
        assert!((3.0..=5.5).contains(&ratio), "{ratio}");
        assert_eq!(estimate_token_count(text), estimate_token_ids(text).len());
    }

    #[test]
    fn chat_rendering_extends_by_turns() {
        let turn1 = vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        let mut turn2 = turn1.clone();
        turn2.push(ChatMessage {
            role: "assistant".into(),
            content: "hello".into(),
        });
        turn2.push(ChatMessage {
            role: "user".into(),
            content: "more".into(),
        });
        let a = render_chat(&turn1);
        let b = render_chat(&turn2);
        let common = a.trim_end_matches("<|im_start|>assistant\n");
        assert!(b.starts_with(common));
    }

    proptest! {
        #[test]
        fn equal_text_prefixes_give_equal_token_prefixes(a in "[a-z ,.]{0,200}", b in "[a-z ,.]{0,200}", c in "[a-z ,.]{0,200}") {
            // Appending after a piece boundary (here: a newline) never changes earlier tokens.
            let p = format!("{a}\n");
            let x = estimate_token_ids(&format!("{p}{b}"));
            let y = estimate_token_ids(&format!("{p}{c}"));
            let n = estimate_token_ids(&p).len();
            prop_assert_eq!(&x[..n], &y[..n]);
        }

        #[test]
        fn ascii_fast_path_splits_like_the_char_path(s in "[ -~\n\t]{0,300}") {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            for_each_ascii_piece(&s, |p| fast.push(p.to_string()));
            for_each_char_piece(&s, |p| slow.push(p.to_string()));
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn ids_are_in_vocab(s in "\\PC{0,300}") {
            prop_assert!(estimate_token_ids(&s).iter().all(|&id| id < ESTIMATE_VOCAB));
        }
    }
}
