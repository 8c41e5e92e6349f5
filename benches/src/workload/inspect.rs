//! What a workload contains: counts, rates, length percentiles, tenant and
//! class mix, and how much of its prompts an infinite prefix cache could reuse.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use sluice_policies::prefix::block_hashes;
use sluice_policies::tokens::estimate_token_ids;

use super::request::WorkloadRequest;
use crate::stats::{mean, percentile_sorted, sorted};

/// Mean and percentiles of one quantity.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `v` (zeros when empty).
    pub fn of(v: &[f64]) -> Self {
        let s = sorted(v);
        let p = |q| percentile_sorted(&s, q).unwrap_or(0.0);
        Spread {
            mean: mean(v).unwrap_or(0.0),
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            max: p(100.0),
        }
    }
}

/// A workload's summary.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStats {
    /// Number of requests.
    pub requests: usize,
    /// Offset of the last arrival, seconds.
    pub duration_s: f64,
    /// Mean arrival rate, requests per second.
    pub mean_rate: f64,
    /// Requests per tenant.
    pub tenants: BTreeMap<String, usize>,
    /// Requests per class.
    pub classes: BTreeMap<String, usize>,
    /// Distinct shared-prefix groups.
    pub prefix_groups: usize,
    /// Fraction of streaming requests.
    pub stream_fraction: f64,
    /// Prompt tokens (estimated, as sent).
    pub prompt_tokens: Spread,
    /// Requested output tokens.
    pub max_tokens: Spread,
    /// Block size used for the cache estimate.
    pub block_size: usize,
    /// Fraction of prompt blocks already seen in an earlier request: the hit
    /// rate of an infinite prefix cache in front of one replica.
    pub ideal_prefix_hit_rate: f64,
}

/// Summarises `w`, hashing prompts in `block_size`-token blocks.
pub fn inspect(w: &[WorkloadRequest], block_size: usize) -> WorkloadStats {
    let mut tenants = BTreeMap::new();
    let mut classes = BTreeMap::new();
    let mut groups = HashSet::new();
    let mut seen = HashSet::new();
    let (mut blocks, mut hits) = (0usize, 0usize);
    let mut prompt = Vec::with_capacity(w.len());
    for r in w {
        *tenants.entry(r.tenant.clone()).or_insert(0) += 1;
        *classes
            .entry(r.class.clone().unwrap_or_else(|| "-".into()))
            .or_insert(0) += 1;
        if let Some(g) = &r.prefix_group {
            groups.insert(g.clone());
        }
        let ids = estimate_token_ids(&r.rendered_prompt());
        prompt.push(ids.len() as f64);
        for h in block_hashes(&ids, block_size, None) {
            blocks += 1;
            if !seen.insert(h) {
                hits += 1;
            }
        }
    }
    let duration_s = w.iter().map(|r| r.arrival_ms).fold(0.0, f64::max) / 1000.0;
    let outputs: Vec<f64> = w.iter().map(|r| f64::from(r.max_tokens)).collect();
    WorkloadStats {
        requests: w.len(),
        duration_s,
        mean_rate: if duration_s > 0.0 {
            w.len() as f64 / duration_s
        } else {
            f64::INFINITY
        },
        tenants,
        classes,
        prefix_groups: groups.len(),
        stream_fraction: w.iter().filter(|r| r.stream).count() as f64 / w.len().max(1) as f64,
        prompt_tokens: Spread::of(&prompt),
        max_tokens: Spread::of(&outputs),
        block_size,
        ideal_prefix_hit_rate: if blocks > 0 {
            hits as f64 / blocks as f64
        } else {
            0.0
        },
    }
}

impl std::fmt::Display for WorkloadStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "requests            {}", self.requests)?;
        writeln!(
            f,
            "duration            {:.1} s (mean rate {:.2} req/s)",
            self.duration_s, self.mean_rate
        )?;
        let mix = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(f, "tenants             {}", mix(&self.tenants))?;
        writeln!(f, "classes             {}", mix(&self.classes))?;
        writeln!(f, "prefix groups       {}", self.prefix_groups)?;
        writeln!(
            f,
            "streaming           {:.0}%",
            self.stream_fraction * 100.0
        )?;
        let s = |x: &Spread| {
            format!(
                "mean {:.0}  p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0}",
                x.mean, x.p50, x.p90, x.p99, x.max
            )
        };
        writeln!(f, "prompt tokens       {}", s(&self.prompt_tokens))?;
        writeln!(f, "max_tokens          {}", s(&self.max_tokens))?;
        write!(
            f,
            "ideal prefix hits   {:.1}% of {}-token blocks (infinite cache, one replica)",
            self.ideal_prefix_hit_rate * 100.0,
            self.block_size
        )
    }
}
