//! `sluice capacity` on a tiny grid picks the configuration a hand calculation says.
//!
//! Three requests arrive together, each an 8000-token prompt and one output
//! token, on engines whose step budget is exactly 8000 tokens: a replica
//! prefills one prompt per step, so the j-th request on a replica gets its
//! first token after the engine's API-server latency plus j prefill steps.
//! With `least_requests` routing, r replicas hold at most ⌈3/r⌉ requests
//! each. A GPU whose m-th request still meets the TTFT bound needs ⌈3/m⌉
//! replicas; the cheapest such pool wins.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use sluice_bench::workload::text::segment_text;
use sluice_bench::workload::{Content, Segment, WorkloadRequest, write_workload};
use sluice_enginesim::EngineConfig;
use sluice_enginesim::roofline::SeqWork;
use sluice_policies::hardware::{GpuSpec, ModelSpec};
use sluice_policies::tokens::estimate_token_count;

const PROMPT: u32 = 8000;
const REQUESTS: u32 = 3;

fn write_burst(path: &Path) {
    let reqs: Vec<WorkloadRequest> = (0..REQUESTS)
        .map(|i| WorkloadRequest {
            id: format!("r{i}"),
            arrival_ms: 0.0,
            tenant: "t".into(),
            class: None,
            prefix_group: None,
            messages: None,
            prompt: Some(Content::Segments(vec![Segment {
                seed: 100 + u64::from(i),
                tokens: PROMPT,
            }])),
            max_tokens: 1,
            stream: true,
            ignore_eos: true,
        })
        .collect();
    write_workload(path, &reqs).unwrap();
}

/// Seconds to the first token of the j-th request on one replica of `gpu`: frontend + j prefill steps.
fn ttft(gpu: &str, j: u32) -> f64 {
    let cfg = EngineConfig::new(
        ModelSpec::resolve("llama-3.1-8b").unwrap(),
        GpuSpec::resolve(gpu).unwrap(),
    )
    .unwrap();
    let roofline =
        sluice_enginesim::roofline::Roofline::new(&cfg.model, &cfg.gpu, cfg.dtype, cfg.kv_dtype, 1);
    let step = roofline.step_time([SeqWork {
        context: 0,
        new_tokens: PROMPT,
    }]);
    cfg.frontend_latency_s + f64::from(j) * step
}

/// The hand calculation: (gpu name, replicas) of the cheapest pool meeting `slo_s` for every request.
fn expected(slo_s: f64, prices: &[(&str, f64)]) -> (String, u32) {
    let mut best: Option<(f64, String, u32)> = None;
    for &(gpu, price) in prices {
        // Keep the bound clear of every per-position TTFT so rounding cannot flip the answer.
        for j in 1..=REQUESTS {
            let t = ttft(gpu, j);
            assert!(
                (t - slo_s).abs() / slo_s > 0.05,
                "SLO {slo_s} too close to {gpu} position {j} ({t})"
            );
        }
        let m = (1..=REQUESTS)
            .take_while(|&j| ttft(gpu, j) <= slo_s)
            .count() as u32;
        if m == 0 {
            continue;
        }
        let replicas = REQUESTS.div_ceil(m);
        let cost = f64::from(replicas) * price;
        let name = GpuSpec::resolve(gpu).unwrap().name;
        if best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, name, replicas));
        }
    }
    let (_, g, r) = best.expect("some GPU meets the SLO");
    (g, r)
}

fn run_capacity(dir: &Path, workload: &Path, slo_ms: f64, prices: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["capacity", "--workload"])
        .arg(workload)
        .args([
            "--slo",
            &format!("ttft={slo_ms:.1}"),
            "--target",
            "1",
            "--gpus",
            "h100,a100",
            "--replicas",
            "1..4",
        ])
        .args([
            "--policies",
            "least_requests",
            "--max-num-batched-tokens",
            "8000",
            "--gpu-price",
            prices,
        ])
        .args(["--threads", "1", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join("capacity.md")).unwrap()
}

fn chosen(md: &str) -> (String, u32) {
    let line = md
        .lines()
        .find(|l| l.starts_with("**Cheapest configuration meeting the SLOs:**"))
        .unwrap_or_else(|| panic!("no choice in:\n{md}"));
    // "**Cheapest configuration meeting the SLOs:** 3 × h100-sxm-80gb (…"
    let rest = line.split("**").nth(2).unwrap().trim();
    let mut words = rest.split_whitespace();
    let n: u32 = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("×"));
    (words.next().unwrap().to_string(), n)
}

#[test]
fn tiny_grid_picks_the_hand_calculated_pool() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("burst.jsonl");
    write_burst(&w);
    // The workload's prompts are the token count the hand calculation assumes.
    assert_eq!(
        estimate_token_count(&segment_text(100, PROMPT)),
        PROMPT as usize
    );

    // 1. A bound only an H100 meets, and only with one request per replica: 3 × H100.
    let slo = 1.5 * ttft("h100", 1);
    let prices = [("h100", 2.99), ("a100", 1.79)];
    let want = expected(slo, &prices);
    assert_eq!(want.1, 3);
    let md = run_capacity(
        &dir.path().join("a"),
        &w,
        slo * 1000.0,
        "h100=2.99,a100=1.79",
    );
    assert_eq!(chosen(&md), want, "{md}");

    // 2. A looser bound: one H100 serves all three in time, an A100 only one each.
    let slo = 1.3 * ttft("a100", 1);
    let want = expected(slo, &prices);
    let md = run_capacity(
        &dir.path().join("b"),
        &w,
        slo * 1000.0,
        "h100=2.99,a100=1.79",
    );
    assert_eq!(chosen(&md), want, "{md}");

    // 3. Same bound, A100s cheap enough that three of them beat one H100.
    let cheap = [("h100", 2.99), ("a100", 0.5)];
    let want_cheap = expected(slo, &cheap);
    assert_ne!(want_cheap, want, "the price change must change the answer");
    let md = run_capacity(
        &dir.path().join("c"),
        &w,
        slo * 1000.0,
        "h100=2.99,a100=0.5",
    );
    assert_eq!(chosen(&md), want_cheap, "{md}");
    for plot in [
        "goodput_vs_replicas.svg",
        "preemptions.svg",
        "prefix_hit_rate.svg",
        "knee/kv_usage.svg",
    ] {
        assert!(dir.path().join("c").join(plot).exists(), "{plot}");
    }
}

#[test]
fn a_sweep_without_slo_or_with_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("burst.jsonl");
    write_burst(&w);
    for (args, needle) in [
        (vec!["--slo", "fast"], "--slo"),
        (
            vec!["--slo", "ttft=100", "--replicas", "4..2"],
            "--replicas",
        ),
        (vec!["--slo", "ttft=100", "--gpus", "h100,tpu"], "tpu"),
        (
            vec!["--slo", "ttft=100", "--gpus", "l4", "--gpu-price", "l4=x"],
            "--gpu-price",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["capacity", "--workload"])
            .arg(&w)
            .args(&args)
            .arg("--out")
            .arg(dir.path().join("o"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
