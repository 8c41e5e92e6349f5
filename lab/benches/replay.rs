//! Replay speed: virtual seconds simulated per wall second.
//!
//! `cargo bench -p sluice-lab --bench replay` times replays of the default
//! demo workload (prefix-heavy chat + RAG) on 4 × H100 at a request rate that
//! saturates them. With `LAB_SPEED_REPORT=N` it also times one replay of an
//! N-request trace (generation, tokenization and replay separately) and
//! prints the figures lab/README.md quotes.
//!
//! Besides criterion's figures it prints, per policy, the fastest of a few
//! replays by wall clock and their CPU time (this thread's run time from
//! `/proc/thread-self/schedstat`, where the kernel offers it): on a machine
//! shared with other jobs the mean wall time mostly measures the others.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use sluice_bench::workload::synth::{SynthSpec, generate};
use sluice_lab::{PreparedWorkload, Scenario, replay};
use sluice_policies::routing::PolicyKind;

// The allocator the `sluice` binary runs `simulate` and `capacity` with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// 45 req/s × 6 is past the knee of 4 × H100 on this workload (throughput stops growing).
const SATURATING_RATE_SCALE: f64 = 6.0;

fn workload(requests: usize) -> PreparedWorkload {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/workloads/demo.toml");
    let mut spec = SynthSpec::load(&path).expect("demo workload spec");
    spec.requests = Some(requests);
    let reqs = generate(&spec).expect("generate");
    PreparedWorkload::new(reqs, 16).expect("prepare")
}

fn scenario(policy: PolicyKind) -> Scenario {
    let mut s = Scenario::resolve(4, "llama-3.1-8b", "h100")
        .expect("scenario")
        .with_policy(policy);
    s.rate_scale = SATURATING_RATE_SCALE;
    s
}

/// CPU time this thread has run, when the kernel reports it.
fn thread_cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Wall and CPU seconds of one call of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, Option<f64>) {
    let cpu = thread_cpu_time();
    let t = Instant::now();
    let out = f();
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu
        .zip(thread_cpu_time())
        .map(|(a, b)| b.saturating_sub(a).as_secs_f64());
    (out, wall, cpu)
}

fn bench_replay(c: &mut Criterion) {
    let w = workload(2000);
    let mut g = c.benchmark_group("replay_4xh100_saturated_2000req");
    g.sample_size(10);
    for policy in [PolicyKind::RoundRobin, PolicyKind::CacheAware] {
        let s = scenario(policy);
        let o = replay(&w, &s).expect("replay");
        let runs = 10;
        let (mut best_wall, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..runs {
            let (out, wall, cpu) = timed(|| replay(&w, &s).expect("replay"));
            black_box(out);
            best_wall = best_wall.min(wall);
            best_cpu = best_cpu.min(cpu.unwrap_or(f64::INFINITY));
        }
        let cpu = if best_cpu.is_finite() {
            format!(", CPU {best_cpu:.4} s = {:.0}×", o.duration_s / best_cpu)
        } else {
            String::new()
        };
        eprintln!(
            "{policy}: {:.2} virtual s; fastest of {runs}: wall {best_wall:.4} s = {:.0}× real time{cpu} ({} events, {:.0} req/s completed)",
            o.duration_s,
            o.duration_s / best_wall,
            o.events,
            o.summary.request_throughput
        );
        g.bench_function(policy.as_str(), |b| {
            b.iter(|| black_box(replay(&w, &s).expect("replay")))
        });
    }
    g.finish();
}

/// One timed replay of a large trace, printed (not a criterion measurement: it runs once).
fn speed_report(n: usize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/workloads/demo.toml");
    let mut spec = SynthSpec::load(&path).expect("demo workload spec");
    spec.requests = Some(n);
    let (reqs, gen_wall, gen_cpu) = timed(|| generate(&spec).expect("generate"));
    let (w, tok_wall, tok_cpu) = timed(|| PreparedWorkload::new(reqs, 16).expect("prepare"));
    let s = scenario(PolicyKind::CacheAware);
    let (o, run_wall, run_cpu) = timed(|| replay(&w, &s).expect("replay"));
    let cpu = |c: Option<f64>| c.map_or(String::new(), |c| format!(" (CPU {c:.2} s)"));
    eprintln!(
        "{n} requests: generate {gen_wall:.2} s{}, tokenize {tok_wall:.2} s{}, replay {run_wall:.2} s{} \
         ({:.1} virtual s, {:.0}× real time by wall clock, {} events, {} completed)",
        cpu(gen_cpu),
        cpu(tok_cpu),
        cpu(run_cpu),
        o.duration_s,
        o.duration_s / run_wall,
        o.events,
        o.summary.completed
    );
}

criterion_group!(benches, bench_replay);

fn main() {
    if let Some(n) = std::env::var("LAB_SPEED_REPORT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        speed_report(n);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
