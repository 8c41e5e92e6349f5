//! Replay outcomes as digests, and replay timings.
//!
//! `outcome_digest` replays the demo workload (2,000 requests) through seven
//! scenarios — both bench policies, SPF, EDF with an SLO, the KV admission
//! gate, and a small pool that forces preemptions under FCFS and under a
//! priority queue — and prints a hash of each whole `Outcome`'s `Debug` form:
//! a speed change must leave every one of them unchanged.
//!
//! `outcome_digest time <policy> [runs]` prints the fastest of `runs` (20)
//! saturated replays on 4 × H100 and its multiple of real time;
//! `outcome_digest once <policy>` runs one, for instruction counts under
//! callgrind (see `lab/README.md`, "Speed").
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;

use sluice_bench::workload::synth::{SynthSpec, generate};
use sluice_lab::{PreparedWorkload, Scenario, Scheduler, parse_admission, replay};
use sluice_policies::routing::PolicyKind;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/workloads/demo.toml");
    let mut spec = SynthSpec::load(&path).expect("spec");
    spec.requests = Some(2000);
    let w = PreparedWorkload::new(generate(&spec).expect("gen"), 16).expect("prep");
    let args: Vec<String> = std::env::args().collect();
    let policy = || -> PolicyKind { args[2].parse().expect("policy") };
    match args.get(1).map(String::as_str) {
        // `outcome_digest time <policy> <runs>`: fastest wall time of `runs` saturated replays.
        Some("time") => {
            let (policy, s) = (policy(), fleet(policy(), 6.0));
            let runs: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(20);
            let mut best = f64::INFINITY;
            let mut virt = 0.0;
            for _ in 0..runs {
                let t = std::time::Instant::now();
                let o = replay(&w, &s).expect("replay");
                best = best.min(t.elapsed().as_secs_f64());
                virt = o.duration_s;
            }
            println!(
                "{policy}: fastest of {runs}: {:.2} ms = {:.0}x",
                best * 1e3,
                virt / best
            );
            return;
        }
        // `outcome_digest once <policy>`: one saturated replay, for instruction counts.
        Some("once") => {
            let o = replay(&w, &fleet(policy(), 6.0)).expect("replay");
            println!("{} tokens", o.summary.total_output_tokens);
            return;
        }
        _ => {}
    }
    let mut all = DefaultHasher::new();
    for (policy, sched, adm, blocks, rate) in [
        (PolicyKind::RoundRobin, Scheduler::Fcfs, false, None, 6.0),
        (PolicyKind::CacheAware, Scheduler::Fcfs, false, None, 6.0),
        (PolicyKind::LeastRequests, Scheduler::Spf, false, None, 6.0),
        (PolicyKind::PrefixAffinity, Scheduler::Edf, false, None, 3.0),
        (PolicyKind::CacheAware, Scheduler::Fcfs, true, None, 6.0),
        (
            PolicyKind::RoundRobin,
            Scheduler::Fcfs,
            false,
            Some(3000),
            3.0,
        ),
        (
            PolicyKind::CacheAware,
            Scheduler::Spf,
            false,
            Some(3000),
            3.0,
        ),
    ] {
        let mut s = fleet(policy, rate);
        s.scheduler = sched;
        s.engine.num_gpu_blocks = blocks;
        s.slo.ttft_ms = Some(500.0);
        if adm {
            s.admission = Some(parse_admission("kv", 16).expect("adm"));
        }
        let o = replay(&w, &s).expect("replay");
        let text = format!("{:?}", o);
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        text.hash(&mut all);
        let pre: u64 = o.replicas.iter().map(|r| r.preemptions).sum();
        println!(
            "{policy} {sched} adm={adm} blocks={blocks:?}: {:016x} ({} events, {:.2} s, {pre} preemptions, {} ok)",
            h.finish(),
            o.events,
            o.duration_s,
            o.summary.completed
        );
    }
    println!("all: {:016x}", all.finish());
}

/// The bench's fleet: 4 × H100 serving llama-3.1-8b under `policy`, the
/// demo workload's rate scaled by `rate`.
fn fleet(policy: PolicyKind, rate: f64) -> Scenario {
    let mut s = Scenario::resolve(4, "llama-3.1-8b", "h100")
        .expect("scenario")
        .with_policy(policy);
    s.rate_scale = rate;
    s
}
