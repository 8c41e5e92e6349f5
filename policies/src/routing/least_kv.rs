//! `least_kv`: the endpoint with the most free KV cache.
//!
//! KV usage is what actually limits a vLLM replica (a full cache preempts
//! requests), so this balances long prompts better than request counts do.
//! It needs fresh engine gauges; when any candidate's are unknown the usages
//! are not comparable, and the policy falls back to fewest requests.

use super::load::least_by;
use super::{Decision, EndpointView, Reason, RouteRequest, Router, kv_load, request_load};

/// Sends each request to the endpoint with the lowest KV-cache usage.
#[derive(Debug)]
pub struct LeastKv {
    block_size: u32,
    calls: u64,
}

impl LeastKv {
    /// `block_size` converts the proxy's in-flight tokens into KV usage.
    pub fn new(block_size: u32) -> Self {
        LeastKv {
            block_size: block_size.max(1),
            calls: 0,
        }
    }
}

impl Router for LeastKv {
    fn name(&self) -> &'static str {
        "least_kv"
    }

    fn pick(
        &mut self,
        _req: &RouteRequest<'_>,
        endpoints: &[EndpointView<'_>],
    ) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        self.calls = self.calls.wrapping_add(1);
        let all_known = endpoints.iter().all(|ep| ep.load.engine.is_some());
        let (index, reason) = if all_known {
            // Request load breaks near-ties: a tenth of a percent of KV is noise.
            let i = least_by(endpoints, self.calls, |_, ep| {
                let kv = kv_load(&ep.load, self.block_size).unwrap_or(f64::INFINITY);
                (kv * 1000.0).round() * 1e6 + request_load(&ep.load)
            });
            (i, Reason::LeastLoaded)
        } else {
            let i = least_by(endpoints, self.calls, |_, ep| request_load(&ep.load));
            (i, Reason::Fallback)
        };
        Some(Decision {
            index,
            reason,
            matched_blocks: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::EngineGauges;
    use crate::routing::test_support::{request, views};

    fn with_kv(kv: f64) -> Option<EngineGauges> {
        Some(EngineGauges {
            kv_usage: kv,
            num_gpu_blocks: Some(1000),
            ..Default::default()
        })
    }

    #[test]
    fn lowest_kv_wins_and_unknown_falls_back() {
        let keys = ["a", "b", "c"];
        let mut eps = views(&keys, &[0, 5, 9]);
        eps[0].load.engine = with_kv(0.9);
        eps[1].load.engine = with_kv(0.2);
        eps[2].load.engine = with_kv(0.4);
        for ep in &mut eps {
            ep.load.in_flight_tokens = 0;
        }
        let mut p = LeastKv::new(16);
        let d = p.pick(&request(&[]), &eps).unwrap();
        assert_eq!((d.index, d.reason), (1, Reason::LeastLoaded));
        // In-flight tokens since the scrape count: 4000 tokens = 0.25 of 16k.
        eps[1].load.in_flight_tokens = 4000;
        assert_eq!(p.pick(&request(&[]), &eps).unwrap().index, 2);
        eps[2].load.engine = None;
        let d = p.pick(&request(&[]), &eps).unwrap();
        assert_eq!((d.index, d.reason), (0, Reason::Fallback));
    }
}
