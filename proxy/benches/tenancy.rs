//! The proxy's per-request tenant checks as the request path runs them:
//! authenticate (hash the key, look up the tenant), tenant quota (rate
//! limiters, caps, concurrency slot, token reservation) and the pool's
//! admission gate, then the releases when the request ends. Target (issue 6):
//! < 20 µs p99 for quota + admission.
//!
//! `cargo bench -p sluice-proxy --bench tenancy` prints p50/p99/p99.9 of
//! single checks timed one by one (the target is a p99), then runs criterion.
//! With `SLUICE_BENCH_REDIS=redis://127.0.0.1:PORT` it also times the Redis
//! backend's admit (one round trip) against that server.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use prometheus::Registry;
use sluice_policies::admission::{AdmissionConfig, AdmissionRequest, Priority};
use sluice_policies::quota::TenantLimits;
use sluice_proxy::admission::PoolGate;
use sluice_proxy::config_tenants::{
    AuthConfig, FailPolicy, QuotaBackend, QuotaConfig, TenantConfig,
};
use sluice_proxy::quota::Quotas;
use sluice_proxy::tenant::{Directory, digest, hex};
use sluice_proxy::usage::UsageMetrics;

const TENANTS: usize = 64;

fn limits() -> TenantLimits {
    // Generous: the bench measures the checks, not refusals.
    TenantLimits {
        requests_per_second: Some(1_000_000),
        requests_per_minute: Some(60_000_000),
        tokens_per_minute: Some(10_000_000_000),
        max_concurrent: Some(1_000_000),
        max_output_tokens: Some(4096),
        ..TenantLimits::default()
    }
}

fn directory() -> Directory {
    let tenants: Vec<TenantConfig> = (0..TENANTS)
        .map(|i| TenantConfig {
            name: format!("tenant-{i}"),
            api_key_sha256: vec![hex(&digest(&format!("sk-{i}")))],
            api_key_env: Vec::new(),
            models: Vec::new(),
            priority: Priority::Standard,
            weight: 1.0,
            cache_isolation: false,
            limits: limits(),
        })
        .collect();
    Directory::build(&tenants, &AuthConfig::default(), &|_| None).expect("tenants")
}

struct Path {
    dir: Directory,
    quotas: Quotas,
    gate: std::sync::Arc<PoolGate>,
    keys: Vec<String>,
}

impl Path {
    fn new(quota: &QuotaConfig) -> Self {
        let registry = Registry::new();
        let metrics = UsageMetrics::new(&registry);
        Self {
            dir: directory(),
            quotas: Quotas::new(quota, metrics.clone()).expect("quotas"),
            gate: PoolGate::new("bench", AdmissionConfig::default(), metrics),
            keys: (0..TENANTS).map(|i| format!("Bearer sk-{i}")).collect(),
        }
    }

    /// One request's checks and releases.
    async fn one(&self, i: usize) {
        let tenant = self
            .dir
            .authenticate(Some(&self.keys[i % TENANTS]))
            .expect("known key");
        let mut permit = self
            .quotas
            .admit(&tenant, 1000, 256)
            .await
            .expect("within limits");
        let req = AdmissionRequest {
            tenant: &tenant.name,
            priority: tenant.priority,
            weight: tenant.weight,
            prompt_tokens: 1000,
            cached_tokens: 0,
            max_tokens: permit.max_tokens,
            ttft_slo_ms: None,
        };
        let (mut slot, _) = self
            .gate
            .admit(&req, std::future::pending())
            .await
            .expect("idle pool admits");
        permit.record_usage(1100);
        slot.record_output(100);
        black_box((&permit, &slot));
    }
}

fn percentiles(label: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
    println!(
        "{label}: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs ({} samples)",
        at(0.5) as f64 / 1000.0,
        at(0.99) as f64 / 1000.0,
        at(0.999) as f64 / 1000.0,
        ns.len()
    );
}

fn time_one_by_one(rt: &tokio::runtime::Runtime, path: &Path, n: usize) -> Vec<u64> {
    rt.block_on(async {
        for i in 0..1000 {
            path.one(i).await;
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            path.one(i).await;
            out.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        out
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = rt.block_on(async { Path::new(&QuotaConfig::default()) });
    percentiles(
        "auth + quota + admission + release, local backend, 64 tenants",
        time_one_by_one(&rt, &local, 100_000),
    );
    if let Ok(url) = std::env::var("SLUICE_BENCH_REDIS") {
        let cfg = QuotaConfig {
            backend: QuotaBackend::Redis,
            redis_url: Some(url),
            on_backend_error: FailPolicy::Closed,
            redis_timeout_ms: 1000,
            key_prefix: format!("bench{}", std::process::id()),
            ..QuotaConfig::default()
        };
        let redis = rt.block_on(async { Path::new(&cfg) });
        percentiles(
            "same, redis backend (one admit round trip; settle runs in the background)",
            time_one_by_one(&rt, &redis, 20_000),
        );
    }
    let mut i = 0usize;
    c.bench_function("tenancy/auth+quota+admission+release", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            rt.block_on(local.one(i));
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
