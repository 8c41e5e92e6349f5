//! `sluice serve` and `sluice check`: the proxy from `sluice-proxy`, run on
//! a Tokio runtime of its own.

use anyhow::Context;

/// Runs the proxy until SIGTERM/SIGINT.
pub fn run(args: sluice_proxy::ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-proxy")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(sluice_proxy::serve(args))?;
    Ok(())
}

/// Validates a config file and prints what it does.
pub fn check(args: sluice_proxy::CheckArgs) -> anyhow::Result<()> {
    let text = sluice_proxy::check(&args)?;
    print!("{text}");
    Ok(())
}
