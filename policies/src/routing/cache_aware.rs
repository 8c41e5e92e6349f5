//! `cache_aware`: send a request where its prefix most likely sits in KV
//! cache, unless that replica is overloaded — the policy of SGLang's router.
//!
//! The router remembers which blocks it sent where ([`PrefixIndex`]). A
//! request goes to the endpoint holding the longest run of its leading
//! blocks when that run covers at least `cache_threshold` of the prompt;
//! otherwise there is little cache to win and it goes to the least loaded
//! endpoint. The load guard: when the best-matching endpoint's load exceeds
//! the least loaded one's by more than `balance_abs_threshold` requests *and*
//! by more than `balance_rel_threshold` times, load wins over cache. Either
//! way the prompt is recorded against the chosen endpoint, since that is
//! where its blocks will now be cached.

use super::load::least_by;
use super::prefix_index::PrefixMatcher;
use super::{CacheAwareParams, Decision, EndpointView, Reason, RouteRequest, Router, request_load};

/// Longest prefix match, guarded by load balance.
#[derive(Debug)]
pub struct CacheAware {
    params: CacheAwareParams,
    prefixes: PrefixMatcher,
    calls: u64,
}

impl CacheAware {
    /// An empty index of `params.max_index_blocks` blocks, hash-keyed by `seed`.
    pub fn new(params: CacheAwareParams, seed: u64) -> Self {
        CacheAware {
            prefixes: PrefixMatcher::new(params.max_index_blocks, seed, params.tenant_scoped),
            params,
            calls: 0,
        }
    }
}

