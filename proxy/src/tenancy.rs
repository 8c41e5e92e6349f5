//! What tenants, quotas and admission keep across config generations: the
//! quota state (usage survives a reload), one admission gate per pool that
//! configures `[pools.admission]`, and the usage metrics.
//!
//! The tenant directory (keys → tenants) belongs to a config generation and
//! is built with it ([`build_directory`]).

use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use prometheus::Registry;

use crate::admission::PoolGate;
use crate::config::Config;
use crate::config_tenants::QuotaConfig;
use crate::pool::Pool;
use crate::quota::Quotas;
use crate::tenant::Directory;
use crate::usage::UsageMetrics;

/// Shared tenant state of a running proxy.
pub struct Tenancy {
    metrics: UsageMetrics,
    quotas: RwLock<(QuotaConfig, Arc<Quotas>)>,
    gates: DashMap<String, Arc<PoolGate>>,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy")
            .field("gates", &self.gates.len())
            .finish_non_exhaustive()
    }
}

/// The tenant directory of `cfg`, reading `api_key_env` from the process environment.
pub fn build_directory(cfg: &Config) -> Result<Directory, String> {
    let tenants: Vec<_> = cfg.tenants.iter().map(|t| t.get_ref().clone()).collect();
    Directory::build(&tenants, &cfg.auth, &|var| std::env::var(var).ok())
}

impl Tenancy {
    /// State for the first config; registers the usage metrics in `registry`.
    pub fn new(cfg: &Config, registry: &Registry) -> Result<Self, String> {
        let metrics = UsageMetrics::new(registry);
        let quotas = Arc::new(Quotas::new(&cfg.quota, metrics.clone())?);
        Ok(Self {
            metrics,
            quotas: RwLock::new((cfg.quota.clone(), quotas)),
            gates: DashMap::new(),
        })
    }

    /// Applies a reloaded config: a changed `[quota]` section starts fresh
    /// quota state; gates whose settings changed are rebuilt on next use.
    pub fn reconfigure(&self, cfg: &Config) -> Result<(), String> {
        let mut q = self
            .quotas
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.0 != cfg.quota {
            *q = (
                cfg.quota.clone(),
                Arc::new(Quotas::new(&cfg.quota, self.metrics.clone())?),
            );
        }
        drop(q);
        let names: Vec<&str> = cfg.pools().map(|p| p.name.as_str()).collect();
        self.gates.retain(|name, _| names.contains(&name.as_str()));
        Ok(())
    }

    /// The quota state requests use now.
    pub fn quotas(&self) -> Arc<Quotas> {
        Arc::clone(
            &self
                .quotas
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .1,
        )
    }

    /// The admission gate of `pool`, or `None` when it has no `[pools.admission]`.
    pub fn gate(&self, pool: &Arc<Pool>) -> Option<Arc<PoolGate>> {
        let cfg = pool.cfg.admission?;
        if let Some(g) = self.gates.get(pool.name())
            && *g.config() == cfg
        {
            g.set_pool(pool);
            return Some(Arc::clone(g.value()));
        }
        let g = PoolGate::new(pool.name(), cfg, self.metrics.clone());
        g.set_pool(pool);
        self.gates.insert(pool.name().to_string(), Arc::clone(&g));
        Some(g)
    }

    /// The usage metrics.
    pub fn metrics(&self) -> &UsageMetrics {
        &self.metrics
    }
}
