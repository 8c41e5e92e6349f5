//! Reading an OpenAI request body once: the fields routing needs, the prompt
//! as token ids, and the one edit the proxy may make (asking a streaming
//! upstream for a final `usage` chunk).
//!
//! Only the fields the proxy uses are deserialized, borrowing from the body
//! where JSON escapes allow, so a 1 MiB RAG prompt costs one pass.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;
use sluice_policies::tokenizer::Tokenizer;
use sluice_policies::tokens::{ChatMessage, render_chat};

use crate::error::ProxyError;

/// Which API the request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The API path upstream.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// Short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// What the proxy learned from a request body.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// The `model` field.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
    /// `stream_options` is present at all (then the proxy does not edit it).
    pub has_stream_options: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Token ids of the (first) prompt, as the simulator computes them.
    pub prompt_ids: Vec<u32>,
    /// Prompt tokens over all prompts of a batched completion.
    pub prompt_tokens: u32,
    /// vLLM's `cache_salt`, which separates prefix-cache namespaces.
    pub cache_salt: Option<String>,
    /// The rendered prompt text, kept only when prompt logging is on.
    pub prompt_text: Option<String>,
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default, borrow)]
    messages: Option<Vec<RawMessage<'a>>>,
    #[serde(default, borrow)]
    prompt: Option<RawPrompt<'a>>,
    #[serde(default)]
    input: Option<IgnoredAny>,
    #[serde(default, borrow)]
    cache_salt: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(default, borrow)]
    content: Option<RawContent<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawContent<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<RawPart<'a>>),
}

#[derive(Deserialize)]
struct RawPart<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPrompt<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Ids(Vec<u32>),
    Texts(#[serde(borrow)] Vec<Cow<'a, str>>),
    IdLists(Vec<Vec<u32>>),
}

fn bad(message: impl Into<String>, param: &'static str) -> ProxyError {
    ProxyError::BadRequest {
        message: message.into(),
        param: Some(param),
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parses `body` for `endpoint`; `keep_prompt` keeps the rendered prompt text.
pub fn parse<'t>(
    endpoint: Endpoint,
    body: &[u8],
    keep_prompt: bool,
    tokenizer_for: impl FnOnce(&str) -> &'t Tokenizer,
) -> Result<RequestFacts, ProxyError> {
    let raw: Raw<'_> = serde_json::from_slice(body).map_err(|e| {
        ProxyError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    let model = match raw.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        _ => return Err(bad("you must provide a model parameter", "model")),
    };
    let tokenizer = tokenizer_for(&model);
    let max_tokens = match raw.max_completion_tokens.or(raw.max_tokens) {
        None => None,
        Some(n) if n >= 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        Some(_) => return Err(bad("max_tokens must be at least 0", "max_tokens")),
    };
    let (prompt_ids, prompt_tokens, prompt_text) = match endpoint {
        Endpoint::Chat => {
            let msgs = raw
                .messages
                .ok_or_else(|| bad("'messages' is a required property", "messages"))?;
            if msgs.is_empty() {
                return Err(bad(
                    "'messages' must contain at least one message",
                    "messages",
                ));
            }
            let msgs: Vec<ChatMessage> = msgs
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role.into_owned(),
                    content: match m.content {
                        None => String::new(),
                        Some(RawContent::Text(t)) => t.into_owned(),
                        Some(RawContent::Parts(parts)) => parts
                            .iter()
                            .filter_map(|p| p.text.as_deref())
                            .collect::<String>(),
                    },
                })
                .collect();
            let text = render_chat(&msgs);
            let ids = tokenizer.encode(&text);
            let n = count(ids.len());
            (ids, n, keep_prompt.then_some(text))
        }
        Endpoint::Completions => match raw.prompt {
            None => return Err(bad("'prompt' is a required property", "prompt")),
            Some(RawPrompt::Text(t)) => {
                let ids = tokenizer.encode(&t);
                let n = count(ids.len());
                (ids, n, keep_prompt.then(|| t.into_owned()))
            }
            Some(RawPrompt::Ids(ids)) => {
                let n = count(ids.len());
                (ids, n, None)
            }
            Some(RawPrompt::Texts(ts)) => {
                let mut total = 0usize;
                let mut first = Vec::new();
                for (i, t) in ts.iter().enumerate() {
                    let ids = tokenizer.encode(t);
                    total += ids.len();
                    if i == 0 {
                        first = ids;
                    }
                }
                let text = keep_prompt
                    .then(|| ts.first().map(|t| t.to_string()))
                    .flatten();
                (first, count(total), text)
            }
            Some(RawPrompt::IdLists(lists)) => {
                let total = lists.iter().map(Vec::len).sum();
                let first = lists.into_iter().next().unwrap_or_default();
                (first, count(total), None)
            }
        },
        Endpoint::Embeddings => {
            if raw.input.is_none() {
                return Err(bad("'input' is a required property", "input"));
            }
            (Vec::new(), 0, None)
        }
    };
    let include_usage = raw.stream_options.as_ref().and_then(|o| o.include_usage);
    Ok(RequestFacts {
        model,
        stream: raw.stream.unwrap_or(false),
        client_wants_usage: include_usage.unwrap_or(false),
        has_stream_options: raw.stream_options.is_some(),
        max_tokens,
        prompt_ids,
        prompt_tokens,
        cache_salt: raw.cache_salt.map(Cow::into_owned),
        prompt_text,
    })
}

