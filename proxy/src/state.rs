//! What the listeners share: the current config generation (swapped whole
//! on reload), the upstream connector, metrics and the lifecycle log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_policies::classify::Classifier;
use sluice_policies::routing::RoutingConfig;

use crate::config::Config;
use crate::config_watch::{FileStamp, stamps};
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
    /// The pools' tokenizer files, and what their metadata said just before
    /// they were loaded (the file watcher reloads when it changes).
    pub tokenizer_files: Vec<PathBuf>,
    /// Stamps of `tokenizer_files`, in order.
    pub tokenizer_stamps: Vec<Option<FileStamp>>,
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

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadTrigger {
    /// SIGHUP.
    Signal,
    /// The config file's content changed.
    FileChange,
}

/// The outcome of the latest reload attempt, shown on `/admin/state`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// What asked for it.
    pub trigger: ReloadTrigger,
    /// When it ran (Unix milliseconds).
    pub at_ms: f64,
    /// Whether the new config is now in use.
    pub ok: bool,
    /// The generation in use afterwards.
    pub generation: u64,
    /// Why the new config was rejected.
    pub error: Option<String>,
}

/// State shared by every connection.
pub struct Shared {
    generation: RwLock<Arc<Generation>>,
    next_id: AtomicU64,
    /// The config file's bytes as last read by a (re)load, so the file
    /// watcher reloads each new content once, whether it loads or not.
    seen_config: Mutex<Option<Vec<u8>>>,
    last_reload: Mutex<Option<ReloadStatus>>,
    /// One reload at a time (SIGHUP and the file watcher may fire together):
    /// two interleaved swaps would leave one new generation's tasks running.
    reloading: Mutex<()>,
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
        let seen = config_path.as_ref().and_then(|p| std::fs::read(p).ok());
        let shared = Arc::new(Self {
            generation: RwLock::new(Arc::clone(&generation)),
            next_id: AtomicU64::new(2),
            seen_config: Mutex::new(seen),
            last_reload: Mutex::new(None),
            reloading: Mutex::new(()),
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
    /// config stays. Requests in flight finish on the generation they started
    /// with. The outcome is counted, logged and kept for `/admin/state`.
    pub fn reload(&self, trigger: ReloadTrigger) -> Result<u64, ProxyError> {
        let _one_at_a_time = lock(&self.reloading);
        let result = self.try_reload();
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        match &result {
            Ok(id) => tracing::info!(generation = id, ?trigger, "config reloaded"),
            Err(e) => {
                tracing::error!(error = %e, ?trigger, "config reload rejected; the running config stays");
                eprintln!("sluice: reload rejected, keeping the running config: {e}");
            }
        }
        *lock(&self.last_reload) = Some(ReloadStatus {
            trigger,
            at_ms: self.clock.unix_ms(Instant::now()),
            ok: result.is_ok(),
            generation: self.current().id,
            error: result.as_ref().err().map(ToString::to_string),
        });
        result
    }

    /// The latest reload attempt, if any.
    pub fn last_reload(&self) -> Option<ReloadStatus> {
        lock(&self.last_reload).clone()
    }

    /// Whether `content` differs from the config file as last (re)loaded.
    pub fn config_changed(&self, content: &[u8]) -> bool {
        lock(&self.seen_config).as_deref() != Some(content)
    }

    /// Tells SIGHUP/SIGUSR1 to the lifecycle writer: reopen the file.
    pub fn reopen_logs(&self) {
        self.current().lifecycle.reopen();
    }

    fn try_reload(&self) -> Result<u64, ProxyError> {
        let path = self.config_path.as_ref().ok_or_else(|| {
            ProxyError::Config("no config file to reload (started without --config)".into())
        })?;
        // Remembered before parsing, so a broken file is tried once, not every poll.
        *lock(&self.seen_config) = std::fs::read(path).ok();
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
        // Taken only once the generation is built (reloads run one at a time),
        // so generation numbers count the configs that really loaded.
        let id = self.next_id.load(Ordering::Relaxed);
        let generation = build_generation(id, config, Some(&old), &self.metrics, self.seed)?;
        self.tenancy
            .reconfigure(&generation.config)
            .map_err(ProxyError::Config)?;
        self.next_id.store(id + 1, Ordering::Relaxed);
        for p in &generation.pools {
            p.start_tasks(&self.metrics);
        }
        generation
            .lifecycle
            .set_rotation(generation.config.lifecycle.rotation());
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    let rotation = config.lifecycle.rotation();
    let lifecycle = match previous {
        // The same destination keeps its writer (two writers on one file would
        // interleave and rotate each other's files); new limits apply to it
        // once the reload is committed.
        Some(p) if p.lifecycle.dest() == config.lifecycle.log => p.lifecycle.clone(),
        _ => LifecycleLog::open(&config.lifecycle.log, rotation, metrics.clone())?,
    };
    // Stamped before reading, so a write during the load shows as a change.
    let tokenizer_files: Vec<PathBuf> =
        config.pools().filter_map(|p| p.tokenizer.clone()).collect();
    let tokenizer_stamps = stamps(&tokenizer_files);
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
        tokenizer_files,
        tokenizer_stamps,
    }))
}
