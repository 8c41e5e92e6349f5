//! Capacity sweeps: replay one workload over GPUs × KV sizes × routing
//! policies × replica counts × request rates, and pick the cheapest
//! deployment whose share of requests meeting every SLO reaches the target
//! at every rate asked for.
//!
//! Within one (GPU, KV size, policy) series replica counts run in ascending
//! order and stop at the first that meets the target (more replicas of the
//! same kind only cost more), unless the sweep is exhaustive.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use sluice_policies::hardware::GpuSpec;
use sluice_policies::routing::{PolicyKind, RoutingConfig};

use crate::error::{LabError, Result};
use crate::outcome::{Outcome, write_jsonl};
use crate::plot::{Series, line_chart};
use crate::prepare::PreparedWorkload;
use crate::replay::replay;
use crate::scenario::Scenario;

/// Illustrative on-demand prices in USD per GPU-hour (public cloud list
/// prices of 2025 for one GPU); pass your own with `--gpu-price NAME=USD`.
pub const DEFAULT_PRICES: &[(&str, f64)] = &[
    ("h100-sxm-80gb", 2.99),
    ("h200", 3.79),
    ("a100-80gb", 1.79),
    ("l4", 0.80),
];

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    /// Model, engine knobs, scheduler, admission, SLOs and seed shared by every run.
    pub base: Scenario,
    /// GPUs to try.
    pub gpus: Vec<GpuSpec>,
    /// Replica counts to try, ascending.
    pub replicas: Vec<u32>,
    /// Routing policies to try.
    pub policies: Vec<PolicyKind>,
    /// KV blocks per replica to try (`None`: sized from GPU memory).
    pub kv_blocks: Vec<Option<u64>>,
    /// Request-rate multipliers; a configuration must meet the target at all of them.
    pub rate_scales: Vec<f64>,
    /// Share of requests (0..=1) that must meet every SLO.
    pub target_share: f64,
    /// USD per GPU-hour by GPU name.
    pub prices: BTreeMap<String, f64>,
    /// Run every replica count even after one meets the target.
    pub exhaustive: bool,
    /// Worker threads (1 runs in order on the calling thread).
    pub threads: usize,
}

impl SweepSpec {
    /// A sweep around `base` with the default prices, a 99% target and one rate.
    pub fn new(base: Scenario) -> Self {
        SweepSpec {
            gpus: vec![base.gpu.clone()],
            replicas: vec![base.replicas],
            policies: vec![base.routing.policy],
            kv_blocks: vec![base.engine.num_gpu_blocks],
            rate_scales: vec![1.0],
            target_share: 0.99,
            prices: DEFAULT_PRICES
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            exhaustive: false,
            threads: 1,
            base,
        }
    }

    /// Checks the grid once, before running it.
    pub fn validate(&self) -> Result<()> {
        if self.base.slo.is_empty() {
            return Err(LabError::invalid(
                "a capacity sweep needs at least one SLO (--slo ttft=…,tpot=…)",
            ));
        }
        if self.gpus.is_empty()
            || self.replicas.is_empty()
            || self.policies.is_empty()
            || self.kv_blocks.is_empty()
            || self.rate_scales.is_empty()
        {
            return Err(LabError::invalid(
                "every sweep dimension needs at least one value",
            ));
        }
        if !(self.target_share > 0.0 && self.target_share <= 1.0) {
            return Err(LabError::invalid(format!(
                "target share must be in (0, 1], got {}",
                self.target_share
            )));
        }
        for g in &self.gpus {
            if !self.prices.contains_key(&g.name) {
                return Err(LabError::invalid(format!(
                    "no price for GPU {}: pass --gpu-price {}=USD_PER_HOUR",
                    g.name, g.name
                )));
            }
        }
        let runs = self.gpus.len()
            * self.replicas.len()
            * self.policies.len()
            * self.kv_blocks.len()
            * self.rate_scales.len();
        if runs > 100_000 {
            return Err(LabError::invalid(format!(
                "the grid has {runs} runs; narrow it"
            )));
        }
        Ok(())
    }
}

