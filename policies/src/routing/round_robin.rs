//! `round_robin`: each request goes to the next endpoint in turn.

use super::{Decision, EndpointView, Reason, RouteRequest, Router};

/// Rotates through the endpoints it is given.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Router for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(
        &mut self,
        _req: &RouteRequest<'_>,
        endpoints: &[EndpointView<'_>],
    ) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        let index = self.next % endpoints.len();
        self.next = self.next.wrapping_add(1);
        Some(Decision {
            index,
            reason: Reason::Rotation,
            matched_blocks: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::EndpointLoad;

    #[test]
    fn rotates_evenly() {
        let keys = ["a", "b", "c"];
        let eps: Vec<_> = keys
            .iter()
            .map(|k| EndpointView {
                key: k,
                load: EndpointLoad::default(),
            })
            .collect();
        let req = RouteRequest {
            block_hashes: &[],
            prompt_tokens: 1,
            max_tokens: 1,
            tenant: "t",
            class: "c",
            now_ms: 0,
        };
        let mut rr = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(&req, &eps).unwrap().index).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert!(rr.pick(&req, &[]).is_none());
    }
}
