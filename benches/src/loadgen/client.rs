//! Sending one workload request over HTTP/1.1 and timing its response.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_policies::tokens::{estimate_token_count, render_chat};

use super::record::RequestRecord;
use super::sse::SseSplitter;
use crate::error::{BenchError, Result};
use crate::workload::WorkloadRequest;

/// Largest non-streaming response body (or error body) read.
const MAX_BODY_BYTES: usize = 16 << 20;

/// A pooled HTTP/1.1 client for one OpenAI-compatible base URL.
#[derive(Clone)]
pub struct ApiClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    authority: String,
    /// Served model name put in every request.
    pub model: String,
    api_key: Option<String>,
    /// Per-tenant API keys; a tenant without one sends `api_key`.
    tenant_keys: Arc<HashMap<String, String>>,
    /// Header carrying each request's conversation (prefix group, else id).
    session_header: Option<HeaderName>,
    /// Header carrying each request's workload tenant.
    tenant_header: Option<HeaderName>,
}

/// The response header in which the proxy names the experiment arm that served a request.
pub const ARM_HEADER: &str = "x-sluice-arm";

/// Parses a header name given on the command line (`flag` names it in the error).
pub fn header_name(flag: &'static str, name: &str) -> Result<HeaderName> {
    HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| BenchError::invalid(flag, format!("{name:?} is not a valid header name")))
}

impl ApiClient {
    /// A client for `base` (e.g. `http://127.0.0.1:8000`); `model` is looked
    /// up from `/v1/models` when `None`.
    pub async fn connect(
        base: &str,
        model: Option<String>,
        api_key: Option<String>,
    ) -> Result<Self> {
        let base = base
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| BenchError::invalid("target", format!("{base}: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(BenchError::invalid(
                "target",
                format!("{base}: only http:// targets are supported"),
            ));
        }
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .ok_or_else(|| BenchError::invalid("target", format!("{base}: no host")))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let mut c = ApiClient {
            client,
            base,
            authority,
            model: String::new(),
            api_key,
            tenant_keys: Arc::default(),
            session_header: None,
            tenant_header: None,
        };
        c.model = match model {
            Some(m) => m,
            None => c.first_model().await?,
        };
        Ok(c)
    }

    /// Sends each request's conversation — its `prefix_group`, else its workload id — in
    /// header `name`, so a proxy splitting by that header keeps a conversation on one arm.
    pub fn with_session_header(mut self, name: Option<HeaderName>) -> Self {
        self.session_header = name;
        self
    }

    /// Sends each request's workload tenant in header `name`.
    pub fn with_tenant_header(mut self, name: Option<HeaderName>) -> Self {
        self.tenant_header = name;
        self
    }

    /// Authenticates each request with its workload tenant's key from `keys`
    /// (tenant → API key); tenants without one use the client's API key.
    pub fn with_tenant_keys(mut self, keys: HashMap<String, String>) -> Self {
        self.tenant_keys = Arc::new(keys);
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET `path`, returning status and body (bounded).
    pub async fn get(&self, path: &str) -> Result<(u16, Bytes)> {
        let req = Request::get(format!("{}{path}", self.base))
            .header(header::HOST, &self.authority)
            .body(Full::new(Bytes::new()))
            .map_err(|e| BenchError::Http(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| BenchError::Http(format!("GET {}{path}: timed out", self.base)))?
            .map_err(|e| BenchError::Http(format!("GET {}{path}: {e}", self.base)))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| BenchError::Http(format!("GET {}{path}: {e}", self.base)))?
            .to_bytes();
        Ok((status, body))
    }

    async fn first_model(&self) -> Result<String> {
        let (status, body) = self.get("/v1/models").await?;
        if status != 200 {
            return Err(BenchError::Http(format!(
                "GET {}/v1/models: HTTP {status}",
                self.base
            )));
        }
        let v: Value = serde_json::from_slice(&body)?;
        v["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                BenchError::Http(format!(
                    "{}/v1/models lists no model; pass --model",
                    self.base
                ))
            })
    }

    /// The JSON body for `req` and its prompt length in estimated tokens.
    pub fn body(&self, req: &WorkloadRequest) -> (Vec<u8>, u32) {
        let mut body = json!({
            "model": self.model,
            "max_tokens": req.max_tokens,
            "stream": req.stream,
            "user": req.tenant,
        });
        let prompt_tokens;
        if req.is_chat() {
            let chat = req.chat_messages();
            prompt_tokens = estimate_token_count(&render_chat(&chat));
            let msgs: Vec<Value> = chat
                .into_iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            body["messages"] = Value::Array(msgs);
        } else {
            let prompt = req.rendered_prompt();
            prompt_tokens = estimate_token_count(&prompt);
            body["prompt"] = Value::String(prompt);
        }
        if req.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if req.ignore_eos {
            body["ignore_eos"] = Value::Bool(true);
        }
        (
            serde_json::to_vec(&body).unwrap_or_default(),
            prompt_tokens as u32,
        )
    }

    /// Sends `req` and records what happened; `start` is when it was sent.
    /// Transport and protocol failures become unsuccessful records, never errors.
    /// `rec` comes from [`RequestRecord::for_request`].
    pub async fn send(
        &self,
        req: &WorkloadRequest,
        body: Vec<u8>,
        mut rec: RequestRecord,
        start: Instant,
    ) -> RequestRecord {
        if let Err(e) = self.exchange(req, body, start, &mut rec).await {
            rec.success = false;
            rec.error = Some(e);
        }
        rec.latency_s = start.elapsed().as_secs_f64();
        rec
    }

    async fn exchange(
        &self,
        req: &WorkloadRequest,
        body: Vec<u8>,
        start: Instant,
        rec: &mut RequestRecord,
    ) -> std::result::Result<(), String> {
        let path = if req.is_chat() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let mut builder = Request::post(format!("{}{path}", self.base))
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json");
        let key = self.tenant_keys.get(&req.tenant).or(self.api_key.as_ref());
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if let Some(name) = &self.session_header {
            let session = req.prefix_group.as_deref().unwrap_or(&req.id);
            builder = builder.header(name, header_value(name, session)?);
        }
        if let Some(name) = &self.tenant_header {
            builder = builder.header(name, header_value(name, &req.tenant)?);
        }
        let http_req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = self
            .client
            .request(http_req)
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
        rec.status = resp.status().as_u16();
        rec.request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Read before the status check: the proxy labels its own errors with the arm too.
        rec.arm = resp
            .headers()
            .get(ARM_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = resp.into_body();
        if rec.status != 200 {
            let bytes = http_body_util::Limited::new(body, 64 << 10)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let msg = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| {
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
                });
            return Err(format!("HTTP {}: {msg}", rec.status));
        }
        if !req.stream {
            let bytes = http_body_util::Limited::new(body, MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading body: {e}"))?
                .to_bytes();
            let t = start.elapsed().as_secs_f64();
            rec.ttft_s = Some(t);
            let v: Value =
                serde_json::from_slice(&bytes).map_err(|e| format!("bad JSON response: {e}"))?;
            if let Some(u) = v.get("usage").and_then(|u| Usage::deserialize(u).ok()) {
                u.apply(rec);
            } else {
                let text = v["choices"][0]["message"]["content"]
                    .as_str()
                    .or(v["choices"][0]["text"].as_str())
                    .unwrap_or("");
                rec.output_tokens = estimate_token_count(text) as u32;
            }
            rec.success = true;
            return Ok(());
        }
        let mut sse = SseSplitter::default();
        let mut state = StreamState::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("stream broke: {}", error_chain(&e)))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let now = start.elapsed().as_secs_f64();
            sse.feed(data, |event| state.on_event(event, now, rec))?;
        }
        let now = start.elapsed().as_secs_f64();
        sse.finish(|event| state.on_event(event, now, rec));
        if let Some(e) = state.error {
            return Err(e);
        }
        if !state.done {
            return Err("stream ended without [DONE]".into());
        }
        if !state.usage_seen {
            rec.output_tokens = state.token_chunks;
        }
        rec.success = true;
        Ok(())
    }
}

