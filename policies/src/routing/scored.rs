//! `scored`: a weighted sum of normalised scorers, highest wins.
//!
//! The shape of llm-d's and Envoy AI Gateway's endpoint pickers: each scorer
//! maps an endpoint to 0..=1 (1 best), the weights say how much each concern
//! matters, and no single signal can starve the others the way a strict
//! priority order would. Scorers:
//!
//! - `prefix`: fraction of the prompt's blocks the endpoint is believed to
//!   hold (from the same [`PrefixIndex`] as `cache_aware`);
//! - `queue`: 1 − engine waiting queue / the longest among the candidates;
//! - `kv`: 1 − KV usage (including tokens in flight from this proxy);
//! - `in_flight`: 1 − the proxy's in-flight requests / the busiest candidate's.
//!
//! Unknown engine gauges score 0 on `queue` and `kv`: a stale view is not an
//! idle one. When every candidate is unknown the terms are equal and drop out.

use super::load::{kv_load, rendezvous};
use super::prefix_index::PrefixMatcher;
use super::{Decision, EndpointView, Reason, RouteRequest, Router, ScoredParams};

/// Weighted normalised scoring.
#[derive(Debug)]
pub struct Scored {
    params: ScoredParams,
    prefixes: PrefixMatcher,
    calls: u64,
}

impl Scored {
    /// An empty prefix index of `params.max_index_blocks` blocks, hash-keyed by `seed`.
    pub fn new(params: ScoredParams, seed: u64) -> Self {
        Scored {
            prefixes: PrefixMatcher::new(params.max_index_blocks, seed, params.tenant_scoped),
            params,
            calls: 0,
        }
    }

    /// The weighted score of endpoint `ep`, whose prefix match is `matched` of
    /// the prompt's `blocks`, among candidates whose largest waiting queue and
    /// in-flight count are `max_waiting` and `max_in_flight`.
    fn score(
        params: &ScoredParams,
        matched: u32,
        ep: &EndpointView<'_>,
        max_waiting: f64,
        max_in_flight: f64,
        blocks: usize,
    ) -> f64 {
        let w = &params.weights;
        let prefix = if blocks == 0 {
            0.0
        } else {
            f64::from(matched) / blocks as f64
        };
        let (queue, kv) = match ep.load.engine {
            Some(g) => {
                let waiting = if g.waiting.is_finite() {
                    g.waiting.max(0.0)
                } else {
                    max_waiting
                };
                let queue = if max_waiting > 0.0 {
                    1.0 - waiting / max_waiting
                } else {
                    1.0
                };
                let kv = kv_load(&ep.load, params.block_size).unwrap_or(1.0);
                (queue, 1.0 - kv.clamp(0.0, 1.0))
            }
            None => (0.0, 0.0),
        };
        let in_flight = if max_in_flight > 0.0 {
            1.0 - f64::from(ep.load.in_flight) / max_in_flight
        } else {
            1.0
        };
        w.prefix * prefix + w.queue * queue + w.kv * kv + w.in_flight * in_flight
    }
}

impl Router for Scored {
    fn name(&self) -> &'static str {
        "scored"
    }

    fn pick(&mut self, req: &RouteRequest<'_>, endpoints: &[EndpointView<'_>]) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        self.calls = self.calls.wrapping_add(1);
        let blocks = req.block_hashes;
        let matches = self.prefixes.match_all(req, endpoints);

        let max_waiting = endpoints
            .iter()
            .filter_map(|ep| ep.load.engine.map(|g| g.waiting))
            .filter(|w| w.is_finite())
            .fold(0.0f64, f64::max);
        let max_in_flight = endpoints
            .iter()
            .map(|ep| f64::from(ep.load.in_flight))
            .fold(0.0f64, f64::max);

        let mut best = 0;
        let mut best_score = f64::NEG_INFINITY;
        let mut best_w = 0;
        for (i, ep) in endpoints.iter().enumerate() {
            let s = Self::score(
                &self.params,
                matches[i],
                ep,
                max_waiting,
                max_in_flight,
                blocks.len(),
            );
            let s = if s.is_finite() { s } else { f64::NEG_INFINITY };
            // Equal scores spread by a rotating rendezvous weight.
            if i == 0 || s > best_score {
                best = i;
                best_score = s;
                best_w = rendezvous(self.calls, ep.key);
            } else if s == best_score {
                let w = rendezvous(self.calls, ep.key);
                if w > best_w {
                    best = i;
                    best_w = w;
                }
            }
        }
        let matched_blocks = self.prefixes.record(blocks, best);
        Some(Decision {
            index: best,
            reason: Reason::Score,
            matched_blocks,
        })
    }

    fn state_size(&self) -> usize {
        self.prefixes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::load::mix64;
    use crate::routing::test_support::{request, views};
    use crate::routing::{EngineGauges, ScoreWeights};

    fn prompt(seed: u64, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| mix64(seed << 20 | i)).collect()
    }

    fn gauges(waiting: f64, kv: f64) -> Option<EngineGauges> {
        Some(EngineGauges {
            running: 1.0,
            waiting,
            kv_usage: kv,
            num_gpu_blocks: None,
        })
    }

    fn scored(weights: ScoreWeights) -> Scored {
        Scored::new(
            ScoredParams {
                weights,
                max_index_blocks: 4096,
                ..Default::default()
            },
            1,
        )
    }

    #[test]
    fn each_scorer_steers() {
        let keys = ["a", "b", "c"];
        let only = |prefix, queue, kv, in_flight| ScoreWeights {
            prefix,
            queue,
            kv,
            in_flight,
        };
        let mut eps = views(&keys, &[4, 1, 2]);
        eps[0].load.engine = gauges(0.0, 0.9);
        eps[1].load.engine = gauges(5.0, 0.5);
        eps[2].load.engine = gauges(3.0, 0.1);
        let q = prompt(1, 8);
        let req = request(&q);
        assert_eq!(
            scored(only(0.0, 1.0, 0.0, 0.0))
                .pick(&req, &eps)
                .unwrap()
                .index,
            0
        );
        assert_eq!(
            scored(only(0.0, 0.0, 1.0, 0.0))
                .pick(&req, &eps)
                .unwrap()
                .index,
            2
        );
        assert_eq!(
            scored(only(0.0, 0.0, 0.0, 1.0))
                .pick(&req, &eps)
                .unwrap()
                .index,
            1
        );
        // Prefix: route once by kv (to c), then a prefix-heavy policy follows the cache
        // even though c is now the busiest by in-flight.
        let mut p = scored(only(3.0, 0.0, 1.0, 1.0));
        let d = p.pick(&req, &eps).unwrap();
        assert_eq!((d.index, d.reason), (2, Reason::Score));
        eps[2].load.in_flight = 9;
        let d = p.pick(&req, &eps).unwrap();
        assert_eq!((d.index, d.matched_blocks), (2, 8));
        assert!(p.state_size() >= 8);
    }

    #[test]
    fn unknown_gauges_are_not_idle() {
        let keys = ["a", "b"];
        let mut eps = views(&keys, &[1, 1]);
        eps[0].load.engine = gauges(1.0, 0.3);
        let mut p = scored(ScoreWeights::default());
        assert_eq!(p.pick(&request(&[]), &eps).unwrap().index, 0);
    }
}
