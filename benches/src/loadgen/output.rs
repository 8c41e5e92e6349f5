//! Writing a run's results: per-request records (JSONL and CSV) and the summary (JSON and CSV).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use super::record::RequestRecord;
use crate::error::{BenchError, Result};
use crate::metrics::Summary;

/// File names inside a results directory.
pub const RECORDS_JSONL: &str = "records.jsonl";
/// Per-request CSV.
pub const RECORDS_CSV: &str = "records.csv";
/// Summary JSON.
pub const SUMMARY_JSON: &str = "summary.json";
/// Summary CSV (`metric,value`).
pub const SUMMARY_CSV: &str = "summary.csv";
/// Per-arm summary CSV (`arm,metric,value`), written when a live split served the run.
pub const SUMMARY_BY_ARM_CSV: &str = "summary_by_arm.csv";

#[derive(Serialize)]
struct CsvRow<'a> {
    id: &'a str,
    tenant: &'a str,
    class: &'a str,
    prefix_group: &'a str,
    stream: bool,
    scheduled_s: f64,
    start_s: f64,
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    mean_itl_ms: Option<f64>,
    latency_ms: f64,
    prompt_tokens: u32,
    output_tokens: u32,
    cached_tokens: Option<u32>,
    status: u16,
    success: bool,
    error: &'a str,
    request_id: &'a str,
    arm: &'a str,
}

fn csv_err(path: &Path, e: csv::Error) -> BenchError {
    BenchError::io(path, std::io::Error::other(e.to_string()))
}

/// Writes records, summary and `meta` (run parameters) into `dir`.
pub fn write_results(
    dir: &Path,
    records: &[RequestRecord],
    summary: &Summary,
    meta: &serde_json::Value,
) -> Result<()> {
    write_results_by_arm(dir, records, summary, &BTreeMap::new(), meta)
}

/// Like [`write_results`], plus each experiment arm's summary (from
/// [`crate::arms::summarize_by_arm`]): summary.json gets an `arms` object keyed
/// by arm name with the same metric keys as `metrics`, and summary_by_arm.csv
/// one `arm,metric,value` row per metric. Nothing extra when `arms` is empty.
pub fn write_results_by_arm(
    dir: &Path,
    records: &[RequestRecord],
    summary: &Summary,
    arms: &BTreeMap<String, Summary>,
    meta: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let path = dir.join(RECORDS_JSONL);
    let mut w = BufWriter::new(std::fs::File::create(&path).map_err(|e| BenchError::io(&path, e))?);
    for r in records {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n").map_err(|e| BenchError::io(&path, e))?;
    }
    w.flush().map_err(|e| BenchError::io(&path, e))?;

    let path = dir.join(RECORDS_CSV);
    let mut c = csv::Writer::from_path(&path).map_err(|e| csv_err(&path, e))?;
    for r in records {
        let itls = r.itls();
        c.serialize(CsvRow {
            id: &r.id,
            tenant: &r.tenant,
            class: r.class.as_deref().unwrap_or(""),
            prefix_group: r.prefix_group.as_deref().unwrap_or(""),
            stream: r.stream,
            scheduled_s: r.scheduled_s,
            start_s: r.start_s,
            ttft_ms: r.ttft_s.map(|t| t * 1000.0),
            tpot_ms: r.tpot_s().map(|t| t * 1000.0),
            mean_itl_ms: (!itls.is_empty())
                .then(|| itls.iter().sum::<f64>() / itls.len() as f64 * 1000.0),
            latency_ms: r.latency_s * 1000.0,
            prompt_tokens: r.prompt_tokens,
            output_tokens: r.output_tokens,
            cached_tokens: r.cached_tokens,
            status: r.status,
            success: r.success,
            error: r.error.as_deref().unwrap_or(""),
            request_id: r.request_id.as_deref().unwrap_or(""),
            arm: r.arm.as_deref().unwrap_or(""),
        })
        .map_err(|e| csv_err(&path, e))?;
    }
    c.flush().map_err(|e| BenchError::io(&path, e))?;

    let path = dir.join(SUMMARY_JSON);
    let flat = |s: &Summary| -> serde_json::Map<String, serde_json::Value> {
        s.flat()
            .into_iter()
            .map(|(k, v)| (k, serde_json::json!(v)))
            .collect()
    };
    let mut doc = serde_json::json!({ "meta": meta, "metrics": flat(summary), "summary": summary });
    if !arms.is_empty() {
        let by_arm: serde_json::Map<String, serde_json::Value> = arms
            .iter()
            .map(|(arm, s)| (arm.clone(), serde_json::Value::Object(flat(s))))
            .collect();
        doc["arms"] = serde_json::Value::Object(by_arm);
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
        .map_err(|e| BenchError::io(&path, e))?;

    let path = dir.join(SUMMARY_CSV);
    let mut c = csv::Writer::from_path(&path).map_err(|e| csv_err(&path, e))?;
    c.write_record(["metric", "value"])
        .map_err(|e| csv_err(&path, e))?;
    for (k, v) in summary.flat() {
        c.write_record([k, format!("{v}")])
            .map_err(|e| csv_err(&path, e))?;
    }
    c.flush().map_err(|e| BenchError::io(&path, e))?;

    if arms.is_empty() {
        return Ok(());
    }
    let path = dir.join(SUMMARY_BY_ARM_CSV);
    let mut c = csv::Writer::from_path(&path).map_err(|e| csv_err(&path, e))?;
    c.write_record(["arm", "metric", "value"])
        .map_err(|e| csv_err(&path, e))?;
    for (arm, s) in arms {
        for (k, v) in s.flat() {
            c.write_record([arm.as_str(), k.as_str(), format!("{v}").as_str()])
                .map_err(|e| csv_err(&path, e))?;
        }
    }
    c.flush().map_err(|e| BenchError::io(&path, e))
}

/// Reads the per-request records written by [`write_results`].
pub fn read_records(dir: &Path) -> Result<Vec<RequestRecord>> {
    let path = dir.join(RECORDS_JSONL);
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::io(&path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| BenchError::Parse {
                path: path.clone(),
                line: Some(i + 1),
                message: e.to_string(),
            })
        })
        .collect()
}

