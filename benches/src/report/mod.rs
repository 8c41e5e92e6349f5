//! Reports of an experiment: per-arm numbers with their spread over
//! repetitions, as a terminal table, Markdown and a self-contained HTML page
//! with SVG plots.

mod html;
mod markdown;
pub mod plots;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ab::{ExperimentResult, RunResult};
use crate::error::{BenchError, Result};

/// How a metric converts from wall-clock to engine time (see [`engine_time_factor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A duration: multiplied by the speedup.
    Latency,
    /// Per second: divided by the speedup.
    Rate,
    /// A count or a ratio: unchanged.
    Plain,
}

/// A headline metric: its column name and how to read it from a run.
pub struct Metric {
    /// Column name.
    pub name: &'static str,
    /// Higher is better (for marking the best arm).
    pub higher_is_better: bool,
    /// What kind of number it is (for the engine-time view).
    pub unit: Unit,
    /// The value in a run (`None` when the run has no such number).
    pub get: fn(&RunResult) -> Option<f64>,
    /// Decimal places shown.
    pub decimals: usize,
}

/// The metrics every report shows, in order.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "req/s",
        unit: Unit::Rate,
        higher_is_better: true,
        get: |r| Some(r.summary.request_throughput),
        decimals: 2,
    },
    Metric {
        name: "goodput req/s",
        unit: Unit::Rate,
        higher_is_better: true,
        get: |r| r.summary.request_goodput,
        decimals: 2,
    },
    Metric {
        name: "out tok/s",
        unit: Unit::Rate,
        higher_is_better: true,
        get: |r| Some(r.summary.output_throughput),
        decimals: 0,
    },
    Metric {
        name: "TTFT mean ms",
        unit: Unit::Latency,
        higher_is_better: false,
        get: |r| Some(r.summary.ttft.mean_ms),
        decimals: 1,
    },
    Metric {
        name: "TTFT p50 ms",
        unit: Unit::Latency,
        higher_is_better: false,
        get: |r| Some(r.summary.ttft.median_ms),
        decimals: 1,
    },
    Metric {
        name: "TTFT p99 ms",
        unit: Unit::Latency,
        higher_is_better: false,
        get: |r| Some(r.summary.ttft.p99_ms),
        decimals: 1,
    },
    Metric {
        name: "TPOT mean ms",
        unit: Unit::Latency,
        higher_is_better: false,
        get: |r| Some(r.summary.tpot.mean_ms),
        decimals: 2,
    },
    Metric {
        name: "ITL p99 ms",
        unit: Unit::Latency,
        higher_is_better: false,
        get: |r| Some(r.summary.itl.p99_ms),
        decimals: 2,
    },
    Metric {
        name: "E2EL p99 ms",
        unit: Unit::Latency,
        higher_is_better: false,
        get: |r| Some(r.summary.e2el.p99_ms),
        decimals: 1,
    },
    Metric {
        name: "prefix hit %",
        unit: Unit::Plain,
        higher_is_better: true,
        get: |r| r.prefix_hit_rate.map(|h| h * 100.0),
        decimals: 1,
    },
    Metric {
        name: "max/mean reqs",
        unit: Unit::Plain,
        higher_is_better: false,
        get: |r| r.max_over_mean_requests,
        decimals: 2,
    },
    Metric {
        name: "preemptions",
        unit: Unit::Plain,
        higher_is_better: false,
        get: |r| Some(r.preemptions),
        decimals: 0,
    },
    Metric {
        name: "failed",
        unit: Unit::Plain,
        higher_is_better: false,
        get: |r| Some(r.summary.failed as f64),
        decimals: 0,
    },
    Metric {
        name: "shed 429/503",
        unit: Unit::Plain,
        higher_is_better: false,
        get: |r| Some(r.shed as f64),
        decimals: 0,
    },
];

/// Engine seconds per wall-clock second: the simulated replicas' speedup, or 1
/// for real endpoints. A simulated H100 at speedup 4 finishes in 25 ms of wall
/// time what takes it 100 ms of engine time, so wall-clock latencies × this
/// (and rates ÷ this) read like the GPU's own numbers.
pub fn engine_time_factor(exp: &crate::ab::Experiment) -> f64 {
    let s = exp.fleet.sim.speedup;
    if exp.fleet.urls.is_empty() && s.is_finite() && s > 0.0 {
        s
    } else {
        1.0
    }
}

