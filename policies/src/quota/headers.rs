//! The values of OpenAI's rate-limit headers and `Retry-After`.
//!
//! Clients (the official SDKs among them) read `x-ratelimit-*` to pace
//! themselves and `Retry-After` to back off, so both use the exact names and
//! formats OpenAI sends: reset times as durations like `1s`, `6m0s`, `20ms`.

/// Values for the six `x-ratelimit-*` headers; a `None` limit omits its three headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitHeaders {
    /// Requests allowed per window.
    pub limit_requests: Option<u64>,
    /// Requests left in the window.
    pub remaining_requests: u64,
    /// Milliseconds until the request limit is back to full.
    pub reset_requests_ms: u64,
    /// Tokens allowed per minute.
    pub limit_tokens: Option<u64>,
    /// Tokens left.
    pub remaining_tokens: u64,
    /// Milliseconds until the token budget is back to full.
    pub reset_tokens_ms: u64,
}

impl RateLimitHeaders {
    /// `(name, value)` pairs to set on a response.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(6);
        if let Some(limit) = self.limit_requests {
            out.push(("x-ratelimit-limit-requests", limit.to_string()));
            out.push((
                "x-ratelimit-remaining-requests",
                self.remaining_requests.to_string(),
            ));
            out.push((
                "x-ratelimit-reset-requests",
                format_reset(self.reset_requests_ms),
            ));
        }
        if let Some(limit) = self.limit_tokens {
            out.push(("x-ratelimit-limit-tokens", limit.to_string()));
            out.push((
                "x-ratelimit-remaining-tokens",
                self.remaining_tokens.to_string(),
            ));
            out.push((
                "x-ratelimit-reset-tokens",
                format_reset(self.reset_tokens_ms),
            ));
        }
        out
    }
}

/// A duration in OpenAI's reset format: `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let (s, frac) = (rem / 1000, rem % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        // Trim trailing zeros: 1.500 → 1.5.
        let f = format!("{frac:03}");
        format!("{s}.{}s", f.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_formats() {
        assert_eq!(format_reset(0), "0ms");
        assert_eq!(format_reset(20), "20ms");
        assert_eq!(format_reset(1000), "1s");
        assert_eq!(format_reset(1500), "1.5s");
        assert_eq!(format_reset(360_000), "6m0s");
        assert_eq!(format_reset(3_723_000), "1h2m3s");
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1001), 2);
        let h = RateLimitHeaders {
            limit_tokens: Some(1000),
            remaining_tokens: 10,
            reset_tokens_ms: 5,
            ..Default::default()
        };
        assert_eq!(
            h.pairs(),
            vec![
                ("x-ratelimit-limit-tokens", "1000".to_string()),
                ("x-ratelimit-remaining-tokens", "10".to_string()),
                ("x-ratelimit-reset-tokens", "5ms".to_string()),
            ]
        );
    }
}
