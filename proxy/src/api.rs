//! The OpenAI API listener: one request, end to end.
//!
//! accept → read head (431 when too large) → read body (bounded, 413) →
//! parse (400) → pick the pools serving the model (404) → count tokens and
//! hash prefix blocks → classify → [authenticate, quota and admission slot in
//! here: see `RequestGuard`] → experiment arm (when the pool splits its
//! traffic) → route → forward and relay → lifecycle record and metrics, on
//! every path.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use serde::Serialize;
use sluice_policies::admission::AdmissionRequest;
use sluice_policies::classify::RequestShape;
use sluice_policies::prefix::block_hashes;
use sluice_policies::routing::RouteRequest;
use sluice_policies::tokenizer::Tokenizer;

use crate::admission::NotAdmitted;
use crate::body::{self, Endpoint};
use crate::error::ProxyError;
use crate::forward::{Forward, client_gone};
use crate::lifecycle::Record;
use crate::state::{Generation, Shared};
use crate::tenant::rewrite_body;

/// Token counting for requests whose model no pool serves (they get a 404 anyway).
static ESTIMATE: Tokenizer = Tokenizer::Estimate;

/// Tenant used until API keys map requests to tenants.
pub const DEFAULT_TENANT: &str = "default";

/// The API listener's app.
pub struct Api {
    shared: Arc<Shared>,
    max_header_bytes: usize,
    keepalive_secs: u64,
}

impl Api {
    /// An app serving the current generation of `shared`.
    pub fn new(shared: Arc<Shared>, max_header_bytes: usize, keepalive_secs: u64) -> Self {
        Self {
            shared,
            max_header_bytes,
            keepalive_secs,
        }
    }
}

/// Resources a request holds while it runs, released when it drops on every
/// path (success, error, client gone, panic unwind).
///
/// Issue 6 adds the tenant's quota reservation and the pool admission slot
/// here, acquired between classification and routing, so their release needs
/// no code on each exit path.
struct RequestGuard {
    in_flight: IntGauge,
}

impl RequestGuard {
    fn new(in_flight: IntGauge) -> Self {
        in_flight.inc();
        Self { in_flight }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

#[async_trait]
impl HttpServerApp for Api {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                // Pingora caps a request head at 1 MiB and a few hundred headers; say which limit.
                if matches!(e.etype(), pingora::ErrorType::InvalidHTTPHeader) {
                    let err = if e.to_string().contains("larger than")
                        || e.to_string().contains("TooManyHeaders")
                    {
                        ProxyError::HeadersTooLarge {
                            limit: self.max_header_bytes,
                        }
                    } else {
                        ProxyError::bad_request("The request head is not valid HTTP/1.1")
                    };
                    session.set_keepalive(None);
                    write_error(&mut session, &err, None, None).await;
                }
                return None;
            }
        }
        let arrival = Instant::now();
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(self.keepalive_secs));
        }
        let keep = self.handle(&mut session, arrival).await;
        if !keep {
            return None;
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(s)) => Some(ReusedHttpStream::from_reusable_stream(s, persistent)),
            _ => None,
        }
    }
}