/// One run of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepRow {
    /// GPU name.
    pub gpu: String,
    /// KV blocks per replica.
    pub kv_blocks: u64,
    /// Routing policy.
    pub policy: &'static str,
    /// Replicas.
    pub replicas: u32,
    /// Request-rate multiplier.
    pub rate_scale: f64,
    /// Offered load, requests per second.
    pub offered_rate: f64,
    /// USD per hour of the whole pool.
    pub cost_per_hour: f64,
    /// Share of requests meeting every SLO.
    pub goodput_share: f64,
    /// Whether `goodput_share` reaches the target.
    pub meets: bool,
    /// TTFT median, ms.
    pub ttft_p50_ms: f64,
    /// TTFT p99, ms.
    pub ttft_p99_ms: f64,
    /// TPOT median, ms.
    pub tpot_p50_ms: f64,
    /// TPOT p99, ms.
    pub tpot_p99_ms: f64,
    /// Completed requests per second.
    pub throughput: f64,
    /// Preemptions over the pool.
    pub preemptions: u64,
    /// Pool-wide prefix-cache hit rate.
    pub prefix_hit_rate: f64,
    /// Highest KV usage on any replica.
    pub peak_kv_usage: f64,
}

/// A deployment choice: one point of the grid without the rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    /// GPU name.
    pub gpu: String,
    /// KV blocks per replica.
    pub kv_blocks: u64,
    /// Routing policy.
    pub policy: &'static str,
    /// Replicas.
    pub replicas: u32,
    /// USD per hour.
    pub cost_per_hour: f64,
    /// Lowest share of requests meeting the SLOs over the rates.
    pub worst_goodput_share: f64,
}

/// What a sweep found.
#[derive(Debug, Clone)]
pub struct SweepResult {
    /// Every run, ordered by GPU, KV size, policy, replicas, rate.
    pub rows: Vec<SweepRow>,
    /// Deployments that met the target at every rate, cheapest first.
    pub meeting: Vec<Choice>,
    /// The highest rate's replay of the cheapest meeting deployment (the knee), if any met.
    pub knee: Option<Outcome>,
    /// The target share.
    pub target_share: f64,
}

impl SweepResult {
    /// The cheapest deployment meeting the target.
    pub fn best(&self) -> Option<&Choice> {
        self.meeting.first()
    }
}

/// One (GPU, KV size, policy) series of the grid.
#[derive(Debug, Clone)]
struct SeriesKey {
    gpu: usize,
    kv: usize,
    policy: usize,
}

fn scenario_for(spec: &SweepSpec, k: &SeriesKey, replicas: u32, rate: f64) -> Scenario {
    let mut s = spec.base.clone();
    s.gpu = spec.gpus[k.gpu].clone();
    s.engine.num_gpu_blocks = spec.kv_blocks[k.kv];
    s.routing = RoutingConfig {
        policy: spec.policies[k.policy],
        ..spec.base.routing.clone()
    };
    if s.routing.validate("sweep").is_err() {
        s.routing = RoutingConfig::with_policy(spec.policies[k.policy]);
    }
    s.replicas = replicas;
    s.rate_scale = rate;
    s
}

fn row_of(spec: &SweepSpec, sc: &Scenario, o: &Outcome, base_rate: f64) -> Result<SweepRow> {
    let d = o.derived();
    let cfg = sc.engine_config()?;
    let price = spec.prices.get(&sc.gpu.name).copied().unwrap_or(0.0);
    Ok(SweepRow {
        gpu: sc.gpu.name.clone(),
        kv_blocks: cfg.num_gpu_blocks,
        policy: sc.routing.policy.as_str(),
        replicas: sc.replicas,
        rate_scale: sc.rate_scale,
        offered_rate: base_rate * sc.rate_scale,
        cost_per_hour: f64::from(sc.replicas) * f64::from(cfg.tensor_parallel) * price,
        goodput_share: d.goodput_share,
        meets: d.goodput_share >= spec.target_share,
        ttft_p50_ms: o.summary.ttft.median_ms,
        ttft_p99_ms: o.summary.ttft.p99_ms,
        tpot_p50_ms: o.summary.tpot.median_ms,
        tpot_p99_ms: o.summary.tpot.p99_ms,
        throughput: o.summary.request_throughput,
        preemptions: d.preemptions,
        prefix_hit_rate: d.prefix_hit_rate,
        peak_kv_usage: d.peak_kv_usage,
    })
}

