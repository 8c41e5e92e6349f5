//! SVG figures drawn with `plotters` (SVG backend; text is left to the browser's fonts).

use plotters::prelude::*;

use crate::ab::{ExperimentResult, RunResult};
use crate::error::{BenchError, Result};
use crate::loadgen::output::read_records;

/// One figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// File stem and HTML anchor.
    pub id: String,
    /// Title.
    pub title: String,
    /// The SVG document.
    pub svg: String,
}

const W: u32 = 720;
const H: u32 = 380;

fn plot_err<E: std::fmt::Display>(e: E) -> BenchError {
    BenchError::Plot(e.to_string())
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// A line chart of named series; `x_max`/`y_max` of 0 mean "from the data".
fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    y_floor_zero: bool,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let pts = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if y_floor_zero {
            y0 = y0.min(0.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let pad = (y1 - y0) * 0.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1 + pad)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_err)?;
        for (i, (name, points)) in series.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            if points.len() <= 12 {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(plot_err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK.mix(0.3))
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// A bar chart, one bar per label.
fn bar_chart(title: &str, y_desc: &str, bars: &[(String, f64)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let y_max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.15;
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..y_max)
            .map_err(plot_err)?;
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(y_desc)
            .x_labels(n)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    color(i).filled(),
                );
                r.set_margin(0, 0, 12, 12);
                r
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    format!("{v:.1}"),
                    (SegmentValue::CenterOf(i), *v + y_max * 0.02),
                    ("sans-serif", 14).into_font(),
                )
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Empirical CDF points of `v` (at most ~400 points).
fn cdf(v: &mut [f64]) -> Vec<(f64, f64)> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let step = (n / 400).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect();
    if let Some(&last) = v.last() {
        pts.push((last, 1.0));
    }
    pts
}

/// The first run of each arm (at the experiment's first rate).
fn first_runs(result: &ExperimentResult) -> Vec<&RunResult> {
    let first_rate = result.runs.first().map(|r| r.rate.map(f64::to_bits));
    result
        .experiment
        .arms
        .iter()
        .filter_map(|a| {
            result
                .runs
                .iter()
                .find(|r| r.arm == a.name && Some(r.rate.map(f64::to_bits)) == first_rate)
        })
        .collect()
}

/// Each arm's prefix hit rate (%) at the first offered rate, as the table shows it.
fn hit_rate_bars(result: &ExperimentResult) -> Vec<(String, f64)> {
    let first_rate = result.runs.first().map(|r| r.rate.map(f64::to_bits));
    let col = super::METRICS.iter().position(|m| m.name == "prefix hit %");
    super::arm_rows(result)
        .into_iter()
        .filter(|row| Some(row.rate.map(f64::to_bits)) == first_rate)
        .map(|row| {
            let mean = col
                .and_then(|c| row.values.get(c).copied().flatten())
                .map_or(0.0, |v| v.mean);
            (row.arm, mean)
        })
        .collect()
}

