//! Routing hot path: one decision plus prefix-index update per policy for a
//! 4k-token prompt (256 blocks of 16) on 16 endpoints, and the request-side
//! work that precedes it (token estimate + block hashing of the prompt).
//!
//! Besides criterion's means, `cargo bench -p sluice-policies --bench routing`
//! prints p50/p99/p99.9 of single decisions timed one by one, because the
//! target (issue 5) is a p99: < 10 µs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_policies::experiment::{ArmConfig, ExperimentConfig, Split, SplitBy};
use sluice_policies::prefix::{BlockHash, block_hashes};
use sluice_policies::routing::{
    EndpointLoad, EndpointView, EngineGauges, PolicyKind, RouteRequest, Router, RoutingConfig,
    build,
};
use sluice_policies::tokens::estimate_token_ids;

const ENDPOINTS: usize = 16;
const BLOCK: usize = 16;
const PROMPT_TOKENS: usize = 4096;
/// Distinct prompts cycled through; enough to push the default index past capacity.
const PROMPTS: usize = 2048;

/// A realistic mix: half the prompts continue one of 32 shared system
/// prompts (1k tokens), the rest are unrelated.
fn prompts() -> Vec<Vec<BlockHash>> {
    let mut rng = SmallRng::seed_from_u64(11);
    let systems: Vec<Vec<u32>> = (0..32)
        .map(|_| (0..1024).map(|_| rng.random_range(0..100_000)).collect())
        .collect();
    (0..PROMPTS)
        .map(|i| {
            let mut tokens: Vec<u32> = if i % 2 == 0 {
                systems[rng.random_range(0..systems.len())].clone()
            } else {
                Vec::new()
            };
            while tokens.len() < PROMPT_TOKENS {
                tokens.push(rng.random_range(0..100_000));
            }
            block_hashes(&tokens, BLOCK, None)
        })
        .collect()
}

fn endpoint_names() -> Vec<String> {
    (0..ENDPOINTS).map(|i| format!("10.0.0.{i}:8000")).collect()
}

/// Loads that look like a busy pool with fresh gauges.
fn views<'a>(names: &'a [String], rng: &mut SmallRng) -> Vec<EndpointView<'a>> {
    names
        .iter()
        .map(|key| {
            let in_flight = rng.random_range(0..40);
            EndpointView {
                key,
                load: EndpointLoad {
                    in_flight,
                    in_flight_tokens: u64::from(in_flight) * 2000,
                    engine: Some(EngineGauges {
                        running: f64::from(in_flight),
                        waiting: f64::from(rng.random_range(0..8u32)),
                        kv_usage: rng.random_range(0.1..0.95),
                        num_gpu_blocks: Some(30_000),
                    }),
                    in_flight_at_scrape: in_flight,
                },
            }
        })
        .collect()
}

fn request(hashes: &[BlockHash]) -> RouteRequest<'_> {
    RouteRequest {
        block_hashes: hashes,
        prompt_tokens: PROMPT_TOKENS as u32,
        max_tokens: 256,
        tenant: "bench",
        class: "rag-long",
        now_ms: 0,
    }
}

/// A router that has already seen every prompt once (a warm index).
fn warm(
    policy: PolicyKind,
    prompts: &[Vec<BlockHash>],
    eps: &[EndpointView<'_>],
) -> Box<dyn Router> {
    let mut r = build(&RoutingConfig::with_policy(policy), 1);
    for p in prompts {
        black_box(r.pick(&request(p), eps));
    }
    r
}

fn bench_routing(c: &mut Criterion) {
    let prompts = prompts();
    let names = endpoint_names();
    let mut rng = SmallRng::seed_from_u64(5);
    let load_sets: Vec<Vec<EndpointView<'_>>> = (0..64).map(|_| views(&names, &mut rng)).collect();
    let mut group = c.benchmark_group("route_4k_prompt_16_endpoints");
    for policy in PolicyKind::ALL {
        let mut router = warm(policy, &prompts, &load_sets[0]);
        let mut i = 0usize;
        group.bench_function(policy.as_str(), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let p = &prompts[i % prompts.len()];
                black_box(router.pick(&request(p), &load_sets[i % load_sets.len()]))
            })
        });
    }
    // Worst case for the prefix index: every prompt is new (81 inserts, and
    // the index turns over its generations). The fresh hashes are made by
    // xor-ing a counter into a base prompt, inside the timed loop.
    for policy in [PolicyKind::CacheAware, PolicyKind::Scored] {
        let mut router = warm(policy, &prompts, &load_sets[0]);
        let mut scratch = prompts[0].clone();
        let mut i = 0u64;
        group.bench_function(format!("{}_all_new_prompts", policy.as_str()), |b| {
            b.iter(|| {
                i += 1;
                fresh_prompt(&prompts[0], i, &mut scratch);
                black_box(router.pick(&request(&scratch), &load_sets[i as usize % load_sets.len()]))
            })
        });
    }
    group.finish();
}

/// `base` with every hash changed by `salt`: a prompt the index has never seen.
fn fresh_prompt(base: &[BlockHash], salt: u64, out: &mut [BlockHash]) {
    let k = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (o, b) in out.iter_mut().zip(base) {
        *o = b ^ k;
    }
}