/// The note that says which clock the report's numbers are on.
pub fn time_note(exp: &crate::ab::Experiment) -> String {
    let f = engine_time_factor(exp);
    if f == 1.0 {
        if exp.fleet.urls.is_empty() {
            "Simulated replicas in real time (speedup 1×): latencies are engine time.".into()
        } else {
            "Latencies and rates are wall-clock time.".into()
        }
    } else {
        format!(
            "Engine time: the replicas ran {f}× faster than real time, so latencies are wall-clock × {f} and rates wall-clock ÷ {f} (per-request records stay wall-clock)."
        )
    }
}

impl Unit {
    /// `v` measured on the wall clock, in engine time for `factor` (see [`engine_time_factor`]).
    pub fn to_engine(self, v: f64, factor: f64) -> f64 {
        match self {
            Unit::Latency => v * factor,
            Unit::Rate => v / factor,
            Unit::Plain => v,
        }
    }
}

/// One metric of one arm over its repetitions.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Mean over repetitions.
    pub mean: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// `(max - min) / |mean|`, in percent (0 for one repetition).
    pub spread_pct: f64,
}

impl Spread {
    /// The spread of `v`; `None` when empty.
    pub fn of(v: &[f64]) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let spread_pct = if mean.abs() > 0.0 {
            (max - min) / mean.abs() * 100.0
        } else {
            0.0
        };
        Some(Spread {
            mean,
            min,
            max,
            spread_pct,
        })
    }
}

/// One row of the comparison: an arm (at one rate, in sweeps).
#[derive(Debug, Clone, Serialize)]
pub struct ArmRow {
    /// Arm name.
    pub arm: String,
    /// Offered rate (sweeps).
    pub rate: Option<f64>,
    /// Repetitions aggregated.
    pub runs: usize,
    /// One entry per [`METRICS`] item.
    pub values: Vec<Option<Spread>>,
}

/// Rows in arm order (as the experiment lists them), then by rate.
/// Latencies and rates are in engine time (see [`engine_time_factor`]).
pub fn arm_rows(result: &ExperimentResult) -> Vec<ArmRow> {
    let factor = engine_time_factor(&result.experiment);
    let mut rows = Vec::new();
    let mut rates: Vec<Option<f64>> = Vec::new();
    for r in &result.runs {
        if !rates
            .iter()
            .any(|x| x.map(f64::to_bits) == r.rate.map(f64::to_bits))
        {
            rates.push(r.rate);
        }
    }
    for arm in &result.experiment.arms {
        for rate in &rates {
            let runs: Vec<&RunResult> = result
                .runs
                .iter()
                .filter(|r| r.arm == arm.name && r.rate.map(f64::to_bits) == rate.map(f64::to_bits))
                .collect();
            if runs.is_empty() {
                continue;
            }
            let values = METRICS
                .iter()
                .map(|m| {
                    let v: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| (m.get)(r))
                        .map(|v| m.unit.to_engine(v, factor))
                        .collect();
                    Spread::of(&v)
                })
                .collect();
            rows.push(ArmRow {
                arm: arm.name.clone(),
                rate: *rate,
                runs: runs.len(),
                values,
            });
        }
    }
    rows
}

/// Formats one value with its spread (`12.3 ±4%` when repeated).
pub fn cell(s: &Option<Spread>, decimals: usize, runs: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if runs > 1 => format!("{:.*} ±{:.0}%", decimals, s.mean, s.spread_pct),
        Some(s) => format!("{:.*}", decimals, s.mean),
    }
}

/// A fixed-width comparison table for the terminal.
pub fn terminal_table(rows: &[ArmRow]) -> String {
    let mut header = vec!["arm".to_string()];
    header.extend(METRICS.iter().map(|m| m.name.to_string()));
    let mut table = vec![header];
    for r in rows {
        let mut line = vec![match r.rate {
            Some(rate) => format!("{} @{rate}", r.arm),
            None => r.arm.clone(),
        }];
        line.extend(
            METRICS
                .iter()
                .zip(&r.values)
                .map(|(m, v)| cell(v, m.decimals, r.runs)),
        );
        table.push(line);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, line) in table.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                if c == 0 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(
                &widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  "),
            );
            out.push('\n');
        }
    }
    out
}

