//! Replay speed: virtual seconds simulated per wall second.
//!
//! `cargo bench -p sluice-lab --bench replay` times replays of the default
//! demo workload (prefix-heavy chat + RAG) on 4 × H100 at a request rate that
//! saturates them. With `LAB_SPEED_REPORT=N` it also times one replay of an
//! N-request trace (tokenization and replay separately) and prints the
//! figures lab/README.md quotes.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use sluice_bench::workload::synth::{SynthSpec, generate};
use sluice_lab::{PreparedWorkload, Scenario, replay};
use sluice_policies::routing::PolicyKind;

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

fn bench_replay(c: &mut Criterion) {
    let w = workload(2000);
    let mut g = c.benchmark_group("replay_4xh100_saturated_2000req");
    g.sample_size(10);
    for policy in [PolicyKind::RoundRobin, PolicyKind::CacheAware] {
        let s = scenario(policy);
        let o = replay(&w, &s).expect("replay");
        let t = Instant::now();
        let runs = 3;
        for _ in 0..runs {
            black_box(replay(&w, &s).expect("replay"));
        }
        let wall = t.elapsed().as_secs_f64() / f64::from(runs);
        eprintln!(
            "{policy}: {:.2} virtual s in {:.4} wall s = {:.0}× real time ({} events, {:.0} req/s completed)",
            o.duration_s,
            wall,
            o.duration_s / wall,
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
    let t = Instant::now();
    let w = workload(n);
    let prep = t.elapsed().as_secs_f64();
    let s = scenario(PolicyKind::CacheAware);
    let t = Instant::now();
    let o = replay(&w, &s).expect("replay");
    let run = t.elapsed().as_secs_f64();
    eprintln!(
        "{n} requests: generate+tokenize {prep:.2} s, replay {run:.2} s ({:.1} virtual s, {:.0}× real time, {} events, {} completed)",
        o.duration_s,
        o.duration_s / run,
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
