//! One simulated deployment: the fleet, its engines, the routing policy, the
//! admission gate and the engine-side scheduler — everything a replay needs
//! besides the workload.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sluice_bench::metrics::Slo;
use sluice_enginesim::{EngineConfig, SchedulingPolicy};
use sluice_policies::admission::AdmissionConfig;
use sluice_policies::hardware::{GpuSpec, ModelSpec};
use sluice_policies::routing::{PolicyKind, RoutingConfig};

use crate::error::{LabError, Result};

/// Order in which an engine takes requests from its waiting queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// First come, first served (vLLM's default).
    #[default]
    Fcfs,
    /// Shortest prompt first, counting only the tokens the engine's prefix
    /// cache does not already hold when the request reaches it.
    Spf,
    /// Earliest deadline (arrival + TTFT target) first, and a request enters
    /// the engine only while the KV blocks of every admitted request's prompt
    /// plus full output still fit, so admitted requests are never preempted.
    Edf,
}

impl Scheduler {
    /// Every scheduler, in documentation order.
    pub const ALL: [Scheduler; 3] = [Scheduler::Fcfs, Scheduler::Spf, Scheduler::Edf];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Fcfs => "fcfs",
            Scheduler::Spf => "spf",
            Scheduler::Edf => "edf",
        }
    }

    /// The engine's queue discipline that carries this scheduler's order.
    pub(crate) fn engine_policy(self) -> SchedulingPolicy {
        match self {
            Scheduler::Fcfs => SchedulingPolicy::Fcfs,
            // Both order by a key the replay computes per request (`priority`).
            Scheduler::Spf | Scheduler::Edf => SchedulingPolicy::Priority,
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scheduler {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self> {
        Scheduler::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| LabError::invalid(format!("unknown scheduler {s:?} (fcfs, spf, edf)")))
    }
}

/// vLLM engine arguments that a sweep or a command line may override; `None` keeps vLLM's default.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct EngineKnobs {
    /// `--num-gpu-blocks-override`; by default sized from GPU memory like `sluice plan`.
    pub num_gpu_blocks: Option<u64>,
    /// `--max-num-seqs`.
    pub max_num_seqs: Option<u32>,
    /// `--max-num-batched-tokens`.
    pub max_num_batched_tokens: Option<u32>,
    /// `--no-enable-prefix-caching` when false.
    pub enable_prefix_caching: Option<bool>,
}

/// Everything about one simulated deployment.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Replicas in the pool.
    pub replicas: u32,
    /// The served model.
    pub model: ModelSpec,
    /// The GPU of every replica.
    pub gpu: GpuSpec,
    /// Engine arguments.
    pub engine: EngineKnobs,
    /// Replica selection.
    pub routing: RoutingConfig,
    /// KV-aware admission in front of the pool; `None` sends every request straight on.
    pub admission: Option<AdmissionConfig>,
    /// Engine-side queue order.
    pub scheduler: Scheduler,
    /// Seeds routing choices and every engine's output lengths.
    pub seed: u64,
    /// How old the engine gauges the router sees may be (the proxy scrapes
    /// `/metrics` this often); 0 means always current.
    pub scrape_interval_s: f64,
    /// Proxy time to count one prompt token (tokenization stage).
    pub tokenize_s_per_token: f64,
    /// Arrival times are divided by this (2.0 replays the trace at twice its rate).
    pub rate_scale: f64,
    /// Latency objectives for goodput; the TTFT bound is also the EDF deadline.
    pub slo: Slo,
}

/// TTFT deadline the EDF scheduler uses when no TTFT objective is given.
pub const DEFAULT_DEADLINE_S: f64 = 1.0;

impl Scenario {
    /// A pool of `replicas` × `gpu` serving `model` with vLLM defaults,
    /// `least_requests` routing, no admission gate and FCFS engines.
    pub fn new(replicas: u32, model: ModelSpec, gpu: GpuSpec) -> Self {
        Scenario {
            replicas,
            model,
            gpu,
            engine: EngineKnobs::default(),
            routing: RoutingConfig::default(),
            admission: None,
            scheduler: Scheduler::Fcfs,
            seed: 0,
            scrape_interval_s: 1.0,
            tokenize_s_per_token: 0.0,
            rate_scale: 1.0,
            slo: Slo::default(),
        }
    }

