//! `prefix_affinity`: consistent hashing with bounded load on the leading
//! prefix blocks.
//!
//! Requests whose first `prefix_blocks` blocks are equal (same system prompt,
//! same few-shot examples, same conversation so far) hash to the same point
//! of a ring of virtual nodes and so to the same replica, whose prefix cache
//! then serves them. Pure consistent hashing would let one hot prefix
//! overload its replica, so the bounded-load rule (Mirrokni, Thorup and
//! Zadimoghaddam, 2018) walks on along the ring past any endpoint that would
//! exceed ⌈(1+ε)·(total load + 1)/n⌉. Adding or removing an endpoint moves
//! only the prefixes whose ring arcs changed.

use super::load::{least_by, mix64};
use super::prefix_index::scope_of;
use super::{
    Decision, EndpointView, PrefixAffinityParams, Reason, RouteRequest, Router, request_load,
};
use crate::prefix::stable_hash;

/// Bounded-load consistent hashing of the leading prefix blocks.
#[derive(Debug)]
pub struct PrefixAffinity {
    params: PrefixAffinityParams,
    /// (ring point, endpoint key hash), sorted by point.
    ring: Vec<(u64, u64)>,
    /// Sorted key hashes the ring was built for.
    members: Vec<u64>,
    /// (key hash, index in the current slice), sorted; rebuilt every call.
    lookup: Vec<(u64, usize)>,
    visited: Vec<bool>,
    calls: u64,
}

impl PrefixAffinity {
    /// An empty ring; it is built from the first endpoint list it sees.
    pub fn new(params: PrefixAffinityParams) -> Self {
        PrefixAffinity {
            params,
            ring: Vec::new(),
            members: Vec::new(),
            lookup: Vec::new(),
            visited: Vec::new(),
            calls: 0,
        }
    }

    fn sync_ring(&mut self, endpoints: &[EndpointView<'_>]) {
        self.lookup.clear();
        self.lookup.extend(
            endpoints
                .iter()
                .enumerate()
                .map(|(i, ep)| (stable_hash(ep.key), i)),
        );
        self.lookup.sort_unstable();
        let same = self.members.len() == self.lookup.len()
            && self
                .members
                .iter()
                .zip(&self.lookup)
                .all(|(m, (h, _))| m == h);
        if same {
            return;
        }
        self.members.clear();
        self.members.extend(self.lookup.iter().map(|(h, _)| *h));
        self.members.dedup();
        self.ring.clear();
        for &h in &self.members {
            for v in 0..u64::from(self.params.virtual_nodes) {
                self.ring.push((mix64(h ^ mix64(v.wrapping_add(1))), h));
            }
        }
        self.ring.sort_unstable();
    }

    fn index_of(&self, key_hash: u64) -> Option<usize> {
        self.lookup
            .binary_search_by_key(&key_hash, |(h, _)| *h)
            .ok()
            .map(|pos| self.lookup[pos].1)
    }
}

impl Router for PrefixAffinity {
    fn name(&self) -> &'static str {
        "prefix_affinity"
    }

