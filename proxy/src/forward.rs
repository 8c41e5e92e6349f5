//! Forwarding one LLM request to a replica and relaying the answer.
//!
//! The body was already read (routing needs it), so the proxy writes it
//! upstream itself (Pingora's HTTP/1 client session over a pool of keep-alive
//! connections, see [`crate::upstream_pool`]) rather than through
//! pingora-proxy, whose body replay stops at 64 KiB. The response is relayed
//! as it arrives; streams are split into SSE events so each is timestamped
//! and the final `usage` read. Every wait is bounded (connect, first token,
//! idle gap, total). Retries go to another replica, only before anything
//! reached the client. When the client goes away the upstream connection is
//! dropped, not pooled, so the engine sees the close and frees its KV cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v1::client::HttpSession;
use sluice_policies::routing::RouteRequest;
use tokio::io::AsyncWriteExt;

use crate::config::Limits;
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::lifecycle::{Clock, Record};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::sse::{self, Splitter, Usage};
use crate::upstream_pool::{ConnectError, UpstreamPool};

/// Largest non-streaming response body copied aside to read its `usage`.
const MAX_USAGE_SCAN_BYTES: usize = 1 << 20;
/// Largest single SSE event buffered before it is passed on unsplit.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Requests up to this size are written upstream with a single write.
const COALESCE_BYTES: usize = 64 * 1024;

/// Request headers that describe one hop, not the request (RFC 9110 §7.6.1),
/// plus the ones the proxy sets itself.
const SKIP_REQUEST_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",
    "x-request-id",
];

/// Response headers not relayed (framing headers are kept: Pingora frames the
/// downstream body from them).
const SKIP_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "trailer",
    "upgrade",
    "x-request-id",
];

/// Everything one forward needs.
pub struct Forward<'a> {
    /// Pooled upstream connections.
    pub upstream: &'a UpstreamPool,
    /// Metrics to update.
    pub metrics: &'a Metrics,
    /// Wall-clock anchor for lifecycle timestamps.
    pub clock: &'a Clock,
    /// The pool chosen by classification.
    pub pool: &'a Arc<Pool>,
    /// The pool's arm whose router picks the replica (0 without an experiment).
    pub arm: usize,
    /// The arm's label for metrics and `x-sluice-arm` (empty: no arm).
    pub arm_label: &'a str,
    /// Retry budget.
    pub limits: &'a Limits,
    /// Upstream path and query.
    pub path: &'a str,
    /// The client's end-to-end headers, wire-encoded ([`encode_request_headers`]).
    pub headers: &'a [u8],
    /// The body to send (possibly with `include_usage` added).
    pub body: Bytes,
    /// The client asked for a stream.
    pub stream: bool,
    /// The proxy added `include_usage`: hide the usage-only chunk from the client.
    pub hide_usage_chunk: bool,
    /// Routing facts.
    pub route: RouteRequest<'a>,
    /// Prompt + planned output tokens, for the in-flight token count.
    pub load_tokens: u64,
    /// Headers the proxy adds to the response (the tenant's `x-ratelimit-*`).
    pub extra_headers: &'a [(&'static str, String)],
    /// Request id sent upstream and back.
    pub request_id: &'a str,
    /// When the request head was read.
    pub arrival: Instant,
}

/// The absolute bounds of one attempt.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    /// By when the first token must arrive (streams).
    first_token: Instant,
    /// By when everything must be done.
    total: Instant,
}

/// How one attempt ended.
enum Attempt {
    /// A response was relayed; the endpoint served the request.
    Relayed,
    /// The replica's own 5xx was relayed unchanged: the client has its answer,
    /// but the failure still counts against the replica.
    RelayedFailure,
    /// Failed before anything reached the client; another replica may be tried.
    Retryable(Failure, ProxyError),
    /// Failed in a way retrying cannot fix (timeout, client gone, mid-stream break).
    Final(ProxyError, Option<Failure>),
}

/// Why an attempt failed, for passive-ejection attribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Could not connect: always the replica's fault.
    Connect,
    /// Connection broke or the replica answered 5xx.
    Response,
}

