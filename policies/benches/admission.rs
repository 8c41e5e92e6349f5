//! Quota and admission hot path: the per-request checks the proxy makes
//! before routing. Target (issue 6): < 20 µs p99 per check.
//!
//! Scenarios: a tenant quota admit + finish; admission of a request into an
//! idle pool (the fast path); and, under contention, a pool whose queue holds
//! ~1000 requests from 64 tenants where every check pushes, polls and admits
//! (all four queue orders). `cargo bench -p sluice-policies --bench admission`
//! also prints p50/p99/p99.9 of single checks timed one by one.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use sluice_policies::admission::{
    AdmissionConfig, AdmissionRequest, KvTicket, Offer, PoolAdmission, PoolSnapshot, Priority,
    QueueOrder,
};
use sluice_policies::quota::{TenantLimits, TenantQuota};
use sluice_policies::routing::EngineGauges;

const TENANTS: usize = 64;
const QUEUE: usize = 1000;

fn tenants() -> Vec<String> {
    (0..TENANTS).map(|i| format!("tenant-{i}")).collect()
}

fn snapshot(kv: f64, now: u64) -> PoolSnapshot {
    PoolSnapshot::from_gauges((0..16).map(|_| {
        (
            EngineGauges {
                running: 8.0,
                waiting: 1.0,
                kv_usage: kv,
                num_gpu_blocks: Some(30_000),
            },
            now,
        )
    }))
    .expect("16 endpoints")
}

fn request<'a>(tenant: &'a str, i: usize) -> AdmissionRequest<'a> {
    AdmissionRequest {
        tenant,
        priority: [Priority::Interactive, Priority::Standard, Priority::Batch][i % 3],
        weight: 1.0 + (i % 4) as f64,
        prompt_tokens: 200 + (i as u32 * 37) % 4000,
        cached_tokens: 0,
        max_tokens: 256,
        ttft_slo_ms: Some(500 + (i as u64 % 5) * 500),
    }
}

/// A pool at its KV threshold with a queue of `QUEUE` requests. Each step
/// offers one request and lets one queued request through (capacity freed
/// by a finished one), so the queue stays full and every path is exercised.
struct Contended {
    adm: PoolAdmission,
    names: Vec<String>,
    held: Vec<KvTicket>,
    i: usize,
    now: u64,
}

impl Contended {
    fn new(order: QueueOrder) -> Self {
        let mut c = Contended {
            adm: PoolAdmission::new(AdmissionConfig {
                order,
                max_queue_len: QUEUE + 24,
                max_queue_wait_ms: u64::MAX / 4,
                starvation_ms: u64::MAX / 4,
                ..Default::default()
            }),
            names: tenants(),
            held: Vec::new(),
            i: 0,
            now: 0,
        };
        let full = snapshot(0.95, 0);
        while c.adm.queue_len() < QUEUE {
            c.step(&full);
        }
        c
    }

    fn step(&mut self, snap: &PoolSnapshot) {
        self.i += 1;
        self.now += 1;
        let tenant = &self.names[self.i % TENANTS];
        let (offer, released) = self
            .adm
            .offer(&request(tenant, self.i), Some(snap), self.now);
        if let Offer::Admitted(kv) = offer {
            self.held.push(kv);
        }
        for (_, kv) in released.admitted {
            self.held.push(kv);
        }
    }

    /// One check under contention: an offer, then a finished request frees
    /// capacity and a poll admits from the queue head.
    fn check(&mut self, full: &PoolSnapshot, roomy: &PoolSnapshot) {
        self.step(full);
        if let Some(kv) = self.held.pop() {
            self.adm.release(kv);
        }
        let r = self.adm.poll(Some(roomy), self.now);
        // Admit at most one per step so the queue stays at its size.
        let mut admitted = r.admitted.into_iter();
        if let Some((_, kv)) = admitted.next() {
            self.held.push(kv);
        }
        for (_, kv) in admitted {
            self.adm.release(kv);
        }
    }
}

