//! A tenant's limits as configured, and the quota state that enforces them.

use serde::{Deserialize, Serialize};

use super::caps::{CapViolation, OutputCapMode, RequestCaps};
use super::concurrency::Concurrency;
use super::headers::RateLimitHeaders;
use super::token_budget::{TokenBudget, TokenReservation, TokenShortfall};
use crate::PolicyError;

/// The `limits` table of a tenant; every limit is optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Requests per second (enforced by the proxy's GCRA limiter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    /// Requests per minute (enforced by the proxy's GCRA limiter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute, reserved at admission and settled at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Most prompt tokens per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prompt_tokens: Option<u32>,
    /// Largest `max_tokens` per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    /// Most prompt + output tokens per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_context_tokens: Option<u32>,
    /// `reject` (default) or `clamp` a `max_tokens` over the caps.
    pub on_output_over_cap: OutputCapMode,
}

impl TenantLimits {
    /// Rejects zero limits (a limit of 0 locks the tenant out; remove the key instead).
    pub fn validate(&self, origin: &str) -> Result<(), PolicyError> {
        let zero = [
            (
                "requests_per_second",
                self.requests_per_second.map(u64::from),
            ),
            (
                "requests_per_minute",
                self.requests_per_minute.map(u64::from),
            ),
            ("tokens_per_minute", self.tokens_per_minute),
            ("max_concurrent", self.max_concurrent.map(u64::from)),
            ("max_prompt_tokens", self.max_prompt_tokens.map(u64::from)),
            ("max_output_tokens", self.max_output_tokens.map(u64::from)),
            ("max_context_tokens", self.max_context_tokens.map(u64::from)),
        ];
        for (key, v) in zero {
            if v == Some(0) {
                return Err(PolicyError::Invalid {
                    origin: origin.to_string(),
                    key: key.to_string(),
                    message: "0 would refuse every request; remove the key for no limit".into(),
                });
            }
        }
        Ok(())
    }

    /// The per-request caps.
    pub fn caps(&self) -> RequestCaps {
        RequestCaps {
            max_prompt_tokens: self.max_prompt_tokens,
            max_output_tokens: self.max_output_tokens,
            max_context_tokens: self.max_context_tokens,
            on_output_over_cap: self.on_output_over_cap,
        }
    }
}

/// Why a tenant's request was refused (a metric label and the error's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// Too many requests in flight.
    Concurrency,
    /// Token budget exhausted for now.
    TokenRate,
    /// The request alone costs more than a minute's token budget.
    TokenRequestTooLarge,
    /// Prompt over `max_prompt_tokens`.
    PromptTooLong,
    /// `max_tokens` over `max_output_tokens`.
    OutputTooLong,
    /// Prompt + output over `max_context_tokens`.
    ContextTooLong,
}

impl DenyReason {
    /// snake_case label for metrics and lifecycle records.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Concurrency => "concurrency",
            DenyReason::TokenRate => "tokens_per_minute",
            DenyReason::TokenRequestTooLarge => "request_over_token_budget",
            DenyReason::PromptTooLong => "max_prompt_tokens",
            DenyReason::OutputTooLong => "max_output_tokens",
            DenyReason::ContextTooLong => "max_context_tokens",
        }
    }

    /// The OpenAI error `type` (`requests` or `tokens`, as OpenAI's own 429s say).
    pub fn error_type(self) -> &'static str {
        match self {
            DenyReason::Concurrency => "requests",
            _ => "tokens",
        }
    }

    /// Whether waiting can help (false: the request itself is over a cap).
    pub fn retryable(self) -> bool {
        matches!(self, DenyReason::Concurrency | DenyReason::TokenRate)
    }
}

/// A refusal: 429 with this message, and `Retry-After` when `retry_after_ms` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Which limit.
    pub reason: DenyReason,
    /// When a retry may succeed (`None` when it never will).
    pub retry_after_ms: Option<u64>,
    /// Human-readable, naming the limit and the numbers.
    pub message: String,
}

/// What [`TenantQuota::admit`] granted; hand it back to [`TenantQuota::finish`] exactly once.
#[derive(Debug)]
#[must_use = "a grant holds a concurrency slot and a token reservation until finished"]
pub struct QuotaGrant {
    /// `max_tokens` to forward (lowered when clamped).
    pub max_tokens: u32,
    /// Whether `max_tokens` was clamped.
    pub clamped: bool,
    reservation: Option<TokenReservation>,
}

