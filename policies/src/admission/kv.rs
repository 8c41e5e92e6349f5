//! KV demand of a request versus the pool's headroom.
//!
//! vLLM never refuses work: an overfull engine queues it and, once the KV
//! cache runs out, preempts running requests (recomputing them later), so
//! everyone's latency collapses. The gate admits a request only while the
//! pool's projected KV usage stays under a threshold. Two projections are
//! kept and the larger one counts:
//!
//! - the engines' scraped usage + what this proxy admitted since that scrape
//!   (the gauges cannot know it yet) — it sees other clients of the engines;
//! - what this proxy has admitted and not yet seen end, each request at its
//!   full expected size (prompt + expected output) — it sees that a request
//!   that just started will grow, and needs no scrape at all.
//!
//! The capacity is the scraped `num_gpu_blocks`, else the last one scraped,
//! else the configured `endpoint_kv_blocks` × the pool's endpoints, so the
//! gate is safe from the first request. With no capacity known at all it
//! admits (the queue bounds still hold).

use std::collections::VecDeque;

use crate::routing::EngineGauges;

/// Oldest own admission remembered as "since the last scrape".
const RECENT_HORIZON_MS: u64 = 10_000;
/// Most remembered admissions (older ones are folded away).
const RECENT_MAX: usize = 65_536;

/// KV blocks a request will occupy: uncached prompt tokens plus expected output.
pub fn demand_blocks(
    prompt_tokens: u32,
    cached_tokens: u32,
    expected_output_tokens: u32,
    block_size: u32,
) -> u64 {
    let tokens =
        u64::from(prompt_tokens.saturating_sub(cached_tokens)) + u64::from(expected_output_tokens);
    tokens.div_ceil(u64::from(block_size.max(1)))
}

/// The pool's engines as last scraped (fresh endpoints only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolSnapshot {
    /// Σ `num_gpu_blocks` of endpoints that report it.
    pub total_blocks: u64,
    /// Σ `kv_cache_usage_perc` × `num_gpu_blocks` over the same endpoints.
    pub used_blocks: f64,
    /// Σ `num_requests_waiting` over fresh endpoints.
    pub waiting: f64,
    /// Fresh endpoints.
    pub endpoints: u32,
    /// Time of the oldest scrape included (own admissions after it are not in the gauges).
    pub as_of_ms: u64,
}

impl PoolSnapshot {
    /// Aggregates fresh endpoints' gauges with their scrape times; `None` when there are none.
    pub fn from_gauges(gauges: impl IntoIterator<Item = (EngineGauges, u64)>) -> Option<Self> {
        let mut s = PoolSnapshot {
            total_blocks: 0,
            used_blocks: 0.0,
            waiting: 0.0,
            endpoints: 0,
            as_of_ms: u64::MAX,
        };
        for (g, scraped_ms) in gauges {
            s.endpoints += 1;
            s.as_of_ms = s.as_of_ms.min(scraped_ms);
            if g.waiting.is_finite() && g.waiting > 0.0 {
                s.waiting += g.waiting;
            }
            if let Some(blocks) = g.num_gpu_blocks.filter(|b| *b > 0) {
                let usage = if g.kv_usage.is_finite() {
                    g.kv_usage.clamp(0.0, 1.0)
                } else {
                    1.0
                };
                s.total_blocks += blocks;
                s.used_blocks += usage * blocks as f64;
            }
        }
        (s.endpoints > 0).then_some(s)
    }
}

/// Why the gate held a request back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Saturation {
    /// Projected KV usage over `max_kv_usage`.
    Kv,
    /// Engine waiting queues over `max_engine_waiting`.
    Waiting,
    /// `max_prefilling` requests per endpoint started within the engine's TTFT.
    Prefill,
}

impl Saturation {
    /// snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            Saturation::Kv => "kv_cache",
            Saturation::Waiting => "engine_queue",
            Saturation::Prefill => "prefill",
        }
    }
}

/// KV blocks held by one admitted request; give it back to [`KvGate::release`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "admitted demand must be released when the request ends"]
pub struct KvTicket {
    blocks: u64,
}

impl KvTicket {
    /// Blocks reserved.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
}

/// The pool's KV gate: thresholds plus the proxy's own admissions.
#[derive(Debug, Clone)]
pub struct KvGate {
    max_kv_usage: f64,
    max_engine_waiting: f64,
    endpoint_kv_blocks: Option<u64>,
    endpoints: u32,
    /// (most per endpoint, window): admissions younger than the window are still in prefill.
    prefill_limit: Option<(u32, u64)>,
    /// Admission times within the prefill window, oldest first.
    starts: VecDeque<u64>,
    /// (admitted at, blocks) since the oldest scrape that may not include them.
    recent: VecDeque<(u64, u64)>,
    recent_blocks: u64,
    in_flight_blocks: u64,
    last_total_blocks: Option<u64>,
}

