//! The `[pools.admission]` table: thresholds and queue policy of one pool.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::PolicyError;

/// Order in which a pool's admission queue releases requests (within a priority band).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueOrder {
    /// First come, first served.
    #[default]
    Fifo,
    /// Fewest prompt tokens first (short requests are not stuck behind long ones).
    ShortestFirst,
    /// Earliest deadline (arrival + the class's TTFT SLO) first.
    Deadline,
    /// Virtual-token-counter fairness across tenants, weighted.
    Fair,
}

impl QueueOrder {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueOrder::Fifo => "fifo",
            QueueOrder::ShortestFirst => "shortest_first",
            QueueOrder::Deadline => "deadline",
            QueueOrder::Fair => "fair",
        }
    }
}

impl fmt::Display for QueueOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tenant's priority band; every band is served before the next (bar starvation protection).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Humans waiting on a response.
    Interactive,
    /// Ordinary API traffic.
    #[default]
    Standard,
    /// Offline work that can wait; shed first.
    Batch,
}

impl Priority {
    /// Number of bands.
    pub const COUNT: usize = 3;

    /// Band index, 0 most important.
    pub fn band(self) -> usize {
        self as usize
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Standard => "standard",
            Priority::Batch => "batch",
        }
    }
}

/// Admission control settings of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Queue and gate requests at all (false: admit everything at once).
    pub enabled: bool,
    /// Highest projected KV-cache usage of the pool, 0..=1, at which a request is still admitted.
    pub max_kv_usage: f64,
    /// Highest engine waiting queue, averaged per endpoint, at which a request is still admitted.
    pub max_engine_waiting: f64,
    /// Queue order within a priority band.
    pub order: QueueOrder,
    /// Most requests waiting; beyond it the lowest priority is shed.
    pub max_queue_len: usize,
    /// Longest wait in the queue before a request is shed, in milliseconds.
    pub max_queue_wait_ms: u64,
    /// A request waiting this long is served before any band or order (starvation protection).
    pub starvation_ms: u64,
    /// Output tokens assumed per request when sizing KV demand (capped by `max_tokens`).
    pub expected_output_tokens: u32,
    /// `fair`: cost of one output token relative to one prompt token.
    pub output_token_cost: f64,
    /// Tokens per KV block of the pool's model.
    pub block_size: u32,
    /// `deadline`: TTFT target assumed for classes without one, in milliseconds.
    pub default_deadline_ms: u64,
    /// KV blocks of one replica (vLLM's `num_gpu_blocks`, see `sluice plan`),
    /// assumed until a scrape reports them, so the gate counts its own
    /// admitted demand against a capacity from the very first request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_kv_blocks: Option<u64>,
    /// Shed a request at once when its projected wait in the queue exceeds
    /// its TTFT budget (its class's `ttft_slo_ms`, else `default_deadline_ms`,
    /// minus `engine_ttft_ms`), and a queued request once its wait reaches
    /// that budget: an answer that would come too late is not worth the capacity.
    pub shed_on_ttft_slo: bool,
    /// The TTFT an engine adds once a request is admitted (prefill in a busy
    /// batch), in milliseconds; what remains of the SLO is the queue's budget.
    pub engine_ttft_ms: u64,
    /// Most requests per endpoint admitted within the last `engine_ttft_ms`
    /// (so still in prefill): prefills that run together lengthen the
    /// engine's step and so every one of their first tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prefilling: Option<u32>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            enabled: true,
            max_kv_usage: 0.9,
            max_engine_waiting: 4.0,
            order: QueueOrder::Fifo,
            max_queue_len: 1024,
            max_queue_wait_ms: 30_000,
            starvation_ms: 10_000,
            expected_output_tokens: 256,
            output_token_cost: 2.0,
            block_size: 16,
            default_deadline_ms: 2_000,
            endpoint_kv_blocks: None,
            shed_on_ttft_slo: false,
            engine_ttft_ms: 0,
            max_prefilling: None,
        }
    }
}

impl AdmissionConfig {
    /// Checks ranges; `origin` names the file and table in the error.
    pub fn validate(&self, origin: &str) -> Result<(), PolicyError> {
        let invalid = |key: &str, message: String| {
            Err(PolicyError::Invalid {
                origin: origin.to_string(),
                key: key.to_string(),
                message,
            })
        };
        if !(self.max_kv_usage > 0.0 && self.max_kv_usage <= 1.0) {
            return invalid(
                "max_kv_usage",
                format!("{} is not in (0, 1]", self.max_kv_usage),
            );
        }
        if !(self.max_engine_waiting.is_finite() && self.max_engine_waiting >= 0.0) {
            return invalid(
                "max_engine_waiting",
                format!("{} must be a finite number >= 0", self.max_engine_waiting),
            );
        }
        if !(1..=1_000_000).contains(&self.max_queue_len) {
            return invalid(
                "max_queue_len",
                format!("{} is not in 1..=1000000", self.max_queue_len),
            );
        }
        if self.max_queue_wait_ms == 0 {
            return invalid("max_queue_wait_ms", "must be > 0".into());
        }
        if self.starvation_ms == 0 {
            return invalid("starvation_ms", "must be > 0".into());
        }
        if !(self.output_token_cost.is_finite() && (0.0..=1000.0).contains(&self.output_token_cost))
        {
            return invalid(
                "output_token_cost",
                format!("{} is not in 0..=1000", self.output_token_cost),
            );
        }
        if self.default_deadline_ms == 0 {
            return invalid("default_deadline_ms", "must be > 0".into());
        }
        if self.endpoint_kv_blocks == Some(0) {
            return invalid("endpoint_kv_blocks", "must be > 0 when set".into());
        }
        if let Some(n) = self.max_prefilling {
            if n == 0 {
                return invalid("max_prefilling", "must be > 0 when set".into());
            }
            if self.engine_ttft_ms == 0 {
                return invalid(
                    "max_prefilling",
                    "needs `engine_ttft_ms` > 0 (how long a request stays in prefill)".into(),
                );
            }
        }
        if !(1..=4096).contains(&self.block_size) {
            return invalid(
                "block_size",
                format!("{} is not in 1..=4096", self.block_size),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_rejects_nonsense() {
        let c: AdmissionConfig = toml::from_str("order = \"fair\"\nmax_kv_usage = 0.8").unwrap();
        assert_eq!(c.order, QueueOrder::Fair);
        assert_eq!(c.max_queue_len, AdmissionConfig::default().max_queue_len);
        c.validate("x").unwrap();
        assert!(toml::from_str::<AdmissionConfig>("max_kv = 0.8").is_err());
        assert!(toml::from_str::<AdmissionConfig>("order = \"lifo\"").is_err());
        for bad in [
            "max_kv_usage = 1.5",
            "max_queue_len = 0",
            "max_engine_waiting = -1.0",
            "endpoint_kv_blocks = 0",
            "default_deadline_ms = 0",
            "max_prefilling = 2",
        ] {
            let c: AdmissionConfig = toml::from_str(bad).unwrap();
            let e = c.validate("pool chat").unwrap_err().to_string();
            assert!(e.contains("pool chat"), "{e}");
        }
        let p: Priority = toml::from_str::<toml::Value>("p = \"batch\"").unwrap()["p"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(p.band(), 2);
    }
}
