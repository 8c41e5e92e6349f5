//! `random`: a uniform choice from a seeded generator.
//!
//! Useful as the baseline of an A/B experiment: it ignores load and prefixes
//! entirely, and the seed makes a run replayable.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Decision, EndpointView, Reason, RouteRequest, Router};

/// Picks a uniformly random endpoint.
#[derive(Debug)]
pub struct RandomChoice {
    rng: SmallRng,
}

impl RandomChoice {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        RandomChoice {
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

impl Router for RandomChoice {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(
        &mut self,
        _req: &RouteRequest<'_>,
        endpoints: &[EndpointView<'_>],
    ) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        Some(Decision {
            index: self.rng.random_range(0..endpoints.len()),
            reason: Reason::Random,
            matched_blocks: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::{request, views};

    #[test]
    fn seeded_and_roughly_uniform() {
        let views = views(&["a", "b", "c", "d"], &[0, 0, 0, 0]);
        let req = request(&[]);
        let mut a = RandomChoice::new(7);
        let mut b = RandomChoice::new(7);
        let mut counts = [0; 4];
        for _ in 0..4000 {
            let d = a.pick(&req, &views).unwrap();
            assert_eq!(d, b.pick(&req, &views).unwrap());
            assert_eq!(d.reason, Reason::Random);
            counts[d.index] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
        assert!(a.pick(&req, &[]).is_none());
    }
}
