//! The engine-side view: each replica's vLLM `/metrics`, scraped during a run.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::loadgen::ApiClient;

/// One scrape of one replica; counters are cumulative since the replica started.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EngineSample {
    /// Seconds since the scraper started.
    pub t_s: f64,
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc` (0..=1).
    pub kv_usage: f64,
    /// `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_hits: f64,
    /// `vllm:prefix_cache_queries_total` (tokens).
    pub prefix_queries: f64,
    /// `vllm:num_preemptions_total`.
    pub preemptions: f64,
    /// `vllm:request_success_total`, all finish reasons.
    pub requests: f64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: f64,
}

/// Sum of every series of metric `name` (any labels) in Prometheus text `text`.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `foo` must not match `foo_bucket`.
        let rest = match rest.as_bytes().first() {
            Some(b'{') => match rest.find('}') {
                Some(end) => &rest[end + 1..],
                None => continue,
            },
            Some(b' ') | Some(b'\t') => rest,
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Parses the gauges and counters the report uses (vLLM V1 names, V0 fallbacks).
pub fn parse_sample(text: &str, t_s: f64) -> EngineSample {
    let get = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| metric_sum(text, n))
            .unwrap_or(0.0)
    };
    EngineSample {
        t_s,
        running: get(&["vllm:num_requests_running"]),
        waiting: get(&["vllm:num_requests_waiting"]),
        kv_usage: get(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
        prefix_hits: get(&[
            "vllm:prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_hits_total",
        ]),
        prefix_queries: get(&[
            "vllm:prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_queries_total",
        ]),
        preemptions: get(&["vllm:num_preemptions_total"]),
        requests: get(&["vllm:request_success_total"]),
        generation_tokens: get(&["vllm:generation_tokens_total"]),
    }
}

/// Scrapes every replica every `interval` until `stop` turns true, then once more.
/// Returns one time series per replica (a failed scrape leaves a gap).
///
/// `baseline` fires once the first round is in: counters are read as deltas
/// from it, so load that starts earlier would go partly uncounted.
pub async fn scrape_until(
    urls: Vec<String>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    baseline: tokio::sync::oneshot::Sender<()>,
) -> Vec<Vec<EngineSample>> {
    let mut baseline = Some(baseline);
    let mut clients = Vec::new();
    for u in &urls {
        clients.push(ApiClient::connect(u, Some(String::new()), None).await.ok());
    }
    let t0 = Instant::now();
    let mut series = vec![Vec::new(); urls.len()];
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let t = t0.elapsed().as_secs_f64();
        let scrapes = clients.iter().map(|c| async move {
            let c = c.as_ref()?;
            match c.get("/metrics").await {
                Ok((200, body)) => Some(parse_sample(&String::from_utf8_lossy(&body), t)),
                _ => None,
            }
        });
        for (s, sample) in series
            .iter_mut()
            .zip(futures::future::join_all(scrapes).await)
        {
            if let Some(sample) = sample {
                s.push(sample);
            }
        }
        if let Some(b) = baseline.take() {
            // The receiver may have stopped waiting; nothing to tell then.
            let _ = b.send(());
        }
        if last {
            return series;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP vllm:num_requests_running x\n\
        # TYPE vllm:num_requests_running gauge\n\
        vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3\n\
        vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n\
        vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 32\n\
        vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 128\n\
        vllm:request_success_total{engine=\"0\",finished_reason=\"stop\",model_name=\"m\"} 5\n\
        vllm:request_success_total{engine=\"0\",finished_reason=\"length\",model_name=\"m\"} 7\n\
        vllm:e2e_request_latency_seconds_bucket{le=\"0.3\"} 9\n\
        vllm:e2e_request_latency_seconds_count 9\n\
        vllm:num_requests_waiting 2\n";

    #[test]
    fn sums_series_and_matches_whole_names() {
        let s = parse_sample(TEXT, 1.5);
        assert_eq!((s.running, s.waiting, s.kv_usage), (3.0, 2.0, 0.25));
        assert_eq!(
            (s.prefix_hits, s.prefix_queries, s.requests),
            (32.0, 128.0, 12.0)
        );
        assert_eq!(metric_sum(TEXT, "vllm:e2e_request_latency_seconds"), None);
        assert_eq!(
            metric_sum(TEXT, "vllm:e2e_request_latency_seconds_count"),
            Some(9.0)
        );
        assert_eq!(s.preemptions, 0.0);
    }
}