impl Forward<'_> {
    /// Runs the attempts. `Ok` means a response (possibly an upstream error)
    /// was relayed; `Err` before anything was written means the caller sends
    /// the error, after that the response was cut short.
    pub async fn run(
        &self,
        session: &mut ServerSession,
        rec: &mut Record,
    ) -> Result<(), ProxyError> {
        let total_deadline = self.arrival + Duration::from_millis(self.pool.cfg.timeouts.total_ms);
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut failures: Vec<(Arc<Endpoint>, Failure)> = Vec::new();
        let mut last_error: Option<ProxyError> = None;
        let pool_name = self.pool.name().to_string();
        for attempt in 0..=self.limits.max_retries {
            if attempt > 0 {
                let backoff = Duration::from_millis(
                    self.limits
                        .retry_backoff_ms
                        .saturating_mul(1 << (attempt - 1).min(10)),
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = client_gone(session) => return Err(ProxyError::ClientGone),
                }
                if Instant::now() >= total_deadline {
                    break;
                }
            }
            let now = Instant::now();
            let Some(routed) = self.pool.route(self.arm, &self.route, now, &tried) else {
                break;
            };
            if attempt > 0 {
                rec.retries += 1;
                self.metrics.retries.with_label_values(&[&pool_name]).inc();
            }
            let policy = self.pool.policy(self.arm);
            let reason = routed.decision.reason.as_str();
            self.metrics
                .decisions
                .with_label_values(&[pool_name.as_str(), self.arm_label, policy, reason])
                .inc();
            rec.routed_ms = Some(self.clock.unix_ms(Instant::now()));
            rec.endpoint = Some(routed.endpoint.key.clone());
            rec.policy = Some(policy);
            rec.reason = Some(reason);
            rec.matched_blocks = Some(routed.decision.matched_blocks);
            if attempt == 0 {
                self.metrics
                    .routing_overhead
                    .with_label_values(&[&pool_name])
                    .observe(self.arrival.elapsed().as_secs_f64());
            }
            tried.push(Arc::clone(&routed.endpoint));
            let can_retry = attempt < self.limits.max_retries;
            let in_flight = routed.endpoint.start_request(self.load_tokens);
            let result = self
                .attempt(session, &routed.endpoint, can_retry, total_deadline, rec)
                .await;
            drop(in_flight);
            match result {
                Attempt::Relayed => {
                    let now = Instant::now();
                    // Another replica served this request, so earlier failures were theirs.
                    for (e, _) in &failures {
                        self.eject_if_needed(e, now);
                    }
                    routed.endpoint.record_success(now);
                    return Ok(());
                }
                Attempt::RelayedFailure => {
                    failures.push((Arc::clone(&routed.endpoint), Failure::Response));
                    self.attribute_unserved(&failures);
                    return Ok(());
                }
                Attempt::Retryable(kind, err) => {
                    failures.push((Arc::clone(&routed.endpoint), kind));
                    last_error = Some(err);
                }
                Attempt::Final(err, kind) => {
                    if let Some(kind) = kind {
                        failures.push((Arc::clone(&routed.endpoint), kind));
                    }
                    self.attribute_unserved(&failures);
                    return Err(err);
                }
            }
        }
        self.attribute_unserved(&failures);
        Err(last_error.unwrap_or(ProxyError::NoHealthyUpstream { pool: pool_name }))
    }

    /// A request no replica served: connect failures are still the replicas'
    /// fault, but response failures seen on two or more replicas are the
    /// request's, and eject nobody.
    fn attribute_unserved(&self, failures: &[(Arc<Endpoint>, Failure)]) {
        let now = Instant::now();
        let response_failures = failures
            .iter()
            .filter(|(_, k)| *k == Failure::Response)
            .count();
        for (e, kind) in failures {
            if *kind == Failure::Connect || response_failures < 2 {
                self.eject_if_needed(e, now);
            }
        }
    }

    fn eject_if_needed(&self, e: &Endpoint, now: Instant) {
        if self.pool.record_failure(e, now) {
            self.metrics
                .ejections
                .with_label_values(&[self.pool.name()])
                .inc();
            tracing::warn!(pool = %self.pool.name(), endpoint = %e.key, "endpoint ejected after repeated failures");
        }
    }

    /// The request as it goes upstream: head, and the body too when it is
    /// small enough for one write. Written straight to bytes: the client's
    /// headers were validated when Pingora parsed them, and building a
    /// `RequestHeader` only to serialize it again cost more than the rest of
    /// the forward together.
    fn upstream_request(&self, endpoint: &Endpoint) -> (Vec<u8>, bool) {
        let body = &self.body;
        let mut len = [0u8; 20];
        let len = format_usize(body.len(), &mut len);
        let head_len =
            64 + self.path.len() + self.headers.len() + endpoint.key.len() + self.request_id.len();
        let with_body = head_len + body.len() <= COALESCE_BYTES;
        let mut out = Vec::with_capacity(if with_body {
            head_len + body.len()
        } else {
            head_len
        });
        for part in [
            b"POST ".as_slice(),
            self.path.as_bytes(),
            b" HTTP/1.1\r\n",
            self.headers,
            b"host: ",
            endpoint.key.as_bytes(),
            b"\r\ncontent-length: ",
            len,
            b"\r\nx-request-id: ",
            self.request_id.as_bytes(),
            b"\r\n\r\n",
        ] {
            out.extend_from_slice(part);
        }
        if with_body {
            out.extend_from_slice(body);
        }
        (out, with_body)
    }

    /// One try against `endpoint`.
    async fn attempt(
        &self,
        session: &mut ServerSession,
        endpoint: &Arc<Endpoint>,
        can_retry: bool,
        total_deadline: Instant,
        rec: &mut Record,
    ) -> Attempt {
        let t = self.pool.cfg.timeouts;
        let connect_timeout = Duration::from_millis(t.connect_ms);
        let (wire, body_included) = self.upstream_request(endpoint);
        let mut fresh_only = false;
        let (mut up, sent_at) = loop {
            let pooled = if fresh_only {
                None
            } else {
                self.upstream.take(endpoint.addr)
            };
            let reused = pooled.is_some();
            let mut stream = match pooled {
                Some(s) => s,
                None => {
                    let connected = tokio::select! {
                        r = UpstreamPool::connect(endpoint.addr, connect_timeout) => r,
                        _ = client_gone(session) => return Attempt::Final(ProxyError::ClientGone, None),
                    };
                    match connected {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(endpoint = %endpoint.key, error = ?e, "connect failed");
                            let err = match e {
                                ConnectError::Timeout => {
                                    ProxyError::UpstreamFailed("connect timed out".into())
                                }
                                ConnectError::Io(_) => ProxyError::UpstreamFailed(
                                    "could not connect to a replica".into(),
                                ),
                            };
                            return Attempt::Retryable(Failure::Connect, err);
                        }
                    }
                }
            };
            // The head and body go out in one write (one packet for small requests).
            let body = &self.body;
            let wire = &wire;
            let send = async {
                stream.write_all(wire).await?;
                if !body_included {
                    stream.write_all(body).await?;
                }
                stream.flush().await
            };
            let sent = tokio::select! {
                r = tokio::time::timeout_at(total_deadline.into(), send) => r,
                _ = client_gone(session) => return Attempt::Final(ProxyError::ClientGone, None),
            };
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %endpoint.key, reused, error = %e, "send failed");
                    if reused {
                        // A keep-alive connection the replica closed while idle: not its fault.
                        fresh_only = true;
                        continue;
                    }
                    return Attempt::Retryable(
                        Failure::Response,
                        ProxyError::UpstreamFailed("the connection to the replica broke".into()),
                    );
                }
                Err(_) => return Attempt::Final(ProxyError::Timeout("total_timeout"), None),
            }
            let sent_at = Instant::now();
            let mut up = HttpSession::new(stream);
            let first_token_deadline =
                (sent_at + Duration::from_millis(t.first_token_ms)).min(total_deadline);
            let (head_deadline, head_timeout) = if self.stream {
                (first_token_deadline, "first_token_timeout")
            } else {
                (total_deadline, "total_timeout")
            };
            let got_head = tokio::select! {
                r = tokio::time::timeout_at(head_deadline.into(), up.read_response()) => r,
                _ = client_gone(session) => return Attempt::Final(ProxyError::ClientGone, None),
            };
            match got_head {
                Ok(Ok(_)) => break (up, sent_at),
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %endpoint.key, reused, error = %e, "no response head");
                    if reused {
                        fresh_only = true;
                        continue;
                    }
                    return Attempt::Retryable(
                        Failure::Response,
                        ProxyError::UpstreamFailed(
                            "the replica closed the connection without a response".into(),
                        ),
                    );
                }
                Err(_) => return Attempt::Final(ProxyError::Timeout(head_timeout), None),
            }
        };
        rec.upstream_sent_ms = Some(self.clock.unix_ms(sent_at));
        let first_token_deadline =
            (sent_at + Duration::from_millis(t.first_token_ms)).min(total_deadline);
        let Some(up_head) = up.resp_header() else {
            return Attempt::Retryable(
                Failure::Response,
                ProxyError::UpstreamFailed("the replica sent no response head".into()),
            );
        };
        let status = up_head.status.as_u16();
        rec.first_byte_ms = Some(self.clock.unix_ms(Instant::now()));
        if can_retry && (status == 502 || status == 503) {
            // Dropping `up` closes the connection; the body is not worth draining.
            return Attempt::Retryable(
                Failure::Response,
                ProxyError::UpstreamFailed(format!("the replica answered {status}")),
            );
        }
        let is_sse = self.stream
            && up_head
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
        let resp = match self.downstream_head(up_head, is_sse && self.hide_usage_chunk) {
            Ok(r) => r,
            Err(e) => return Attempt::Final(e, Some(Failure::Response)),
        };
        rec.status = status;
        let server_error = status >= 500;
        let outcome = self
            .relay_body(
                session,
                &mut up,
                resp,
                is_sse,
                Deadlines {
                    first_token: first_token_deadline,
                    total: total_deadline,
                },
                rec,
            )
            .await;
        match outcome {
            Ok(()) => {
                up.respect_keepalive();
                if let Some(stream) = up.reuse().await {
                    self.upstream.put(endpoint.addr, stream);
                }
                if server_error {
                    Attempt::RelayedFailure
                } else {
                    Attempt::Relayed
                }
            }
            Err(e) => {
                let upstream_fault = matches!(e, ProxyError::UpstreamFailed(_));
                let blame = upstream_fault.then_some(Failure::Response);
                if session.response_written().is_none() && upstream_fault && can_retry {
                    // Nothing reached the client yet, so another replica may still serve it.
                    Attempt::Retryable(Failure::Response, e)
                } else {
                    Attempt::Final(e, blame)
                }
            }
        }
    }

    fn downstream_head(
        &self,
        up: &ResponseHeader,
        rechunk: bool,
    ) -> Result<ResponseHeader, ProxyError> {
        let internal =
            |_| ProxyError::UpstreamFailed("the replica sent an invalid response head".into());
        let mut resp =
            // No case map: header names go out lowercase (HTTP/1.1 names are
            // case-insensitive), and every header is stored once, not twice.
            ResponseHeader::build_no_case(up.status, Some(up.headers.len() + 2))
                .map_err(internal)?;
        for (name, value) in up.headers.iter() {
            let n = name.as_str();
            if SKIP_RESPONSE_HEADERS.contains(&n)
                || (rechunk && (n == "content-length" || n == "transfer-encoding"))
            {
                continue;
            }
            resp.append_header(name.clone(), value.clone())
                .map_err(internal)?;
        }
        if rechunk {
            // A chunk is removed from the stream, so a length from upstream would be wrong.
            resp.insert_header("transfer-encoding", "chunked")
                .map_err(internal)?;
        }
        resp.insert_header("x-request-id", self.request_id)
            .map_err(internal)?;
        if !self.arm_label.is_empty() {
            // A `--arm` label that is no valid header value only loses the header.
            let _ = resp.insert_header("x-sluice-arm", self.arm_label);
        }
        for (name, value) in self.extra_headers {
            resp.insert_header(*name, value.as_str())
                .map_err(internal)?;
        }
        Ok(resp)
    }

    /// Relays the response: the head goes out with the first body bytes (so a
    /// replica that stalls or breaks before sending anything can still get a
    /// clean error status or a retry), then the body as it arrives. `Err`
    /// means it was cut short; if the head went out, a stream got an SSE
    /// error event first.
    async fn relay_body(
        &self,
        session: &mut ServerSession,
        up: &mut HttpSession,
        head: ResponseHeader,
        is_sse: bool,
        deadlines: Deadlines,
        rec: &mut Record,
    ) -> Result<(), ProxyError> {
        let Deadlines {
            first_token: first_token_deadline,
            total: total_deadline,
        } = deadlines;
        let idle = Duration::from_millis(self.pool.cfg.timeouts.idle_ms);
        let pool = self.pool.name();
        let mut pending = Some(Box::new(head));
        let mut splitter = Splitter::new(MAX_EVENT_BYTES);
        let mut events = Vec::new();
        let mut scan = BytesMut::new();
        let mut scan_overflow = false;
        let mut usage: Option<Usage> = None;
        let mut last_token: Option<Instant> = None;
        let mut first_token: Option<Instant> = None;
        // Looked up once per stream, and not at all for plain bodies.
        let token_hists = is_sse.then(|| {
            (
                self.metrics.ttft.with_label_values(&[pool, self.arm_label]),
                self.metrics.itl.with_label_values(&[pool, self.arm_label]),
            )
        });
        loop {
            let (deadline, what) = if is_sse && first_token.is_none() {
                (first_token_deadline, "first_token_timeout")
            } else {
                let d = Instant::now() + idle;
                if d < total_deadline {
                    (d, "idle_timeout")
                } else {
                    (total_deadline, "total_timeout")
                }
            };
            let read = tokio::select! {
                biased;
                r = tokio::time::timeout_at(deadline.into(), up.read_body_bytes()) => r,
                _ = client_gone(session) => return Err(ProxyError::ClientGone),
            };
            let chunk = match read {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "upstream body broke");
                    let err =
                        ProxyError::UpstreamFailed("the replica closed the stream early".into());
                    self.end_with_error(session, pending.is_none(), is_sse, &err)
                        .await;
                    return Err(err);
                }
                Err(_) => {
                    let err = ProxyError::Timeout(what);
                    self.end_with_error(session, pending.is_none(), is_sse, &err)
                        .await;
                    return Err(err);
                }
            };
            if !is_sse {
                if !scan_overflow {
                    if scan.len() + chunk.len() <= MAX_USAGE_SCAN_BYTES {
                        scan.extend_from_slice(&chunk);
                    } else {
                        scan_overflow = true;
                        scan = BytesMut::new();
                    }
                }
                send(session, &mut pending, chunk, false).await?;
                continue;
            }
            splitter.push(&chunk, &mut events);
            for event in events.drain(..) {
                let info = sse::inspect_event(&event);
                if info.usage.is_some() {
                    usage = info.usage;
                }
                if info.finish_reason.is_some() {
                    rec.finish_reason = info.finish_reason.clone();
                }
                if info.has_token {
                    let now = Instant::now();
                    match last_token {
                        None => {
                            first_token = Some(now);
                            rec.first_token_ms = Some(self.clock.unix_ms(now));
                            if let Some((ttft, _)) = &token_hists {
                                ttft.observe(
                                    now.saturating_duration_since(self.arrival).as_secs_f64(),
                                );
                            }
                        }
                        Some(prev) => {
                            if let Some((_, itl)) = &token_hists {
                                itl.observe(now.saturating_duration_since(prev).as_secs_f64());
                            }
                        }
                    }
                    last_token = Some(now);
                }
                if self.hide_usage_chunk && info.usage_only {
                    continue;
                }
                send(session, &mut pending, event, false).await?;
            }
        }
        if let Some(rest) = splitter.finish() {
            send(session, &mut pending, rest, false).await?;
        }
        send(session, &mut pending, Bytes::new(), true).await?;
        if !is_sse && !scan_overflow {
            let (u, finish_reason) = sse::inspect_response(&scan);
            usage = u;
            rec.finish_reason = finish_reason;
        }
        if let Some(last) = last_token {
            rec.last_token_ms = Some(self.clock.unix_ms(last));
        }
        if let Some(u) = usage {
            rec.prompt_tokens = Some(u.prompt_tokens);
            rec.output_tokens = Some(u.completion_tokens);
            rec.cached_tokens = u.cached_tokens();
        }
        Ok(())
    }

    /// Ends a response that is already under way after a failure: a stream
    /// gets the error as a final SSE event; a plain body is just cut off
    /// (the missing bytes tell the client it is incomplete).
    async fn end_with_error(
        &self,
        session: &mut ServerSession,
        head_sent: bool,
        is_sse: bool,
        err: &ProxyError,
    ) {
        if !head_sent {
            // The caller answers with a proper error status instead.
            return;
        }
        if is_sse {
            let _ = session.write_response_body(err.sse_event(), false).await;
            let _ = session.write_response_body(Bytes::new(), true).await;
        } else {
            session.set_keepalive(None);
        }
    }
}

