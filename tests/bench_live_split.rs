//! `sluice bench` evaluating a live split: two `sluice sim` replicas behind
//! `sluice serve` whose pool splits 1:1 between two arms by `x-session-id`;
//! the load generator sends each conversation's prefix group in that header
//! (`--session-header`), records the arm of every response and summarises the
//! run per arm. The per-arm numbers must agree with the proxy's own metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "proxy_common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{MODEL, Proxy, sims, write_config};
use serde_json::Value;

/// 40 requests: multi-turn streamed chat (5 turns per conversation, so a
/// conversation's prefix group recurs) and single non-streamed requests
/// without a prefix group (sent with their id as the session).
const SPEC: &str = r#"
seed = 11
requests = 40
arrival = { kind = "poisson", rate = 80 }

[[classes]]
name = "chat"
weight = 3
prompt = { kind = "uniform", min = 20, max = 60 }
output = { kind = "uniform", min = 4, max = 12 }
prefix = { kind = "conversation", active = 6, turns = { kind = "fixed", value = 5 }, system_prompts = 2, system_tokens = { kind = "fixed", value = 64 } }

[[classes]]
name = "oneshot"
weight = 1
stream = false
prompt = { kind = "uniform", min = 20, max = 60 }
output = { kind = "uniform", min = 4, max = 8 }
"#;

const ARMS: [&str; 2] = ["rr", "lr"];

/// Sum of `sluice_requests_total` samples with `arm` and status 200.
fn proxy_ok_requests(metrics: &str, arm: &str) -> f64 {
    let arm_label = format!("arm=\"{arm}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("sluice_requests_total{"))
        .filter(|l| l.contains(&arm_label) && l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sluice {args:?} failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn bench_reports_a_live_split_per_arm_and_agrees_with_the_proxy() {
    let sims = sims(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let eps: Vec<String> = sims.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    let cfg = write_config(
        dir.path(),
        "split.toml",
        &format!(
            r#"[[pools]]
name = "chat"
model = "{MODEL}"
endpoints = [{}]

[pools.experiment]
split_by = "header"
header = "x-session-id"

[[pools.experiment.arms]]
name = "{}"
weight = 1
routing = {{ policy = "round_robin" }}

[[pools.experiment.arms]]
name = "{}"
weight = 1
routing = {{ policy = "least_requests" }}
"#,
            eps.join(", "),
            ARMS[0],
            ARMS[1]
        ),
    );
    let proxy = Proxy::start(&["--config", cfg.to_str().unwrap()]);

    let spec = write_config(dir.path(), "spec.toml", SPEC);
    let workload = dir.path().join("workload.jsonl");
    run(&[
        "workload",
        "generate",
        "--spec",
        spec.to_str().unwrap(),
        "--out",
        workload.to_str().unwrap(),
    ]);
    let out = dir.path().join("out");
    let target = format!("http://{}", proxy.api.addr);
    let stdout = run(&[
        "bench",
        "--target",
        &target,
        "--workload",
        workload.to_str().unwrap(),
        "--model",
        MODEL,
        "--session-header",
        "x-session-id",
        "--request-timeout",
        "60",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);

    // Every record names its arm; one conversation stays on one arm.
    let records = sluice_bench::loadgen::output::read_records(&out).unwrap();
    assert_eq!(records.len(), 40);
    assert!(records.iter().any(|r| r.stream) && records.iter().any(|r| !r.stream));
    let mut group_arm: HashMap<&str, &str> = HashMap::new();
    let mut grouped = 0;
    for r in &records {
        assert!(r.success, "{r:?}");
        let arm = r.arm.as_deref().unwrap_or_else(|| panic!("no arm: {r:?}"));
        assert!(ARMS.contains(&arm), "{r:?}");
        if let Some(g) = r.prefix_group.as_deref() {
            grouped += 1;
            let first = *group_arm.entry(g).or_insert(arm);
            assert_eq!(first, arm, "prefix group {g} split across arms");
        }
    }
    // Enough repeated groups that a per-request split would have broken one.
    assert!(
        grouped >= group_arm.len() + 10,
        "{grouped} in {group_arm:?}"
    );
    let csv = std::fs::read_to_string(out.join("records.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",arm"), "{csv}");

    // summary.json: both arms, with the run's metric keys, adding up to the run.
    let summary: Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let arms = summary["arms"].as_object().unwrap();
    assert_eq!(arms.len(), 2, "{summary}");
    let keys = |m: &Value| {
        m.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<String>>()
    };
    let mut completed: BTreeMap<&str, f64> = BTreeMap::new();
    let mut total = 0.0;
    for arm in ARMS {
        let m = &arms[arm];
        assert_eq!(keys(m), keys(&summary["metrics"]), "{summary}");
        let from_records = records
            .iter()
            .filter(|r| r.arm.as_deref() == Some(arm))
            .count() as f64;
        assert!(from_records > 0.0, "arm {arm} got nothing");
        assert_eq!(m["completed"].as_f64().unwrap(), from_records);
        assert!(m["mean_ttft_ms"].as_f64().unwrap() > 0.0, "{m}");
        completed.insert(arm, m["completed"].as_f64().unwrap());
        total += m["completed"].as_f64().unwrap() + m["failed"].as_f64().unwrap();
    }
    assert_eq!(total, 40.0);
    assert_eq!(summary["metrics"]["completed"].as_f64(), Some(40.0));
    for arm in ARMS {
        assert!(stdout.contains(&format!(" arm {arm} ")), "{stdout}");
    }

    // The proxy counted the same requests per arm (its counters settle as each request ends).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = proxy.admin.get("/metrics").text();
        let seen: BTreeMap<&str, f64> = ARMS
            .iter()
            .map(|a| (*a, proxy_ok_requests(&m, a)))
            .collect();
        if seen == completed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxy counts {seen:?}, bench {completed:?}\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
