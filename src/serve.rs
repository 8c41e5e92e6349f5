//! `sluice serve` and `sluice check`: the proxy from `sluice-proxy`, run on
//! a Tokio runtime of its own. With neither `--config` nor `--upstream`,
//! `serve` first starts a small pool of simulated replicas in-process, so a
//! new user sees the whole path work without a GPU.

use anyhow::Context;
use clap::Parser;
use sluice_enginesim::cli::SimArgs;

/// Replicas of the embedded pool.
const EMBEDDED_REPLICAS: usize = 3;
/// Model the embedded pool serves (a built-in model description).
const EMBEDDED_MODEL: &str = "llama-3.1-8b";

/// Parses `sluice sim` flags, so the embedded replicas get exactly the CLI's defaults.
#[derive(Parser)]
struct EmbeddedSim {
    #[command(flatten)]
    sim: SimArgs,
}

/// Runs the proxy until SIGTERM/SIGINT.
pub fn run(mut args: sluice_proxy::ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-proxy")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut fleet = Vec::new();
        if args.config.is_none() && args.upstream.is_empty() {
            for i in 0..EMBEDDED_REPLICAS {
                let seed = (i + 1).to_string();
                let sim = EmbeddedSim::try_parse_from(["sim", "--model", EMBEDDED_MODEL, "--seed", &seed])
                    .context("embedded replica flags")?;
                let opts = sim.sim.options()?;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .context("cannot bind an embedded replica")?;
                let handle = sluice_enginesim::spawn(listener, opts)?;
                args.upstream.push(format!("http://{}", handle.local_addr()));
                fleet.push(handle);
            }
            args.model.get_or_insert_with(|| EMBEDDED_MODEL.to_string());
            eprintln!(
                "sluice: no --config or --upstream given: serving {EMBEDDED_REPLICAS} simulated {EMBEDDED_MODEL} replicas ({})",
                args.upstream.join(", ")
            );
        }
        sluice_proxy::serve(args).await?;
        for sim in fleet {
            sim.shutdown(std::time::Duration::from_millis(200)).await;
        }
        Ok(())
    })
}

/// Validates a config file and prints what it does.
pub fn check(args: sluice_proxy::CheckArgs) -> anyhow::Result<()> {
    let text = sluice_proxy::check(&args)?;
    print!("{text}");
    Ok(())
}