/// Runs one series: replica counts ascending, each at every rate.
fn run_series(
    spec: &SweepSpec,
    w: &PreparedWorkload,
    k: &SeriesKey,
    base_rate: f64,
) -> Result<Vec<SweepRow>> {
    let mut rows = Vec::new();
    for &n in &spec.replicas {
        let mut all_meet = true;
        for &rate in &spec.rate_scales {
            let sc = scenario_for(spec, k, n, rate);
            let o = replay(w, &sc)?;
            let row = row_of(spec, &sc, &o, base_rate)?;
            all_meet &= row.meets;
            rows.push(row);
        }
        if all_meet && !spec.exhaustive {
            break;
        }
    }
    Ok(rows)
}

/// Runs the sweep.
pub fn sweep(spec: &SweepSpec, w: &PreparedWorkload) -> Result<SweepResult> {
    spec.validate()?;
    let mut replicas = spec.replicas.clone();
    replicas.sort_unstable();
    replicas.dedup();
    let spec = &SweepSpec {
        replicas,
        ..spec.clone()
    };
    let span = w.span_s();
    let base_rate = if span > 0.0 {
        (w.len().saturating_sub(1)) as f64 / span
    } else {
        0.0
    };
    let mut keys = Vec::new();
    for gpu in 0..spec.gpus.len() {
        for kv in 0..spec.kv_blocks.len() {
            for policy in 0..spec.policies.len() {
                keys.push(SeriesKey { gpu, kv, policy });
            }
        }
    }
    // Series are independent: spread them over threads, keep results in grid order.
    let results: Vec<Mutex<Option<Result<Vec<SweepRow>>>>> =
        keys.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let threads = spec.threads.clamp(1, keys.len().max(1));
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(k) = keys.get(i) else { break };
            let r = run_series(spec, w, k, base_rate);
            if let Ok(mut slot) = results[i].lock() {
                *slot = Some(r);
            }
        }
    };
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
    let mut rows = Vec::new();
    for slot in results {
        let r = slot
            .into_inner()
            .ok()
            .flatten()
            .ok_or_else(|| LabError::invalid("a sweep worker stopped early"))?;
        rows.extend(r?);
    }
    let meeting = meeting_choices(&rows, spec.rate_scales.len());
    let knee = match meeting.first() {
        Some(best) => {
            let k = keys
                .iter()
                .find(|k| {
                    spec.gpus[k.gpu].name == best.gpu
                        && spec.policies[k.policy].as_str() == best.policy
                        && scenario_for(spec, k, best.replicas, 1.0)
                            .engine_config()
                            .is_ok_and(|c| c.num_gpu_blocks == best.kv_blocks)
                })
                .cloned();
            let top = spec.rate_scales.iter().copied().fold(f64::MIN, f64::max);
            match k {
                Some(k) => Some(replay(w, &scenario_for(spec, &k, best.replicas, top))?),
                None => None,
            }
        }
        None => None,
    };
    Ok(SweepResult {
        rows,
        meeting,
        knee,
        target_share: spec.target_share,
    })
}

/// Deployments whose every rate met the target, cheapest first (then the
/// better worst-case share, then fewer replicas, then name order).
fn meeting_choices(rows: &[SweepRow], rates: usize) -> Vec<Choice> {
    let mut groups: BTreeMap<(String, u64, &'static str, u32), Vec<&SweepRow>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((r.gpu.clone(), r.kv_blocks, r.policy, r.replicas))
            .or_default()
            .push(r);
    }
    let mut out: Vec<Choice> = groups
        .into_iter()
        .filter(|(_, rs)| rs.len() == rates && rs.iter().all(|r| r.meets))
        .map(|((gpu, kv_blocks, policy, replicas), rs)| Choice {
            gpu,
            kv_blocks,
            policy,
            replicas,
            cost_per_hour: rs[0].cost_per_hour,
            worst_goodput_share: rs.iter().map(|r| r.goodput_share).fold(1.0, f64::min),
        })
        .collect();
    out.sort_by(|a, b| {
        a.cost_per_hour
            .total_cmp(&b.cost_per_hour)
            .then(b.worst_goodput_share.total_cmp(&a.worst_goodput_share))
            .then(a.replicas.cmp(&b.replicas))
            .then(a.gpu.cmp(&b.gpu))
            .then(a.policy.cmp(b.policy))
    });
    out
}

