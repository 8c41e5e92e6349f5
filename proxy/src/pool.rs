//! A pool: the replicas serving one model, the router that picks among them
//! (one per arm when the pool runs an experiment, see [`crate::arms`]), and
//! the background tasks that keep its view of them current (DNS
//! re-resolution, active health checks, metric scrapes).
//!
//! Tasks stop when the pool's generation is replaced by a reload; requests
//! already running keep their `Arc<Pool>` and finish against it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sluice_policies::routing::{Decision, EndpointView, RouteRequest};
use sluice_policies::tokenizer::Tokenizer;
use tokio::sync::watch;

use crate::arms::Arms;
use crate::config::{Discovery, PoolConfig};
use crate::endpoint::{Endpoint, Scraped};
use crate::metrics::Metrics;
use crate::outlier::may_eject;
use crate::probe;
use crate::scrape::parse_vllm_gauges;

/// Largest `/metrics` body read from a replica.
const MAX_SCRAPE_BYTES: usize = 4 * 1024 * 1024;

/// One pool of one config generation.
pub struct Pool {
    /// Its config.
    pub cfg: PoolConfig,
    /// Counts and hashes its prompts.
    pub tokenizer: Tokenizer,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    arms: Arms,
    stop: watch::Sender<bool>,
}

/// The routing decision for one attempt.
pub struct Routed {
    /// The chosen endpoint.
    pub endpoint: Arc<Endpoint>,
    /// The policy's answer.
    pub decision: Decision,
}

impl Pool {
    /// Builds a pool, reusing endpoints (and each arm's router, when its config
    /// is unchanged) from `previous`, the same-named pool of the old generation.
    pub fn new(
        cfg: PoolConfig,
        tokenizer: Tokenizer,
        previous: Option<&Pool>,
        seed: u64,
    ) -> Arc<Self> {
        let old: HashMap<SocketAddr, Arc<Endpoint>> = previous
            .map(|p| {
                p.endpoints()
                    .iter()
                    .map(|e| (e.addr, Arc::clone(e)))
                    .collect()
            })
            .unwrap_or_default();
        let addrs = match cfg.discovery() {
            Discovery::Static(addrs) => addrs,
            // Until the first resolution, keep what the old generation knew.
            Discovery::Dns { .. } => old.keys().copied().collect(),
        };
        let endpoints = addrs
            .into_iter()
            .map(|a| old.get(&a).cloned().unwrap_or_else(|| Endpoint::new(a)))
            .collect();
        let arms = Arms::new(&cfg, previous.map(|p| &p.arms), seed);
        let (stop, _) = watch::channel(false);
        Arc::new(Self {
            cfg,
            tokenizer,
            endpoints: RwLock::new(Arc::new(endpoints)),
            arms,
            stop,
        })
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The routing policy of arm `arm` (0 in a pool without an experiment).
    pub fn policy(&self, arm: usize) -> &'static str {
        self.arms.policy(arm)
    }

    /// The pool's arms and their split.
    pub fn arms(&self) -> &Arms {
        &self.arms
    }

    /// The current endpoint list.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        Arc::clone(
            &self
                .endpoints
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn set_endpoints(&self, list: Vec<Arc<Endpoint>>) {
        *self
            .endpoints
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(list);
    }

    /// Age after which scraped gauges count as unknown.
    pub fn stale_after(&self) -> Duration {
        if self.cfg.scrape.enabled {
            Duration::from_millis(self.cfg.scrape.stale_after_ms)
        } else {
            Duration::ZERO
        }
    }

    /// Whether any endpoint may take traffic now.
    pub fn has_routable(&self, now: Instant) -> bool {
        self.endpoints().iter().any(|e| e.is_routable(now))
    }

    /// Asks arm `arm`'s router for an endpoint among the routable ones not in `exclude`.
    pub fn route(
        &self,
        arm: usize,
        req: &RouteRequest<'_>,
        now: Instant,
        exclude: &[Arc<Endpoint>],
    ) -> Option<Routed> {
        let all = self.endpoints();
        let stale = self.stale_after();
        let candidates: Vec<&Arc<Endpoint>> = all
            .iter()
            .filter(|e| e.is_routable(now) && !exclude.iter().any(|x| Arc::ptr_eq(x, e)))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let views: Vec<EndpointView<'_>> = candidates
            .iter()
            .map(|e| EndpointView {
                key: &e.key,
                load: e.load(now, stale),
            })
            .collect();
        let decision = self.arms.pick(arm, req, &views)?;
        let endpoint = Arc::clone(candidates.get(decision.index)?);
        Some(Routed { endpoint, decision })
    }

    /// Entries in the routers' bounded state (every arm's together).
    pub fn router_state_size(&self) -> usize {
        self.arms.state_size()
    }

    /// Attributes a failure to `endpoint`, ejecting it if the run is long
    /// enough and the pool's cap allows; returns whether it was ejected.
    pub fn record_failure(&self, endpoint: &Endpoint, now: Instant) -> bool {
        let all = self.endpoints();
        let ejected = all.iter().filter(|e| e.is_ejected(now)).count();
        let allowed = may_eject(ejected, all.len(), self.cfg.ejection.max_ejection_percent);
        endpoint.record_failure(now, &self.cfg.ejection, allowed)
    }