/// A human-readable summary in the layout of vLLM's benchmark output.
pub fn format_summary(s: &Summary) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<40}{v:>12}\n"));
    line("Successful requests:", s.completed.to_string());
    line("Failed requests:", s.failed.to_string());
    line("Benchmark duration (s):", format!("{:.2}", s.duration_s));
    line("Total input tokens:", s.total_input_tokens.to_string());
    line("Total generated tokens:", s.total_output_tokens.to_string());
    line(
        "Request throughput (req/s):",
        format!("{:.2}", s.request_throughput),
    );
    if let Some(g) = s.request_goodput {
        line("Request goodput (req/s):", format!("{g:.2}"));
    }
    line(
        "Output token throughput (tok/s):",
        format!("{:.2}", s.output_throughput),
    );
    line(
        "Total token throughput (tok/s):",
        format!("{:.2}", s.total_token_throughput),
    );
    if let Some(c) = s.cached_token_fraction {
        line("Cached prompt tokens (%):", format!("{:.1}", c * 100.0));
    }
    for (k, v) in latency_rows(s) {
        line(&k, v);
    }
    out
}

/// The latency rows of `vllm bench serve`'s result block: mean, median and
/// P99 of TTFT, TPOT, ITL and E2EL in milliseconds, as (label, value).
pub fn latency_rows(s: &Summary) -> Vec<(String, String)> {
    let mut rows = Vec::with_capacity(12);
    for (name, st) in [
        ("TTFT", &s.ttft),
        ("TPOT", &s.tpot),
        ("ITL", &s.itl),
        ("E2EL", &s.e2el),
    ] {
        rows.push((format!("Mean {name} (ms):"), format!("{:.2}", st.mean_ms)));
        rows.push((
            format!("Median {name} (ms):"),
            format!("{:.2}", st.median_ms),
        ));
        rows.push((format!("P99 {name} (ms):"), format!("{:.2}", st.p99_ms)));
    }
    rows
}

/// One [`format_summary`] section per experiment arm, each under a banner naming the arm.
pub fn format_arm_summaries(arms: &BTreeMap<String, Summary>) -> String {
    let mut out = String::new();
    for (arm, s) in arms {
        out.push_str(&format!("{:=^52}\n", format!(" arm {arm} ")));
        out.push_str(&format_summary(s));
    }
    out
}