impl QuotaGrant {
    /// Tokens reserved against the budget (0 without a token limit).
    pub fn reserved_tokens(&self) -> u64 {
        self.reservation
            .as_ref()
            .map_or(0, TokenReservation::tokens)
    }
}

/// One tenant's quota state: token budget, concurrency slots and caps.
#[derive(Debug, Clone)]
pub struct TenantQuota {
    limits: TenantLimits,
    tokens: Option<TokenBudget>,
    concurrency: Concurrency,
}

impl TenantQuota {
    /// Fresh state for `limits` as of `now_ms` (budgets start full).
    pub fn new(limits: TenantLimits, now_ms: u64) -> Self {
        TenantQuota {
            tokens: limits
                .tokens_per_minute
                .map(|t| TokenBudget::new(t, now_ms)),
            concurrency: Concurrency::new(limits.max_concurrent),
            limits,
        }
    }

    /// Applies new limits (config reload) keeping usage, slots and reservations.
    pub fn set_limits(&mut self, limits: TenantLimits, now_ms: u64) {
        self.tokens = match (self.tokens.take(), limits.tokens_per_minute) {
            (Some(mut b), Some(t)) => {
                b.set_per_minute(t, now_ms);
                Some(b)
            }
            (None, Some(t)) => Some(TokenBudget::new(t, now_ms)),
            (_, None) => None,
        };
        self.concurrency.set_limit(limits.max_concurrent);
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> &TenantLimits {
        &self.limits
    }

    /// Checks caps, takes a slot and reserves prompt + `max_tokens` tokens, or
    /// refuses without holding anything.
    pub fn admit(
        &mut self,
        prompt_tokens: u32,
        max_tokens: u32,
        now_ms: u64,
    ) -> Result<QuotaGrant, Denial> {
        let caps = self.limits.caps().check(prompt_tokens, max_tokens).map_err(|v| {
            let (reason, message) = match v {
                CapViolation::Prompt { limit, actual } => (
                    DenyReason::PromptTooLong,
                    format!("prompt has {actual} tokens; this key allows at most {limit}"),
                ),
                CapViolation::Output { limit, actual } => (
                    DenyReason::OutputTooLong,
                    format!("max_tokens is {actual}; this key allows at most {limit}"),
                ),
                CapViolation::Context { limit, actual } => (
                    DenyReason::ContextTooLong,
                    format!(
                        "prompt + max_tokens is {actual} tokens; this key allows at most {limit}"
                    ),
                ),
            };
            Denial {
                reason,
                retry_after_ms: None,
                message,
            }
        })?;
        if !self.concurrency.try_acquire() {
            return Err(Denial {
                reason: DenyReason::Concurrency,
                // A slot frees when some request ends; a second is a polite guess.
                retry_after_ms: Some(1000),
                message: format!(
                    "too many concurrent requests: this key allows {}",
                    self.concurrency.limit().unwrap_or(u32::MAX)
                ),
            });
        }
        let cost = u64::from(prompt_tokens) + u64::from(caps.max_tokens);
        let reservation = match self.tokens.as_mut().map(|b| b.try_reserve(cost, now_ms)) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(short)) => {
                self.concurrency.release();
                let per_minute = self.limits.tokens_per_minute.unwrap_or(0);
                return Err(match short {
                    TokenShortfall::Wait { retry_after_ms } => Denial {
                        reason: DenyReason::TokenRate,
                        retry_after_ms: Some(retry_after_ms),
                        message: format!(
                            "token rate limit reached: {per_minute} tokens per minute; \
                             this request needs {cost} (prompt + max_tokens)"
                        ),
                    },
                    TokenShortfall::TooLarge => Denial {
                        reason: DenyReason::TokenRequestTooLarge,
                        retry_after_ms: None,
                        message: format!(
                            "this request needs {cost} tokens (prompt + max_tokens), more than \
                             the key's whole budget of {per_minute} per minute; lower max_tokens"
                        ),
                    },
                });
            }
        };
        Ok(QuotaGrant {
            max_tokens: caps.max_tokens,
            clamped: caps.clamped,
            reservation,
        })
    }

    /// Ends a granted request: frees its slot and settles its reservation
    /// against `actual_tokens` (prompt + completion as counted; on a cancel,
    /// what was produced before it).
    pub fn finish(&mut self, grant: QuotaGrant, actual_tokens: u64, now_ms: u64) {
        self.concurrency.release();
        if let (Some(r), Some(b)) = (grant.reservation, self.tokens.as_mut()) {
            b.settle(r, actual_tokens, now_ms);
        }
    }

    /// Requests holding a slot (a metric; must return to 0 when idle).
    pub fn in_flight(&self) -> u32 {
        self.concurrency.in_use()
    }

    /// Token-side header values (the request-side ones come from the rate limiter).
    pub fn headers(&self, now_ms: u64) -> RateLimitHeaders {
        let mut h = RateLimitHeaders::default();
        if let Some(b) = &self.tokens {
            h.limit_tokens = Some(b.per_minute());
            h.remaining_tokens = b.remaining(now_ms);
            h.reset_tokens_ms = b.reset_ms(now_ms);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> TenantLimits {
        TenantLimits {
            tokens_per_minute: Some(10_000),
            max_concurrent: Some(2),
            max_output_tokens: Some(1000),
            ..Default::default()
        }
    }

    #[test]
    fn parses_and_validates() {
        let l: TenantLimits = toml::from_str(
            "tokens_per_minute = 5000\nmax_concurrent = 4\non_output_over_cap = \"clamp\"",
        )
        .unwrap();
        assert_eq!(l.on_output_over_cap, OutputCapMode::Clamp);
        l.validate("t").unwrap();
        assert!(toml::from_str::<TenantLimits>("token_per_minute = 1").is_err());
        let zero = TenantLimits {
            max_concurrent: Some(0),
            ..Default::default()
        };
        let e = zero.validate("tenant a").unwrap_err().to_string();
        assert!(e.contains("max_concurrent"), "{e}");
    }

    #[test]
    fn each_limit_refuses_with_its_reason() {
        let mut q = TenantQuota::new(limits(), 0);
        let e = q.admit(10, 2000, 0).unwrap_err();
        assert_eq!(
            (e.reason, e.retry_after_ms),
            (DenyReason::OutputTooLong, None)
        );
        let a = q.admit(3000, 1000, 0).unwrap();
        let b = q.admit(3000, 1000, 0).unwrap();
        let e = q.admit(10, 10, 0).unwrap_err();
        assert_eq!(e.reason, DenyReason::Concurrency);
        assert!(e.message.contains('2'));
        q.finish(a, 3100, 0);
        // 10000 - 4000 - 4000 + 900 back = 2900 left.
        assert_eq!(q.headers(0).remaining_tokens, 2900);
        let e = q.admit(3000, 1000, 0).unwrap_err();
        assert_eq!(e.reason, DenyReason::TokenRate);
        // 1100 tokens short at 10000/min = 6.6 s.
        assert_eq!(e.retry_after_ms, Some(6600));
        assert_eq!(q.in_flight(), 1, "a refusal holds no slot");
        let e = q.admit(10_000, 1000, 0).unwrap_err();
        assert_eq!(e.reason, DenyReason::TokenRequestTooLarge);
        q.finish(b, 0, 0);
        assert_eq!(q.in_flight(), 0);
        let h = q.headers(0);
        assert_eq!((h.limit_tokens, h.remaining_tokens), (Some(10_000), 6900));
    }

    #[test]
    fn reload_keeps_usage() {
        let mut q = TenantQuota::new(limits(), 0);
        let g = q.admit(100, 100, 0).unwrap();
        q.set_limits(
            TenantLimits {
                max_concurrent: Some(1),
                ..limits()
            },
            0,
        );
        assert_eq!(
            q.admit(1, 1, 0).unwrap_err().reason,
            DenyReason::Concurrency
        );
        q.finish(g, 200, 0);
        assert_eq!(q.headers(0).remaining_tokens, 9800);
    }

    proptest! {
        #[test]
        fn no_slot_or_token_leaks(
            reqs in proptest::collection::vec((0u32..4000, 0u32..1500, 0u64..6000, any::<bool>()), 1..100),
        ) {
            let mut q = TenantQuota::new(limits(), 0);
            let mut held = Vec::new();
            for (i, (prompt, out, actual, finish_now)) in reqs.into_iter().enumerate() {
                let now = i as u64 * 10;
                if let Ok(g) = q.admit(prompt, out, now) {
                    prop_assert!(g.max_tokens <= 1000);
                    if finish_now {
                        q.finish(g, actual, now);
                    } else {
                        held.push(g);
                    }
                }
                prop_assert!(q.in_flight() <= 2);
            }
            for g in held {
                let r = g.reserved_tokens();
                q.finish(g, r, 0);
            }
            prop_assert_eq!(q.in_flight(), 0);
            prop_assert_eq!(q.headers(1_000_000).remaining_tokens, 10_000);
        }
    }
}