impl KvGate {
    /// A gate with the pool's thresholds; `endpoint_kv_blocks` is the
    /// configured capacity of one endpoint, used until a scrape reports one.
    pub fn new(
        max_kv_usage: f64,
        max_engine_waiting: f64,
        endpoint_kv_blocks: Option<u64>,
    ) -> Self {
        KvGate {
            max_kv_usage,
            max_engine_waiting,
            endpoint_kv_blocks,
            endpoints: 1,
            prefill_limit: None,
            starts: VecDeque::new(),
            recent: VecDeque::new(),
            recent_blocks: 0,
            in_flight_blocks: 0,
            last_total_blocks: None,
        }
    }

    fn forget_before(&mut self, ms: u64) {
        while let Some(&(at, blocks)) = self.recent.front() {
            if at >= ms && self.recent.len() <= RECENT_MAX {
                break;
            }
            self.recent.pop_front();
            self.recent_blocks = self.recent_blocks.saturating_sub(blocks);
        }
    }

    /// Limits requests in prefill: at most `per_endpoint` admissions per
    /// endpoint within the last `window_ms` (the engine's own TTFT). Every
    /// prefill that runs at once lengthens the engine step, so each one more
    /// adds to every first token in flight.
    pub fn with_prefill_limit(mut self, per_endpoint: u32, window_ms: u64) -> Self {
        self.prefill_limit = Some((per_endpoint.max(1), window_ms.max(1)));
        self
    }

    /// Sets how many endpoints serve the pool now (sizes the configured capacity).
    pub fn set_endpoints(&mut self, endpoints: u32) {
        self.endpoints = endpoints.max(1);
    }

    /// Whether `demand` blocks may start now.
    pub fn check(
        &mut self,
        demand: u64,
        snapshot: Option<&PoolSnapshot>,
        now_ms: u64,
    ) -> Result<(), Saturation> {
        self.forget_before(now_ms.saturating_sub(RECENT_HORIZON_MS));
        // Endpoints as told, or as many as report gauges (a caller that never tells).
        let endpoints = snapshot.map_or(self.endpoints, |s| s.endpoints.max(self.endpoints));
        if let Some((per_endpoint, window_ms)) = self.prefill_limit {
            let since = now_ms.saturating_sub(window_ms);
            while self.starts.front().is_some_and(|&at| at <= since) {
                self.starts.pop_front();
            }
            let max = u64::from(per_endpoint) * u64::from(endpoints);
            if self.starts.len() as u64 >= max {
                return Err(Saturation::Prefill);
            }
        }
        // Scraped usage plus own admissions the scrape cannot include yet.
        let mut scraped_used = None;
        if let Some(s) = snapshot {
            self.forget_before(s.as_of_ms);
            if s.waiting > self.max_engine_waiting * f64::from(s.endpoints.max(1)) {
                return Err(Saturation::Waiting);
            }
            if s.total_blocks > 0 {
                self.last_total_blocks = Some(s.total_blocks);
                scraped_used = Some(s.used_blocks + self.recent_blocks as f64);
            }
        }
        let configured = self
            .endpoint_kv_blocks
            .map(|b| b.saturating_mul(u64::from(endpoints)));
        let Some(total) = self.last_total_blocks.or(configured) else {
            return Ok(());
        };
        let limit = self.max_kv_usage * total as f64;
        // A request larger than the whole allowance waits for an idle pool, not forever.
        let demand = (demand as f64).min(limit);
        let used = scraped_used
            .unwrap_or(0.0)
            .max(self.in_flight_blocks as f64);
        if used + demand > limit + 1e-9 {
            return Err(Saturation::Kv);
        }
        Ok(())
    }

    /// Records an admission of `demand` blocks.
    pub fn reserve(&mut self, demand: u64, now_ms: u64) -> KvTicket {
        self.recent.push_back((now_ms, demand));
        if self.prefill_limit.is_some() {
            // Bounded: `check` refuses past the limit, and old entries go on every check.
            if self.starts.len() >= RECENT_MAX {
                self.starts.pop_front();
            }
            self.starts.push_back(now_ms);
        }
        self.recent_blocks += demand;
        self.in_flight_blocks += demand;
        self.forget_before(now_ms.saturating_sub(RECENT_HORIZON_MS));
        KvTicket { blocks: demand }
    }

    /// Returns an admitted request's blocks when it ends.
    pub fn release(&mut self, ticket: KvTicket) {
        self.in_flight_blocks = self.in_flight_blocks.saturating_sub(ticket.blocks);
    }

