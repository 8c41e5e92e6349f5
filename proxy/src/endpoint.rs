//! One replica as the proxy sees it: its address, whether it may receive
//! traffic (active health and passive ejection), what the proxy has in flight
//! there, and the engine gauges last scraped from it.
//!
//! An `Endpoint` outlives config reloads (a reload that keeps the address
//! keeps the state), and in-flight requests hold it by `Arc`, so a replica
//! removed from the config still counts down its requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_policies::routing::{EndpointLoad, EngineGauges};

use crate::config::{EjectionConfig, HealthConfig};
use crate::outlier::Outlier;

/// The engine gauges and when they were read.
#[derive(Debug, Clone, Copy)]
pub struct Scraped {
    /// The values.
    pub gauges: EngineGauges,
    /// When the scrape completed.
    pub at: Instant,
    /// The proxy's requests in flight there when the scrape completed: the
    /// part of the engine's count that is the proxy's own traffic.
    pub in_flight: u32,
}

#[derive(Debug, Default)]
struct HealthRun {
    failures: u32,
    successes: u32,
    last_error: Option<String>,
    checked: bool,
}

/// One replica.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Stable key (`ip:port`) used by routers and metric labels.
    pub key: String,
    healthy: AtomicBool,
    health: Mutex<HealthRun>,
    outlier: Mutex<Outlier>,
    in_flight: AtomicU32,
    in_flight_tokens: AtomicU64,
    scraped: Mutex<Option<Scraped>>,
    scrape_error: Mutex<Option<String>>,
}

impl Endpoint {
    /// A new endpoint, assumed healthy until a check says otherwise so a
    /// freshly started proxy serves at once.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            key: addr.to_string(),
            healthy: AtomicBool::new(true),
            health: Mutex::new(HealthRun::default()),
            outlier: Mutex::new(Outlier::default()),
            in_flight: AtomicU32::new(0),
            in_flight_tokens: AtomicU64::new(0),
            scraped: Mutex::new(None),
            scrape_error: Mutex::new(None),
        })
    }

    /// Passes active health checks.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Passively ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.outlier).is_ejected(now)
    }

    /// May receive new requests at `now`.
    pub fn is_routable(&self, now: Instant) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }

    /// Applies one active probe result; returns whether health flipped.
    pub fn record_probe(&self, ok: Result<(), String>, cfg: &HealthConfig) -> bool {
        let mut run = lock(&self.health);
        run.checked = true;
        let was = self.is_healthy();
        match ok {
            Ok(()) => {
                run.failures = 0;
                run.successes = run.successes.saturating_add(1);
                run.last_error = None;
                if !was && run.successes >= cfg.healthy_threshold {
                    self.healthy.store(true, Ordering::Relaxed);
                    return true;
                }
            }
            Err(e) => {
                run.successes = 0;
                run.failures = run.failures.saturating_add(1);
                run.last_error = Some(e);
                if was && run.failures >= cfg.unhealthy_threshold {
                    self.healthy.store(false, Ordering::Relaxed);
                    return true;
                }
            }
        }
        false
    }

    /// Records a failure attributed to this endpoint; returns whether it was ejected.
    pub fn record_failure(&self, now: Instant, cfg: &EjectionConfig, may_eject: bool) -> bool {
        lock(&self.outlier).record_failure(now, cfg, may_eject)
    }

    /// Records a request it served.
    pub fn record_success(&self, now: Instant) {
        lock(&self.outlier).record_success(now);
    }

    /// Stores a scrape result.
    pub fn set_scraped(&self, result: Result<Scraped, String>) {
        match result {
            Ok(s) => {
                *lock(&self.scraped) = Some(s);
                *lock(&self.scrape_error) = None;
            }
            Err(e) => *lock(&self.scrape_error) = Some(e),
        }
    }

    /// Age of the last good scrape.
    pub fn scrape_age(&self, now: Instant) -> Option<Duration> {
        lock(&self.scraped).map(|s| now.saturating_duration_since(s.at))
    }

    /// The load view a router sees: proxy counts plus gauges no older than `stale_after`.
    pub fn load(&self, now: Instant, stale_after: Duration) -> EndpointLoad {
        let fresh =
            lock(&self.scraped).filter(|s| now.saturating_duration_since(s.at) <= stale_after);
        EndpointLoad {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            in_flight_tokens: self.in_flight_tokens.load(Ordering::Relaxed),
            engine: fresh.map(|s| s.gauges),
            in_flight_at_scrape: fresh.map_or(0, |s| s.in_flight),
        }
    }

    /// Counts a request as in flight here until the guard drops.
    pub fn start_request(self: &Arc<Self>, tokens: u64) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        InFlight {
            endpoint: Arc::clone(self),
            tokens,
        }
    }

    /// Requests in flight here now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A snapshot for the admin state view.
    pub fn snapshot(&self, now: Instant, stale_after: Duration) -> EndpointSnapshot {
        let run = lock(&self.health);
        let outlier = lock(&self.outlier);
        let scraped = *lock(&self.scraped);
        EndpointSnapshot {
            address: self.key.clone(),
            healthy: self.is_healthy(),
            checked: run.checked,
            last_health_error: run.last_error.clone(),
            ejected: outlier.is_ejected(now),
            consecutive_failures: outlier.consecutive_failures(),
            in_flight: self.in_flight(),
            in_flight_tokens: self.in_flight_tokens.load(Ordering::Relaxed),
            scrape_age_seconds: scraped.map(|s| now.saturating_duration_since(s.at).as_secs_f64()),
            engine_stale: scraped.is_none_or(|s| now.saturating_duration_since(s.at) > stale_after),
            num_requests_running: scraped.map(|s| s.gauges.running),
            num_requests_waiting: scraped.map(|s| s.gauges.waiting),
            kv_cache_usage_perc: scraped.map(|s| s.gauges.kv_usage),
            num_gpu_blocks: scraped.and_then(|s| s.gauges.num_gpu_blocks),
            last_scrape_error: lock(&self.scrape_error).clone(),
        }
    }
}