fn head_size(session: &ServerSession) -> usize {
    let h = session.req_header();
    h.raw_path().len()
        + h.headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

impl Api {
    /// Serves one request; returns whether the connection may be reused.
    async fn handle(&self, session: &mut ServerSession, arrival: Instant) -> bool {
        let shared = &self.shared;
        let generation = shared.current();
        let request_id = session
            .get_header("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_request_id(v))
            .map(str::to_string)
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        let mut rec = Record {
            request_id: request_id.clone(),
            tenant: DEFAULT_TENANT.to_string(),
            arrival_ms: shared.clock.unix_ms(arrival),
            arm: shared.arm.clone(),
            ..Record::default()
        };
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.as_str().to_string();
        let api = match path.as_str() {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        };
        rec.api = api.map_or_else(|| path.clone(), |a| a.label().to_string());

        let result = if head_size(session) > self.max_header_bytes {
            session.set_keepalive(None);
            Err(ProxyError::HeadersTooLarge {
                limit: self.max_header_bytes,
            })
        } else {
            match (method.as_str(), api, path.as_str()) {
                ("POST", Some(api), _) => {
                    self.serve_llm(session, &generation, api, &request_id, arrival, &mut rec)
                        .await
                }
                ("GET", None, "/v1/models") => {
                    rec.status = 200;
                    write_json(session, 200, &models(&generation, shared), &request_id).await
                }
                (_, Some(_), _) | (_, None, "/v1/models") => {
                    Err(ProxyError::MethodNotAllowed(method.clone()))
                }
                _ => Err(ProxyError::NotFound {
                    method: method.clone(),
                    path: path.clone(),
                }),
            }
        };
        let keep = match &result {
            Ok(()) => true,
            Err(ProxyError::ClientGone) => {
                rec.status = 499;
                rec.error = Some("client_gone".into());
                false
            }
            Err(e) => {
                rec.error = Some(e.label().to_string());
                if session.response_written().is_none() {
                    rec.status = e.status();
                    write_error(session, e, Some(&request_id), rec.arm.as_deref()).await
                } else {
                    // The head already went out (a stream or body cut short): the
                    // connection's framing is no longer trustworthy.
                    false
                }
            }
        };
        let end = Instant::now();
        rec.end_ms = Some(shared.clock.unix_ms(end));
        let pool = rec.pool.clone().unwrap_or_default();
        let class = rec.class.clone().unwrap_or_default();
        let arm = rec.arm.as_deref().unwrap_or_default();
        shared
            .metrics
            .requests
            .with_label_values(&[pool.as_str(), arm, class.as_str(), &rec.status.to_string()])
            .inc();
        if api.is_some() && !pool.is_empty() {
            shared
                .metrics
                .e2e
                .with_label_values(&[pool.as_str(), arm])
                .observe(end.saturating_duration_since(arrival).as_secs_f64());
            if let Some(n) = rec.prompt_tokens {
                shared
                    .metrics
                    .prompt_tokens
                    .with_label_values(&[&pool])
                    .inc_by(u64::from(n));
            }
            if let Some(n) = rec.output_tokens {
                shared
                    .metrics
                    .output_tokens
                    .with_label_values(&[&pool])
                    .inc_by(u64::from(n));
            }
        }
        generation.lifecycle.emit(rec);
        keep
    }

    /// Chat, completions and embeddings: read, shape, classify, route, forward.
    async fn serve_llm(
        &self,
        session: &mut ServerSession,
        generation: &Generation,
        api: Endpoint,
        request_id: &str,
        arrival: Instant,
        rec: &mut Record,
    ) -> Result<(), ProxyError> {
        let limits = &generation.config.limits;
        // Who is asking, before spending anything on the body.
        let authorization = session
            .get_header("authorization")
            .and_then(|v| v.to_str().ok());
        let tenant = match generation.tenants.authenticate(authorization) {
            Ok(t) => t,
            Err(f) => {
                rec.tenant = String::new();
                self.shared.tenancy.metrics().reject("", f.as_str());
                // The body stays unread: the connection cannot be reused.
                session.set_keepalive(None);
                return Err(ProxyError::Unauthorized(f));
            }
        };
        rec.tenant = tenant.name.clone();
        let raw = read_body(session, limits.max_body_bytes).await?;
        // Pools serving one model share a tokenizer in any sane config; use the first one's.
        let facts = body::parse(
            api,
            &raw,
            generation.config.lifecycle.include_prompts,
            |model| {
                generation
                    .pools
                    .iter()
                    .find(|p| p.cfg.serves(model))
                    .map_or(&ESTIMATE, |p| &p.tokenizer)
            },
        )?;
        rec.model = Some(facts.model.clone());
        rec.stream = facts.stream;
        rec.prompt_tokens = Some(facts.prompt_tokens);
        rec.prompt = facts.prompt_text.clone();

        if !tenant.allows_model(&facts.model) {
            return Err(ProxyError::UnknownModel(facts.model.clone()));
        }
        let mut serving = generation.pools_for(&facts.model).peekable();
        let Some(first_pool) = serving.peek().map(|p| p.name().to_string()) else {
            return Err(ProxyError::UnknownModel(facts.model.clone()));
        };
        let eligible: Vec<&str> = serving.map(|p| p.name()).collect();

        // Borrowed until the upstream headers are encoded, before the first await.
        let client_head = session.req_header();
        let class = {
            // Scoped: the shape's header lookup is not `Sync` and must not live across an await.
            let lookup = |name: &str| client_head.headers.get(name).and_then(|v| v.to_str().ok());
            let shape = RequestShape {
                prompt_tokens: facts.prompt_tokens,
                max_tokens: facts.max_tokens,
                header: &lookup,
            };
            generation
                .classifier
                .classify(&shape, |p| eligible.contains(&p), Some(first_pool.as_str()))
                .ok_or_else(|| ProxyError::UnknownModel(facts.model.clone()))?
        };
        let pool = generation
            .pool(class.pool)
            .ok_or_else(|| ProxyError::UnknownModel(facts.model.clone()))?;
        rec.class = Some(class.class.to_string());
        rec.pool = Some(pool.name().to_string());
        rec.max_tokens = Some(class.max_tokens);
        // The experiment arm (its router picks the replica): sticky on the
        // tenant or a header when the pool's split says so.
        let arm = pool.arms().assign(&tenant.name, |name| {
            client_head.headers.get(name).and_then(|v| v.to_str().ok())
        });
        if let Some(name) = pool.arms().name(arm) {
            rec.arm = Some(name.to_string());
        }
        let arm_label = rec.arm.clone().unwrap_or_default();
        let path_and_query = client_head
            .uri
            .path_and_query()
            .map_or(api.path(), |pq| pq.as_str())
            .to_string();
        let upstream_headers = crate::forward::encode_request_headers(client_head);

        let _guard = RequestGuard::new(
            self.shared
                .metrics
                .in_flight
                .with_label_values(&[pool.name()]),
        );
        // Tenant quota, then the pool's KV-aware admission. Both hold their
        // reservations in guards that give them back when this function
        // returns, however it returns (finish, error, client gone).
        let quotas = self.shared.tenancy.quotas();
        let mut permit = quotas
            .admit(&tenant, facts.prompt_tokens, class.max_tokens)
            .await
            .map_err(ProxyError::Quota)?;
        let max_tokens = permit.max_tokens;
        rec.max_tokens = Some(max_tokens);
        let mut admission = None;
        if let Some(gate) = self.shared.tenancy.gate(pool) {
            let req = AdmissionRequest {
                tenant: &tenant.name,
                priority: tenant.priority,
                weight: tenant.weight,
                prompt_tokens: facts.prompt_tokens,
                cached_tokens: 0,
                max_tokens,
                ttft_slo_ms: class.ttft_slo_ms,
            };
            match gate.admit(&req, client_gone(session)).await {
                Ok((slot, _)) => admission = Some(slot),
                Err(NotAdmitted::ClientGone) => return Err(ProxyError::ClientGone),
                Err(NotAdmitted::Shed(shed)) => {
                    quotas.metrics().reject(&tenant.name, shed.reason.as_str());
                    return Err(ProxyError::Shed {
                        status: shed.status.http_status(),
                        reason: shed.reason.as_str(),
                        message: shed.message,
                        retry_after_ms: shed.retry_after_ms,
                    });
                }
            }
        }

        // Cache isolation: the tenant's salt scopes both vLLM's prefix cache
        // (`cache_salt` on the forwarded body) and the proxy's prefix index.
        let salt = tenant.effective_salt(facts.cache_salt.as_deref());
        let raw = if tenant.cache_salt.is_some() || permit.clamped {
            let cap = permit.clamped.then_some(max_tokens);
            let salt = tenant.cache_salt.as_ref().and(salt.as_deref());
            match rewrite_body(&raw, salt, cap) {
                Some(b) => Bytes::from(b),
                None => raw,
            }
        } else {
            raw
        };
        let hashes = block_hashes(&facts.prompt_ids, pool.cfg.block_size, salt.as_deref());
        let inject_usage = facts.stream
            && pool.cfg.stream_usage
            && !facts.has_stream_options
            && api != Endpoint::Embeddings;
        let body = match inject_usage
            .then(|| body::with_include_usage(&raw))
            .flatten()
        {
            Some(b) => Bytes::from(b),
            None => raw,
        };
        let hide_usage_chunk = inject_usage && !facts.client_wants_usage;
        let now_ms = self.shared.clock.mono_ms(Instant::now());
        let forward = Forward {
            upstream: &self.shared.upstream,
            metrics: &self.shared.metrics,
            clock: &self.shared.clock,
            pool,
            arm,
            arm_label: &arm_label,
            limits,
            path: &path_and_query,
            headers: &upstream_headers,
            body,
            stream: facts.stream,
            hide_usage_chunk,
            route: RouteRequest {
                block_hashes: &hashes,
                prompt_tokens: facts.prompt_tokens,
                max_tokens,
                tenant: &tenant.name,
                class: class.class,
                now_ms,
            },
            load_tokens: u64::from(facts.prompt_tokens) + u64::from(max_tokens),
            extra_headers: &permit.headers,
            request_id,
            arrival,
        };
        let result = forward.run(session, rec).await;
        if rec.prompt_tokens.is_none() {
            rec.prompt_tokens = Some(facts.prompt_tokens);
        }
        // Usage accounting and settlement, from the upstream's own usage when it sent one.
        let usage = quotas.metrics();
        let prompt = u64::from(rec.prompt_tokens.unwrap_or(facts.prompt_tokens));
        if rec.endpoint.is_some() {
            usage
                .prompt_tokens
                .with_label_values(&[&tenant.name])
                .inc_by(prompt);
        }
        if let Some(c) = rec.cached_tokens {
            usage
                .cached_prompt_tokens
                .with_label_values(&[&tenant.name])
                .inc_by(u64::from(c));
        }
        if let Some(out) = rec.output_tokens {
            usage
                .completion_tokens
                .with_label_values(&[&tenant.name])
                .inc_by(u64::from(out));
            permit.record_usage(prompt + u64::from(out));
            if let Some(slot) = admission.as_mut() {
                slot.record_output(out);
            }
        }
        result
    }
}

/// Reads the whole request body, refusing more than `limit` bytes.
async fn read_body(session: &mut ServerSession, limit: usize) -> Result<Bytes, ProxyError> {
    let declared = session
        .get_header("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        // The unread body makes the connection unusable for another request.
        session.set_keepalive(None);
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let expects_continue = session
        .get_header("expect")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue && session.write_continue_response().await.is_err() {
        return Err(ProxyError::ClientGone);
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    session.set_keepalive(None);
                    return Err(ProxyError::BodyTooLarge { limit });
                }
                if buf.is_empty() && declared == Some(chunk.len()) {
                    // The whole body in one read: keep it without copying.
                    return Ok(chunk);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                return Err(match e.etype() {
                    pingora::ErrorType::ReadTimedout | pingora::ErrorType::ConnectionClosed => {
                        ProxyError::ClientGone
                    }
                    _ if e.esource() == &pingora::ErrorSource::Downstream
                        && e.to_string().contains("Connection") =>
                    {
                        ProxyError::ClientGone
                    }
                    _ => {
                        session.set_keepalive(None);
                        ProxyError::bad_request("The request body could not be read")
                    }
                });
            }
        }
    }
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelCard>,
}

#[derive(Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

fn models(generation: &Generation, shared: &Shared) -> ModelList {
    let created = (shared.clock.unix_ms(generation.loaded_at) / 1000.0) as u64;
    let mut data: Vec<ModelCard> = Vec::new();
    for p in &generation.pools {
        let m = &p.cfg.model;
        if m != "*" && !data.iter().any(|c| &c.id == m) {
            data.push(ModelCard {
                id: m.clone(),
                object: "model",
                created,
                owned_by: "sluice",
            });
        }
    }
    ModelList {
        object: "list",
        data,
    }
}

async fn write_json<T: Serialize>(
    session: &mut ServerSession,
    status: u16,
    value: &T,
    request_id: &str,
) -> Result<(), ProxyError> {
    let body = serde_json::to_vec(value).map_err(|e| ProxyError::UpstreamFailed(e.to_string()))?;
    let mut h = ResponseHeader::build(status, Some(3)).map_err(|_| ProxyError::ClientGone)?;
    let _ = h.insert_header("content-type", "application/json");
    let _ = h.insert_header("content-length", body.len().to_string());
    let _ = h.insert_header("x-request-id", request_id);
    session
        .write_response_header(Box::new(h))
        .await
        .map_err(|_| ProxyError::ClientGone)?;
    session
        .write_response_body(Bytes::from(body), true)
        .await
        .map_err(|_| ProxyError::ClientGone)
}

/// Sends the proxy's own error (with the experiment arm, when the request had
/// one by then); returns whether the connection may be reused.
async fn write_error(
    session: &mut ServerSession,
    err: &ProxyError,
    request_id: Option<&str>,
    arm: Option<&str>,
) -> bool {
    let body = err.body();
    let Ok(mut h) = ResponseHeader::build(err.status(), Some(4)) else {
        return false;
    };
    let _ = h.insert_header("content-type", "application/json");
    let _ = h.insert_header("content-length", body.len().to_string());
    let _ = h.insert_header("x-sluice-error", "true");
    for (name, value) in err.headers() {
        let _ = h.insert_header(name, value);
    }
    if let Some(id) = request_id {
        let _ = h.insert_header("x-request-id", id);
    }
    if let Some(arm) = arm {
        let _ = h.insert_header("x-sluice-arm", arm);
    }
    if session.write_response_header(Box::new(h)).await.is_err() {
        return false;
    }
    session.write_response_body(body, true).await.is_ok()
}
