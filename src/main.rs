//! `sluice`: the command that wires Sluice's crates together.
//!
//! Each subcommand lives in its own module (or its crate's `cli` module) and
//! returns `anyhow::Result`; errors print as one line on stderr and exit 1.

use clap::{Parser, Subcommand};

// The proxy allocates per request; glibc malloc cost ~13% of its CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod capacity;
mod demo;
mod plan;
mod serve;
mod simulate;

/// A request-routing proxy for LLM inference fleets.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Embedded simulated fleet + one proxy per routing policy → comparison table and HTML report.
    Demo(demo::DemoArgs),
    /// KV-cache capacity worksheet for a model on a GPU.
    Plan(plan::PlanArgs),
    /// The proxy: --config FILE, --upstream URL..., or an embedded simulated pool.
    Serve(sluice_proxy::ServeArgs),
    /// Validate a proxy config file and explain what it does.
    Check(sluice_proxy::CheckArgs),
    /// One simulated vLLM replica (OpenAI API, SSE, vLLM /metrics, fault injection).
    Sim(sluice_enginesim::cli::SimArgs),
    /// Generate synthetic workloads, import public traces, inspect workloads.
    Workload(sluice_bench::cli::WorkloadArgs),
    /// Load generator against any OpenAI-compatible URL (vLLM serving-benchmark metrics).
    Bench(sluice_bench::cli::BenchArgs),
    /// A/B experiment: the same workload against each arm on a fresh fleet, with reports.
    Ab(sluice_bench::cli::AbArgs),
    /// Replay a workload on a simulated fleet in virtual time (no GPU, no HTTP).
    Simulate(simulate::SimulateArgs),
    /// Sweep simulated deployments (GPUs × replicas × policies × KV × rate); pick the cheapest meeting the SLOs.
    Capacity(capacity::CapacityArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Check(args) => serve::check(args),
        Command::Sim(args) => sluice_enginesim::cli::run(args).map_err(Into::into),
        Command::Workload(args) => sluice_bench::cli::run_workload(args).map_err(Into::into),
        Command::Bench(args) => sluice_bench::cli::run_bench(args).map_err(Into::into),
        Command::Ab(args) => sluice_bench::cli::run_ab(args).map_err(Into::into),
        Command::Simulate(args) => simulate::run(args),
        Command::Capacity(args) => capacity::run(args),
    };
    if let Err(e) = result {
        eprintln!("sluice: error: {e:#}");
        std::process::exit(1);
    }
}
