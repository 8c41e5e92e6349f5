//! Server-sent events as they pass through: split the upstream byte stream
//! into whole events (chunks do not align with events), and read from each
//! event what the lifecycle record needs (did it carry a token, the finish
//! reason, the final `usage`).

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// Splits a byte stream into SSE events, each ending with its blank line.
#[derive(Debug)]
pub struct Splitter {
    buf: BytesMut,
    /// Where to resume searching for a boundary (bytes before it were searched).
    scanned: usize,
    max_event_bytes: usize,
}

impl Splitter {
    /// A splitter that passes on an event-in-progress unsplit once it exceeds
    /// `max_event_bytes`, so a peer that never sends a blank line cannot grow memory.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max_event_bytes,
        }
    }

    /// Feeds one upstream chunk; pushes every event it completes onto `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Bytes>) {
        self.buf.extend_from_slice(chunk);
        loop {
            match find_boundary(&self.buf[..], self.scanned) {
                Some(end) => {
                    out.push(self.buf.split_to(end).freeze());
                    self.scanned = 0;
                }
                None => {
                    // A boundary may straddle chunks: re-scan the last 3 bytes next time.
                    self.scanned = self.buf.len().saturating_sub(3);
                    break;
                }
            }
        }
        if self.buf.len() > self.max_event_bytes {
            out.push(self.buf.split().freeze());
            self.scanned = 0;
        }
    }

    /// Whatever is left when the stream ends (an event without its blank line).
    pub fn finish(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

/// End (exclusive) of the first event boundary at or after `from`: `\n\n`, `\r\n\r\n` or `\r\r`.
fn find_boundary(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < buf.len() {
        match (buf[i], buf[i + 1]) {
            (b'\n', b'\n') | (b'\r', b'\r') => return Some(i + 2),
            (b'\r', b'\n') if buf.get(i + 2) == Some(&b'\r') && buf.get(i + 3) == Some(&b'\n') => {
                return Some(i + 4);
            }
            _ => i += 1,
        }
    }
    None
}

/// Token accounting as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// Prompt tokens as the engine counted them.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Output tokens.
    #[serde(default)]
    pub completion_tokens: u32,
    /// Details, including prefix-cache hits.
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct PromptDetails {
    /// Prompt tokens served from the prefix cache.
    #[serde(default)]
    pub cached_tokens: Option<u32>,
}

impl Usage {
    /// Cached prompt tokens, when reported.
    pub fn cached_tokens(&self) -> Option<u32> {
        self.prompt_tokens_details.and_then(|d| d.cached_tokens)
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

impl Delta {
    fn has_output(&self) -> bool {
        self.content.as_deref().is_some_and(|s| !s.is_empty())
            || self
                .reasoning_content
                .as_deref()
                .is_some_and(|s| !s.is_empty())
            || self.tool_calls.is_some()
    }
}

/// What one SSE event (or a whole non-streaming body) says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventInfo {
    /// `data: [DONE]`.
    pub done: bool,
    /// Carries at least one output token (text, reasoning or a tool call).
    pub has_token: bool,
    /// The first `finish_reason` it carries.
    pub finish_reason: Option<String>,
    /// Its `usage`, if any.
    pub usage: Option<Usage>,
    /// A usage-only chunk (`choices: []` plus `usage`), as `include_usage` produces.
    pub usage_only: bool,
    /// An `{"error": ...}` object.
    pub error: bool,
}

/// Reads the `data:` payload of one event.
pub fn inspect_event(event: &[u8]) -> EventInfo {
    let mut data: Vec<u8> = Vec::new();
    let mut lines = 0;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            if lines > 0 {
                data.push(b'\n');
            }
            data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            lines += 1;
        }
    }
    if lines == 0 {
        return EventInfo::default();
    }
    if data.trim_ascii() == b"[DONE]" {
        return EventInfo {
            done: true,
            ..EventInfo::default()
        };
    }
    inspect_json(&data)
}

/// Reads a chat/completions JSON object (a stream chunk or a whole response).
pub fn inspect_json(json: &[u8]) -> EventInfo {
    let Ok(chunk) = serde_json::from_slice::<Chunk>(json) else {
        return EventInfo::default();
    };
    let mut info = EventInfo {
        usage: chunk.usage,
        error: chunk.error.is_some(),
        ..EventInfo::default()
    };
    if let Some(choices) = &chunk.choices {
        info.usage_only = choices.is_empty() && chunk.usage.is_some();
        for c in choices {
            let delta_out = c.delta.as_ref().is_some_and(Delta::has_output)
                || c.message.as_ref().is_some_and(Delta::has_output);
            if delta_out || c.text.as_deref().is_some_and(|t| !t.is_empty()) {
                info.has_token = true;
            }
            if info.finish_reason.is_none() {
                info.finish_reason = c.finish_reason.clone();
            }
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn events_are_read() {
        let mut s = Splitter::new(1 << 20);
        let mut out = Vec::new();
        s.push(STREAM.as_bytes(), &mut out);
        assert_eq!(out.len(), 5);
        assert!(s.finish().is_none());
        let infos: Vec<EventInfo> = out.iter().map(|e| inspect_event(e)).collect();
        assert!(!infos[0].has_token);
        assert!(infos[1].has_token);
        assert_eq!(infos[2].finish_reason.as_deref(), Some("stop"));
        assert!(infos[3].usage_only);
        assert_eq!(infos[3].usage.unwrap().cached_tokens(), Some(4));
        assert!(infos[4].done);
    }

    #[test]
    fn crlf_and_oversized_events() {
        let mut s = Splitter::new(8);
        let mut out = Vec::new();
        s.push(b"data: 1\r\n\r\ndata: 2", &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"data: 1\r\n\r\n")]);
        out.clear();
        s.push(b"23456789", &mut out);
        assert_eq!(out.len(), 1, "an event past the bound is passed on unsplit");
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..20)) {
            let bytes = STREAM.as_bytes();
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut s = Splitter::new(1 << 20);
            let mut out = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                s.push(&bytes[prev..c], &mut out);
                prev = c;
            }
            prop_assert_eq!(out.len(), 5);
            let joined: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
            prop_assert_eq!(joined, bytes.to_vec());
        }
    }
}
