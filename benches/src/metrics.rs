//! Serving metrics exactly as vLLM's serving benchmark (`vllm bench serve`) defines them.
//!
//! Over successful requests only: TTFT (send to first token), TPOT
//! (`(e2el - ttft) / (output_tokens - 1)`, only for requests with more than one
//! output token), ITL (every gap between successive token-bearing chunks),
//! E2EL (send to last byte). Throughputs divide by the benchmark duration
//! (first send to last completion). Goodput counts requests meeting every
//! SLO given (a request with at most one output token has TPOT 0 there), per second.

use serde::{Deserialize, Serialize};

use crate::loadgen::record::RequestRecord;
use crate::stats::describe;

/// Service-level objectives for goodput, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Slo {
    /// TTFT bound.
    pub ttft_ms: Option<f64>,
    /// TPOT bound.
    pub tpot_ms: Option<f64>,
    /// E2EL bound.
    pub e2el_ms: Option<f64>,
}

impl Slo {
    /// Parses `ttft=500,tpot=50,e2el=10000` (milliseconds).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=ms, got {part:?}"))?;
            let v: f64 = v
                .trim()
                .trim_end_matches("ms")
                .parse()
                .map_err(|_| format!("bad number in {part:?}"))?;
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{k} must be > 0"));
            }
            match k.trim() {
                "ttft" => slo.ttft_ms = Some(v),
                "tpot" => slo.tpot_ms = Some(v),
                "e2el" => slo.e2el_ms = Some(v),
                other => return Err(format!("unknown SLO {other:?} (ttft, tpot, e2el)")),
            }
        }
        Ok(slo)
    }

    /// True when no objective is set.
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.tpot_ms.is_none() && self.e2el_ms.is_none()
    }
}

/// Mean, median, standard deviation and tail percentiles of one latency, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub median_ms: f64,
    /// Population standard deviation.
    pub std_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl LatencyStats {
    /// Statistics of `seconds` (zeros when empty, as vLLM reports).
    pub fn of_seconds(seconds: &[f64]) -> Self {
        Self::of_ms(seconds.iter().map(|s| s * 1000.0).collect())
    }

    /// Statistics of `ms`, already in milliseconds (zeros when empty). Takes
    /// the buffer because the percentiles are found by selection in place.
    pub fn of_ms(mut ms: Vec<f64>) -> Self {
        let (mean_ms, std_ms, [median_ms, p90_ms, p95_ms, p99_ms]) =
            describe(&mut ms, [50.0, 90.0, 95.0, 99.0]).unwrap_or((0.0, 0.0, [0.0; 4]));
        LatencyStats {
            mean_ms,
            median_ms,
            std_ms,
            p90_ms,
            p95_ms,
            p99_ms,
        }
    }
}

/// A run's summary.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Successful requests.
    pub completed: usize,
    /// Failed or cancelled requests.
    pub failed: usize,
    /// First send to last completion, seconds.
    pub duration_s: f64,
    /// Prompt tokens of successful requests.
    pub total_input_tokens: u64,
    /// Output tokens of successful requests.
    pub total_output_tokens: u64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Requests per second meeting every SLO (`None` without SLOs).
    pub request_goodput: Option<f64>,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Input plus output tokens per second.
    pub total_token_throughput: f64,
    /// Fraction of prompt tokens served from cache, over requests that report it.
    pub cached_token_fraction: Option<f64>,
    /// Time to first token.
    pub ttft: LatencyStats,
    /// Time per output token, excluding the first.
    pub tpot: LatencyStats,
    /// Inter-token latency, per chunk.
    pub itl: LatencyStats,
    /// End-to-end latency.
    pub e2el: LatencyStats,
}