/// Writes `data` to the client, preceded by the response head if it has not gone out yet.
async fn send(
    session: &mut ServerSession,
    pending: &mut Option<Box<ResponseHeader>>,
    data: Bytes,
    end: bool,
) -> Result<(), ProxyError> {
    if let Some(head) = pending.take() {
        session
            .write_response_header(head)
            .await
            .map_err(|_| ProxyError::ClientGone)?;
    }
    session
        .write_response_body(data, end)
        .await
        .map_err(|_| ProxyError::ClientGone)
}

/// Resolves when the client has closed its connection (or sent something
/// it should not have); pending otherwise. Only valid once the request body
/// was read completely.
pub async fn client_gone(session: &mut ServerSession) {
    loop {
        match session.read_body_or_idle(true).await {
            Err(_) => return,
            // Idle reads return data only for a pipelined request; keep waiting.
            Ok(_) => tokio::task::yield_now().await,
        }
    }
}

/// The client's end-to-end request headers as `name: value\r\n` lines, for
/// the upstream request: hop-by-hop headers and the ones the proxy sets
/// itself are left out.
pub fn encode_request_headers(head: &RequestHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for (name, value) in head.headers.iter() {
        if !SKIP_REQUEST_HEADERS.contains(&name.as_str()) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// `n` in decimal, without allocating.
fn format_usize(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}
