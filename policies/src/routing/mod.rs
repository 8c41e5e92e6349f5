//! Replica selection: given a request's shape and each healthy endpoint's
//! load, pick one endpoint and say why.
//!
//! A [`Router`] is owned by one pool and called with `&mut self` (the proxy
//! keeps it behind a short-lived lock; the offline simulator owns it), so a
//! policy keeps its state (a counter, a prefix index, a hash ring) as plain
//! fields. Time is an argument (`RouteRequest::now_ms`); nothing here reads a
//! clock or does I/O.

mod round_robin;

pub use round_robin::RoundRobin;

use crate::prefix::BlockHash;

/// Engine-side gauges scraped from a replica's `/metrics`, fresh enough to trust.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineGauges {
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc`, 0..=1.
    pub kv_usage: f64,
    /// `num_gpu_blocks` from `vllm:cache_config_info`, when known.
    pub num_gpu_blocks: Option<u64>,
}

/// What is known about one endpoint's load at decision time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EndpointLoad {
    /// Requests the proxy has sent there and not yet seen finish.
    pub in_flight: u32,
    /// Prompt + requested output tokens of those requests.
    pub in_flight_tokens: u64,
    /// The engine's own gauges, `None` when never scraped or stale (unknown, not idle).
    pub engine: Option<EngineGauges>,
}

/// One candidate endpoint: a stable key (its `host:port`) and its load.
#[derive(Debug, Clone, Copy)]
pub struct EndpointView<'a> {
    /// Stable identity; prefix indexes and hash rings key on it.
    pub key: &'a str,
    /// Current load.
    pub load: EndpointLoad,
}

/// The request facts a policy may use.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Chained prefix block hashes of the prompt (see [`crate::prefix`]).
    pub block_hashes: &'a [BlockHash],
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Requested output tokens (`max_tokens`), or the class default.
    pub max_tokens: u32,
    /// Tenant name.
    pub tenant: &'a str,
    /// Request class name.
    pub class: &'a str,
    /// Monotonic time in milliseconds, supplied by the caller.
    pub now_ms: u64,
}

/// Why a policy chose the endpoint it chose (a metric label and a lifecycle field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Next in rotation.
    Rotation,
    /// Uniform random choice.
    Random,
    /// Least loaded by the policy's load measure.
    LeastLoaded,
    /// Endpoint already holds (or was last sent) a prefix of this prompt.
    PrefixHit,
    /// No endpoint matched the prefix; placed by load or hash.
    PrefixMiss,
    /// A prefix match existed but load imbalance overrode it.
    Balance,
    /// Highest weighted score.
    Score,
    /// The policy could not apply (e.g. no load data) and fell back.
    Fallback,
}

impl Reason {
    /// The snake_case label used in metrics and lifecycle records.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rotation => "rotation",
            Reason::Random => "random",
            Reason::LeastLoaded => "least_loaded",
            Reason::PrefixHit => "prefix_hit",
            Reason::PrefixMiss => "prefix_miss",
            Reason::Balance => "balance",
            Reason::Score => "score",
            Reason::Fallback => "fallback",
        }
    }
}

/// A policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index into the `endpoints` slice the policy was given.
    pub index: usize,
    /// Why.
    pub reason: Reason,
    /// Prompt blocks the policy believes are cached there (0 when it does not track prefixes).
    pub matched_blocks: u32,
}

/// A replica-selection policy for one pool.
pub trait Router: Send {
    /// The policy's config name (`round_robin`, `cache_aware`, ...).
    fn name(&self) -> &'static str;

    /// Picks one of `endpoints` (all healthy; never empty when called) for `req`.
    /// Returns `None` only when `endpoints` is empty. A policy that tracks
    /// prefixes records the routed prompt here.
    fn pick(&mut self, req: &RouteRequest<'_>, endpoints: &[EndpointView<'_>]) -> Option<Decision>;

    /// Number of entries in the policy's bounded state (prefix-index size), for metrics.
    fn state_size(&self) -> usize {
        0
    }
}