/// Computes the summary of `records` over a run of `duration_s` seconds.
pub fn summarize(records: &[RequestRecord], duration_s: f64, slo: &Slo) -> Summary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success).collect();
    let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot_s()).collect();
    // Straight into milliseconds, one buffer: a long run has a gap per output token.
    let mut itls_ms = Vec::with_capacity(ok.iter().map(|r| r.chunk_times_s.len()).sum());
    for r in &ok {
        let Some(mut prev) = r.ttft_s else {
            continue;
        };
        // The same arithmetic as `RequestRecord::itls`, then seconds to ms.
        itls_ms.extend(r.chunk_times_s.iter().map(|&t| {
            let gap = t - prev;
            prev = t;
            gap * 1000.0
        }));
    }
    let e2els: Vec<f64> = ok.iter().map(|r| r.latency_s).collect();
    let input: u64 = ok.iter().map(|r| u64::from(r.prompt_tokens)).sum();
    let output: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    let goodput = (!slo.is_empty()).then(|| {
        let good = ok
            .iter()
            .filter(|r| {
                let ttft_ms = r.ttft_s.unwrap_or(r.latency_s) * 1000.0;
                let tpot_ms = r.tpot_s().unwrap_or(0.0) * 1000.0;
                slo.ttft_ms.is_none_or(|b| ttft_ms <= b)
                    && slo.tpot_ms.is_none_or(|b| tpot_ms <= b)
                    && slo.e2el_ms.is_none_or(|b| r.latency_s * 1000.0 <= b)
            })
            .count();
        per_s(good as f64)
    });
    let reporting: Vec<&&RequestRecord> = ok.iter().filter(|r| r.cached_tokens.is_some()).collect();
    let cached_fraction = (!reporting.is_empty()).then(|| {
        let cached: u64 = reporting
            .iter()
            .map(|r| u64::from(r.cached_tokens.unwrap_or(0)))
            .sum();
        let prompt: u64 = reporting.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        if prompt > 0 {
            cached as f64 / prompt as f64
        } else {
            0.0
        }
    });
    Summary {
        completed: ok.len(),
        failed: records.len() - ok.len(),
        duration_s,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: per_s(ok.len() as f64),
        request_goodput: goodput,
        output_throughput: per_s(output as f64),
        total_token_throughput: per_s((input + output) as f64),
        cached_token_fraction: cached_fraction,
        ttft: LatencyStats::of_seconds(&ttfts),
        tpot: LatencyStats::of_seconds(&tpots),
        itl: LatencyStats::of_ms(itls_ms),
        e2el: LatencyStats::of_seconds(&e2els),
    }
}