/// Paths and text of the written reports.
#[derive(Debug, Clone)]
pub struct Reports {
    /// The terminal table and the note saying which clock it is on.
    pub table: String,
    /// `report.md`.
    pub markdown: PathBuf,
    /// `report.html`.
    pub html: PathBuf,
}

/// Writes `report.md`, `report.html` and the SVG plots into `out`.
pub fn write_reports(result: &ExperimentResult, out: &Path) -> Result<Reports> {
    let rows = arm_rows(result);
    let figures = plots::figures(result)?;
    let plots_dir = out.join("plots");
    std::fs::create_dir_all(&plots_dir).map_err(|e| BenchError::io(&plots_dir, e))?;
    for f in &figures {
        let p = plots_dir.join(format!("{}.svg", f.id));
        std::fs::write(&p, &f.svg).map_err(|e| BenchError::io(&p, e))?;
    }
    let md = out.join("report.md");
    std::fs::write(&md, markdown::render(result, &rows, &figures))
        .map_err(|e| BenchError::io(&md, e))?;
    let html = out.join("report.html");
    std::fs::write(&html, html::render(result, &rows, &figures))
        .map_err(|e| BenchError::io(&html, e))?;
    let html = std::fs::canonicalize(&html).unwrap_or(html);
    Ok(Reports {
        table: format!(
            "{}{}\n",
            terminal_table(&rows),
            time_note(&result.experiment)
        ),
        markdown: md,
        html,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_over_repetitions() {
        let s = Spread::of(&[9.0, 10.0, 11.0]).unwrap();
        assert_eq!((s.mean, s.min, s.max), (10.0, 9.0, 11.0));
        assert!((s.spread_pct - 20.0).abs() < 1e-9);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(cell(&Some(s), 1, 3), "10.0 ±20%");
        assert_eq!(cell(&Some(s), 0, 1), "10");
    }

    #[test]
    fn engine_time_scales_latencies_and_rates_only() {
        let mut exp: crate::ab::Experiment = toml::from_str(
            r#"
            [fleet]
            replicas = 2
            sim = { speedup = 4 }
            [workload]
            path = "w.jsonl"
            [[arms]]
            name = "a"
            "#,
        )
        .unwrap();
        let mut summary = crate::metrics::Summary {
            request_throughput: 40.0,
            ..Default::default()
        };
        summary.ttft.p99_ms = 25.0;
        let run = RunResult {
            arm: "a".into(),
            rep: 0,
            rate: None,
            dir: PathBuf::new(),
            summary,
            shed: 2,
            replicas: Vec::new(),
            prefix_hit_rate: Some(0.5),
            preemptions: 3.0,
            max_over_mean_requests: Some(1.1),
            lifecycle_records: None,
            series: Vec::new(),
        };
        let result = ExperimentResult {
            experiment: exp.clone(),
            runs: vec![run],
            interrupted: false,
        };
        let col = |name: &str| METRICS.iter().position(|m| m.name == name).unwrap();
        let row = &arm_rows(&result)[0];
        let v = |name: &str| row.values[col(name)].unwrap().mean;
        assert_eq!(v("TTFT p99 ms"), 100.0);
        assert_eq!(v("req/s"), 10.0);
        assert_eq!(v("prefix hit %"), 50.0);
        assert_eq!(v("preemptions"), 3.0);
        assert_eq!(v("shed 429/503"), 2.0);
        assert!(time_note(&exp).contains("wall-clock × 4"));
        // Real endpoints run on the wall clock.
        exp.fleet.urls = vec!["http://127.0.0.1:1".into()];
        assert_eq!(engine_time_factor(&exp), 1.0);
        exp.fleet.urls.clear();
        exp.fleet.sim.speedup = 1.0;
        assert!(time_note(&exp).contains("engine time"));
    }
}