    /// Starts DNS, health and scrape tasks on the current runtime.
    pub fn start_tasks(self: &Arc<Self>, metrics: &Metrics) {
        if let Discovery::Dns { target, refresh_ms } = self.cfg.discovery() {
            let pool = Arc::clone(self);
            let mut stop = self.stop.subscribe();
            tokio::spawn(async move {
                loop {
                    pool.resolve(&target).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(refresh_ms)) => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        let pool = Arc::clone(self);
        let metrics = metrics.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let connector = pingora::connectors::http::v1::Connector::new(None);
            let health_every = Duration::from_millis(pool.cfg.health.interval_ms);
            let scrape_every = Duration::from_millis(pool.cfg.scrape.interval_ms);
            let mut next_health = Instant::now();
            let mut next_scrape = Instant::now();
            loop {
                let now = Instant::now();
                if now >= next_health {
                    pool.check_health(&connector, &metrics).await;
                    next_health = now + health_every;
                }
                if pool.cfg.scrape.enabled && now >= next_scrape {
                    pool.scrape(&connector).await;
                    next_scrape = now + scrape_every;
                }
                let wake = if pool.cfg.scrape.enabled {
                    next_health.min(next_scrape)
                } else {
                    next_health
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    /// Stops the background tasks (the generation was replaced).
    pub fn stop_tasks(&self) {
        let _ = self.stop.send(true);
    }

    async fn resolve(&self, target: &str) {
        let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(target).await {
            Ok(addrs) => {
                let mut v: Vec<SocketAddr> = addrs.collect();
                v.sort();
                v.dedup();
                v
            }
            Err(e) => {
                tracing::warn!(pool = %self.cfg.name, %target, error = %e, "DNS resolution failed; keeping the last known endpoints");
                return;
            }
        };
        if resolved.is_empty() {
            // An empty answer during a rollout is more likely a blip than a real scale-to-zero.
            tracing::warn!(pool = %self.cfg.name, %target, "DNS returned no addresses; keeping the last known endpoints");
            return;
        }
        let old = self.endpoints();
        if old.iter().map(|e| e.addr).collect::<Vec<_>>() == resolved {
            return;
        }
        let list = resolved
            .into_iter()
            .map(|a| {
                old.iter()
                    .find(|e| e.addr == a)
                    .cloned()
                    .unwrap_or_else(|| Endpoint::new(a))
            })
            .collect::<Vec<_>>();
        tracing::info!(pool = %self.cfg.name, endpoints = list.len(), "DNS endpoints changed");
        self.set_endpoints(list);
    }

    async fn check_health(
        &self,
        connector: &pingora::connectors::http::v1::Connector,
        metrics: &Metrics,
    ) {
        let h = &self.cfg.health;
        let timeout = Duration::from_millis(h.timeout_ms);
        let eps = self.endpoints();
        let probes = eps.iter().map(|e| async move {
            let r = probe::get(connector, e.addr, &h.path, timeout, 64 * 1024).await;
            let ok = match r {
                Ok((s, _)) if (200..300).contains(&s) => Ok(()),
                Ok((s, _)) => Err(format!("status {s}")),
                Err(e) => Err(e),
            };
            (e, ok)
        });
        for (e, ok) in futures::future::join_all(probes).await {
            let failed = ok.as_ref().err().cloned();
            if e.record_probe(ok, h) {
                match failed {
                    Some(err) => {
                        tracing::warn!(pool = %self.cfg.name, endpoint = %e.key, error = %err, "endpoint unhealthy")
                    }
                    None => {
                        tracing::info!(pool = %self.cfg.name, endpoint = %e.key, "endpoint healthy again")
                    }
                }
            }
            metrics
                .upstream_healthy
                .with_label_values(&[self.cfg.name.as_str(), e.key.as_str()])
                .set(i64::from(e.is_healthy()));
        }
    }

    async fn scrape(&self, connector: &pingora::connectors::http::v1::Connector) {
        let s = &self.cfg.scrape;
        let timeout = Duration::from_millis(s.interval_ms.max(100));
        let eps = self.endpoints();
        let scrapes = eps.iter().map(|e| async move {
            let r = probe::get(connector, e.addr, &s.path, timeout, MAX_SCRAPE_BYTES).await;
            let parsed = match r {
                Ok((200, body)) => {
                    match std::str::from_utf8(&body).ok().and_then(parse_vllm_gauges) {
                        Some(gauges) => Ok(Scraped {
                            gauges,
                            at: Instant::now(),
                            in_flight: e.in_flight(),
                        }),
                        None => Err("no vllm: gauges in /metrics".to_string()),
                    }
                }
                Ok((status, _)) => Err(format!("status {status}")),
                Err(e) => Err(e),
            };
            e.set_scraped(parsed);
        });
        futures::future::join_all(scrapes).await;
    }
}
