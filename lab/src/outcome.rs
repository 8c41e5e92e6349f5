//! What one replay produced: the load generator's per-request records (the
//! same type a live `sluice bench` run writes), lifecycle records with every
//! stage's timestamp, per-replica engine statistics and gauge timelines —
//! and the files they are written to.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sluice_bench::loadgen::record::RequestRecord;
use sluice_bench::metrics::{Slo, Summary, summarize};

use crate::error::{LabError, Result};

/// One request's path through the simulated stages. Times are milliseconds
/// from the start of the run; a missing one means the request never got there.
/// Field names follow the proxy's lifecycle record where they mean the same.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LifecycleRecord {
    /// Generated id (`sim-<n>`), also the record's `request_id`.
    pub request_id: String,
    /// Workload id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Workload class.
    pub class: Option<String>,
    /// Replica the request ran on (`replica-<i>`).
    pub endpoint: Option<String>,
    /// Routing policy.
    pub policy: &'static str,
    /// Why the policy chose the replica.
    pub reason: Option<&'static str>,
    /// Prompt blocks the policy believed cached there.
    pub matched_blocks: Option<u32>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the engine's prefix cache.
    pub cached_tokens: Option<u32>,
    /// Output tokens.
    pub output_tokens: u32,
    /// Requested output tokens.
    pub max_tokens: u32,
    /// Arrival at the proxy.
    pub arrival_ms: f64,
    /// Left the admission queue.
    pub admitted_ms: Option<f64>,
    /// Prompt counted and hashed.
    pub tokenized_ms: Option<f64>,
    /// Routing decision made (and the request handed to the engine or its hold queue).
    pub routed_ms: Option<f64>,
    /// Entered the engine's waiting queue.
    pub engine_queued_ms: Option<f64>,
    /// First scheduled by the engine (start of prefill).
    pub engine_scheduled_ms: Option<f64>,
    /// First token.
    pub first_token_ms: Option<f64>,
    /// Last token or rejection.
    pub end_ms: f64,
    /// Status a client would have seen.
    pub status: u16,
    /// `stop`, `length` or `abort`.
    pub finish_reason: Option<&'static str>,
    /// Times the engine preempted it.
    pub preemptions: u32,
    /// What went wrong.
    pub error: Option<String>,
}

/// Engine-side statistics of one replica over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplicaStats {
    /// `replica-<i>`.
    pub key: String,
    /// Requests routed there.
    pub routed: u64,
    /// Engine steps.
    pub steps: u64,
    /// Seconds spent computing steps.
    pub busy_s: f64,
    /// `busy_s` over the run's duration.
    pub utilization: f64,
    /// Preemptions (`vllm:num_preemptions_total`).
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache (`vllm:prefix_cache_queries_total`).
    pub prefix_cache_queries: u64,
    /// Of which found (`vllm:prefix_cache_hits_total`).
    pub prefix_cache_hits: u64,
    /// Highest KV usage seen, 0..=1.
    pub peak_kv_usage: f64,
    /// Longest engine waiting queue seen.
    pub peak_waiting: u64,
    /// Prompt plus generated tokens computed.
    pub batched_tokens: u64,
    /// KV blocks of the engine.
    pub num_gpu_blocks: u64,
}

impl ReplicaStats {
    /// Prefix-cache hit rate (hits over queried prompt tokens), 0 when nothing was queried.
    pub fn hit_rate(&self) -> f64 {
        ratio(self.prefix_cache_hits, self.prefix_cache_queries)
    }
}

/// Gauges of one replica at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds from the start of the run.
    pub t: f64,
    /// Replica index.
    pub replica: u32,
    /// `vllm:kv_cache_usage_perc`.
    pub kv_usage: f64,
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// Requests in the proxy's admission queue (pool-wide).
    pub admission_queue: u32,
}

