//! Command-line entry points (`sluice workload|bench|ab`), wired into the `sluice` binary.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use std::time::Duration;

use crate::arms::summarize_by_arm;
use crate::error::{BenchError, Result};
use crate::loadgen::client::header_name;
use crate::loadgen::output::{format_arm_summaries, format_summary, write_results_by_arm};
use crate::loadgen::{ApiClient, LoadConfig, LoadMode, run_load};
use crate::metrics::{Slo, summarize};
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

/// `sluice bench`: drive a workload against an OpenAI-compatible URL.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Base URL of the target (proxy or engine), e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub target: String,
    /// The JSONL workload.
    #[arg(long)]
    pub workload: PathBuf,
    /// Open loop at this many requests/s (gamma arrivals); default: the workload's own arrival times.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Gamma shape of drawn arrivals (1 = Poisson, lower = burstier), as vLLM's --burstiness.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Open loop: cap on requests in flight.
    #[arg(long, conflicts_with = "concurrency")]
    pub max_concurrency: Option<usize>,
    /// Closed loop with this many concurrent users (arrival times ignored).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Number of requests (the workload is cycled if shorter).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Stop sending after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Multiply the workload's arrival offsets (0.5 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Served model name (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// API key sent as a bearer token.
    #[arg(long, env = "SLUICE_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// API key per workload tenant, TENANT=KEY (repeatable, or comma-separated in the
    /// environment): each request authenticates as its tenant; other tenants send --api-key.
    #[arg(
        long = "tenant-key",
        value_name = "TENANT=KEY",
        env = "SLUICE_BENCH_TENANT_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub tenant_keys: Vec<String>,
    /// Send each request's workload tenant in this header (the tenant is always the body's `user`).
    #[arg(long, value_name = "NAME")]
    pub tenant_header: Option<String>,
    /// Send each request's conversation (its prefix_group, else its id) in this header, e.g.
    /// x-session-id, so a proxy experiment with split_by = "header" keeps a conversation on one arm.
    #[arg(long, value_name = "NAME")]
    pub session_header: Option<String>,
    /// Goodput SLOs in ms, e.g. ttft=500,tpot=50 (also e2el).
    #[arg(long)]
    pub slo: Option<String>,
    /// Seed for drawn arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bound on one request in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Results directory (records.jsonl/csv, summary.json/csv).
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `TENANT=KEY` pairs as a map; a tenant given twice is an error.
fn tenant_keys(pairs: &[String]) -> Result<HashMap<String, String>> {
    let mut keys = HashMap::new();
    for pair in pairs {
        let (tenant, key) = pair
            .split_once('=')
            .filter(|(t, k)| !t.trim().is_empty() && !k.trim().is_empty())
            .ok_or_else(|| {
                // Never echo the pair: it holds a key.
                BenchError::invalid("--tenant-key", "expected TENANT=KEY")
            })?;
        let tenant = tenant.trim().to_string();
        if keys
            .insert(tenant.clone(), key.trim().to_string())
            .is_some()
        {
            return Err(BenchError::invalid(
                "--tenant-key",
                format!("tenant {tenant:?} is given twice"),
            ));
        }
    }
    Ok(keys)
}

fn secs(flag: &str, v: f64) -> Result<Duration> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(BenchError::invalid(
            "flags",
            format!("{flag} must be > 0 seconds"),
        ))
    }
}

/// A multi-threaded runtime for the async commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::io("tokio runtime", e))
}

/// A stop signal that turns true on Ctrl-C.
pub fn ctrl_c_stop() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("sluice: interrupted; stopping and writing results");
            let _ = tx.send(true);
        }
        // Keep the sender alive so receivers never see a closed channel as a stop.
        std::future::pending::<()>().await;
    });
    rx
}

