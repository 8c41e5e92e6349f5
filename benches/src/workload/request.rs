//! The workload file format: JSON Lines, one request per line.
//!
//! ```json
//! {"id":"conv-3-t2","arrival_ms":1520.0,"tenant":"team-a","class":"chat","prefix_group":"conv-3",
//!  "messages":[{"role":"system","content":[{"seed":77,"tokens":1024}]},
//!              {"role":"user","content":"What is a KV cache?"}],
//!  "max_tokens":128,"stream":true,"ignore_eos":true}
//! ```
//!
//! A request has either `messages` (sent to `/v1/chat/completions`) or
//! `prompt` (sent to `/v1/completions`). Content is literal text or a list of
//! segments, each a token-length spec that renders to deterministic text (see
//! [`super::text`]); requests that start with the same segments share a
//! prefix, token for token.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sluice_policies::tokens::{ChatMessage, estimate_token_count, render_chat};

use super::text::push_segment_text;
use crate::error::{BenchError, Result};

/// A run of deterministic text: `tokens` estimated tokens generated from `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// Seed of the text; equal seeds and lengths give equal text.
    pub seed: u64,
    /// Length in estimated tokens.
    pub tokens: u32,
}

/// Message or prompt content: literal text, or segments rendered on send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Literal text.
    Text(String),
    /// Deterministic text from token-length specs.
    Segments(Vec<Segment>),
}

impl Content {
    /// Appends the content's text to `out`.
    pub fn push_text(&self, out: &mut String) {
        match self {
            Content::Text(t) => out.push_str(t),
            Content::Segments(segs) => {
                for s in segs {
                    push_segment_text(out, s.seed, s.tokens);
                }
            }
        }
    }

    /// The content as text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.push_text(&mut s);
        s
    }
}

/// One chat message of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// The message content.
    pub content: Content,
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRequest {
    /// Unique id within the workload.
    pub id: String,
    /// Arrival offset from the start of the run, in milliseconds.
    pub arrival_ms: f64,
    /// Tenant the request belongs to.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Request class (workload bookkeeping; the proxy classifies on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Shared-prefix group (system prompt, document or conversation id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_group: Option<String>,
    /// Chat messages (for `/v1/chat/completions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    /// Completion prompt (for `/v1/completions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Content>,
    /// Requested output tokens.
    pub max_tokens: u32,
    /// Whether to stream the response (SSE).
    #[serde(default = "yes")]
    pub stream: bool,
    /// Ask the engine to generate exactly `max_tokens` (vLLM's `ignore_eos`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

fn default_tenant() -> String {
    "default".to_string()
}

fn yes() -> bool {
    true
}

impl WorkloadRequest {
    /// Checks the fields a sender relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match (&self.messages, &self.prompt) {
            (Some(m), None) if !m.is_empty() => {}
            (Some(_), None) => return Err("`messages` is empty".into()),
            (None, Some(_)) => {}
            _ => return Err("exactly one of `messages` and `prompt` must be set".into()),
        }
        if !self.arrival_ms.is_finite() || self.arrival_ms < 0.0 {
            return Err(format!(
                "arrival_ms {} is not a non-negative number",
                self.arrival_ms
            ));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        Ok(())
    }

    /// True when the request goes to `/v1/chat/completions`.
    pub fn is_chat(&self) -> bool {
        self.messages.is_some()
    }

    /// Chat messages with their text rendered.
    pub fn chat_messages(&self) -> Vec<ChatMessage> {
        self.messages
            .iter()
            .flatten()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.to_text(),
            })
            .collect()
    }

    /// The text the engine sees as the prompt (chat rendered with the shared template).
    pub fn rendered_prompt(&self) -> String {
        match &self.prompt {
            Some(p) => p.to_text(),
            None => render_chat(&self.chat_messages()),
        }
    }

    /// Prompt length in estimated tokens.
    pub fn prompt_tokens_estimate(&self) -> u32 {
        estimate_token_count(&self.rendered_prompt()) as u32
    }
}

/// Reads a workload file, validating every line.
pub fn read_workload(path: &Path) -> Result<Vec<WorkloadRequest>> {
    let file = std::fs::File::open(path).map_err(|e| BenchError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| BenchError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let parse_err = |message: String| BenchError::Parse {
            path: path.to_path_buf(),
            line: Some(i + 1),
            message,
        };
        let req: WorkloadRequest =
            serde_json::from_str(&line).map_err(|e| parse_err(e.to_string()))?;
        req.validate().map_err(parse_err)?;
        out.push(req);
    }
    if out.is_empty() {
        return Err(BenchError::Parse {
            path: path.to_path_buf(),
            line: None,
            message: "the workload has no requests".into(),
        });
    }
    Ok(out)
}

/// Writes a workload as JSON Lines.
pub fn write_workload(path: &Path, requests: &[WorkloadRequest]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    let file = std::fs::File::create(path).map_err(|e| BenchError::io(path, e))?;
    let mut w = BufWriter::new(file);
    for r in requests {
        serde_json::to_writer(&mut w, r).map_err(|e| BenchError::io(path, e.into()))?;
        w.write_all(b"\n").map_err(|e| BenchError::io(path, e))?;
    }
    w.flush().map_err(|e| BenchError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> WorkloadRequest {
        WorkloadRequest {
            id: "a".into(),
            arrival_ms: 1.5,
            tenant: "t".into(),
            class: Some("chat".into()),
            prefix_group: Some("sys-1".into()),
            messages: Some(vec![
                Message {
                    role: "system".into(),
                    content: Content::Segments(vec![Segment {
                        seed: 3,
                        tokens: 40,
                    }]),
                },
                Message {
                    role: "user".into(),
                    content: Content::Text("hello there".into()),
                },
            ]),
            prompt: None,
            max_tokens: 16,
            stream: true,
            ignore_eos: true,
        }
    }

    #[test]
    fn round_trips_through_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.jsonl");
        let mut b = req();
        b.id = "b".into();
        b.messages = None;
        b.prompt = Some(Content::Text("x".into()));
        write_workload(&path, &[req(), b.clone()]).unwrap();
        let back = read_workload(&path).unwrap();
        assert_eq!(back, vec![req(), b]);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.jsonl");
        let good = serde_json::to_string(&req()).unwrap();
        std::fs::write(
            &path,
            format!("{good}\n{{\"id\":\"x\",\"arrival_ms\":0,\"max_tokens\":3}}\n"),
        )
        .unwrap();
        let err = read_workload(&path).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("exactly one"), "{err}");
        std::fs::write(&path, "not json\n").unwrap();
        assert!(
            read_workload(&path)
                .unwrap_err()
                .to_string()
                .contains(":1:")
        );
    }

    #[test]
    fn segment_prompt_token_count_is_exact_plus_template() {
        let r = req();
        let mut empty = r.clone();
        for m in empty.messages.iter_mut().flatten() {
            m.content = Content::Text(String::new());
        }
        // 40 segment tokens + the literal text's + the chat template's own tokens.
        let literal = estimate_token_count("hello there") as u32;
        assert_eq!(
            r.prompt_tokens_estimate(),
            40 + literal + empty.prompt_tokens_estimate()
        );
    }
}