    /// Resolves model and GPU by name (or TOML path) first.
    pub fn resolve(replicas: u32, model: &str, gpu: &str) -> Result<Self> {
        Ok(Self::new(
            replicas,
            ModelSpec::resolve(model)?,
            GpuSpec::resolve(gpu)?,
        ))
    }

    /// The routing policy, with default parameters.
    pub fn with_policy(mut self, policy: PolicyKind) -> Self {
        self.routing = RoutingConfig::with_policy(policy);
        self
    }

    /// The EDF deadline relative to arrival.
    pub fn deadline_s(&self) -> f64 {
        self.slo
            .ttft_ms
            .map_or(DEFAULT_DEADLINE_S, |ms| ms / 1000.0)
    }

    /// Checks the numbers once, before a run.
    pub fn validate(&self) -> Result<()> {
        if self.replicas == 0 || self.replicas > 4096 {
            return Err(LabError::invalid(format!(
                "fleet size must be in 1..=4096, got {}",
                self.replicas
            )));
        }
        if !(self.rate_scale.is_finite() && self.rate_scale > 0.0) {
            return Err(LabError::invalid(format!(
                "rate scale must be > 0, got {}",
                self.rate_scale
            )));
        }
        if !(self.scrape_interval_s.is_finite() && self.scrape_interval_s >= 0.0) {
            return Err(LabError::invalid("scrape interval must be ≥ 0"));
        }
        if !(self.tokenize_s_per_token.is_finite() && self.tokenize_s_per_token >= 0.0) {
            return Err(LabError::invalid("tokenization cost must be ≥ 0"));
        }
        self.routing.validate("routing")?;
        if let Some(a) = &self.admission {
            a.validate("admission")?;
        }
        self.engine_config()?.validate()?;
        Ok(())
    }

    /// The configuration every replica's engine runs with.
    pub fn engine_config(&self) -> Result<EngineConfig> {
        let mut cfg = EngineConfig::new(self.model.clone(), self.gpu.clone())?;
        if let Some(n) = self.engine.num_gpu_blocks {
            cfg.num_gpu_blocks = n;
            cfg.max_model_len = self.model.max_context;
            cfg.clamp_max_model_len();
        }
        if let Some(n) = self.engine.max_num_seqs {
            cfg.max_num_seqs = n;
        }
        if let Some(n) = self.engine.max_num_batched_tokens {
            cfg.max_num_batched_tokens = n;
        }
        if let Some(on) = self.engine.enable_prefix_caching {
            cfg.enable_prefix_caching = on;
        }
        cfg.scheduling_policy = self.scheduler.engine_policy();
        cfg.seed = self.seed;
        Ok(cfg)
    }

    /// One line naming the deployment (`4 × h100-sxm-80gb, cache_aware, fcfs`).
    pub fn label(&self) -> String {
        let mut s = format!(
            "{} × {}, {}, {}",
            self.replicas, self.gpu.name, self.routing.policy, self.scheduler
        );
        if let Some(n) = self.engine.num_gpu_blocks {
            s.push_str(&format!(", {n} blocks"));
        }
        if self.admission.is_some() {
            s.push_str(", admission");
        }
        if self.rate_scale != 1.0 {
            s.push_str(&format!(", rate ×{}", self.rate_scale));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedulers_parse_by_name() {
        for s in Scheduler::ALL {
            assert_eq!(s.as_str().parse::<Scheduler>().unwrap(), s);
        }
        assert!("lifo".parse::<Scheduler>().is_err());
    }

    #[test]
    fn knobs_reach_the_engine_config() {
        let mut s = Scenario::resolve(2, "llama-3.1-8b", "h100").unwrap();
        s.engine.num_gpu_blocks = Some(100);
        s.engine.max_num_seqs = Some(8);
        s.scheduler = Scheduler::Spf;
        let c = s.engine_config().unwrap();
        assert_eq!((c.num_gpu_blocks, c.max_num_seqs), (100, 8));
        assert_eq!(c.max_model_len, 1600);
        assert_eq!(c.scheduling_policy, SchedulingPolicy::Priority);
        s.validate().unwrap();
        s.replicas = 0;
        assert!(s.validate().is_err());
    }
}