    /// Blocks admitted and not yet released (a metric; 0 when idle).
    pub fn in_flight_blocks(&self) -> u64 {
        self.in_flight_blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(used: f64, waiting: f64, as_of_ms: u64) -> PoolSnapshot {
        PoolSnapshot::from_gauges([
            (
                EngineGauges {
                    running: 1.0,
                    waiting,
                    kv_usage: used,
                    num_gpu_blocks: Some(1000),
                },
                as_of_ms,
            ),
            (
                EngineGauges {
                    running: 1.0,
                    waiting: 0.0,
                    kv_usage: used,
                    num_gpu_blocks: Some(1000),
                },
                as_of_ms + 5,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn demand_counts_uncached_prompt_and_output() {
        assert_eq!(demand_blocks(1000, 0, 256, 16), 79);
        assert_eq!(demand_blocks(1000, 992, 0, 16), 1);
        assert_eq!(demand_blocks(10, 20, 0, 16), 0);
        assert_eq!(demand_blocks(16, 0, 0, 0), 16);
    }

    #[test]
    fn own_admissions_since_the_scrape_count() {
        let mut g = KvGate::new(0.9, 4.0, None);
        let s = snap(0.5, 0.0, 100);
        assert_eq!((s.total_blocks, s.endpoints, s.as_of_ms), (2000, 2, 100));
        // 1000 used of 1800 allowed: 800 free.
        assert_eq!(g.check(700, Some(&s), 200), Ok(()));
        let t = g.reserve(700, 200);
        assert_eq!(g.check(200, Some(&s), 210), Err(Saturation::Kv));
        // A newer scrape includes the admission (usage went up accordingly).
        let s2 = snap(0.85, 0.0, 300);
        assert_eq!(g.check(100, Some(&s2), 310), Ok(()));
        assert_eq!(g.check(200, Some(&s2), 310), Err(Saturation::Kv));
        g.release(t);
        assert_eq!(g.in_flight_blocks(), 0);
        // Engine queues over threshold: 10 waiting on 2 endpoints > 4 each.
        assert_eq!(
            g.check(1, Some(&snap(0.1, 10.0, 400)), 410),
            Err(Saturation::Waiting)
        );
    }

    #[test]
    fn without_gauges_own_demand_is_the_measure() {
        let mut g = KvGate::new(0.9, 4.0, None);
        assert_eq!(g.check(1_000_000, None, 0), Ok(()), "nothing known: admit");
        g.check(1, Some(&snap(0.0, 0.0, 0)), 0).unwrap();
        let a = g.reserve(1000, 1);
        assert_eq!(g.check(700, None, 2), Ok(()));
        assert_eq!(g.check(900, None, 2), Err(Saturation::Kv));
        g.release(a);
        assert_eq!(
            g.check(1_000_000, None, 3),
            Ok(()),
            "oversized waits only for an idle pool"
        );
    }

    #[test]
    fn configured_capacity_holds_before_the_first_scrape() {
        let mut g = KvGate::new(0.5, 4.0, Some(100));
        g.set_endpoints(2);
        // 2 × 100 blocks, half allowed: 100.
        assert_eq!(g.check(60, None, 0), Ok(()));
        let a = g.reserve(60, 0);
        assert_eq!(g.check(60, None, 1), Err(Saturation::Kv));
        assert_eq!(g.check(40, None, 1), Ok(()));
        // A scrape that reports capacity replaces the configured one.
        assert_eq!(g.check(800, Some(&snap(0.0, 0.0, 2)), 3), Ok(()));
        g.release(a);
        assert_eq!(g.in_flight_blocks(), 0);
    }

    #[test]
    fn admitted_requests_count_at_full_size_until_they_end() {
        let mut g = KvGate::new(0.9, 4.0, None);
        g.check(0, Some(&snap(0.0, 0.0, 100)), 100).unwrap();
        let a = g.reserve(1500, 110);
        // A later scrape sees only what the admitted requests hold so far
        // (200 blocks); they will grow to the 1500 reserved.
        let later = snap(0.1, 0.0, 200);
        assert_eq!(g.check(400, Some(&later), 210), Err(Saturation::Kv));
        assert_eq!(g.check(300, Some(&later), 210), Ok(()));
        g.release(a);
        assert_eq!(g.check(1500, Some(&later), 220), Ok(()));
    }

    #[test]
    fn prefill_limit_spaces_admissions_by_the_engine_ttft() {
        let mut g = KvGate::new(0.9, 4.0, Some(1000)).with_prefill_limit(1, 25);
        g.set_endpoints(2);
        // Two endpoints: two may start at once, the third waits 25 ms.
        for _ in 0..2 {
            g.check(1, None, 100).unwrap();
            let _ = g.reserve(1, 100);
        }
        assert_eq!(g.check(1, None, 110), Err(Saturation::Prefill));
        assert_eq!(g.check(1, None, 125), Ok(()));
        // A caller that never says how many endpoints: those reporting gauges count.
        let mut g = KvGate::new(0.9, 4.0, None).with_prefill_limit(1, 25);
        let s = snap(0.0, 0.0, 100);
        for _ in 0..2 {
            g.check(1, Some(&s), 100).unwrap();
            let _ = g.reserve(1, 100);
        }
        assert_eq!(g.check(1, Some(&s), 110), Err(Saturation::Prefill));
    }
}