/// Everything one replay produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The deployment, in one line.
    pub label: String,
    /// Per-request records in workload arrival order (as `sluice bench` writes them).
    pub records: Vec<RequestRecord>,
    /// Per-request stage timestamps, same order.
    pub lifecycle: Vec<LifecycleRecord>,
    /// Per-replica engine statistics.
    pub replicas: Vec<ReplicaStats>,
    /// Gauges over time.
    pub timeline: Vec<Sample>,
    /// Metrics over `records`, as vLLM's serving benchmark defines them.
    pub summary: Summary,
    /// The objectives `summary`'s goodput was computed against.
    pub slo: Slo,
    /// Virtual seconds from the first arrival to the last completion.
    pub duration_s: f64,
    /// Events the loop processed.
    pub events: u64,
    /// The engines' API-server latency before a request can be scheduled, ms.
    pub frontend_latency_ms: f64,
}

/// Shares and totals derived from an [`Outcome`], as the report quotes them.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Derived {
    /// Requests in the workload.
    pub requests: usize,
    /// Requests meeting every SLO over all requests (failures count against it).
    pub goodput_share: f64,
    /// Pool-wide prefix-cache hit rate.
    pub prefix_hit_rate: f64,
    /// Highest KV usage on any replica.
    pub peak_kv_usage: f64,
    /// Preemptions over the pool.
    pub preemptions: u64,
    /// Mean replica utilization.
    pub mean_utilization: f64,
    /// Most requests routed to one replica over the mean (1.0 is perfect balance).
    pub imbalance: f64,
    /// Mean time a request waited before the engine first scheduled it
    /// (admission queue, tokenization, engine queue; not the engine's fixed
    /// API-server latency), ms.
    pub mean_queue_ms: f64,
    /// The engines' fixed API-server latency, ms (part of every TTFT).
    pub frontend_ms: f64,
    /// Mean time from first scheduling to first token (prefill), ms.
    pub mean_prefill_ms: f64,
    /// Requests rejected by admission.
    pub shed: usize,
}

impl Outcome {
    /// Requests meeting every objective, over all requests.
    pub fn good_requests(&self) -> usize {
        good_count(&self.records, &self.slo)
    }

    /// The report's derived figures.
    pub fn derived(&self) -> Derived {
        let n = self.records.len();
        let hits: u64 = self.replicas.iter().map(|r| r.prefix_cache_hits).sum();
        let queries: u64 = self.replicas.iter().map(|r| r.prefix_cache_queries).sum();
        let routed: Vec<f64> = self.replicas.iter().map(|r| r.routed as f64).collect();
        let mean_routed = routed.iter().sum::<f64>() / routed.len().max(1) as f64;
        let max_routed = routed.iter().copied().fold(0.0, f64::max);
        let (mut queue, mut prefill, mut k) = (0.0, 0.0, 0usize);
        for l in &self.lifecycle {
            if let (Some(s), Some(f)) = (l.engine_scheduled_ms, l.first_token_ms) {
                queue += (s - l.arrival_ms - self.frontend_latency_ms).max(0.0);
                prefill += f - s;
                k += 1;
            }
        }
        Derived {
            requests: n,
            goodput_share: if n == 0 {
                0.0
            } else {
                self.good_requests() as f64 / n as f64
            },
            prefix_hit_rate: ratio(hits, queries),
            peak_kv_usage: self
                .replicas
                .iter()
                .map(|r| r.peak_kv_usage)
                .fold(0.0, f64::max),
            preemptions: self.replicas.iter().map(|r| r.preemptions).sum(),
            mean_utilization: self.replicas.iter().map(|r| r.utilization).sum::<f64>()
                / self.replicas.len().max(1) as f64,
            imbalance: if mean_routed > 0.0 {
                max_routed / mean_routed
            } else {
                1.0
            },
            mean_queue_ms: if k > 0 { queue / k as f64 } else { 0.0 },
            mean_prefill_ms: if k > 0 { prefill / k as f64 } else { 0.0 },
            frontend_ms: self.frontend_latency_ms,
            shed: self
                .lifecycle
                .iter()
                .filter(|l| matches!(l.status, 429 | 503))
                .count(),
        }
    }

