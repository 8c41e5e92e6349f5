//! `sluice simulate`: replay a workload on a simulated fleet in virtual time.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sluice_bench::metrics::Slo;
use sluice_lab::{PreparedWorkload, Scenario, Scheduler, parse_admission, report};
use sluice_policies::routing::PolicyKind;

/// Arguments of `sluice simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Workload file (JSON Lines, as `sluice workload generate` writes).
    #[arg(long)]
    pub workload: PathBuf,
    /// Replicas in the pool.
    #[arg(long, default_value_t = 4)]
    pub fleet: u32,
    /// Model (built-in name, Hugging Face id or TOML file).
    #[arg(long, default_value = "llama-3.1-8b")]
    pub model: String,
    /// GPU of every replica (built-in name or TOML file).
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    /// Routing policy (round_robin, random, least_requests, least_kv, power_of_two, prefix_affinity, cache_aware, scored).
    #[arg(long, default_value = "least_requests")]
    pub policy: String,
    /// KV-aware admission (the proxy's gate): `none`, `kv` (defaults), or `[pools.admission]` keys,
    /// e.g. `max_kv_usage=0.9,max_engine_waiting=4,order=fifo,max_queue_len=1024,max_queue_wait_ms=30000`.
    #[arg(long, default_value = "none")]
    pub admission: String,
    /// Engine-side queue order: fcfs, spf (shortest prompt first with cache-hit credit), edf (memory-aware earliest deadline).
    #[arg(long, default_value = "fcfs")]
    pub scheduler: String,
    /// KV blocks per replica (default: sized from GPU memory like `sluice plan`).
    #[arg(long)]
    pub num_gpu_blocks: Option<u64>,
    /// vLLM `--max-num-seqs`.
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// vLLM `--max-num-batched-tokens`.
    #[arg(long)]
    pub max_num_batched_tokens: Option<u32>,
    /// Turn the engines' prefix cache off.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Seed of routing choices and output lengths.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Age of the engine gauges the router sees (the proxy's scrape interval); 0 = always current.
    #[arg(long, default_value_t = 1000.0)]
    pub scrape_interval_ms: f64,
    /// Proxy time to count one prompt token, in microseconds (the tokenization stage).
    #[arg(long, default_value_t = 0.0)]
    pub tokenize_us_per_token: f64,
    /// Replay the trace this many times faster (2 doubles the request rate).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Objectives for goodput, e.g. `ttft=500,tpot=50` (ms); the TTFT bound is EDF's deadline.
    #[arg(long)]
    pub slo: Option<String>,
    /// Directory for records.jsonl, lifecycle.jsonl, summary.json, timeline.csv and plots.
    #[arg(long, default_value = "sluice-simulate")]
    pub out: PathBuf,
    /// Also write a lab report (Markdown) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The question the report's experiment answers.
    #[arg(long)]
    pub question: Option<String>,
}

impl SimulateArgs {
    /// The deployment these arguments describe.
    pub fn scenario(&self) -> anyhow::Result<Scenario> {
        let policy: PolicyKind = self.policy.parse()?;
        let mut s = Scenario::resolve(self.fleet, &self.model, &self.gpu)?.with_policy(policy);
        let block_size = s.engine_config()?.block_size;
        s.admission = match self.admission.as_str() {
            "none" | "" => None,
            spec => Some(parse_admission(spec, block_size)?),
        };
        s.scheduler = self.scheduler.parse::<Scheduler>()?;
        s.engine.num_gpu_blocks = self.num_gpu_blocks;
        s.engine.max_num_seqs = self.max_num_seqs;
        s.engine.max_num_batched_tokens = self.max_num_batched_tokens;
        s.engine.enable_prefix_caching = self.no_prefix_caching.then_some(false);
        s.seed = self.seed;
        s.scrape_interval_s = self.scrape_interval_ms / 1000.0;
        s.rate_scale = self.rate_scale;
        s.tokenize_s_per_token = self.tokenize_us_per_token / 1e6;
        if let Some(spec) = &self.slo {
            s.slo = Slo::parse(spec).map_err(|e| anyhow::anyhow!("--slo: {e}"))?;
        }
        s.validate()?;
        Ok(s)
    }
}

/// Runs `sluice simulate`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let scenario = args.scenario()?;
    let block_size = scenario.engine_config()?.block_size;
    let started = Instant::now();
    let workload = PreparedWorkload::load(&args.workload, block_size)
        .with_context(|| format!("loading {}", args.workload.display()))?;
    let prepared = started.elapsed().as_secs_f64();
    let outcome = sluice_lab::replay(&workload, &scenario)?;
    let wall = started.elapsed().as_secs_f64();
    let mut files = outcome.write_dir(&args.out)?;
    files.extend(sluice_lab::plot::outcome_plots(&outcome, &args.out)?);
    let mut out = outcome.text_summary();
    let replay_s = wall - prepared;
    out.push_str(&format!(
        "{:<40}{:>14}\n",
        "Wall time (s):",
        format!("{wall:.2} ({prepared:.2} tokenizing)")
    ));
    if replay_s > 0.0 {
        out.push_str(&format!(
            "{:<40}{:>14}\n",
            "Replay speed (× real time):",
            format!("{:.0}", outcome.duration_s / replay_s)
        ));
    }
    if let Some(path) = &args.report {
        let ctx = report::ReportContext {
            question: args.question.clone(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            workload_path: args.workload.display().to_string(),
        };
        let text = report::lab_report(&ctx, &workload, &scenario, &outcome);
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        files.push(path.clone());
    }
    for f in files {
        out.push_str(&format!("wrote {}\n", f.display()));
    }
    print_stdout(&out)
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
