//! `sluice capacity`: sweep simulated deployments and pick the cheapest that meets the SLOs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sluice_bench::metrics::Slo;
use sluice_lab::capacity::{SweepSpec, markdown, parse_replicas, sweep, write_outputs};
use sluice_lab::{PreparedWorkload, Scenario, Scheduler, parse_admission};
use sluice_policies::hardware::GpuSpec;
use sluice_policies::routing::PolicyKind;

use crate::simulate::print_stdout;

/// Arguments of `sluice capacity`.
#[derive(Debug, Args)]
pub struct CapacityArgs {
    /// Workload file (JSON Lines).
    #[arg(long)]
    pub workload: PathBuf,
    /// Objectives (ms), e.g. `ttft=500,tpot=50`.
    #[arg(long)]
    pub slo: String,
    /// Share of requests that must meet every objective (0..1].
    #[arg(long, default_value_t = 0.99)]
    pub target: f64,
    /// GPUs to try, comma-separated (built-in names or TOML files).
    #[arg(long, default_value = "h100,a100")]
    pub gpus: String,
    /// Replica counts: `1..16`, `2,4,8` or `4`.
    #[arg(long, default_value = "1..8")]
    pub replicas: String,
    /// Routing policies to try, comma-separated.
    #[arg(long, default_value = "least_requests,cache_aware")]
    pub policies: String,
    /// KV blocks per replica to try, comma-separated (`auto` = sized from GPU memory).
    #[arg(long, default_value = "auto")]
    pub kv_blocks: String,
    /// Request-rate multipliers; a configuration must meet the target at every one.
    #[arg(long, default_value = "1")]
    pub rates: String,
    /// Model.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub model: String,
    /// vLLM `--max-num-batched-tokens` of every engine.
    #[arg(long)]
    pub max_num_batched_tokens: Option<u32>,
    /// vLLM `--max-num-seqs` of every engine.
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// Engine-side scheduler: fcfs, spf, edf.
    #[arg(long, default_value = "fcfs")]
    pub scheduler: String,
    /// Admission gate (`none`, `kv`, or `[pools.admission]` key=value pairs).
    #[arg(long, default_value = "none")]
    pub admission: String,
    /// USD per GPU-hour, e.g. `h100-sxm-80gb=2.5,a100-80gb=1.2` (defaults: illustrative list prices).
    #[arg(long)]
    pub gpu_price: Option<String>,
    /// Run every replica count, not only up to the first that meets the target.
    #[arg(long)]
    pub exhaustive: bool,
    /// Worker threads (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory for capacity.md, capacity.jsonl, plots and the knee run.
    #[arg(long, default_value = "sluice-capacity")]
    pub out: PathBuf,
}

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

impl CapacityArgs {
    /// The sweep these arguments describe.
    pub fn spec(&self) -> anyhow::Result<SweepSpec> {
        let gpus = list(&self.gpus)
            .map(GpuSpec::resolve)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = gpus.first().cloned() else {
            anyhow::bail!("--gpus names no GPU");
        };
        let mut base = Scenario::resolve(1, &self.model, &first.name)?;
        base.slo = Slo::parse(&self.slo).map_err(|e| anyhow::anyhow!("--slo: {e}"))?;
        base.scheduler = self.scheduler.parse::<Scheduler>()?;
        base.seed = self.seed;
        base.engine.max_num_batched_tokens = self.max_num_batched_tokens;
        base.engine.max_num_seqs = self.max_num_seqs;
        let block_size = base.engine_config()?.block_size;
        base.admission = match self.admission.as_str() {
            "none" | "" => None,
            spec => Some(parse_admission(spec, block_size)?),
        };
        let mut spec = SweepSpec::new(base);
        spec.gpus = gpus;
        spec.replicas = parse_replicas(&self.replicas)?;
        spec.policies = list(&self.policies)
            .map(str::parse::<PolicyKind>)
            .collect::<Result<Vec<_>, _>>()?;
        spec.kv_blocks = list(&self.kv_blocks)
            .map(|v| match v {
                "auto" => Ok(None),
                n => n
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("--kv-blocks: bad count {n:?}")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        spec.rate_scales = list(&self.rates)
            .map(|v| match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(anyhow::anyhow!("--rates: {v:?} is not a positive number")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        spec.target_share = self.target;
        spec.exhaustive = self.exhaustive;
        spec.threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if let Some(prices) = &self.gpu_price {
            for pair in list(prices) {
                let (name, usd) = pair.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--gpu-price: expected NAME=USD, got {pair:?}")
                })?;
                let usd: f64 = usd
                    .trim()
                    .parse()
                    .ok()
                    .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| anyhow::anyhow!("--gpu-price: bad price in {pair:?}"))?;
                // Accept the short names `--gpus` accepts.
                let name =
                    GpuSpec::resolve(name.trim()).map_or(name.trim().to_string(), |g| g.name);
                spec.prices.insert(name, usd);
            }
        }
        spec.validate()?;
        Ok(spec)
    }
}

/// Runs `sluice capacity`.
pub fn run(args: CapacityArgs) -> anyhow::Result<()> {
    let spec = args.spec()?;
    let block_size = spec.base.engine_config()?.block_size;
    let started = Instant::now();
    let workload = PreparedWorkload::load(&args.workload, block_size)
        .with_context(|| format!("loading {}", args.workload.display()))?;
    let result = sweep(&spec, &workload)?;
    let files = write_outputs(&spec, &result, &args.out)?;
    let mut out = markdown(&spec, &result);
    out.push_str(&format!(
        "\n{} runs in {:.1} s wall\n",
        result.rows.len(),
        started.elapsed().as_secs_f64()
    ));
    for f in files {
        out.push_str(&format!("wrote {}\n", f.display()));
    }
    print_stdout(&out)
}
