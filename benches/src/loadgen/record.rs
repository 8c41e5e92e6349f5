//! One request's outcome as the load generator saw it.

use serde::{Deserialize, Serialize};

/// Per-request record. Times are seconds; `start_s` is from the start of the
/// run, every other time is from this request's send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RequestRecord {
    /// Workload request id (with `#k` appended on the k-th repeat of a cycled workload).
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Workload class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Shared-prefix group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_group: Option<String>,
    /// Streamed (SSE) or not.
    pub stream: bool,
    /// When the schedule wanted it sent.
    pub scheduled_s: f64,
    /// When it was sent.
    pub start_s: f64,
    /// Time to the first token-bearing chunk (the whole response when not streaming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_s: Option<f64>,
    /// Arrival of every token-bearing chunk after the first, since send.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunk_times_s: Vec<f64>,
    /// End-to-end latency: send to the last byte.
    pub latency_s: f64,
    /// Prompt tokens (the server's usage, else the workload's estimate).
    pub prompt_tokens: u32,
    /// Generated tokens (the server's usage, else the count of token chunks).
    pub output_tokens: u32,
    /// Prompt tokens served from the prefix cache, when the server reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
    /// HTTP status (0 when no response arrived).
    pub status: u16,
    /// Completed with a full, error-free response.
    pub success: bool,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `x-request-id` returned by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Experiment arm the proxy sent it to (`x-sluice-arm`, also on the proxy's own errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<String>,
}

impl RequestRecord {
    /// A record for `req` before it is sent.
    pub fn for_request(
        req: &crate::workload::WorkloadRequest,
        id: String,
        scheduled_s: f64,
        prompt_tokens: u32,
    ) -> Self {
        RequestRecord {
            id,
            tenant: req.tenant.clone(),
            class: req.class.clone(),
            prefix_group: req.prefix_group.clone(),
            stream: req.stream,
            scheduled_s,
            prompt_tokens,
            ..Default::default()
        }
    }

    /// Inter-token latencies: gaps between successive token-bearing chunks.
    pub fn itls(&self) -> Vec<f64> {
        let Some(mut prev) = self.ttft_s else {
            return Vec::new();
        };
        self.chunk_times_s
            .iter()
            .map(|&t| {
                let gap = t - prev;
                prev = t;
                gap
            })
            .collect()
    }

    /// Time per output token excluding the first: `(latency - ttft) / (output_tokens - 1)`,
    /// `None` when there is at most one output token.
    pub fn tpot_s(&self) -> Option<f64> {
        let ttft = self.ttft_s?;
        (self.output_tokens > 1)
            .then(|| (self.latency_s - ttft) / f64::from(self.output_tokens - 1))
    }
}
