//! The proxy's Prometheus metrics (`sluice_*`), served on the admin listener.
//!
//! Latency histograms use the same buckets as vLLM's own
//! (`vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
//! `vllm:e2e_request_latency_seconds`) so the two can be compared bucket by
//! bucket on one dashboard.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// vLLM's `time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's `inter_token_latency_seconds` buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's `e2e_request_latency_seconds` buckets.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Buckets for the proxy's own work before forwarding (parse, tokenize, classify, route).
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

/// Every metric family the proxy exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Finished requests by pool, arm, class and status.
    pub requests: IntCounterVec,
    /// Requests in progress by pool.
    pub in_flight: IntGaugeVec,
    /// Time to first token (streaming), by pool and arm.
    pub ttft: HistogramVec,
    /// Gap between token-carrying events (streaming), by pool and arm.
    pub itl: HistogramVec,
    /// Arrival to last byte, by pool and arm.
    pub e2e: HistogramVec,
    /// Arrival to the first upstream send attempt.
    pub routing_overhead: HistogramVec,
    /// Routing decisions by pool, arm, policy and reason.
    pub decisions: IntCounterVec,
    /// Retries by pool.
    pub retries: IntCounterVec,
    /// Prompt tokens by pool.
    pub prompt_tokens: IntCounterVec,
    /// Output tokens by pool.
    pub output_tokens: IntCounterVec,
    /// 1 when an endpoint passes health checks.
    pub upstream_healthy: IntGaugeVec,
    /// 1 when an endpoint is passively ejected.
    pub upstream_ejected: IntGaugeVec,
    /// Proxy requests in flight per endpoint.
    pub upstream_in_flight: IntGaugeVec,
    /// Seconds since the last good scrape of an endpoint.
    pub scrape_age: GaugeVec,
    /// Endpoints a pool can route to now (healthy, not ejected); 0 pages.
    pub pool_routable: IntGaugeVec,
    /// Ejections by pool.
    pub ejections: IntCounterVec,
    /// Router state entries (prefix-index size) per pool.
    pub prefix_index_entries: IntGaugeVec,
    /// Config reloads by result.
    pub reloads: IntCounterVec,
    /// Lifecycle records dropped because the writer fell behind.
    pub lifecycle_dropped: IntCounter,
    /// Open client connections.
    pub connections: IntGauge,
}

fn hist(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|_| unreachable_metric(name))
}

// Metric definitions are static; a failure is a programming error caught by the unit test.
fn unreachable_metric<T>(name: &str) -> T {
    panic!("invalid metric definition {name}")
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let registry = Registry::new();
        let cv = |n: &str, h: &str, l: &[&str]| {
            IntCounterVec::new(Opts::new(n, h), l).unwrap_or_else(|_| unreachable_metric(n))
        };
        let gv = |n: &str, h: &str, l: &[&str]| {
            IntGaugeVec::new(Opts::new(n, h), l).unwrap_or_else(|_| unreachable_metric(n))
        };
        let m = Self {
            requests: cv("sluice_requests_total", "Requests finished, by pool, experiment arm (empty: none), class and HTTP status.", &["pool", "arm", "class", "status"]),
            in_flight: gv("sluice_requests_in_flight", "Requests in progress.", &["pool"]),
            ttft: hist("sluice_time_to_first_token_seconds", "Time from arrival to the first token of a streamed response, by pool and experiment arm (empty: none).", TTFT_BUCKETS, &["pool", "arm"]),
            itl: hist("sluice_inter_token_latency_seconds", "Time between token-carrying events of a streamed response, by pool and experiment arm.", ITL_BUCKETS, &["pool", "arm"]),
            e2e: hist("sluice_e2e_request_latency_seconds", "Time from arrival to the last byte sent to the client, by pool and experiment arm.", E2E_BUCKETS, &["pool", "arm"]),
            routing_overhead: hist("sluice_routing_overhead_seconds", "Time from arrival (headers read) to the upstream send: body read, parse, tokenize, classify, route.", OVERHEAD_BUCKETS, &["pool"]),
            decisions: cv("sluice_routing_decisions_total", "Routing decisions, by pool, experiment arm (empty: none), policy and reason.", &["pool", "arm", "policy", "reason"]),
            retries: cv("sluice_upstream_retries_total", "Attempts on another replica before the first byte reached the client.", &["pool"]),
            prompt_tokens: cv("sluice_prompt_tokens_total", "Prompt tokens of finished requests.", &["pool"]),
            output_tokens: cv("sluice_generation_tokens_total", "Output tokens of finished requests (from upstream usage).", &["pool"]),
            upstream_healthy: gv("sluice_upstream_healthy", "1 when the endpoint passes active health checks.", &["pool", "endpoint"]),
            upstream_ejected: gv("sluice_upstream_ejected", "1 when the endpoint is passively ejected.", &["pool", "endpoint"]),
            upstream_in_flight: gv("sluice_upstream_in_flight", "Proxy requests in flight on the endpoint.", &["pool", "endpoint"]),
            scrape_age: GaugeVec::new(Opts::new("sluice_upstream_scrape_age_seconds", "Seconds since the endpoint's /metrics was last scraped successfully (-1: never)."), &["pool", "endpoint"]).unwrap_or_else(|_| unreachable_metric("scrape_age")),
            pool_routable: gv("sluice_pool_routable_endpoints", "Endpoints the pool can route to now (healthy and not ejected); 0 means its requests fail.", &["pool"]),
            ejections: cv("sluice_upstream_ejections_total", "Passive ejections.", &["pool"]),
            prefix_index_entries: gv("sluice_prefix_index_entries", "Entries in the pool router's bounded state (prefix index).", &["pool"]),
            reloads: cv("sluice_config_reloads_total", "Config reloads, by result.", &["result"]),
            lifecycle_dropped: IntCounter::new("sluice_lifecycle_dropped_total", "Lifecycle records dropped because the writer fell behind.").unwrap_or_else(|_| unreachable_metric("lifecycle_dropped")),
            connections: IntGauge::new("sluice_client_connections", "Open client connections on the API listener.").unwrap_or_else(|_| unreachable_metric("connections")),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.e2e.clone()),
            Box::new(m.routing_overhead.clone()),
            Box::new(m.decisions.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.output_tokens.clone()),
            Box::new(m.upstream_healthy.clone()),
            Box::new(m.upstream_ejected.clone()),
            Box::new(m.upstream_in_flight.clone()),
            Box::new(m.scrape_age.clone()),
            Box::new(m.pool_routable.clone()),
            Box::new(m.ejections.clone()),
            Box::new(m.prefix_index_entries.clone()),
            Box::new(m.reloads.clone()),
            Box::new(m.lifecycle_dropped.clone()),
            Box::new(m.connections.clone()),
        ];
        for c in collectors {
            // Names are distinct by construction; a duplicate would only lose that family.
            let _ = m.registry.register(c);
        }
        m
    }

    /// The registry, for families defined elsewhere (tenant usage, admission).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_register_and_render() {
        let m = Metrics::new();
        m.requests.with_label_values(&["p", "a", "c", "200"]).inc();
        m.ttft.with_label_values(&["p", "a"]).observe(0.05);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(
                "sluice_requests_total{arm=\"a\",class=\"c\",pool=\"p\",status=\"200\"} 1"
            )
        );
        assert!(text.contains(
            "sluice_time_to_first_token_seconds_bucket{arm=\"a\",pool=\"p\",le=\"0.06\"} 1"
        ));
        assert_eq!(
            m.registry.gather().len(),
            4,
            "only touched vec families and plain gauges show"
        );
    }
}