/// Snapshot with room for exactly a little: the poll admits about one request.
fn roomy(now: u64) -> PoolSnapshot {
    // 480k blocks, 0.9 allowed = 432k; 431.6k used leaves 400 blocks (any one request fits).
    let mut s = snapshot(0.0, now);
    s.used_blocks = 0.9 * s.total_blocks as f64 - 400.0;
    s
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("quota_admission");
    let mut q = TenantQuota::new(
        TenantLimits {
            tokens_per_minute: Some(u64::MAX / 4),
            max_concurrent: Some(1000),
            max_output_tokens: Some(4096),
            ..Default::default()
        },
        0,
    );
    let mut now = 0;
    g.bench_function("tenant_quota_admit_finish", |b| {
        b.iter(|| {
            now += 1;
            if let Ok(grant) = q.admit(black_box(2000), 256, now) {
                q.finish(grant, 1800, now);
            }
        })
    });
    let mut idle = PoolAdmission::new(AdmissionConfig::default());
    let mut free = snapshot(0.2, 0);
    let names = tenants();
    let mut i = 0;
    g.bench_function("admission_idle_pool_offer_release", |b| {
        b.iter(|| {
            i += 1;
            // Scrapes keep coming in: the gauges are always fresh.
            free.as_of_ms = i as u64;
            let (offer, _) = idle.offer(&request(&names[i % TENANTS], i), Some(&free), i as u64);
            if let Offer::Admitted(kv) = offer {
                idle.release(kv);
            }
        })
    });
    for order in [
        QueueOrder::Fifo,
        QueueOrder::ShortestFirst,
        QueueOrder::Deadline,
        QueueOrder::Fair,
    ] {
        let mut pool = Contended::new(order);
        let full = snapshot(0.95, 0);
        g.bench_function(format!("admission_queue_1000_{order}"), |b| {
            b.iter(|| {
                let roomy = roomy(pool.now);
                pool.check(&full, &roomy)
            })
        });
    }
    g.finish();
}

fn percentiles(n: usize) {
    println!(
        "single-check latency, {n} samples (queue of {QUEUE} from {TENANTS} tenants where noted):"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "check", "p50", "p99", "p99.9", "max"
    );
    let mut q = TenantQuota::new(
        TenantLimits {
            tokens_per_minute: Some(u64::MAX / 4),
            max_concurrent: Some(1000),
            ..Default::default()
        },
        0,
    );
    let mut samples = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        if let Ok(grant) = q.admit(black_box(2000), 256, i) {
            q.finish(grant, 1800, i);
        }
        samples.push(t.elapsed());
    }
    report("tenant quota admit+finish", &mut samples);
    let mut idle = PoolAdmission::new(AdmissionConfig::default());
    let mut free = snapshot(0.2, 0);
    let names = tenants();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        free.as_of_ms = i as u64;
        let t = Instant::now();
        let (offer, _) = idle.offer(&request(&names[i % TENANTS], i), Some(&free), i as u64);
        if let Offer::Admitted(kv) = offer {
            idle.release(kv);
        } else {
            panic!("an idle pool must admit: {offer:?}");
        }
        samples.push(t.elapsed());
    }
    report("offer+release, idle pool", &mut samples);
    for order in [
        QueueOrder::Fifo,
        QueueOrder::ShortestFirst,
        QueueOrder::Deadline,
        QueueOrder::Fair,
    ] {
        let mut pool = Contended::new(order);
        let full = snapshot(0.95, 0);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let roomy = roomy(pool.now);
            let t = Instant::now();
            pool.check(&full, &roomy);
            samples.push(t.elapsed());
        }
        report(&format!("offer+release+poll, {order}"), &mut samples);
        println!("{:<34} queue length {}", "", pool.adm.queue_len());
    }
}

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{:<34} {:>9.2?} {:>9.2?} {:>9.2?} {:>9.2?}",
        name,
        at(0.5),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    );
}

criterion_group!(benches, bench);

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    percentiles(if measuring { 100_000 } else { 100 });
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
