//! `sluice simulate`: same seed, same result; the lab report has every
//! section and its numbers are the ones the run's records give.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_bench::loadgen::record::RequestRecord;
use sluice_bench::metrics::{Slo, summarize};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// A 300-request slice of the demo workload (prefix-heavy chat + RAG), at 3× its rate.
fn demo_workload(dir: &Path) -> PathBuf {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/workloads/demo.toml");
    let out = dir.join("demo.jsonl");
    let st = sluice()
        .args(["workload", "generate", "--requests", "300", "--spec"])
        .arg(&spec)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

fn simulate(workload: &Path, out: &Path, extra: &[&str]) -> String {
    let o = sluice()
        .args(["simulate", "--workload"])
        .arg(workload)
        .args([
            "--fleet",
            "3",
            "--rate-scale",
            "3",
            "--slo",
            "ttft=200,tpot=20",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn read_records(dir: &Path) -> Vec<RequestRecord> {
    std::fs::read_to_string(dir.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn same_seed_same_result_and_the_seed_matters() {
    let dir = tempfile::tempdir().unwrap();
    let w = demo_workload(dir.path());
    let args = [
        "--policy",
        "power_of_two",
        "--seed",
        "7",
        "--scheduler",
        "spf",
        "--admission",
        "kv",
    ];
    simulate(&w, &dir.path().join("a"), &args);
    simulate(&w, &dir.path().join("b"), &args);
    for f in ["records.jsonl", "lifecycle.jsonl", "timeline.csv"] {
        let a = std::fs::read(dir.path().join("a").join(f)).unwrap();
        let b = std::fs::read(dir.path().join("b").join(f)).unwrap();
        assert!(a == b, "{f} differs between two runs with the same seed");
    }
    let mut other = args;
    other[3] = "8";
    simulate(&w, &dir.path().join("c"), &other);
    let a = std::fs::read(dir.path().join("a/lifecycle.jsonl")).unwrap();
    let c = std::fs::read(dir.path().join("c/lifecycle.jsonl")).unwrap();
    assert!(
        a != c,
        "power_of_two with another seed should route differently"
    );
    // Every request is accounted for, in workload order, with its stages.
    let recs = read_records(&dir.path().join("a"));
    assert_eq!(recs.len(), 300);
    assert!(
        recs.iter()
            .all(|r| r.success && r.ttft_s.is_some() && r.output_tokens > 0)
    );
}

/// The value after `| label |` in the report's tables.
fn cell<'a>(report: &'a str, label: &str) -> Vec<&'a str> {
    let prefix = format!("| {label} |");
    let line = report
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row {label:?}"));
    line.trim_matches('|')
        .split('|')
        .skip(1)
        .map(str::trim)
        .collect()
}

#[test]
fn lab_report_has_every_section_and_the_records_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let w = demo_workload(dir.path());
    let out = dir.path().join("run");
    let report_path = dir.path().join("lab.md");
    let stdout = simulate(
        &w,
        &out,
        &[
            "--policy",
            "round_robin",
            "--report",
            report_path.to_str().unwrap(),
        ],
    );
    assert!(
        stdout.contains("wrote") && stdout.contains("lab.md"),
        "{stdout}"
    );
    let report = std::fs::read_to_string(&report_path).unwrap();
    let sections = [
        "## Question",
        "## Environment",
        "## Workload",
        "## Metrics",
        "## Results",
        "## Explanation",
        "## Conclusion",
        "## Tuning suggestions",
    ];
    let mut at = 0;
    for s in sections {
        let pos = report[at..]
            .find(s)
            .unwrap_or_else(|| panic!("missing or out of order: {s}"));
        at += pos + s.len();
    }

    // Recompute the metrics from the records the run wrote.
    let recs = read_records(&out);
    let start = recs.iter().map(|r| r.start_s).fold(f64::INFINITY, f64::min);
    let end = recs
        .iter()
        .map(|r| r.start_s + r.latency_s)
        .fold(0.0, f64::max);
    let slo = Slo::parse("ttft=200,tpot=20").unwrap();
    let s = summarize(&recs, end - start, &slo);
    assert_eq!(
        cell(&report, "successful requests"),
        [s.completed.to_string()]
    );
    assert_eq!(cell(&report, "failed requests"), [s.failed.to_string()]);
    assert_eq!(
        cell(&report, "request throughput (req/s)"),
        [format!("{:.2}", s.request_throughput)]
    );
    assert_eq!(
        cell(&report, "output throughput (tok/s)"),
        [format!("{:.1}", s.output_throughput)]
    );
    assert_eq!(
        cell(&report, "request goodput (req/s)"),
        [format!("{:.2}", s.request_goodput.unwrap())]
    );
    for (name, l) in [
        ("TTFT", s.ttft),
        ("TPOT", s.tpot),
        ("ITL", s.itl),
        ("E2EL", s.e2el),
    ] {
        let want: Vec<String> = [l.mean_ms, l.median_ms, l.p90_ms, l.p95_ms, l.p99_ms]
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect();
        assert_eq!(cell(&report, name), want, "{name}");
    }
    // Cache hit rate: the engines' counters agree with the records' cached tokens
    // (each request's prompt is queried once when it is first scheduled, no preemptions here).
    let cached: u64 = recs
        .iter()
        .map(|r| u64::from(r.cached_tokens.unwrap()))
        .sum();
    let prompt: u64 = recs.iter().map(|r| u64::from(r.prompt_tokens)).sum();
    assert_eq!(cell(&report, "preemptions"), ["0"]);
    assert_eq!(
        cell(&report, "prefix cache hit rate"),
        [format!("{:.1}%", 100.0 * cached as f64 / prompt as f64)]
    );
    // Per-replica request counts match the lifecycle records' endpoints.
    let life = std::fs::read_to_string(out.join("lifecycle.jsonl")).unwrap();
    for i in 0..3 {
        let key = format!("replica-{i}");
        let n = life
            .lines()
            .filter(|l| l.contains(&format!("\"endpoint\":\"{key}\"")))
            .count();
        assert_eq!(cell(&report, &key)[0], n.to_string(), "{key}");
    }
    for plot in ["ttft_cdf.svg", "kv_usage.svg", "waiting.svg"] {
        assert!(
            std::fs::read_to_string(out.join(plot))
                .unwrap()
                .starts_with("<svg"),
            "{plot}"
        );
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\":\"x\"}\n").unwrap();
    let w = demo_workload(dir.path());
    for (workload, args, needle) in [
        (&bad, vec![], "bad.jsonl"),
        (&w, vec!["--policy", "fastest"], "fastest"),
        (&w, vec!["--scheduler", "lifo"], "lifo"),
        (&w, vec!["--admission", "max_kv_usage=3"], "max_kv_usage"),
        (&w, vec!["--fleet", "0"], "fleet"),
        (&w, vec!["--num-gpu-blocks", "0"], "num_gpu_blocks"),
    ] {
        let o = sluice()
            .args(["simulate", "--workload"])
            .arg(workload)
            .args(&args)
            .arg("--out")
            .arg(dir.path().join("o"))
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