    fn pick(&mut self, req: &RouteRequest<'_>, endpoints: &[EndpointView<'_>]) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        self.calls = self.calls.wrapping_add(1);
        let Some(&anchor) = req.block_hashes.get(
            req.block_hashes
                .len()
                .min(self.params.prefix_blocks as usize)
                .wrapping_sub(1),
        ) else {
            // Shorter than one block: nothing to be affine to.
            let index = least_by(endpoints, self.calls, |_, ep| request_load(&ep.load));
            return Some(Decision {
                index,
                reason: Reason::Fallback,
                matched_blocks: 0,
            });
        };
        self.sync_ring(endpoints);
        let scope = if self.params.tenant_scoped {
            scope_of(req.tenant)
        } else {
            0
        };
        let point = mix64(anchor ^ scope);
        let total: f64 = endpoints.iter().map(|ep| request_load(&ep.load)).sum();
        let bound =
            ((1.0 + self.params.load_epsilon) * (total + 1.0) / endpoints.len() as f64).ceil();

        self.visited.clear();
        self.visited.resize(endpoints.len(), false);
        let start = self.ring.partition_point(|(p, _)| *p < point);
        let mut distinct = 0;
        for step in 0..self.ring.len() {
            let (_, key_hash) = self.ring[(start + step) % self.ring.len()];
            let Some(i) = self.index_of(key_hash) else {
                continue;
            };
            if self.visited[i] {
                continue;
            }
            self.visited[i] = true;
            distinct += 1;
            if request_load(&endpoints[i].load) + 1.0 <= bound {
                let reason = if distinct == 1 {
                    Reason::PrefixHit
                } else {
                    Reason::Balance
                };
                return Some(Decision {
                    index: i,
                    reason,
                    matched_blocks: 0,
                });
            }
            if distinct == endpoints.len() {
                break;
            }
        }
        // Unreachable with integer loads (the least loaded is always under the
        // bound), but gauges are floats: degrade to least loaded.
        let index = least_by(endpoints, self.calls, |_, ep| request_load(&ep.load));
        Some(Decision {
            index,
            reason: Reason::Balance,
            matched_blocks: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::{request, views};
    use proptest::prelude::*;

    fn prompt(seed: u64, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| mix64(seed << 20 | i)).collect()
    }

    #[test]
    fn same_prefix_sticks_and_different_prefixes_spread() {
        let keys = ["a", "b", "c", "d"];
        let eps = views(&keys, &[0, 0, 0, 0]);
        let mut p = PrefixAffinity::new(PrefixAffinityParams::default());
        let shared = prompt(1, 8);
        let first = p.pick(&request(&shared), &eps).unwrap();
        assert_eq!(first.reason, Reason::PrefixHit);
        for tail in 0..20 {
            // Same first four blocks, different continuations.
            let mut q = shared[..4].to_vec();
            q.extend(prompt(100 + tail, 4));
            assert_eq!(p.pick(&request(&q), &eps).unwrap().index, first.index);
        }
        let mut counts = [0; 4];
        for seed in 0..400 {
            counts[p
                .pick(&request(&prompt(1000 + seed, 8)), &eps)
                .unwrap()
                .index] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
        let d = p.pick(&request(&[]), &eps).unwrap();
        assert_eq!(d.reason, Reason::Fallback);
    }

    #[test]
    fn overloaded_home_is_skipped() {
        let keys = ["a", "b", "c", "d"];
        let mut p = PrefixAffinity::new(PrefixAffinityParams::default());
        let q = prompt(7, 8);
        let home = p
            .pick(&request(&q), &views(&keys, &[0, 0, 0, 0]))
            .unwrap()
            .index;
        let mut loads = [2, 2, 2, 2];
        loads[home] = 10;
        let d = p.pick(&request(&q), &views(&keys, &loads)).unwrap();
        assert_ne!(d.index, home);
        assert_eq!(d.reason, Reason::Balance);
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_prefixes() {
        let keys = ["a", "b", "c", "d", "e"];
        let eps = views(&keys, &[0; 5]);
        let fewer = views(&keys[..4], &[0; 4]);
        let mut p = PrefixAffinity::new(PrefixAffinityParams::default());
        let mut moved = 0;
        for seed in 0..200 {
            let q = prompt(seed, 4);
            let before = p.pick(&request(&q), &eps).unwrap().index;
            let after = p.pick(&request(&q), &fewer).unwrap().index;
            if before != 4 {
                moved += usize::from(before != after);
            }
        }
        assert_eq!(moved, 0);
    }

    proptest! {
        #[test]
        fn respects_the_load_bound(loads in proptest::collection::vec(0u32..50, 1..17), seed in 0u64..1000) {
            let names: Vec<String> = (0..loads.len()).map(|i| format!("10.0.0.{i}:8000")).collect();
            let keys: Vec<&str> = names.iter().map(String::as_str).collect();
            let eps = views(&keys, &loads);
            let mut p = PrefixAffinity::new(PrefixAffinityParams::default());
            let d = p.pick(&request(&prompt(seed, 6)), &eps).unwrap();
            prop_assert!(d.index < loads.len());
            let total: u32 = loads.iter().sum();
            let bound = (1.25 * f64::from(total + 1) / loads.len() as f64).ceil();
            prop_assert!(f64::from(loads[d.index]) + 1.0 <= bound);
        }
    }
}