fn prose(tokens: usize) -> String {
    const WORDS: [&str; 16] = [
        "the", "replica", "prefix", "cache", "routing", "tokens", "quickly", "serves", "request",
        "under", "load", "with", "bounded", "memory", "and", "latency",
    ];
    let mut rng = SmallRng::seed_from_u64(3);
    let mut s = String::new();
    while s.len() < tokens * 4 {
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        s.push(if rng.random_range(0..12) == 0 {
            '.'
        } else {
            ' '
        });
    }
    s
}

fn bench_prompt_side(c: &mut Criterion) {
    let text = prose(PROMPT_TOKENS);
    let ids = estimate_token_ids(&text);
    let mut group = c.benchmark_group("prompt_4k_tokens");
    group.bench_function("estimate_token_ids", |b| {
        b.iter(|| black_box(estimate_token_ids(black_box(&text))))
    });
    group.bench_function("block_hashes", |b| {
        b.iter(|| black_box(block_hashes(black_box(&ids), BLOCK, None)))
    });
    group.bench_function("estimate_and_hash", |b| {
        b.iter(|| {
            let ids = estimate_token_ids(black_box(&text));
            black_box(block_hashes(&ids, BLOCK, None))
        })
    });
    group.finish();
}

/// Arm assignment of a live experiment (4 arms): per request, and sticky on a
/// 36-character session id.
fn bench_experiment(c: &mut Criterion) {
    let cfg = ExperimentConfig {
        split_by: SplitBy::Header,
        header: Some("x-session-id".into()),
        salt: String::new(),
        arms: [4.0, 3.0, 2.0, 1.0]
            .iter()
            .enumerate()
            .map(|(i, &weight)| ArmConfig {
                name: format!("arm{i}"),
                weight,
                routing: None,
            })
            .collect(),
    };
    let split = Split::new(&cfg);
    let sessions: Vec<String> = (0..1024)
        .map(|i| format!("{i:08x}-5f3c-4d1e-9a7b-{:012x}", i * 7919))
        .collect();
    let mut group = c.benchmark_group("experiment_4_arms");
    let mut n = 0u64;
    group.bench_function("by_request", |b| {
        b.iter(|| {
            n += 1;
            black_box(split.arm_for_request(black_box(n)))
        })
    });
    let mut i = 0usize;
    group.bench_function("by_session_header", |b| {
        b.iter(|| {
            i = (i + 1) % sessions.len();
            black_box(split.assign(Some(black_box(&sessions[i])), 0))
        })
    });
    group.finish();
}

/// Times `n` single decisions per policy and prints percentiles.
fn percentiles(n: usize) {
    let prompts = prompts();
    let names = endpoint_names();
    let mut rng = SmallRng::seed_from_u64(5);
    let load_sets: Vec<Vec<EndpointView<'_>>> = (0..64).map(|_| views(&names, &mut rng)).collect();
    let text = prose(PROMPT_TOKENS);
    println!(
        "single-decision latency, 4k-token prompt (256 blocks), {ENDPOINTS} endpoints, {n} samples:"
    );
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9}",
        "policy", "p50", "p99", "p99.9", "max"
    );
    for policy in PolicyKind::ALL {
        let mut router = warm(policy, &prompts, &load_sets[0]);
        let mut samples: Vec<Duration> = Vec::with_capacity(n);
        for i in 0..n {
            // The same sequence as the criterion loop, so the two agree.
            let p = &prompts[i % prompts.len()];
            let eps = &load_sets[i % load_sets.len()];
            let t = Instant::now();
            black_box(router.pick(&request(p), eps));
            samples.push(t.elapsed());
        }
        report(policy.as_str(), &mut samples);
        if policy.tracks_prefixes() {
            println!("{:<24} index size {} blocks", "", router.state_size());
        }
    }
    for policy in [PolicyKind::CacheAware, PolicyKind::Scored] {
        let mut router = warm(policy, &prompts, &load_sets[0]);
        let mut scratch = prompts[0].clone();
        let mut samples: Vec<Duration> = Vec::with_capacity(n);
        for i in 0..n {
            let eps = &load_sets[i % load_sets.len()];
            let t = Instant::now();
            fresh_prompt(&prompts[0], i as u64 + 1, &mut scratch);
            black_box(router.pick(&request(&scratch), eps));
            samples.push(t.elapsed());
        }
        report(&format!("{} (all new)", policy.as_str()), &mut samples);
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(n / 10);
    for _ in 0..(n / 10).max(1) {
        let t = Instant::now();
        let ids = estimate_token_ids(black_box(&text));
        black_box(block_hashes(&ids, BLOCK, None));
        samples.push(t.elapsed());
    }
    report("estimate+hash", &mut samples);
}

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{:<24} {:>9.2?} {:>9.2?} {:>9.2?} {:>9.2?}",
        name,
        at(0.5),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    );
}

criterion_group!(benches, bench_routing, bench_prompt_side, bench_experiment);

fn main() {
    // Under `cargo test --benches` (no `--bench`), run a token amount so the target stays tested.
    let measuring = std::env::args().any(|a| a == "--bench");
    percentiles(if measuring { 200_000 } else { 200 });
    benches();
    Criterion::default().configure_from_args().final_summary();
}
