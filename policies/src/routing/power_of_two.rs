//! `power_of_two`: sample two endpoints at random, take the less loaded.
//!
//! The classic "power of two choices": nearly as balanced as scanning every
//! endpoint, yet two proxies with the same stale view do not herd onto the
//! same idle replica, because their samples differ.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Decision, EndpointView, Reason, RouteRequest, Router, request_load};

/// Two random candidates, the one with fewer requests.
#[derive(Debug)]
pub struct PowerOfTwo {
    rng: SmallRng,
}

impl PowerOfTwo {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        PowerOfTwo {
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

impl Router for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn pick(
        &mut self,
        _req: &RouteRequest<'_>,
        endpoints: &[EndpointView<'_>],
    ) -> Option<Decision> {
        let n = endpoints.len();
        let index = match n {
            0 => return None,
            1 => 0,
            _ => {
                let a = self.rng.random_range(0..n);
                // A second, distinct candidate: shift by 1..n.
                let b = (a + self.rng.random_range(1..n)) % n;
                let (la, lb) = (
                    request_load(&endpoints[a].load),
                    request_load(&endpoints[b].load),
                );
                if lb < la { b } else { a }
            }
        };
        Some(Decision {
            index,
            reason: Reason::LeastLoaded,
            matched_blocks: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::{request, views};

    #[test]
    fn never_picks_the_busiest_of_many() {
        let keys = ["a", "b", "c", "d"];
        let eps = views(&keys, &[1, 2, 3, 100]);
        let mut p = PowerOfTwo::new(1);
        let mut counts = [0; 4];
        for _ in 0..1000 {
            counts[p.pick(&request(&[]), &eps).unwrap().index] += 1;
        }
        assert_eq!(counts[3], 0, "{counts:?}");
        // a wins whenever sampled: 1 - P(not sampled) = 1/2.
        assert!((400..600).contains(&counts[0]), "{counts:?}");
        let one = views(&["x"], &[5]);
        assert_eq!(p.pick(&request(&[]), &one).unwrap().index, 0);
    }
}