/// What `/admin/state` shows for one endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointSnapshot {
    /// `ip:port`.
    pub address: String,
    /// Passes health checks.
    pub healthy: bool,
    /// At least one health check ran.
    pub checked: bool,
    /// Why the last check failed.
    pub last_health_error: Option<String>,
    /// Passively ejected now.
    pub ejected: bool,
    /// Attributed failures in the current run.
    pub consecutive_failures: u32,
    /// Proxy's requests in flight there.
    pub in_flight: u32,
    /// Their prompt + output tokens.
    pub in_flight_tokens: u64,
    /// Age of the last good scrape.
    pub scrape_age_seconds: Option<f64>,
    /// The gauges are missing or too old to route on.
    pub engine_stale: bool,
    /// `vllm:num_requests_running`.
    pub num_requests_running: Option<f64>,
    /// `vllm:num_requests_waiting`.
    pub num_requests_waiting: Option<f64>,
    /// `vllm:kv_cache_usage_perc`.
    pub kv_cache_usage_perc: Option<f64>,
    /// From `vllm:cache_config_info`.
    pub num_gpu_blocks: Option<u64>,
    /// Why the last scrape failed.
    pub last_scrape_error: Option<String>,
}

/// A request in flight on an endpoint; dropping it (on every path) counts it down.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    tokens: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.endpoint
            .in_flight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (every value kept here stays valid mid-update).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_down_on_drop() {
        let e = Endpoint::new("127.0.0.1:1".parse().unwrap());
        let a = e.start_request(10);
        let b = e.start_request(5);
        let now = Instant::now();
        assert_eq!(e.load(now, Duration::from_secs(1)).in_flight_tokens, 15);
        drop(a);
        drop(b);
        let l = e.load(now, Duration::from_secs(1));
        assert_eq!((l.in_flight, l.in_flight_tokens), (0, 0));
    }

    #[test]
    fn stale_gauges_are_unknown() {
        let e = Endpoint::new("127.0.0.1:1".parse().unwrap());
        let t = Instant::now();
        e.set_scraped(Ok(Scraped {
            gauges: EngineGauges {
                running: 3.0,
                ..EngineGauges::default()
            },
            at: t,
            in_flight: 0,
        }));
        let fresh = e.load(t + Duration::from_millis(500), Duration::from_secs(1));
        assert_eq!(fresh.engine.unwrap().running, 3.0);
        assert!(
            e.load(t + Duration::from_secs(2), Duration::from_secs(1))
                .engine
                .is_none()
        );
    }

    #[test]
    fn health_thresholds() {
        let cfg = HealthConfig {
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            ..HealthConfig::default()
        };
        let e = Endpoint::new("127.0.0.1:1".parse().unwrap());
        assert!(!e.record_probe(Err("x".into()), &cfg));
        assert!(e.is_healthy());
        assert!(e.record_probe(Err("x".into()), &cfg));
        assert!(!e.is_healthy());
        assert!(!e.record_probe(Ok(()), &cfg));
        assert!(e.record_probe(Ok(()), &cfg));
        assert!(e.is_healthy());
    }
}
