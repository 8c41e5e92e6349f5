//! `sluice bench` evaluating a live split: two `sluice sim` replicas behind
//! `sluice serve` whose pool splits 1:1 between two arms by `x-session-id`;
//! the load generator sends each conversation's prefix group in that header
//! (`--session-header`), records the arm of every response and summarises the
//! run per arm. The per-arm numbers must agree with the proxy's own metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "proxy_common/mod.rs"]
mod common;
#[path = "tenants_common/mod.rs"]
mod tenants;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{MODEL, Proxy, Sim, sims, write_config};
use serde_json::Value;
use sluice_bench::loadgen::RequestRecord;
use tenants::sha256_hex;

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
    run_with_env(args, &[])
}

fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .envs(env.iter().copied())
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
    let cfg = write_config(
        dir.path(),
        "split.toml",
        &split_config(&sims, "split_by = \"header\"\nheader = \"x-session-id\""),
    );
    let proxy = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    let workload = generate(dir.path(), SPEC);
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

/// A one-pool config over `sims` splitting 1:1 between [`ARMS`] as `split` says.
fn split_config(sims: &[Sim], split: &str) -> String {
    let eps: Vec<String> = sims.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    let mut text = format!(
        "[[pools]]\nname = \"chat\"\nmodel = \"{MODEL}\"\nendpoints = [{}]\n\n[pools.experiment]\n{split}\n",
        eps.join(", ")
    );
    for (arm, policy) in ARMS.iter().zip(["round_robin", "least_requests"]) {
        text.push_str(&format!(
            "\n[[pools.experiment.arms]]\nname = \"{arm}\"\nweight = 1\nrouting = {{ policy = \"{policy}\" }}\n"
        ));
    }
    text
}

/// `sluice workload generate` from `spec` into `dir`.
fn generate(dir: &std::path::Path, spec: &str) -> std::path::PathBuf {
    let spec = write_config(dir, "spec.toml", spec);
    let workload = dir.join("workload.jsonl");
    run(&[
        "workload",
        "generate",
        "--spec",
        spec.to_str().unwrap(),
        "--out",
        workload.to_str().unwrap(),
    ]);
    workload
}

/// Split by tenant: each workload tenant authenticates with its own key
/// (`SLUICE_BENCH_TENANT_KEYS`), so one tenant stays on one arm; a tenant the
/// proxy refuses (per-request cap) still gets its arm recorded on the errors.
#[test]
fn bench_sends_tenant_keys_for_a_tenant_split_and_records_arms_on_refusals() {
    let sims = sims(1, &[]);
    let tenants = ["team0", "team1", "team2", "team3", "team4", "team5"];
    let mut text = split_config(&sims, "split_by = \"tenant\"\nsalt = \"bench\"");
    for t in tenants {
        text.push_str(&format!(
            "\n[[tenants]]\nname = \"{t}\"\napi_key_sha256 = [\"{}\"]\n",
            sha256_hex(&format!("sk-{t}"))
        ));
    }
    text.push_str(&format!(
        "\n[[tenants]]\nname = \"capped\"\napi_key_sha256 = [\"{}\"]\n[tenants.limits]\nmax_output_tokens = 1\n",
        sha256_hex("sk-capped")
    ));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "tenants.toml", &text);
    let proxy = Proxy::start(&["--config", cfg.to_str().unwrap()]);

    let mut spec = String::from(
        "seed = 5\nrequests = 40\narrival = { kind = \"poisson\", rate = 80 }\ntenants = [",
    );
    for t in tenants.iter().chain(&["capped"]) {
        spec.push_str(&format!("{{ name = \"{t}\" }}, "));
    }
    spec.push_str(
        "]\n[[classes]]\nname = \"c\"\nprompt = { kind = \"uniform\", min = 10, max = 30 }\noutput = { kind = \"uniform\", min = 4, max = 8 }\n",
    );
    let workload = generate(dir.path(), &spec);
    let keys: Vec<String> = tenants
        .iter()
        .chain(&["capped"])
        .map(|t| format!("{t}=sk-{t}"))
        .collect();
    let out = dir.path().join("out");
    let target = format!("http://{}", proxy.api.addr);
    run_with_env(
        &[
            "bench",
            "--target",
            &target,
            "--workload",
            workload.to_str().unwrap(),
            "--model",
            MODEL,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ],
        &[("SLUICE_BENCH_TENANT_KEYS", &keys.join(","))],
    );

    let records = sluice_bench::loadgen::output::read_records(&out).unwrap();
    assert_eq!(records.len(), 40);
    let mut tenant_arm: HashMap<&str, &str> = HashMap::new();
    for r in &records {
        let arm = r.arm.as_deref().unwrap_or_else(|| panic!("no arm: {r:?}"));
        let first = *tenant_arm.entry(&r.tenant).or_insert(arm);
        assert_eq!(first, arm, "tenant {} split across arms", r.tenant);
        // Only the capped tenant is refused: every other key was accepted.
        assert_eq!(r.success, r.tenant != "capped", "{r:?}");
        if r.tenant == "capped" {
            assert_eq!(r.status, 400, "{r:?}");
        }
    }
    assert!(records.iter().any(|r| r.tenant == "capped"));
    let summary: Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let arms = summary["arms"].as_object().unwrap();
    assert_eq!(arms.len(), 2, "{tenant_arm:?}");
    for arm in ARMS {
        let of_arm: Vec<&RequestRecord> = records
            .iter()
            .filter(|r| r.arm.as_deref() == Some(arm))
            .collect();
        let ok = of_arm.iter().filter(|r| r.success).count() as f64;
        assert_eq!(arms[arm]["completed"].as_f64(), Some(ok));
        assert_eq!(arms[arm]["failed"].as_f64(), Some(of_arm.len() as f64 - ok));
    }
}
