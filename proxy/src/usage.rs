//! Per-tenant usage accounting, quota and admission metrics.
//!
//! The same numbers go into the lifecycle records, so cost attribution from
//! the log and from Prometheus agree. The gauges of held slots, reserved
//! tokens and queued requests return to zero when the proxy is idle; tests
//! use them to prove that nothing leaks.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, core::Collector,
};

/// Queue-wait buckets, seconds.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The families; handles are cheap clones of the registered ones.
#[derive(Clone)]
pub struct UsageMetrics {
    /// `sluice_tenant_requests_total{tenant}`: admitted requests.
    pub requests: IntCounterVec,
    /// `sluice_tenant_prompt_tokens_total{tenant}`.
    pub prompt_tokens: IntCounterVec,
    /// `sluice_tenant_cached_prompt_tokens_total{tenant}`.
    pub cached_prompt_tokens: IntCounterVec,
    /// `sluice_tenant_completion_tokens_total{tenant}`.
    pub completion_tokens: IntCounterVec,
    /// `sluice_tenant_rejected_requests_total{tenant,reason}`.
    pub rejected: IntCounterVec,
    /// `sluice_tenant_concurrency_slots{tenant}`: concurrency slots held.
    pub slots: IntGaugeVec,
    /// `sluice_tenant_reserved_tokens{tenant}`: tokens reserved and not yet settled.
    pub reserved_tokens: IntGaugeVec,
    /// `sluice_admission_queue_length{pool}`.
    pub queue_len: IntGaugeVec,
    /// `sluice_admission_kv_reserved_blocks{pool}`: KV blocks of admitted requests.
    pub kv_blocks: IntGaugeVec,
    /// `sluice_admission_decisions_total{pool,outcome}`.
    pub decisions: IntCounterVec,
    /// `sluice_admission_queue_wait_seconds{pool}`.
    pub queue_wait: HistogramVec,
    /// `sluice_quota_backend_errors_total{backend,policy}`.
    pub backend_errors: IntCounterVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("invalid metric definition {name}: {e}"))
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("invalid metric definition {name}: {e}"))
}

impl UsageMetrics {
    /// Creates the families and registers them in `registry` (duplicates are ignored).
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            requests: counter(
                "sluice_tenant_requests_total",
                "Requests admitted past quota, by tenant.",
                &["tenant"],
            ),
            prompt_tokens: counter(
                "sluice_tenant_prompt_tokens_total",
                "Prompt tokens of finished requests, by tenant (upstream usage, else the proxy's count).",
                &["tenant"],
            ),
            cached_prompt_tokens: counter(
                "sluice_tenant_cached_prompt_tokens_total",
                "Prompt tokens served from prefix cache, by tenant (upstream usage).",
                &["tenant"],
            ),
            completion_tokens: counter(
                "sluice_tenant_completion_tokens_total",
                "Completion tokens of finished requests, by tenant (upstream usage).",
                &["tenant"],
            ),
            rejected: counter(
                "sluice_tenant_rejected_requests_total",
                "Requests refused by authentication, quota or admission, by tenant and reason.",
                &["tenant", "reason"],
            ),
            slots: gauge(
                "sluice_tenant_concurrency_slots",
                "Concurrency slots held, by tenant.",
                &["tenant"],
            ),
            reserved_tokens: gauge(
                "sluice_tenant_reserved_tokens",
                "Tokens reserved against the token budget and not yet settled, by tenant.",
                &["tenant"],
            ),
            queue_len: gauge(
                "sluice_admission_queue_length",
                "Requests waiting in the pool's admission queue.",
                &["pool"],
            ),
            kv_blocks: gauge(
                "sluice_admission_kv_reserved_blocks",
                "KV blocks admitted by this proxy and not yet released.",
                &["pool"],
            ),
            decisions: counter(
                "sluice_admission_decisions_total",
                "Admission outcomes, by pool: admitted, queued, dequeued, shed_429, shed_503, timeout, ttft_slo, cancelled.",
                &["pool", "outcome"],
            ),
            queue_wait: HistogramVec::new(
                HistogramOpts::new(
                    "sluice_admission_queue_wait_seconds",
                    "Time requests spent in the admission queue before admission.",
                )
                .buckets(WAIT_BUCKETS.to_vec()),
                &["pool"],
            )
            .unwrap_or_else(|e| panic!("invalid metric definition queue_wait: {e}")),
            backend_errors: counter(
                "sluice_quota_backend_errors_total",
                "Quota checks the backend could not answer, by backend and the fail policy applied.",
                &["backend", "policy"],
            ),
        };
        let all: Vec<Box<dyn Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.cached_prompt_tokens.clone()),
            Box::new(m.completion_tokens.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.slots.clone()),
            Box::new(m.reserved_tokens.clone()),
            Box::new(m.queue_len.clone()),
            Box::new(m.kv_blocks.clone()),
            Box::new(m.decisions.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.backend_errors.clone()),
        ];
        for c in all {
            // Names are distinct by construction; a duplicate only loses that family.
            let _ = registry.register(c);
        }
        m
    }

    /// Counts a refusal.
    pub fn reject(&self, tenant: &str, reason: &str) {
        self.rejected.with_label_values(&[tenant, reason]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn families_register_and_render() {
        let r = Registry::new();
        let m = UsageMetrics::new(&r);
        m.reject("a", "tokens_per_minute");
        m.slots.with_label_values(&["a"]).set(0);
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(
            "sluice_tenant_rejected_requests_total{reason=\"tokens_per_minute\",tenant=\"a\"} 1"
        ));
        assert!(text.contains("sluice_tenant_concurrency_slots{tenant=\"a\"} 0"));
    }
}