/// The sweep's table and verdict as Markdown.
pub fn markdown(spec: &SweepSpec, res: &SweepResult) -> String {
    let mut m = String::new();
    let slo = &spec.base.slo;
    let _ = writeln!(m, "# Capacity sweep: {}\n", spec.base.model.name);
    let _ = writeln!(
        m,
        "Target: at least {:.1}% of requests meet {} at every rate. Scheduler `{}`, admission {}.\n",
        spec.target_share * 100.0,
        crate::report::slo_text(slo),
        spec.base.scheduler,
        spec.base.admission.map_or("none".into(), |a| format!(
            "`{}`",
            crate::admission::admission_spec(&a)
        )),
    );
    match res.best() {
        Some(b) => {
            let _ = writeln!(
                m,
                "**Cheapest configuration meeting the SLOs:** {} × {} ({} KV blocks each), `{}` routing — ${:.2}/hour, worst share {:.1}%.\n",
                b.replicas,
                b.gpu,
                b.kv_blocks,
                b.policy,
                b.cost_per_hour,
                b.worst_goodput_share * 100.0
            );
        }
        None => {
            let _ = writeln!(
                m,
                "**No configuration in the grid meets the SLOs.** Widen the replica range or relax the objectives.\n"
            );
        }
    }
    let _ = writeln!(
        m,
        "| GPU | KV blocks | policy | replicas | rate ×| offered req/s | $/h | SLO share | meets | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | req/s | preemptions | prefix hit | peak KV |"
    );
    let _ = writeln!(
        m,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &res.rows {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1}% | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {:.1}% | {:.1}% |",
            r.gpu,
            r.kv_blocks,
            r.policy,
            r.replicas,
            r.rate_scale,
            r.offered_rate,
            r.cost_per_hour,
            r.goodput_share * 100.0,
            if r.meets { "yes" } else { "no" },
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.tpot_p50_ms,
            r.tpot_p99_ms,
            r.throughput,
            r.preemptions,
            r.prefix_hit_rate * 100.0,
            r.peak_kv_usage * 100.0
        );
    }
    m
}

fn series_name(r: &SweepRow, many_kv: bool) -> String {
    if many_kv {
        format!("{} {} kv{}", r.gpu, r.policy, r.kv_blocks)
    } else {
        format!("{} {}", r.gpu, r.policy)
    }
}

/// Lines of `value` against replicas (at rate `rate`), one per (GPU, KV, policy) series.
fn by_replicas(
    rows: &[SweepRow],
    rate: f64,
    many_kv: bool,
    value: impl Fn(&SweepRow) -> f64,
) -> Vec<Series> {
    let mut m: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.rate_scale == rate) {
        m.entry(series_name(r, many_kv))
            .or_default()
            .push((f64::from(r.replicas), value(r)));
    }
    m.into_iter()
        .map(|(name, points)| Series { name, points })
        .collect()
}

/// A per-replica-count chart: file, title, y label, value.
type Chart = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SweepRow) -> f64,
);

