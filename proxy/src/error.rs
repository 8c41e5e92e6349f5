//! The one error type of `sluice-proxy`, and the one place it becomes an
//! HTTP status and an OpenAI error body.

use bytes::Bytes;
use serde::Serialize;

/// Everything the proxy itself can answer with instead of an upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration file could not be read, parsed or validated.
    #[error("{0}")]
    Config(String),
    /// A listener could not be bound, or another start-up I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The request body is not valid JSON or misses a required field.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, safe to show the client.
        message: String,
        /// The offending request field, when there is one.
        param: Option<&'static str>,
    },
    /// No configured pool serves the requested model.
    #[error("The model `{0}` does not exist")]
    UnknownModel(String),
    /// The path is not one the proxy serves.
    #[error("Unknown request URL: {method} {path}")]
    NotFound {
        /// Request method.
        method: String,
        /// Request path (without the query).
        path: String,
    },
    /// The path exists but not for this method.
    #[error("Method {0} is not allowed for this URL")]
    MethodNotAllowed(String),
    /// The request body is larger than `limits.max_body_bytes`.
    #[error("Request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The request headers are larger than `limits.max_header_bytes`.
    #[error("Request headers exceed the limit of {limit} bytes")]
    HeadersTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The pool has no endpoint that is healthy and not ejected.
    #[error("No healthy replica is available for pool `{pool}`")]
    NoHealthyUpstream {
        /// The pool that was chosen for the request.
        pool: String,
    },
    /// Every attempt to reach a replica failed (connect error, reset, 502/503).
    #[error("The upstream replica failed: {0}")]
    UpstreamFailed(String),
    /// A configured bound on connect, first token, idle gap or total time was hit.
    #[error("The upstream replica timed out ({0})")]
    Timeout(&'static str),
    /// The client went away; nothing is sent back.
    #[error("client disconnected")]
    ClientGone,
    /// No API key, or one that matches no tenant (401).
    #[error("{}", .0.message())]
    Unauthorized(crate::tenant::AuthFailure),
    /// A tenant quota refused the request (429, 400 for per-request caps, 503
    /// when the quota backend is down and fails closed).
    #[error("{}", .0.message)]
    Quota(crate::quota::QuotaRefusal),
    /// Admission control shed the request (429: the tenant is over its share
    /// of the queue; 503: the pool is overloaded).
    #[error("{message}")]
    Shed {
        /// 429 or 503.
        status: u16,
        /// `queue_full`, `displaced` or `queue_timeout`.
        reason: &'static str,
        /// What happened, safe to show.
        message: String,
        /// For `Retry-After`.
        retry_after_ms: u64,
    },
}

/// The OpenAI error object: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorObject<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ProxyError {
    /// Shorthand for a 400 without a named parameter.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status the client sees.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::UnknownModel(_) | Self::NotFound { .. } => 404,
            Self::MethodNotAllowed(_) => 405,
            Self::BodyTooLarge { .. } => 413,
            Self::HeadersTooLarge { .. } => 431,
            Self::UpstreamFailed(_) => 502,
            Self::NoHealthyUpstream { .. } => 503,
            Self::Timeout(_) => 504,
            Self::Unauthorized(_) => 401,
            Self::Quota(r) => r.status,
            Self::Shed { status, .. } => *status,
            // 499 is the de-facto "client closed request" code; only ever logged.
            Self::ClientGone => 499,
            Self::Config(_) | Self::Io { .. } => 500,
        }
    }

    /// OpenAI's `type` field for this error.
    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. }
            | Self::UnknownModel(_)
            | Self::NotFound { .. }
            | Self::MethodNotAllowed(_)
            | Self::BodyTooLarge { .. }
            | Self::HeadersTooLarge { .. } => "invalid_request_error",
            Self::NoHealthyUpstream { .. } => "service_unavailable",
            Self::UpstreamFailed(_) => "upstream_error",
            Self::Timeout(_) => "timeout",
            Self::ClientGone | Self::Config(_) | Self::Io { .. } => "internal_error",
            Self::Unauthorized(_) => "invalid_request_error",
            Self::Quota(r) => match r.status {
                400 => "invalid_request_error",
                503 => "service_unavailable",
                _ if r.reason.contains("token") => "tokens",
                _ => "requests",
            },
            Self::Shed { status: 429, .. } => "requests",
            Self::Shed { .. } => "service_unavailable",
        }
    }

    /// OpenAI's `code` field for this error.
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::UnknownModel(_) => Some("model_not_found"),
            Self::BodyTooLarge { .. } => Some("request_too_large"),
            Self::HeadersTooLarge { .. } => Some("headers_too_large"),
            Self::NoHealthyUpstream { .. } => Some("no_healthy_upstream"),
            Self::UpstreamFailed(_) => Some("upstream_failed"),
            Self::Timeout(_) => Some("upstream_timeout"),
            Self::Unauthorized(f) => Some(f.as_str()),
            Self::Quota(r) => Some(r.code),
            Self::Shed { status: 429, .. } => Some("rate_limit_exceeded"),
            Self::Shed { .. } => Some("pool_overloaded"),
            _ => None,
        }
    }

    /// The short label used in lifecycle records and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Io { .. } => "io",
            Self::BadRequest { .. } => "bad_request",
            Self::UnknownModel(_) => "unknown_model",
            Self::NotFound { .. } => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::NoHealthyUpstream { .. } => "no_healthy_upstream",
            Self::UpstreamFailed(_) => "upstream_failed",
            Self::Timeout(what) => what,
            Self::ClientGone => "client_gone",
            Self::Unauthorized(f) => f.as_str(),
            Self::Quota(r) => r.reason,
            Self::Shed { reason, .. } => reason,
        }
    }

    /// The OpenAI error body. Messages are written by this crate and never
    /// carry upstream addresses (upstream failures are described by kind only).
    pub fn body(&self) -> Bytes {
        let param = match self {
            Self::BadRequest { param, .. } => *param,
            Self::UnknownModel(_) => Some("model"),
            Self::Quota(r) => r.param,
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorObject {
                message: self.to_string(),
                kind: self.kind(),
                param,
                code: self.code(),
            },
        };
        // Serializing a struct of strings cannot fail; fall back to a fixed body anyway.
        serde_json::to_vec(&body)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(br#"{"error":{"message":"internal error","type":"internal_error","param":null,"code":null}}"#))
    }

    /// Headers the error response carries besides the body: `Retry-After`
    /// and the `x-ratelimit-*` values of a quota refusal.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let retry = |ms: u64| {
            (
                "retry-after",
                sluice_policies::quota::retry_after_secs(ms).to_string(),
            )
        };
        match self {
            Self::Quota(r) => {
                let mut h = r.headers.clone();
                if let Some(ms) = r.retry_after_ms {
                    h.push(retry(ms));
                }
                h
            }
            Self::Shed { retry_after_ms, .. } => vec![retry(*retry_after_ms)],
            _ => Vec::new(),
        }
    }

    /// The same error as one SSE event, for failures after a stream started.
    pub fn sse_event(&self) -> Bytes {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.body());
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let e = ProxyError::UnknownModel("gpt-x".into());
        assert_eq!(e.status(), 404);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-x"));
        let t = ProxyError::Timeout("first_token_timeout");
        assert_eq!(t.status(), 504);
        assert!(t.sse_event().starts_with(b"data: {\"error\""));
        assert!(t.sse_event().ends_with(b"\n\n"));
    }
}