impl Summary {
    /// Flat `(name, value)` pairs with vLLM's result keys (`mean_ttft_ms`, `p99_itl_ms`, ...).
    pub fn flat(&self) -> Vec<(String, f64)> {
        let mut v = vec![
            ("completed".to_string(), self.completed as f64),
            ("failed".to_string(), self.failed as f64),
            ("duration".to_string(), self.duration_s),
            (
                "total_input_tokens".to_string(),
                self.total_input_tokens as f64,
            ),
            (
                "total_output_tokens".to_string(),
                self.total_output_tokens as f64,
            ),
            ("request_throughput".to_string(), self.request_throughput),
            ("output_throughput".to_string(), self.output_throughput),
            (
                "total_token_throughput".to_string(),
                self.total_token_throughput,
            ),
        ];
        if let Some(g) = self.request_goodput {
            v.push(("request_goodput".into(), g));
        }
        if let Some(c) = self.cached_token_fraction {
            v.push(("cached_token_fraction".into(), c));
        }
        for (name, s) in [
            ("ttft", &self.ttft),
            ("tpot", &self.tpot),
            ("itl", &self.itl),
            ("e2el", &self.e2el),
        ] {
            v.push((format!("mean_{name}_ms"), s.mean_ms));
            v.push((format!("median_{name}_ms"), s.median_ms));
            v.push((format!("std_{name}_ms"), s.std_ms));
            v.push((format!("p90_{name}_ms"), s.p90_ms));
            v.push((format!("p95_{name}_ms"), s.p95_ms));
            v.push((format!("p99_{name}_ms"), s.p99_ms));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ttft: f64, chunks: &[f64], latency: f64, out: u32, success: bool) -> RequestRecord {
        RequestRecord {
            id: "r".into(),
            stream: true,
            ttft_s: Some(ttft),
            chunk_times_s: chunks.to_vec(),
            latency_s: latency,
            prompt_tokens: 100,
            output_tokens: out,
            status: if success { 200 } else { 500 },
            success,
            ..Default::default()
        }
    }

    /// Hand-computed over three successful requests and one failure, 2 s run:
    /// A: ttft 0.1, chunks at 0.2, 0.4, end 0.4, 3 tokens → tpot 0.15, itl 0.1, 0.2
    /// B: ttft 0.3, chunks at 0.5, end 0.6, 3 tokens (2 chunks) → tpot 0.15, itl 0.2
    /// C: ttft 0.2, no more chunks, end 0.2, 1 token → no tpot, no itl
    #[test]
    fn matches_hand_computed_values() {
        let records = vec![
            rec(0.1, &[0.2, 0.4], 0.4, 3, true),
            rec(0.3, &[0.5], 0.6, 3, true),
            rec(0.2, &[], 0.2, 1, true),
            rec(9.0, &[], 9.0, 50, false),
        ];
        let s = summarize(
            &records,
            2.0,
            &Slo {
                ttft_ms: Some(250.0),
                tpot_ms: Some(200.0),
                e2el_ms: None,
            },
        );
        assert_eq!((s.completed, s.failed), (3, 1));
        assert_eq!(s.total_input_tokens, 300);
        assert_eq!(s.total_output_tokens, 7);
        assert!((s.request_throughput - 1.5).abs() < 1e-12);
        assert!((s.output_throughput - 3.5).abs() < 1e-12);
        assert!((s.total_token_throughput - 153.5).abs() < 1e-12);
        // Goodput: A (ttft 100, tpot 150) and C (ttft 200, tpot 0) pass; B's ttft 300 fails.
        assert!((s.request_goodput.unwrap() - 1.0).abs() < 1e-12);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // TTFT over [100, 300, 200] ms.
        assert!(close(s.ttft.mean_ms, 200.0));
        assert!(close(s.ttft.median_ms, 200.0));
        assert!(close(s.ttft.p99_ms, 298.0));
        assert!(close(s.ttft.std_ms, (20000.0f64 / 3.0).sqrt()));
        // TPOT over [150, 150] ms.
        assert!(close(s.tpot.mean_ms, 150.0) && close(s.tpot.p99_ms, 150.0));
        // ITL over [100, 200, 200] ms.
        assert!(close(s.itl.mean_ms, 500.0 / 3.0));
        assert!(close(s.itl.median_ms, 200.0));
        assert!(close(s.itl.p90_ms, 200.0));
        // E2EL over [400, 600, 200] ms: p90 = 400 + 0.8 * 200.
        assert!(close(s.e2el.mean_ms, 400.0));
        assert!(close(s.e2el.p90_ms, 560.0));
        let flat = s.flat();
        assert!(
            flat.iter()
                .any(|(k, v)| k == "p99_ttft_ms" && close(*v, 298.0))
        );
    }

    /// The summary as it was computed before selection: every gap collected
    /// per record, converted, fully sorted.
    fn sorted_stats(seconds: &[f64]) -> LatencyStats {
        use crate::stats::{mean, percentile_sorted, sorted, std_dev};
        let ms: Vec<f64> = seconds.iter().map(|s| s * 1000.0).collect();
        let s = sorted(&ms);
        let p = |q| percentile_sorted(&s, q).unwrap_or(0.0);
        LatencyStats {
            mean_ms: mean(&ms).unwrap_or(0.0),
            median_ms: p(50.0),
            std_ms: std_dev(&ms).unwrap_or(0.0),
            p90_ms: p(90.0),
            p95_ms: p(95.0),
            p99_ms: p(99.0),
        }
    }

    proptest::proptest! {
        #[test]
        fn summary_latencies_equal_the_sort_based_ones(
            reqs in proptest::collection::vec(
                (0.001f64..2.0, proptest::collection::vec(0.0f64..0.2, 0..40), proptest::bool::weighted(0.9)),
                0..60,
            )
        ) {
            let records: Vec<RequestRecord> = reqs
                .iter()
                .map(|(ttft, gaps, ok)| {
                    let mut t = *ttft;
                    let chunks: Vec<f64> = gaps.iter().map(|g| { t += g; t }).collect();
                    rec(*ttft, &chunks, t + 0.01, chunks.len() as u32 + 1, *ok)
                })
                .collect();
            let s = summarize(&records, 10.0, &Slo::default());
            let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success).collect();
            let itls: Vec<f64> = ok.iter().flat_map(|r| r.itls()).collect();
            let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
            let e2els: Vec<f64> = ok.iter().map(|r| r.latency_s).collect();
            let bits = |l: &LatencyStats| {
                [l.mean_ms, l.median_ms, l.std_ms, l.p90_ms, l.p95_ms, l.p99_ms].map(f64::to_bits)
            };
            proptest::prop_assert_eq!(bits(&s.itl), bits(&sorted_stats(&itls)));
            proptest::prop_assert_eq!(bits(&s.ttft), bits(&sorted_stats(&ttfts)));
            proptest::prop_assert_eq!(bits(&s.e2el), bits(&sorted_stats(&e2els)));
        }
    }

    #[test]
    fn no_successes_gives_zeros_not_nan() {
        let s = summarize(&[rec(1.0, &[], 1.0, 1, false)], 0.0, &Slo::default());
        assert_eq!(s.completed, 0);
        assert_eq!(s.request_throughput, 0.0);
        assert!(s.flat().iter().all(|(_, v)| v.is_finite()));
        assert!(s.request_goodput.is_none());
    }

    #[test]
    fn slo_parsing() {
        let s = Slo::parse("ttft=500, tpot=50ms").unwrap();
        assert_eq!(
            (s.ttft_ms, s.tpot_ms, s.e2el_ms),
            (Some(500.0), Some(50.0), None)
        );
        assert!(Slo::parse("ttft").is_err());
        assert!(Slo::parse("foo=1").is_err());
        assert!(Slo::parse("ttft=-1").is_err());
    }
}
