//! The tokenization stage, done once per workload: every request's prompt
//! rendered and turned into token ids, prefix block hashes and the engine's
//! prompt hash with the same functions the proxy and the simulated replica
//! use (`sluice_policies::tokens`, `sluice_policies::prefix`,
//! `sluice_enginesim::engine::prompt_hash`), so a sweep of many deployments
//! over one workload pays for it once.

use std::path::Path;
use std::sync::Arc;

use sluice_bench::workload::{WorkloadRequest, read_workload};
use sluice_enginesim::engine::prompt_hash;
use sluice_policies::prefix::{BlockHash, block_hashes};
use sluice_policies::tokens::estimate_token_ids;

use crate::error::{LabError, Result};

/// One workload request, tokenized.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    /// Workload id.
    pub id: String,
    /// Arrival offset from the start of the run, seconds (before rate scaling).
    pub arrival_s: f64,
    /// Tenant.
    pub tenant: String,
    /// Workload class.
    pub class: Option<String>,
    /// Shared-prefix group.
    pub prefix_group: Option<String>,
    /// Streamed or not (decides what TTFT means in the record).
    pub stream: bool,
    /// Prompt token ids as the engine sees them.
    pub prompt: Arc<[u32]>,
    /// Chained hashes of the prompt's full blocks, for routing and the engine's prefix cache.
    pub hashes: Arc<[BlockHash]>,
    /// The engine's [`prompt_hash`] (seeds its output), computed once per workload.
    pub prompt_hash: u64,
    /// Requested output tokens.
    pub max_tokens: u32,
    /// Generate exactly `max_tokens`.
    pub ignore_eos: bool,
}

impl PreparedRequest {
    /// Prompt tokens.
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt.len() as u32
    }
}

/// A workload ready to replay, sorted by arrival.
#[derive(Debug, Clone)]
pub struct PreparedWorkload {
    /// Requests in arrival order (ties keep file order).
    pub requests: Vec<PreparedRequest>,
    /// Tokens per block of `hashes`.
    pub block_size: u32,
    /// The raw workload (for the report's workload section).
    pub source: Arc<Vec<WorkloadRequest>>,
}

impl PreparedWorkload {
    /// Tokenizes `requests`, hashing prompts in `block_size`-token blocks.
    pub fn new(requests: Vec<WorkloadRequest>, block_size: u32) -> Result<Self> {
        if requests.is_empty() {
            return Err(LabError::invalid("the workload has no requests"));
        }
        if block_size == 0 {
            return Err(LabError::invalid("block size must be at least 1"));
        }
        let mut prepared = Vec::with_capacity(requests.len());
        for r in &requests {
            r.validate()
                .map_err(|e| LabError::invalid(format!("request {}: {e}", r.id)))?;
            let prompt: Arc<[u32]> = estimate_token_ids(&r.rendered_prompt()).into();
            let hashes: Arc<[BlockHash]> = block_hashes(&prompt, block_size as usize, None).into();
            let prompt_hash = prompt_hash(&prompt);
            prepared.push(PreparedRequest {
                id: r.id.clone(),
                arrival_s: r.arrival_ms / 1000.0,
                tenant: r.tenant.clone(),
                class: r.class.clone(),
                prefix_group: r.prefix_group.clone(),
                stream: r.stream,
                prompt,
                hashes,
                prompt_hash,
                max_tokens: r.max_tokens,
                ignore_eos: r.ignore_eos,
            });
        }
        // Stable: equal arrivals keep file order, so a replay is deterministic.
        prepared.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        Ok(PreparedWorkload {
            requests: prepared,
            block_size,
            source: Arc::new(requests),
        })
    }

    /// Reads and tokenizes a JSONL workload file.
    pub fn load(path: &Path, block_size: u32) -> Result<Self> {
        Self::new(read_workload(path)?, block_size)
    }

    /// Offset of the last arrival, seconds.
    pub fn span_s(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.arrival_s)
    }

    /// Requests.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// True when there are no requests (never, once built).
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}
