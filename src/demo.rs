//! `sluice demo`: the main job. Starts a fleet of simulated replicas and one
//! proxy per routing policy (a fresh fleet per policy, so every policy starts
//! from cold caches), sends each the same prefix-heavy multi-turn workload,
//! and prints a comparison table and the path of the HTML report.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use sluice_bench::ab::{Arm, Experiment, FleetSpec, LoadSpec, WorkloadSource};
use sluice_bench::fleet::SimSpec;
use sluice_bench::metrics::Slo;
use sluice_bench::workload::synth::SynthSpec;

/// The default workload (also in fixtures/workloads/demo.toml), built in so the demo needs no files.
const DEMO_WORKLOAD: &str = include_str!("../fixtures/workloads/demo.toml");

/// Flags of `sluice demo` (all optional).
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the report and per-run data go.
    #[arg(long, default_value = "sluice-demo")]
    out: PathBuf,
    /// Routing policies to compare (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round_robin,least_requests,prefix_affinity,cache_aware"
    )]
    policies: Vec<String>,
    /// Simulated replicas per fleet.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Simulated time runs this many times faster than real time. At 1 the
    /// fleet is as loaded as four real H100s at the workload's rate and the
    /// latencies are engine time; above 1 the report converts them.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// KV cache blocks per replica: 51k tokens, an H100's cache scaled down
    /// with the workload (48 live conversations instead of thousands), so a
    /// replica holds its own conversations but not everyone's.
    #[arg(long, default_value_t = 3200)]
    num_gpu_blocks: u64,
    /// Requests in the workload.
    #[arg(long, default_value_t = 900)]
    requests: usize,
    /// Repetitions per policy (arms interleaved).
    #[arg(long, default_value_t = 1)]
    repetitions: usize,
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut workload = SynthSpec::from_toml(
        DEMO_WORKLOAD,
        std::path::Path::new("fixtures/workloads/demo.toml"),
    )?;
    workload.requests = Some(args.requests);
    let exp = Experiment {
        name: "demo".into(),
        repetitions: args.repetitions,
        seed: 1,
        scrape_interval_ms: 500,
        fleet: FleetSpec {
            replicas: args.replicas,
            sim: SimSpec {
                speedup: args.speedup,
                num_gpu_blocks: Some(args.num_gpu_blocks),
                ..SimSpec::default()
            },
            urls: Vec::new(),
        },
        workload: WorkloadSource {
            path: None,
            spec: None,
            inline: Some(workload),
        },
        load: LoadSpec {
            slo: Slo {
                ttft_ms: Some(500.0),
                tpot_ms: Some(50.0),
                e2el_ms: None,
            },
            ..LoadSpec::default()
        },
        arms: args
            .policies
            .iter()
            .map(|p| Arm {
                name: p.clone(),
                policy: Some(p.clone()),
                config: None,
                serve_args: Vec::new(),
            })
            .collect(),
    };
    eprintln!(
        "sluice demo: {} policies × {} simulated {} replicas on {} (speedup {}×), {} requests each",
        exp.arms.len(),
        args.replicas,
        exp.fleet.sim.model,
        exp.fleet.sim.gpu,
        args.speedup,
        args.requests
    );
    let (report, result) =
        sluice_bench::cli::run_and_report(&exp, &args.out).context("demo failed")?;
    println!();
    print!("{}", report.table);
    println!();
    println!("report: {}", report.html.display());
    if result.interrupted {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
