//! `least_requests`: the endpoint with the fewest requests in flight.
//!
//! The count is the proxy's own in-flight number, raised to the engine's
//! running + waiting when the scraped gauges are fresh and higher, so traffic
//! from other proxies is seen too (see [`super::request_load`]). Ties rotate,
//! so an idle pool still spreads sequential requests.

use super::load::least_by;
use super::{Decision, EndpointView, Reason, RouteRequest, Router, request_load};

/// Sends each request to the least busy endpoint.
#[derive(Debug, Default)]
pub struct LeastRequests {
    calls: u64,
}

impl Router for LeastRequests {
    fn name(&self) -> &'static str {
        "least_requests"
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
        let index = least_by(endpoints, self.calls, |_, ep| request_load(&ep.load));
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
    use crate::routing::{EndpointLoad, EngineGauges};

    #[test]
    fn picks_the_least_busy_and_sees_engine_queues() {
        let keys = ["a", "b", "c"];
        let mut eps = views(&keys, &[3, 1, 2]);
        let req = request(&[]);
        let mut p = LeastRequests::default();
        assert_eq!(p.pick(&req, &eps).unwrap().index, 1);
        // Another proxy has filled b: the engine says so.
        eps[1].load = EndpointLoad {
            in_flight: 1,
            in_flight_tokens: 0,
            engine: Some(EngineGauges {
                running: 4.0,
                waiting: 4.0,
                ..Default::default()
            }),
            in_flight_at_scrape: 1,
        };
        assert_eq!(p.pick(&req, &eps).unwrap().index, 2);
    }

    #[test]
    fn idle_pool_spreads_sequential_requests() {
        let keys = ["a", "b", "c", "d"];
        let eps = views(&keys, &[0, 0, 0, 0]);
        let mut p = LeastRequests::default();
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[p.pick(&request(&[]), &eps).unwrap().index] += 1;
        }
        assert!(counts.iter().all(|&c| c > 60), "{counts:?}");
    }
}