/// Runs `sluice bench ...`.
pub fn run_bench(args: BenchArgs) -> Result<()> {
    let slo = match &args.slo {
        Some(s) => Slo::parse(s).map_err(|m| BenchError::invalid("--slo", m))?,
        None => Slo::default(),
    };
    let mode = match args.concurrency {
        Some(concurrency) => LoadMode::Closed { concurrency },
        None => LoadMode::Open {
            rate: args.rate,
            burstiness: args.burstiness,
            max_concurrency: args.max_concurrency,
        },
    };
    let cfg = LoadConfig {
        mode,
        requests: args.requests,
        duration: args.duration.map(|d| secs("--duration", d)).transpose()?,
        time_scale: args.time_scale,
        seed: args.seed,
        request_timeout: secs("--request-timeout", args.request_timeout)?,
        progress: !args.quiet,
    };
    let session_header = args
        .session_header
        .as_deref()
        .map(|h| header_name("--session-header", h))
        .transpose()?;
    let tenant_header = args
        .tenant_header
        .as_deref()
        .map(|h| header_name("--tenant-header", h))
        .transpose()?;
    let keys = tenant_keys(&args.tenant_keys)?;
    let workload = read_workload(&args.workload)?;
    runtime()?.block_on(async move {
        let stop = ctrl_c_stop();
        let client = ApiClient::connect(&args.target, args.model.clone(), args.api_key.clone())
            .await?
            .with_session_header(session_header)
            .with_tenant_header(tenant_header)
            .with_tenant_keys(keys);
        let model = client.model.clone();
        let out = run_load(client, workload, &cfg, stop).await?;
        let summary = summarize(&out.records, out.duration_s, &slo);
        let arms = summarize_by_arm(&out.records, out.duration_s, &slo);
        let meta = serde_json::json!({
            "target": args.target,
            "model": model,
            "workload": args.workload,
            "mode": format!("{:?}", cfg.mode),
            "requests": out.records.len(),
            "interrupted": out.interrupted,
            "slo": slo,
            "session_header": args.session_header,
            "tenant_header": args.tenant_header,
        });
        write_results_by_arm(&args.out, &out.records, &summary, &arms, &meta)?;
        if !arms.is_empty() {
            println!("{:=^52}", " all requests ");
        }
        print!("{}", format_summary(&summary));
        print!("{}", format_arm_summaries(&arms));
        println!("results in {}", args.out.display());
        if out.interrupted {
            return Err(BenchError::Interrupted);
        }
        Ok(())
    })
}

/// `sluice ab`: an A/B experiment over routing policies / proxy configs.
#[derive(Debug, Args)]
pub struct AbArgs {
    /// The experiment TOML (fleet, workload, load, arms, repetitions).
    #[arg(long)]
    pub experiment: PathBuf,
    /// Results directory (default: ab-<experiment name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override the experiment's repetitions.
    #[arg(long)]
    pub repetitions: Option<usize>,
}

/// Runs an experiment with Ctrl-C handling, prints one line per run on
/// stderr, writes the reports into `out` and returns them.
pub fn run_and_report(
    exp: &crate::ab::Experiment,
    out: &std::path::Path,
) -> Result<(crate::report::Reports, crate::ab::ExperimentResult)> {
    let exe = crate::fleet::sluice_exe()?;
    let factor = crate::report::engine_time_factor(exp);
    let result = runtime()?.block_on(async {
        let stop = ctrl_c_stop();
        crate::ab::run_experiment(exp, &exe, out, stop, |r| {
            eprintln!(
                "{} rep {}{}: {:.1} req/s, TTFT p99 {:.0} ms, prefix hits {}",
                r.arm,
                r.rep,
                r.rate.map(|x| format!(" @ {x} req/s")).unwrap_or_default(),
                r.summary.request_throughput / factor,
                r.summary.ttft.p99_ms * factor,
                r.prefix_hit_rate
                    .map(|h| format!("{:.1}%", h * 100.0))
                    .unwrap_or_else(|| "n/a".into())
            )
        })
        .await
    })?;
    let report = crate::report::write_reports(&result, out)?;
    Ok((report, result))
}

/// Runs `sluice ab ...`: every arm on a fresh fleet, then the Markdown and HTML reports.
pub fn run_ab(args: AbArgs) -> Result<()> {
    let mut exp = crate::ab::Experiment::load(&args.experiment)?;
    if let Some(r) = args.repetitions {
        exp.repetitions = r;
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("ab-{}", exp.name)));
    let (report, result) = run_and_report(&exp, &out)?;
    print!("{}", report.table);
    println!("report: {}", report.html.display());
    if result.interrupted {
        return Err(BenchError::Interrupted);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_keys_parse_and_errors_never_echo_a_key() {
        let keys = tenant_keys(&["a=k1".into(), " b = k=2 ".into()]).unwrap();
        assert_eq!(keys["a"], "k1");
        assert_eq!(keys["b"], "k=2", "a key may contain '='");
        for bad in ["secret-key", "=secret-key", "a="] {
            let e = tenant_keys(&[bad.into()]).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{e}");
        }
        let e = tenant_keys(&["a=secret1".into(), "a=secret2".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"a\"") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn header_flags_are_validated() {
        assert_eq!(
            header_name("--session-header", "X-Session-Id").unwrap(),
            "x-session-id"
        );
        assert!(header_name("--session-header", "bad header").is_err());
    }
}