    /// Writes `records.jsonl`, `lifecycle.jsonl`, `summary.json` and
    /// `timeline.csv` into `dir` (created if missing); returns the paths.
    pub fn write_dir(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        let records = dir.join("records.jsonl");
        write_jsonl(&records, &self.records)?;
        let lifecycle = dir.join("lifecycle.jsonl");
        write_jsonl(&lifecycle, &self.lifecycle)?;
        let summary = dir.join("summary.json");
        let body = serde_json::json!({
            "label": self.label,
            "slo": self.slo,
            "summary": self.summary,
            "metrics": self.summary.flat().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "derived": self.derived(),
            "replicas": self.replicas,
            "virtual_duration_s": self.duration_s,
            "events": self.events,
        });
        let text =
            serde_json::to_string_pretty(&body).map_err(|e| LabError::io(&summary, e.into()))?;
        std::fs::write(&summary, text + "\n").map_err(|e| LabError::io(&summary, e))?;
        let timeline = dir.join("timeline.csv");
        let mut w = create(&timeline)?;
        let io = |e| LabError::io(&timeline, e);
        writeln!(w, "t_s,replica,kv_usage,running,waiting,admission_queue").map_err(io)?;
        for s in &self.timeline {
            writeln!(
                w,
                "{:.3},{},{:.4},{},{},{}",
                s.t, s.replica, s.kv_usage, s.running, s.waiting, s.admission_queue
            )
            .map_err(io)?;
        }
        w.flush().map_err(io)?;
        Ok(vec![records, lifecycle, summary, timeline])
    }
}

/// Requests of `records` meeting every objective of `slo` (all successes when none is set),
/// judged exactly as the goodput of [`summarize`].
pub fn good_count(records: &[RequestRecord], slo: &Slo) -> usize {
    // One record at a time through the shared metric code, so the rule cannot drift.
    let probe = if slo.is_empty() {
        Slo {
            e2el_ms: Some(f64::MAX),
            ..*slo
        }
    } else {
        *slo
    };
    records
        .iter()
        .filter(|r| r.success)
        .filter(|r| {
            summarize(std::slice::from_ref(*r), 1.0, &probe)
                .request_goodput
                .is_some_and(|g| g > 0.0)
        })
        .count()
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn create(path: &Path) -> Result<BufWriter<std::fs::File>> {
    let f = std::fs::File::create(path).map_err(|e| LabError::io(path, e))?;
    Ok(BufWriter::new(f))
}

/// Writes one JSON object per line.
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut w = create(path)?;
    for it in items {
        serde_json::to_writer(&mut w, it).map_err(|e| LabError::io(path, e.into()))?;
        w.write_all(b"\n").map_err(|e| LabError::io(path, e))?;
    }
    w.flush().map_err(|e| LabError::io(path, e))
}

impl Outcome {
    /// A terminal summary in the layout of `vllm bench serve`'s result block.
    pub fn text_summary(&self) -> String {
        let s = &self.summary;
        let d = self.derived();
        let mut out = format!("Deployment: {}\n", self.label);
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<40}{v:>14}\n"));
        line("Successful requests:", s.completed.to_string());
        line("Failed requests:", s.failed.to_string());
        line("Virtual duration (s):", format!("{:.2}", s.duration_s));
        line(
            "Request throughput (req/s):",
            format!("{:.2}", s.request_throughput),
        );
        if let Some(g) = s.request_goodput {
            line("Request goodput (req/s):", format!("{g:.2}"));
            line(
                "Goodput share of requests:",
                format!("{:.3}", d.goodput_share),
            );
        }
        line(
            "Output token throughput (tok/s):",
            format!("{:.1}", s.output_throughput),
        );
        line(
            "Total token throughput (tok/s):",
            format!("{:.1}", s.total_token_throughput),
        );
        for (k, v) in sluice_bench::loadgen::output::latency_rows(s) {
            line(&k, v);
        }
        line(
            "Prefix cache hit rate:",
            format!("{:.3}", d.prefix_hit_rate),
        );
        line("Peak KV cache usage:", format!("{:.3}", d.peak_kv_usage));
        line("Preemptions:", d.preemptions.to_string());
        line(
            "Mean replica utilization:",
            format!("{:.3}", d.mean_utilization),
        );
        line(
            "Busiest replica / mean requests:",
            format!("{:.2}", d.imbalance),
        );
        out
    }
}