/// `body` with `"stream_options":{"include_usage":true}` added as its last
/// member, without re-serializing the (possibly large) rest. Returns `None`
/// when the body is not a JSON object ending in `}`.
pub fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body[end] != b'}' {
        return None;
    }
    let inner_end = body[..end].iter().rposition(|b| !b.is_ascii_whitespace())?;
    let empty = body[inner_end] == b'{';
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let mut out = Vec::with_capacity(body.len() + MEMBER.len() + 1);
    out.extend_from_slice(&body[..end]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(MEMBER);
    out.push(b'}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policies::tokens::estimate_token_ids;

    fn est(_: &str) -> &'static Tokenizer {
        static EST: Tokenizer = Tokenizer::Estimate;
        &EST
    }

    #[test]
    fn chat_prompt_matches_the_shared_rendering() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hello "},{"type":"text","text":"there"}]}],"max_tokens":7,"stream":true}"#;
        let f = parse(Endpoint::Chat, body, true, est).unwrap();
        let want = render_chat(&[
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hello there".into(),
            },
        ]);
        assert_eq!(f.prompt_ids, estimate_token_ids(&want));
        assert_eq!(f.prompt_text.as_deref(), Some(want.as_str()));
        assert_eq!(
            (f.model.as_str(), f.stream, f.max_tokens),
            ("m", true, Some(7))
        );
        assert!(!f.client_wants_usage && !f.has_stream_options);
    }

    #[test]
    fn completions_accept_every_prompt_form() {
        let f = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":[1,2,3]}"#,
            false,
            est,
        )
        .unwrap();
        assert_eq!(f.prompt_ids, vec![1, 2, 3]);
        let f = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":["a b","c"]}"#,
            false,
            est,
        )
        .unwrap();
        assert_eq!(f.prompt_tokens, 3);
        let f = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":[[1],[2,3]],"max_completion_tokens":4,"max_tokens":9}"#,
            false,
            est,
        )
        .unwrap();
        assert_eq!((f.prompt_tokens, f.max_tokens), (3, Some(4)));
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        let e = parse(Endpoint::Chat, b"{not json", false, est).unwrap_err();
        assert_eq!(e.status(), 400);
        let e = parse(
            Endpoint::Chat,
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
            false,
            est,
        )
        .unwrap_err();
        assert!(e.to_string().contains("model"));
        let e = parse(Endpoint::Chat, br#"{"model":"m"}"#, false, est).unwrap_err();
        assert!(e.to_string().contains("messages"));
        let e = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"x","max_tokens":-1}"#,
            false,
            est,
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_tokens"));
        assert!(parse(Endpoint::Embeddings, br#"{"model":"m"}"#, false, est).is_err());
    }

    #[test]
    fn include_usage_is_spliced_in() {
        let out = with_include_usage(br#"{"model":"m","stream":true}  "#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let out = with_include_usage(b"{ }").unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        assert!(with_include_usage(b"[1]").is_none());
    }
}