/// `value` (from the workload file) as the value of header `name`.
fn header_value(name: &HeaderName, value: &str) -> std::result::Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("{value:?} cannot be sent as header {name}"))
}

/// An error and its sources on one line (hyper's top-level messages are terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

impl Usage {
    fn apply(&self, rec: &mut RequestRecord) {
        if let Some(p) = self.prompt_tokens {
            rec.prompt_tokens = p;
        }
        if let Some(c) = self.completion_tokens {
            rec.output_tokens = c;
        }
        if let Some(c) = self
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
        {
            rec.cached_tokens = Some(c);
        }
    }
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChoiceChunk<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChoiceChunk<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
}

#[derive(Default)]
struct StreamState {
    done: bool,
    usage_seen: bool,
    token_chunks: u32,
    error: Option<String>,
}

impl StreamState {
    fn on_event(&mut self, data: &str, now: f64, rec: &mut RequestRecord) {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let chunk: Chunk<'_> = match serde_json::from_str(data) {
            Ok(c) => c,
            Err(e) => {
                self.error
                    .get_or_insert_with(|| format!("bad SSE event: {e}"));
                return;
            }
        };
        if let Some(err) = chunk.error {
            let msg = err["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| err.to_string());
            self.error.get_or_insert(format!("error event: {msg}"));
            return;
        }
        let has_text = chunk.choices.iter().any(|c| {
            c.text.as_deref().is_some_and(|t| !t.is_empty())
                || c.delta.as_ref().is_some_and(|d| {
                    d.content.as_deref().is_some_and(|t| !t.is_empty())
                        || d.reasoning_content
                            .as_deref()
                            .is_some_and(|t| !t.is_empty())
                })
        });
        if has_text {
            self.token_chunks += 1;
            if rec.ttft_s.is_none() {
                rec.ttft_s = Some(now);
            } else {
                rec.chunk_times_s.push(now);
            }
        }
        if let Some(u) = chunk.usage {
            self.usage_seen = u.completion_tokens.is_some();
            u.apply(rec);
        }
    }
}
