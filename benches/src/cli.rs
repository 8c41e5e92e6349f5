//! Command-line entry points (`sluice workload|bench|ab`), wired into the `sluice` binary.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::error::{BenchError, Result};
use crate::workload::import::{ImportOptions, TraceFormat, import};
use crate::workload::inspect::inspect;
use crate::workload::synth::{Api, SynthSpec, generate};
use crate::workload::{read_workload, write_workload};

/// `sluice workload`: generate, import and inspect workloads.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    #[command(subcommand)]
    command: WorkloadCommand,
}

#[derive(Debug, Subcommand)]
enum WorkloadCommand {
    /// Generate a synthetic workload from a TOML spec (deterministic per seed).
    Generate {
        /// The spec (see fixtures/workloads/demo.toml).
        #[arg(long)]
        spec: PathBuf,
        /// Where to write the JSONL workload.
        #[arg(long)]
        out: PathBuf,
        /// Override the spec's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override the spec's request count.
        #[arg(long)]
        requests: Option<usize>,
    },
    /// Convert a public trace (Mooncake JSONL, Azure CSV, ShareGPT JSON) to a workload.
    Import {
        /// The trace file.
        input: PathBuf,
        /// The trace's format.
        #[arg(long, value_enum)]
        format: TraceFormat,
        /// Where to write the JSONL workload.
        #[arg(long)]
        out: PathBuf,
        /// Keep at most this many requests.
        #[arg(long)]
        limit: Option<usize>,
        /// Multiply arrival offsets by this (0.5 = twice as fast).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Spread requests sharing a quantised timestamp over the gap to the next.
        #[arg(long)]
        smooth: bool,
        /// API the requests use.
        #[arg(long, value_enum)]
        api: Option<ApiArg>,
        /// Send non-streaming requests.
        #[arg(long)]
        no_stream: bool,
        /// Poisson arrival rate for traces without timestamps (ShareGPT).
        #[arg(long)]
        rate: Option<f64>,
        /// Seed for drawn arrivals.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// max_tokens for traces without output lengths (ShareGPT).
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Tenant recorded on every request.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Summarise a workload: rates, lengths, mix, ideal prefix-cache hit rate.
    Inspect {
        /// The JSONL workload.
        workload: PathBuf,
        /// Block size for the cache estimate (vLLM's default is 16).
        #[arg(long, default_value_t = 16)]
        block_size: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The API a request is sent to.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ApiArg {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// Runs `sluice workload ...`.
pub fn run_workload(args: WorkloadArgs) -> Result<()> {
    match args.command {
        WorkloadCommand::Generate {
            spec,
            out,
            seed,
            requests,
        } => {
            let mut s = SynthSpec::load(&spec)?;
            if let Some(seed) = seed {
                s.seed = seed;
            }
            if requests.is_some() {
                s.requests = requests;
            }
            let w = generate(&s)?;
            write_workload(&out, &w)?;
            println!("wrote {} requests to {}", w.len(), out.display());
            Ok(())
        }
        WorkloadCommand::Import {
            input,
            format,
            out,
            limit,
            time_scale,
            smooth,
            api,
            no_stream,
            rate,
            seed,
            max_tokens,
            tenant,
        } => {
            let api = match api {
                Some(ApiArg::Chat) => Api::Chat,
                Some(ApiArg::Completions) => Api::Completions,
                None if format == TraceFormat::Sharegpt => Api::Chat,
                None => Api::Completions,
            };
            let opts = ImportOptions {
                format,
                limit,
                time_scale,
                smooth,
                api,
                stream: !no_stream,
                rate,
                seed,
                max_tokens,
                tenant,
            };
            let w = import(&input, &opts)?;
            write_workload(&out, &w)?;
            println!("wrote {} requests to {}", w.len(), out.display());
            Ok(())
        }
        WorkloadCommand::Inspect {
            workload,
            block_size,
            json,
        } => {
            if block_size == 0 {
                return Err(BenchError::invalid(
                    "flags",
                    "--block-size must be at least 1",
                ));
            }
            let w = read_workload(&workload)?;
            let stats = inspect(&w, block_size);
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!("{stats}");
            }
            Ok(())
        }
    }
}
