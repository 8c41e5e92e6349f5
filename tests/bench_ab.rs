//! `sluice ab` end to end: two arms on a small simulated fleet; the report's
//! numbers must agree with the per-request records, the engine-side counters
//! and the proxy's lifecycle log, and no child process may outlive the run.
#![allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use sluice_bench::loadgen::output::read_records;
use sluice_bench::metrics::{Slo, summarize};

const EXPERIMENT: &str = r#"
name = "two-arms"
repetitions = 1
scrape_interval_ms = 200
[fleet]
replicas = 2
sim = { speedup = 50, num_gpu_blocks = 600 }
[workload]
inline = { seed = 3, requests = 60, arrival = { kind = "poisson", rate = 120 }, classes = [
  { name = "chat", prompt = { kind = "uniform", min = 20, max = 60 }, output = { kind = "uniform", min = 4, max = 12 },
    prefix = { kind = "conversation", active = 6, turns = { kind = "fixed", value = 5 }, system_prompts = 2, system_tokens = { kind = "fixed", value = 200 } } },
] }
[load]
slo = { ttft_ms = 2000, tpot_ms = 500 }
[[arms]]
name = "rr"
policy = "round_robin"
[[arms]]
name = "ca"
policy = "cache_aware"
"#;

/// Processes whose command line mentions `needle` (children left behind).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn ab_report_agrees_with_records_engine_and_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exp.toml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    let out = dir.path().join("out");
    let status = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["ab", "--experiment"])
        .arg(&exp)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        processes_mentioning(&out.display().to_string()).is_empty(),
        "children left running"
    );

    let result: Value =
        serde_json::from_slice(&std::fs::read(out.join("experiment.json")).unwrap()).unwrap();
    let runs = result["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("TTFT CDF per arm"));
    for run in runs {
        let arm = run["arm"].as_str().unwrap();
        let run_dir = Path::new(run["dir"].as_str().unwrap());
        let records = read_records(run_dir).unwrap();
        assert_eq!(records.len(), 60, "{arm}: one record per workload request");
        assert!(
            records.iter().all(|r| r.success),
            "{arm}: {:?}",
            records.iter().find(|r| !r.success)
        );

        // The report's summary is exactly what the records give, with the
        // engine-time SLOs on the records' wall clock (speedup 50).
        let duration = run["summary"]["duration_s"].as_f64().unwrap();
        let again = summarize(
            &records,
            duration,
            &Slo {
                ttft_ms: Some(2000.0 / 50.0),
                tpot_ms: Some(500.0 / 50.0),
                e2el_ms: None,
            },
        );
        let reported: sluice_bench::metrics::Summary =
            serde_json::from_value(run["summary"].clone()).unwrap();
        // (JSON round trips may move the last bit of a float.)
        for ((k, a), (_, b)) in reported.flat().iter().zip(again.flat()) {
            assert!(
                (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                "{arm} {k}: {a} vs {b}"
            );
        }
        assert_eq!(
            (reported.completed, reported.failed),
            (again.completed, again.failed)
        );
        assert_eq!(
            reported.total_output_tokens,
            records
                .iter()
                .map(|r| u64::from(r.output_tokens))
                .sum::<u64>()
        );

        // The engines finished exactly the requests the client saw succeed.
        let per_replica: f64 = run["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["requests"].as_f64().unwrap())
            .sum();
        assert_eq!(per_replica, 60.0, "{arm}");
        // The proxy logged one lifecycle record per request.
        assert_eq!(run["lifecycle_records"].as_u64(), Some(60), "{arm}");

        // The table shows the run's throughput in engine time: the replicas
        // ran 50× faster than the wall clock the records were taken on.
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {arm} |")))
            .unwrap();
        assert!(
            row.contains(&format!("{:.2}", reported.request_throughput / 50.0)),
            "{row}"
        );
        assert!(md.contains("wall-clock × 50"));
        assert!(stdout.contains(arm));
    }
    // Shared conversation prefixes: routing them together can only help the cache.
    let hit = |arm: &str| {
        runs.iter().find(|r| r["arm"] == arm).unwrap()["prefix_hit_rate"]
            .as_f64()
            .unwrap()
    };
    assert!(
        hit("ca") + 0.02 >= hit("rr"),
        "cache_aware {} < round_robin {}",
        hit("ca"),
        hit("rr")
    );
}

#[test]
fn bad_experiments_fail_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exp.toml");
    std::fs::write(&exp, EXPERIMENT.replace("name = \"ca\"", "name = \"rr\"")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["ab", "--experiment"])
        .arg(&exp)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("appears twice"));
}
