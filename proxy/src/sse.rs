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

/// A whole non-streaming response, read only for what the proxy records.
#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    choices: Option<Vec<Finish>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Finish {
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<NonEmpty>,
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<NonEmpty>,
    #[serde(default)]
    reasoning_content: Option<NonEmpty>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

impl Delta {
    fn has_output(&self) -> bool {
        self.content.is_some_and(|s| s.0)
            || self.reasoning_content.is_some_and(|s| s.0)
            || self.tool_calls.is_some()
    }
}

/// A string read only for whether it is non-empty: output text is never
/// copied out of the body (it is most of a response's bytes).
#[derive(Clone, Copy)]
struct NonEmpty(bool);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = NonEmpty;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NonEmpty, E> {
                Ok(NonEmpty(!v.is_empty()))
            }
        }
        d.deserialize_str(V)
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

/// Reads a whole non-streaming chat/completions response: its `usage` and
/// first `finish_reason`.
///
/// Only the two values are decoded, found by their keys: in valid JSON the
/// bytes `"key"` followed by `:` can only be an object key (a quote inside a
/// string is escaped), and OpenAI responses have one `usage`, at the top
/// level, after the choices. Anything else falls back to a full parse; the
/// message text, most of the body, is never decoded.
pub fn inspect_response(json: &[u8]) -> (Option<Usage>, Option<String>) {
    let usage = value_after_key::<Usage>(json, b"\"usage\"", true);
    // The first non-null one (a null fails to decode as a string).
    let finish = value_after_key::<String>(json, b"\"finish_reason\"", false);
    if let (Some(u), Some(f)) = (usage, finish) {
        return (Some(u), Some(f));
    }
    let Ok(r) = serde_json::from_slice::<Response>(json) else {
        return (None, None);
    };
    let finish = r
        .choices
        .and_then(|c| c.into_iter().find_map(|c| c.finish_reason));
    (r.usage, finish)
}

/// The value of the first (or `last`) `key` (with its quotes) in `json`
/// that is followed by a colon, if it decodes as `T`.
fn value_after_key<T: serde::de::DeserializeOwned>(
    json: &[u8],
    key: &[u8],
    last: bool,
) -> Option<T> {
    let decode = |i: usize| -> Option<T> {
        let rest = json[i + key.len()..]
            .trim_ascii_start()
            .strip_prefix(b":")?;
        T::deserialize(&mut serde_json::Deserializer::from_slice(rest)).ok()
    };
    // The quote first: a whole-slice compare at every byte costs a call each.
    let is_key = |w: &[u8]| w[0] == b'"' && w == key;
    let mut at = json.windows(key.len());
    if last {
        // From the end: `usage` comes last, after the (long) message.
        decode(at.rposition(is_key)?)
    } else {
        at.enumerate()
            .filter(|(_, w)| is_key(w))
            .find_map(|(i, _)| decode(i))
    }
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
            if delta_out || c.text.is_some_and(|t| t.0) {
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

    #[test]
    fn whole_responses_give_usage_and_finish_reason() {
        let body = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"a \"quoted\" answer"},"finish_reason":"length"}],"usage":{"prompt_tokens":7,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let (usage, finish) = inspect_response(body);
        let usage = usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 3));
        assert_eq!(usage.cached_tokens(), Some(4));
        assert_eq!(finish.as_deref(), Some("length"));
        assert_eq!(inspect_response(b"not json"), (None, None));
        // A key's name inside the message text is not the key.
        let tricky = br#"{"choices":[{"message":{"content":"say \"usage\": {} and \"finish_reason\":\"x\""},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":9}}"#;
        let (u, f) = inspect_response(tricky);
        assert_eq!(u.map(|u| u.completion_tokens), Some(9));
        assert_eq!(f.as_deref(), Some("stop"));
        // Without usage: the full parse still finds the finish reason.
        let (u, f) =
            inspect_response(br#"{"choices":[{"finish_reason":null},{"finish_reason":"length"}]}"#);
        assert_eq!((u, f.as_deref()), (None, Some("length")));
        let info = inspect_json(body);
        assert!(info.has_token);
        assert_eq!(info.usage, Some(usage));
    }
}
