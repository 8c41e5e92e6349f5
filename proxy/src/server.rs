//! Listeners and the process around them: bind (port 0 allowed), accept into
//! Pingora's HTTP sessions, reload on SIGHUP or when the config file changes,
//! reopen the lifecycle log on SIGHUP/SIGUSR1, drain on SIGTERM/SIGINT.
//!
//! Shutdown, in order: `/readyz` answers 503 at once; the API listener keeps
//! accepting for `server.shutdown_delay_ms` (load balancers polling readiness
//! stop sending meanwhile), then closes; requests in flight — queued,
//! forwarding or streaming — get up to `server.drain_timeout_ms` to finish
//! (kept-alive connections are closed after their current request); then
//! the process exits. The admin listener serves throughout.
//!
//! The proxy binds its own sockets (rather than using Pingora's `Server`
//! bootstrap) so it can report the real port of a `:0` listener and run
//! several proxies in one process (the demo and A/B harness do).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pingora::apps::{HttpServerApp, ServerApp};
use sluice_policies::routing::{PolicyKind, RoutingConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Semaphore, watch};

use crate::admin::Admin;
use crate::api::Api;
use crate::client_stream::ClientStream;
use crate::config::Config;
use crate::error::ProxyError;
use crate::state::{Overrides, ReloadTrigger, Shared};

/// Most client connections served at once; more wait in the kernel backlog.
const MAX_CONNECTIONS: usize = 65_536;

/// `sluice serve` options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (see fixtures/configs/sluice.toml).
    #[arg(long, conflicts_with = "upstream")]
    pub config: Option<PathBuf>,
    /// A replica URL (http://IP:PORT); repeat for a one-pool setup without a file.
    #[arg(long = "upstream", value_name = "URL")]
    pub upstream: Vec<String>,
    /// API listen address (overrides the file; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin listen address (overrides the file; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Routing policy for every pool (round_robin, random, least_requests,
    /// least_kv, power_of_two, prefix_affinity, cache_aware, scored). Arms of a
    /// `[pools.experiment]` that set their own `routing` keep it.
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// Model name the --upstream pool serves (default: accept any model).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Lifecycle log: `stdout`, `off`, or a file to append JSON lines to.
    #[arg(long, value_name = "FILE")]
    pub lifecycle_log: Option<String>,
    /// Seed for randomised routing policies.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Experiment arm label for lifecycle records, `x-sluice-arm` and the `arm`
    /// metric label (`sluice ab` sets it); a pool's `[pools.experiment]` arm
    /// takes precedence for that pool's requests.
    #[arg(long, value_name = "NAME")]
    pub arm: Option<String>,
    /// Reload only on SIGHUP, not when the --config file changes.
    #[arg(long)]
    pub no_watch_config: bool,
}

/// `sluice check` options.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The config file to validate.
    #[arg(long)]
    pub config: PathBuf,
}

/// Validates a config file and returns its explanation.
pub fn check(args: &CheckArgs) -> Result<String, ProxyError> {
    let cfg = Config::load(&args.config)?;
    cfg.tokenizers()?;
    Ok(format!("{}: OK\n{}", args.config.display(), cfg.explain()))
}

impl ServeArgs {
    /// The config these arguments describe (file or `--upstream`), with
    /// overrides applied, plus the overrides to re-apply on reload.
    pub fn resolve(&self) -> Result<(Config, Overrides), ProxyError> {
        let routing = match &self.policy {
            Some(name) => {
                let kind: PolicyKind =
                    name.parse().map_err(|e: sluice_policies::PolicyError| {
                        ProxyError::Config(format!("--policy: {e}"))
                    })?;
                Some(RoutingConfig::with_policy(kind))
            }
            None => None,
        };
        let overrides = Overrides {
            routing,
            lifecycle_log: self.lifecycle_log.clone(),
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
        };
        let mut cfg = match (&self.config, self.upstream.is_empty()) {
            (Some(path), _) => Config::load(path)?,
            (None, false) => Config::for_upstreams(&self.upstream, self.model.as_deref())?,
            (None, true) => {
                return Err(ProxyError::Config(
                    "give --config FILE or at least one --upstream URL".into(),
                ));
            }
        };
        overrides.apply(&mut cfg);
        cfg.validate(None).map_err(ProxyError::Config)?;
        Ok((cfg, overrides))
    }
}

/// A running proxy inside the current Tokio runtime.
pub struct RunningProxy {
    /// Shared state (config generation, metrics).
    pub shared: Arc<Shared>,
    api_addr: SocketAddr,
    admin_addr: SocketAddr,
    /// Set first on shutdown: `/readyz` fails.
    draining: Arc<AtomicBool>,
    /// Stops the API listener and the config watcher.
    shutdown: watch::Sender<bool>,
    /// Stops the admin listener, last.
    admin_shutdown: watch::Sender<bool>,
}

