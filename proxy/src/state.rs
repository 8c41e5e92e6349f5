//! What the listeners share: the current config generation (swapped whole
//! on reload), the upstream connector, metrics and the lifecycle log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sluice_policies::classify::Classifier;
use sluice_policies::routing::RoutingConfig;

use crate::config::Config;
use crate::error::ProxyError;
use crate::lifecycle::{Clock, LifecycleLog};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::tenancy::{Tenancy, build_directory};
use crate::tenant::Directory;
use crate::upstream_pool::UpstreamPool;

/// Idle keep-alive connections kept per replica.
const IDLE_PER_REPLICA: usize = 1024;
/// How long an idle upstream connection is kept: under uvicorn's default
/// keep-alive (5 s), which vLLM uses, so the replica rarely closes it first.
const UPSTREAM_IDLE: Duration = Duration::from_secs(4);

/// Command-line settings that override the file on every (re)load.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--policy`: routing for every pool.
    pub routing: Option<RoutingConfig>,
    /// `--lifecycle-log`.
    pub lifecycle_log: Option<String>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
}

impl Overrides {
    /// Applies the overrides to a freshly loaded config.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(r) = &self.routing {
            for p in &mut cfg.pools {
                p.get_mut().routing = r.clone();
            }
        }
        if let Some(l) = &self.lifecycle_log {
            cfg.lifecycle.log = l.clone();
        }
        if let Some(l) = &self.listen {
            cfg.server.listen = l.clone();
        }
        if let Some(l) = &self.admin_listen {
            cfg.server.admin_listen = l.clone();
        }
    }
}

/// One loaded config and everything built from it.
pub struct Generation {
    /// Sequence number, 1 for the first load.
    pub id: u64,
    /// The config.
    pub config: Config,
    /// Pools in config order.
    pub pools: Vec<Arc<Pool>>,
    /// Class rules.
    pub classifier: Classifier,
    /// Where lifecycle records go.
    pub lifecycle: LifecycleLog,
    /// API keys → tenants.
    pub tenants: Directory,
    /// When it was loaded.
    pub loaded_at: Instant,
}

impl Generation {
    /// The pools that serve `model`, in config order.
    pub fn pools_for<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a Arc<Pool>> + 'a {
        self.pools.iter().filter(move |p| p.cfg.serves(model))
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.name() == name)
    }
}

/// State shared by every connection.
pub struct Shared {
    generation: RwLock<Arc<Generation>>,
    next_id: AtomicU64,
    /// Keep-alive connections to replicas.
    pub upstream: UpstreamPool,
    /// Quota state and admission gates (they outlive config generations).
    pub tenancy: Tenancy,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Wall-clock anchor.
    pub clock: Clock,
    /// The file reloads read, when serving from one.
    pub config_path: Option<PathBuf>,
    /// Command-line overrides re-applied on reload.
    pub overrides: Overrides,
    /// Seed for randomised routing policies.
    pub seed: u64,
    /// Experiment arm label for lifecycle records.
    pub arm: Option<String>,
}

impl Shared {
    /// Builds the first generation from `config` and starts its pool tasks
    /// (call inside the runtime).
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        overrides: Overrides,
        seed: u64,
        arm: Option<String>,
    ) -> Result<Arc<Self>, ProxyError> {
        let metrics = Metrics::new();
        let tenancy = Tenancy::new(&config, metrics.registry()).map_err(ProxyError::Config)?;
        let generation = build_generation(1, config, None, &metrics, seed)?;
        let shared = Arc::new(Self {
            generation: RwLock::new(Arc::clone(&generation)),
            next_id: AtomicU64::new(2),
            upstream: UpstreamPool::new(IDLE_PER_REPLICA, UPSTREAM_IDLE),
            tenancy,
            metrics,
            clock: Clock::new(),
            config_path,
            overrides,
            seed,
            arm,
        });
        for p in &generation.pools {
            p.start_tasks(&shared.metrics);
        }
        Ok(shared)
    }

    /// The generation new requests use.
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(
            &self
                .generation
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Re-reads the config file and swaps it in; on any error the running
    /// config stays. Requests in flight finish on the generation they started with.
    pub fn reload(&self) -> Result<u64, ProxyError> {
        let result = self.try_reload();
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        result
    }

    fn try_reload(&self) -> Result<u64, ProxyError> {
        let path = self.config_path.as_ref().ok_or_else(|| {
            ProxyError::Config("no config file to reload (started without --config)".into())
        })?;
        let mut config = Config::load(path)?;
        self.overrides.apply(&mut config);
        config
            .validate(None)
            .map_err(|m| ProxyError::Config(format!("{}: {m}", path.display())))?;
        let old = self.current();
        if config.server.listen != old.config.server.listen
            || config.server.admin_listen != old.config.server.admin_listen
        {
            tracing::warn!(
                "listener addresses changed in the config; they take effect after a restart"
            );
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let generation = build_generation(id, config, Some(&old), &self.metrics, self.seed)?;
        self.tenancy
            .reconfigure(&generation.config)
            .map_err(ProxyError::Config)?;
        for p in &generation.pools {
            p.start_tasks(&self.metrics);
        }
        *self
            .generation
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = generation;
        for p in &old.pools {
            p.stop_tasks();
        }
        Ok(id)
    }
}

fn build_generation(
    id: u64,
    config: Config,
    previous: Option<&Generation>,
    metrics: &Metrics,
    seed: u64,
) -> Result<Arc<Generation>, ProxyError> {
    let classifier = config.classifier()?;
    let tenants = build_directory(&config).map_err(ProxyError::Config)?;
    let lifecycle = match previous {
        Some(p) if p.config.lifecycle.log == config.lifecycle.log => p.lifecycle.clone(),
        _ => LifecycleLog::open(&config.lifecycle.log, metrics.clone())?,
    };
    let tokenizers = config.tokenizers()?;
    let pools = config
        .pools()
        .zip(tokenizers)
        .enumerate()
        .map(|(i, (p, tok))| {
            let prev = previous.and_then(|g| g.pool(&p.name)).map(|a| a.as_ref());
            Pool::new(p.clone(), tok, prev, seed.wrapping_add(i as u64))
        })
        .collect();
    Ok(Arc::new(Generation {
        id,
        config,
        pools,
        classifier,
        lifecycle,
        tenants,
        loaded_at: Instant::now(),
    }))
}