impl Router for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn pick(&mut self, req: &RouteRequest<'_>, endpoints: &[EndpointView<'_>]) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        self.calls = self.calls.wrapping_add(1);
        let blocks = req.block_hashes;
        let matches = self.prefixes.match_all(req, endpoints);

        let least = least_by(endpoints, self.calls, |_, ep| request_load(&ep.load));
        // Longest match; among equal matches the less loaded.
        let best_match = matches.iter().copied().max().unwrap_or(0);
        let best = least_by(endpoints, self.calls, |i, ep| {
            if matches[i] == best_match {
                request_load(&ep.load)
            } else {
                f64::INFINITY
            }
        });

        let hit = best_match > 0
            && f64::from(best_match) >= self.params.cache_threshold * blocks.len() as f64;
        let (index, reason) = if !hit {
            (least, Reason::PrefixMiss)
        } else {
            let best_load = request_load(&endpoints[best].load);
            let min_load = request_load(&endpoints[least].load);
            let imbalanced = best_load - min_load > self.params.balance_abs_threshold
                && best_load > self.params.balance_rel_threshold * min_load;
            if imbalanced {
                (least, Reason::Balance)
            } else {
                (best, Reason::PrefixHit)
            }
        };
        let matched_blocks = self.prefixes.record(blocks, index);
        Some(Decision {
            index,
            reason,
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
    use crate::routing::{EndpointLoad, RouteRequest};
    use proptest::prelude::*;

    fn prompt(seed: u64, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| mix64(seed << 20 | i)).collect()
    }

    fn params() -> CacheAwareParams {
        CacheAwareParams {
            max_index_blocks: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn shared_prefix_sticks_until_imbalance() {
        let keys = ["a", "b", "c", "d"];
        let mut p = CacheAware::new(params(), 1);
        let sys = prompt(1, 30);
        let first = p
            .pick(&request(&sys[..20]), &views(&keys, &[0; 4]))
            .unwrap();
        assert_eq!(first.reason, Reason::PrefixMiss);
        let home = first.index;
        // Longer conversations with the same start: hits on the same endpoint.
        let mut loads = [5u32; 4];
        for n in 21..30 {
            let d = p.pick(&request(&sys[..n]), &views(&keys, &loads)).unwrap();
            assert_eq!((d.index, d.reason), (home, Reason::PrefixHit));
            assert_eq!(d.matched_blocks as usize, n - 1);
        }
        // Home grows busy, but within the thresholds: still a hit.
        loads[home] = 30;
        let d = p.pick(&request(&sys), &views(&keys, &loads)).unwrap();
        assert_eq!((d.index, d.reason), (home, Reason::PrefixHit));
        // Past both thresholds (> 32 more and > 1.5x): balance wins.
        loads[home] = 40;
        let d = p.pick(&request(&sys), &views(&keys, &loads)).unwrap();
        assert_ne!(d.index, home);
        assert_eq!(d.reason, Reason::Balance);
        assert_eq!(d.matched_blocks, 0);
        assert!(p.state_size() >= 30);
    }

    #[test]
    fn small_matches_do_not_count_as_hits() {
        let keys = ["a", "b"];
        let mut p = CacheAware::new(params(), 1);
        let a = prompt(1, 10);
        let home = p.pick(&request(&a), &views(&keys, &[0, 0])).unwrap().index;
        // Shares 2 of 10 blocks (< 0.5): placed by load.
        let mut b = a[..2].to_vec();
        b.extend(prompt(2, 8));
        let mut loads = [0, 0];
        loads[home] = 3;
        let d = p.pick(&request(&b), &views(&keys, &loads)).unwrap();
        assert_eq!((d.index, d.reason), (1 - home, Reason::PrefixMiss));
    }

    #[test]
    fn tenant_scope_isolates() {
        let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let eps = views(&keys, &[0; 8]);
        let mut p = CacheAware::new(
            CacheAwareParams {
                tenant_scoped: true,
                ..params()
            },
            1,
        );
        let q = prompt(3, 10);
        let mut req = request(&q);
        req.tenant = "alice";
        p.pick(&req, &eps).unwrap();
        assert_eq!(p.pick(&req, &eps).unwrap().reason, Reason::PrefixHit);
        req.tenant = "bob";
        assert_eq!(p.pick(&req, &eps).unwrap().reason, Reason::PrefixMiss);
    }

    #[test]
    fn departed_endpoints_are_ignored() {
        let mut p = CacheAware::new(params(), 1);
        let q = prompt(4, 10);
        let all = ["a", "b", "c"];
        let home = p.pick(&request(&q), &views(&all, &[0; 3])).unwrap().index;
        let rest: Vec<&str> = all.iter().copied().filter(|k| *k != all[home]).collect();
        let d = p.pick(&request(&q), &views(&rest, &[0; 2])).unwrap();
        assert!(d.index < 2);
        assert_eq!(d.reason, Reason::PrefixMiss);
        // The new home is remembered.
        let d2 = p.pick(&request(&q), &views(&rest, &[0; 2])).unwrap();
        assert_eq!((d2.index, d2.reason), (d.index, Reason::PrefixHit));
    }

    /// Simulated traffic: each decision adds to the chosen endpoint's load,
    /// and every `finish_every` decisions all loads decay by one request.
    fn run(p: &mut CacheAware, prompts: &[Vec<u64>], n_eps: usize) -> (Vec<usize>, Vec<u32>) {
        let names: Vec<String> = (0..n_eps).map(|i| format!("ep{i}")).collect();
        let keys: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut loads = vec![0u32; n_eps];
        let mut picks = Vec::new();
        for (k, q) in prompts.iter().enumerate() {
            let eps: Vec<EndpointView<'_>> = keys
                .iter()
                .zip(&loads)
                .map(|(key, &l)| EndpointView {
                    key,
                    load: EndpointLoad {
                        in_flight: l,
                        ..Default::default()
                    },
                })
                .collect();
            let req = RouteRequest {
                block_hashes: q,
                ..request(&[])
            };
            let d = p.pick(&req, &eps).unwrap();
            loads[d.index] += 1;
            picks.push(d.index);
            if k % 2 == 1 {
                for l in &mut loads {
                    *l = l.saturating_sub(1);
                }
            }
        }
        (picks, loads)
    }

    proptest! {
        #[test]
        fn picks_in_range_and_index_bounded(
            n_eps in 1usize..20,
            seeds in proptest::collection::vec((0u64..30, 0usize..64), 1..150),
        ) {
            let mut p = CacheAware::new(CacheAwareParams { max_index_blocks: 1024, ..params() }, 2);
            let prompts: Vec<Vec<u64>> = seeds.iter().map(|&(s, n)| prompt(s, n)).collect();
            let (picks, _) = run(&mut p, &prompts, n_eps);
            prop_assert!(picks.iter().all(|&i| i < n_eps));
            prop_assert!(p.state_size() <= 1024);
        }

        #[test]
        fn unrelated_prompts_spread(seed in 0u64..1000) {
            let mut p = CacheAware::new(params(), seed);
            let prompts: Vec<Vec<u64>> = (0..400).map(|i| prompt(seed * 10_000 + i, 16)).collect();
            let (picks, _) = run(&mut p, &prompts, 4);
            let mut counts = [0usize; 4];
            for i in picks {
                counts[i] += 1;
            }
            // Misses go to the least loaded: within 25% of an even share.
            prop_assert!(counts.iter().all(|&c| (75..=125).contains(&c)), "{:?}", counts);
        }

        #[test]
        fn shared_prefix_groups_stick(seed in 0u64..1000) {
            let mut p = CacheAware::new(params(), seed);
            // 8 groups, each a shared 12-block prefix with a 4-block private tail.
            let prompts: Vec<Vec<u64>> = (0..160u64)
                .map(|i| {
                    let mut q = prompt(seed * 100 + i % 8, 12);
                    q.extend(prompt(seed * 100_000 + i, 4));
                    q
                })
                .collect();
            let (picks, _) = run(&mut p, &prompts, 4);
            for g in 0..8 {
                let homes: Vec<usize> = picks.iter().skip(g).step_by(8).copied().collect();
                prop_assert!(homes.iter().all(|&h| h == homes[0]), "group {} moved: {:?}", g, homes);
            }
        }
    }
}
