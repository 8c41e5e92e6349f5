//! GCRA (generic cell rate algorithm) as a pure state function.
//!
//! The proxy enforces request rates with `governor`, which implements GCRA;
//! the Redis backend runs the same algorithm in a server-side script so a
//! fleet of proxies shares one limit. This function is the reference both are
//! tested against, and it yields the remaining/reset values for the
//! `x-ratelimit-*-requests` headers. The whole state is one number, the
//! theoretical arrival time (TAT).

/// A rate of `count` requests per `period_ms`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraLimit {
    /// Requests per period.
    pub count: u32,
    /// The period in milliseconds.
    pub period_ms: u64,
    /// Requests allowed back to back from idle (governor's burst size; usually `count`).
    pub burst: u32,
}

/// The outcome of one [`check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcraOutcome {
    /// Whether the request conforms.
    pub allowed: bool,
    /// The new TAT to store (unchanged when refused).
    pub tat_ms: f64,
    /// When refused, milliseconds until a retry would conform.
    pub retry_after_ms: u64,
    /// Requests that would still conform right now, after this one.
    pub remaining: u64,
    /// Milliseconds until the limiter is back to a full burst.
    pub reset_ms: u64,
}

impl GcraLimit {
    /// Milliseconds between requests at the sustained rate.
    pub fn emission_interval_ms(&self) -> f64 {
        self.period_ms.max(1) as f64 / f64::from(self.count.max(1))
    }
}

/// Checks one request arriving at `now_ms` against state `tat_ms` (`None` for a new key).
pub fn check(limit: &GcraLimit, tat_ms: Option<f64>, now_ms: u64) -> GcraOutcome {
    let t = limit.emission_interval_ms();
    let now = now_ms as f64;
    let burst = f64::from(limit.burst.max(1));
    // How far ahead of now the TAT may run: burst - 1 intervals.
    let tolerance = t * (burst - 1.0);
    let tat = tat_ms.unwrap_or(now).max(now);
    let new_tat = tat + t;
    let allow_at = new_tat - t - tolerance;
    let allowed = allow_at <= now;
    let stored = if allowed { new_tat } else { tat };
    let ahead = (stored - now).max(0.0);
    let remaining = ((tolerance + t - ahead) / t).floor().max(0.0) as u64;
    GcraOutcome {
        allowed,
        tat_ms: stored,
        retry_after_ms: if allowed {
            0
        } else {
            (allow_at - now).ceil() as u64
        },
        remaining,
        reset_ms: ahead.ceil() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let limit = GcraLimit {
            count: 10,
            period_ms: 1000,
            burst: 5,
        };
        let mut tat = None;
        let mut allowed = 0;
        for _ in 0..10 {
            let o = check(&limit, tat, 0);
            if o.allowed {
                allowed += 1;
                tat = Some(o.tat_ms);
            }
        }
        assert_eq!(allowed, 5, "a full burst from idle");
        let refused = check(&limit, tat, 0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 100);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_ms, 500);
        // One interval later exactly one more conforms.
        let o = check(&limit, tat, 100);
        assert!(o.allowed);
        assert!(!check(&limit, Some(o.tat_ms), 100).allowed);
        // After a long idle, back to a full burst.
        let o = check(&limit, Some(o.tat_ms), 10_000);
        assert_eq!((o.allowed, o.remaining), (true, 4));
    }

    #[test]
    fn sustained_rate_matches_count_per_period() {
        let limit = GcraLimit {
            count: 60,
            period_ms: 60_000,
            burst: 1,
        };
        let mut tat = None;
        let mut allowed = 0;
        for now in (0..60_000).step_by(100) {
            let o = check(&limit, tat, now);
            if o.allowed {
                allowed += 1;
                tat = Some(o.tat_ms);
            }
        }
        assert_eq!(allowed, 60);
    }
}