/// Every figure of the report.
pub fn figures(result: &ExperimentResult) -> Result<Vec<Figure>> {
    let mut figs = Vec::new();
    let factor = super::engine_time_factor(&result.experiment);
    let ms_label = if factor == 1.0 {
        "TTFT (ms)".to_string()
    } else {
        format!("TTFT (ms, engine time = wall × {factor})")
    };
    let sweep =
        result.runs.iter().any(|r| r.rate.is_some()) && !result.experiment.load.rates.is_empty();

    // TTFT CDF per arm, pooled over repetitions at the first rate.
    let first_rate = result.runs.first().map(|r| r.rate.map(f64::to_bits));
    let mut series = Vec::new();
    for arm in &result.experiment.arms {
        let mut ttfts = Vec::new();
        for run in result
            .runs
            .iter()
            .filter(|r| r.arm == arm.name && Some(r.rate.map(f64::to_bits)) == first_rate)
        {
            for rec in read_records(&run.dir)?.iter().filter(|r| r.success) {
                if let Some(t) = rec.ttft_s {
                    ttfts.push(t * 1000.0 * factor);
                }
            }
        }
        series.push((arm.name.clone(), cdf(&mut ttfts)));
    }
    figs.push(Figure {
        id: "ttft_cdf".into(),
        title: "TTFT CDF per arm".into(),
        svg: line_chart(
            "TTFT CDF per arm",
            &ms_label,
            "fraction of requests",
            &series,
            true,
        )?,
    });

    // Prefix cache hit rate per arm at the first rate: the table's value
    // (mean over repetitions), not one repetition's.
    let bars = hit_rate_bars(result);
    figs.push(Figure {
        id: "hit_rate".into(),
        title: "Prefix cache hit rate per arm".into(),
        svg: bar_chart(
            "Prefix cache hit rate per arm (engine-side)",
            "hit tokens / queried tokens (%)",
            &bars,
        )?,
    });

    // Per replica over time: completed requests/s and KV usage, for each arm's first run.
    for run in first_runs(result) {
        let mut thr = Vec::new();
        let mut kv = Vec::new();
        for (i, s) in run.series.iter().enumerate() {
            let name = format!("replica {i}");
            thr.push((
                name.clone(),
                s.windows(2)
                    .filter(|w| w[1].t_s > w[0].t_s)
                    .map(|w| {
                        (
                            w[1].t_s,
                            (w[1].requests - w[0].requests) / (w[1].t_s - w[0].t_s),
                        )
                    })
                    .collect(),
            ));
            kv.push((
                name,
                s.iter().map(|x| (x.t_s, x.kv_usage * 100.0)).collect(),
            ));
        }
        let t = format!("{}: finished requests/s per replica", run.arm);
        figs.push(Figure {
            id: format!("throughput_{}", run.arm),
            svg: line_chart(&t, "time (s)", "requests/s", &thr, true)?,
            title: t,
        });
        let t = format!("{}: KV cache usage per replica", run.arm);
        figs.push(Figure {
            id: format!("kv_{}", run.arm),
            svg: line_chart(&t, "time (s)", "KV usage (%)", &kv, true)?,
            title: t,
        });
    }

    // Latency vs load in sweeps.
    if sweep {
        let mut ttft = Vec::new();
        let mut e2el = Vec::new();
        for arm in &result.experiment.arms {
            let mut runs: Vec<&RunResult> =
                result.runs.iter().filter(|r| r.arm == arm.name).collect();
            runs.sort_by(|a, b| a.rate.unwrap_or(0.0).total_cmp(&b.rate.unwrap_or(0.0)));
            ttft.push((
                arm.name.clone(),
                runs.iter()
                    .map(|r| {
                        (
                            r.summary.request_throughput / factor,
                            r.summary.ttft.p99_ms * factor,
                        )
                    })
                    .collect(),
            ));
            e2el.push((
                arm.name.clone(),
                runs.iter()
                    .map(|r| {
                        (
                            r.summary.request_throughput / factor,
                            r.summary.e2el.median_ms * factor,
                        )
                    })
                    .collect(),
            ));
        }
        figs.push(Figure {
            id: "sweep_ttft".into(),
            title: "TTFT p99 vs throughput".into(),
            svg: line_chart(
                "TTFT p99 vs achieved throughput",
                "requests/s",
                "TTFT p99 (ms)",
                &ttft,
                true,
            )?,
        });
        figs.push(Figure {
            id: "sweep_e2el".into(),
            title: "E2EL median vs throughput".into(),
            svg: line_chart(
                "E2E latency median vs achieved throughput",
                "requests/s",
                "E2EL median (ms)",
                &e2el,
                true,
            )?,
        });
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_rate_bars_average_the_repetitions_like_the_table() {
        let exp: crate::ab::Experiment = toml::from_str(
            r#"
            [fleet]
            replicas = 2
            [workload]
            path = "w.jsonl"
            [[arms]]
            name = "a"
            [[arms]]
            name = "b"
            "#,
        )
        .unwrap();
        let run = |arm: &str, rep: usize, hit: f64| RunResult {
            arm: arm.into(),
            rep,
            rate: None,
            dir: std::path::PathBuf::new(),
            summary: crate::metrics::Summary::default(),
            shed: 0,
            replicas: Vec::new(),
            prefix_hit_rate: Some(hit),
            preemptions: 0.0,
            max_over_mean_requests: None,
            lifecycle_records: None,
            series: Vec::new(),
        };
        let result = ExperimentResult {
            experiment: exp,
            runs: vec![
                run("a", 0, 0.2),
                run("b", 0, 0.5),
                run("a", 1, 0.4),
                run("b", 1, 0.7),
            ],
            interrupted: false,
        };
        let bars = hit_rate_bars(&result);
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].0, "a");
        assert!((bars[0].1 - 30.0).abs() < 1e-9, "{bars:?}");
        assert!((bars[1].1 - 60.0).abs() < 1e-9, "{bars:?}");
    }

    #[test]
    fn charts_render_text_and_shapes() {
        let svg = line_chart(
            "T",
            "x axis",
            "y axis",
            &[("arm-a".into(), vec![(0.0, 0.0), (1.0, 2.0)])],
            true,
        )
        .unwrap();
        assert!(
            svg.starts_with("<svg")
                && svg.contains("<text")
                && svg.contains("arm-a")
                && svg.contains("x axis")
        );
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        let svg = bar_chart("B", "y", &[("a".into(), 1.0), ("b".into(), 3.0)]).unwrap();
        // Background plus two bars; the labels are text elements.
        assert!(svg.matches("<rect").count() >= 3, "{svg}");
        assert!(
            svg.contains("\nb\n</text>") && svg.contains("\n3.0\n</text>"),
            "{svg}"
        );
        // Empty data still renders an empty chart instead of failing.
        assert!(
            line_chart("E", "x", "y", &[], true)
                .unwrap()
                .contains("<svg")
        );
        let mut v = vec![3.0, 1.0, 2.0];
        assert_eq!(cdf(&mut v).last(), Some(&(3.0, 1.0)));
    }
}