/// Writes `capacity.md`, `capacity.jsonl` and the plots into `dir`; returns the paths.
pub fn write_outputs(spec: &SweepSpec, res: &SweepResult, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
    let mut files = Vec::new();
    let md = dir.join("capacity.md");
    std::fs::write(&md, markdown(spec, res)).map_err(|e| LabError::io(&md, e))?;
    files.push(md);
    let jl = dir.join("capacity.jsonl");
    write_jsonl(&jl, &res.rows)?;
    files.push(jl);
    let many_kv = spec.kv_blocks.len() > 1;
    let top = spec.rate_scales.iter().copied().fold(f64::MIN, f64::max);
    let charts: [Chart; 4] = [
        (
            "goodput_vs_replicas.svg",
            "Share of requests meeting the SLOs",
            "share",
            |r| r.goodput_share,
        ),
        ("preemptions.svg", "Preemptions", "preemptions", |r| {
            r.preemptions as f64
        }),
        (
            "prefix_hit_rate.svg",
            "Prefix cache hit rate",
            "hit rate",
            |r| r.prefix_hit_rate,
        ),
        ("ttft_p99_vs_replicas.svg", "TTFT p99", "ms", |r| {
            r.ttft_p99_ms
        }),
    ];
    for (file, title, y, f) in charts {
        let p = dir.join(file);
        line_chart(
            &p,
            &format!("{title} at rate ×{top}"),
            "replicas",
            y,
            &by_replicas(&res.rows, top, many_kv, f),
            true,
        )?;
        files.push(p);
    }
    if spec.rate_scales.len() > 1 {
        // Latency against offered load, one line per deployment.
        let mut m: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in &res.rows {
            m.entry(format!("{} ×{}", series_name(r, many_kv), r.replicas))
                .or_default()
                .push((r.offered_rate, r.ttft_p99_ms));
        }
        let lines: Vec<Series> = m
            .into_iter()
            .filter(|(_, p)| p.len() > 1)
            .map(|(name, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { name, points }
            })
            .collect();
        let p = dir.join("latency_vs_load.svg");
        line_chart(
            &p,
            "TTFT p99 against offered load",
            "offered load (req/s)",
            "TTFT p99 (ms)",
            &lines,
            true,
        )?;
        files.push(p);
    }
    if let Some(knee) = &res.knee {
        let kdir = dir.join("knee");
        files.extend(crate::plot::outcome_plots(knee, &kdir)?);
        files.extend(knee.write_dir(&kdir)?);
    }
    Ok(files)
}

/// Parses `1..16`, `1,2,4,8` or `4` into replica counts.
pub fn parse_replicas(s: &str) -> Result<Vec<u32>> {
    let bad = || LabError::invalid(format!("--replicas: expected N, A..B or a list, got {s:?}"));
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once("..") {
            let a: u32 = a.trim().parse().map_err(|_| bad())?;
            let b: u32 = b
                .trim_start_matches('=')
                .trim()
                .parse()
                .map_err(|_| bad())?;
            if a == 0 || b < a || b - a > 4096 {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            let n: u32 = part.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(bad());
            }
            out.push(n);
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ranges_parse() {
        assert_eq!(parse_replicas("1..4").unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(parse_replicas("2, 8,1..2").unwrap(), vec![2, 8, 1, 2]);
        for bad in ["", "0", "4..2", "x", "1..", "0..3"] {
            assert!(parse_replicas(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cheapest_wins_then_better_share() {
        let row = |gpu: &str, n: u32, cost: f64, share: f64| SweepRow {
            gpu: gpu.into(),
            kv_blocks: 1,
            policy: "round_robin",
            replicas: n,
            rate_scale: 1.0,
            offered_rate: 1.0,
            cost_per_hour: cost,
            goodput_share: share,
            meets: share >= 0.9,
            ttft_p50_ms: 0.0,
            ttft_p99_ms: 0.0,
            tpot_p50_ms: 0.0,
            tpot_p99_ms: 0.0,
            throughput: 0.0,
            preemptions: 0,
            prefix_hit_rate: 0.0,
            peak_kv_usage: 0.0,
        };
        let rows = vec![
            row("a", 2, 4.0, 0.95),
            row("b", 1, 3.0, 0.5),
            row("b", 2, 6.0, 1.0),
            row("c", 3, 4.0, 1.0),
        ];
        let m = meeting_choices(&rows, 1);
        assert_eq!(
            m.iter()
                .map(|c| (c.gpu.as_str(), c.replicas))
                .collect::<Vec<_>>(),
            vec![("c", 3), ("a", 2), ("b", 2)]
        );
    }
}