impl RunningProxy {
    /// Binds both listeners and starts serving.
    pub async fn start(args: &ServeArgs) -> Result<Self, ProxyError> {
        let (cfg, overrides) = args.resolve()?;
        let listen = cfg.server.listen.clone();
        let admin_listen = cfg.server.admin_listen.clone();
        let max_header = cfg.server.max_header_bytes;
        let keepalive = cfg.server.keepalive_secs;
        let api_listener = bind(&listen).await?;
        let admin_listener = bind(&admin_listen).await?;
        let api_addr = local(&api_listener, &listen)?;
        let admin_addr = local(&admin_listener, &admin_listen)?;
        let shared = Shared::new(
            cfg,
            args.config.clone(),
            overrides,
            args.seed,
            args.arm.clone(),
        )?;
        let (shutdown, watch_rx) = watch::channel(false);
        let (admin_shutdown, admin_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        let api = Arc::new(Api::new(Arc::clone(&shared), max_header, keepalive));
        let admin = Arc::new(Admin::new(Arc::clone(&shared), Arc::clone(&draining)));
        tokio::spawn(accept_loop(
            api_listener,
            api,
            watch_rx.clone(),
            Some(Arc::clone(&shared)),
        ));
        if !args.no_watch_config {
            tokio::spawn(crate::config_watch::watch(
                Arc::clone(&shared),
                watch_rx.clone(),
            ));
        }
        tokio::spawn(accept_loop(admin_listener, admin, admin_rx, None));
        Ok(Self {
            shared,
            api_addr,
            admin_addr,
            draining,
            shutdown,
            admin_shutdown,
        })
    }

    /// Where the OpenAI API listens.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Where the admin listener listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Graceful shutdown (see the module doc): readiness fails, the API
    /// listener closes after `shutdown_delay_ms`, requests in flight get up
    /// to `drain_timeout_ms`, then the admin listener closes. Returns how
    /// many requests were still in flight when it gave up waiting (0: all
    /// finished).
    pub async fn shutdown(&self) -> u64 {
        self.draining.store(true, Ordering::Relaxed);
        let server = self.shared.current().config.server.clone();
        tracing::info!(
            shutdown_delay_ms = server.shutdown_delay_ms,
            drain_timeout_ms = server.drain_timeout_ms,
            "shutting down: readiness fails now"
        );
        tokio::time::sleep(Duration::from_millis(server.shutdown_delay_ms)).await;
        let _ = self.shutdown.send(true);
        let until = Instant::now() + Duration::from_millis(server.drain_timeout_ms);
        let mut left = self.in_flight();
        while left > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            left = self.in_flight();
        }
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "drain deadline passed; exiting with requests in flight"
            );
        }
        let _ = self.admin_shutdown.send(true);
        left
    }

    /// Requests between classification and their end (admission queue,
    /// forwarding, streaming) over every pool, or the endpoints' own
    /// in-flight counts if those are higher.
    fn in_flight(&self) -> u64 {
        use prometheus::core::Collector;
        let requests: f64 = self
            .shared
            .metrics
            .in_flight
            .collect()
            .iter()
            .flat_map(|f| f.get_metric().iter().map(|m| m.get_gauge().get_value()))
            .sum();
        let g = self.shared.current();
        let forwarding: u64 = g
            .pools
            .iter()
            .flat_map(|p| {
                p.endpoints()
                    .iter()
                    .map(|e| u64::from(e.in_flight()))
                    .collect::<Vec<_>>()
            })
            .sum();
        // Gauges are whole numbers; a negative would be a bug, not a request.
        let requests = if requests > 0.0 { requests as u64 } else { 0 };
        requests.max(forwarding)
    }
}

/// Runs `sluice serve` until SIGTERM/SIGINT: prints the listening line,
/// reloads on SIGHUP (and on file changes), reopens the lifecycle log on
/// SIGHUP and SIGUSR1.
pub async fn serve(args: ServeArgs) -> Result<(), ProxyError> {
    let proxy = RunningProxy::start(&args).await?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "sluice-proxy listening on http://{} admin http://{}",
            proxy.api_addr(),
            proxy.admin_addr()
        );
        let _ = out.flush();
    }
    wait_for_signals(&proxy).await?;
    // A second SIGTERM/SIGINT during the drain (an impatient operator, a
    // supervisor escalating) exits at once instead of being ignored.
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    tokio::select! {
        _ = proxy.shutdown() => {}
        _ = term.recv() => tracing::warn!("second SIGTERM: exiting without waiting for requests in flight"),
        _ = int.recv() => tracing::warn!("second SIGINT: exiting without waiting for requests in flight"),
    }
    Ok(())
}

fn sig(kind: SignalKind) -> Result<Signal, ProxyError> {
    signal(kind).map_err(|source| ProxyError::Io {
        context: "cannot install signal handler".into(),
        source,
    })
}

async fn wait_for_signals(proxy: &RunningProxy) -> Result<(), ProxyError> {
    let mut hup = sig(SignalKind::hangup())?;
    let mut usr1 = sig(SignalKind::user_defined1())?;
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // Logged and counted inside; the running config stays on error.
                let _ = proxy.shared.reload(ReloadTrigger::Signal);
                proxy.shared.reopen_logs();
            }
            _ = usr1.recv() => proxy.shared.reopen_logs(),
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

async fn bind(addr: &str) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Io {
            context: format!("cannot listen on {addr}"),
            source,
        })
}

fn local(l: &TcpListener, addr: &str) -> Result<SocketAddr, ProxyError> {
    l.local_addr().map_err(|source| ProxyError::Io {
        context: format!("cannot read the bound address of {addr}"),
        source,
    })
}

async fn accept_loop<A>(
    listener: TcpListener,
    app: Arc<A>,
    mut shutdown: watch::Receiver<bool>,
    counted: Option<Arc<Shared>>,
) where
    A: HttpServerApp + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let stream: pingora::protocols::Stream = Box::new(ClientStream::new(tcp));
        let app = Arc::clone(&app);
        let shutdown = shutdown.clone();
        let counted = counted.clone();
        tokio::spawn(async move {
            if let Some(s) = &counted {
                s.metrics.connections.inc();
            }
            let _ = app.process_new(stream, &shutdown).await;
            if let Some(s) = &counted {
                s.metrics.connections.dec();
            }
            drop(permit);
        });
    }
}
