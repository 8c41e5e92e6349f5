//! SVG plots of a replay and of a capacity sweep, drawn with `plotters`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{LabError, Result};
use crate::outcome::Outcome;

/// One named line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points, x ascending.
    pub points: Vec<(f64, f64)>,
}

const W: u32 = 800;
const H: u32 = 480;

/// Draws `series` as lines (with point markers when `markers`) into an SVG at `path`.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    markers: bool,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| LabError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1 * 1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (k, s) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        if markers {
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Empirical CDF of `values` (seconds) as (ms, fraction ≤) points.
pub fn cdf_ms(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    // At most ~500 points: enough for a smooth curve, small SVGs on big traces.
    let stride = (v.len() / 500).max(1);
    let mut out: Vec<(f64, f64)> = v
        .iter()
        .enumerate()
        .step_by(stride)
        .map(|(i, x)| (x * 1000.0, (i + 1) as f64 / n))
        .collect();
    if let Some(&last) = v.last() {
        out.push((last * 1000.0, 1.0));
    }
    out
}

/// Per-replica gauge lines of `outcome`'s timeline.
fn per_replica(outcome: &Outcome, value: impl Fn(&crate::outcome::Sample) -> f64) -> Vec<Series> {
    let mut series: Vec<Series> = outcome
        .replicas
        .iter()
        .map(|r| Series {
            name: r.key.clone(),
            points: Vec::new(),
        })
        .collect();
    for s in &outcome.timeline {
        if let Some(line) = series.get_mut(s.replica as usize) {
            line.points.push((s.t, value(s)));
        }
    }
    series
}

/// TTFT CDF, KV usage and waiting requests over time: `ttft_cdf.svg`, `kv_usage.svg`, `waiting.svg` in `dir`.
pub fn outcome_plots(outcome: &Outcome, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
    let ttfts: Vec<f64> = outcome
        .records
        .iter()
        .filter(|r| r.success)
        .filter_map(|r| r.ttft_s)
        .collect();
    let cdf = dir.join("ttft_cdf.svg");
    line_chart(
        &cdf,
        "TTFT CDF",
        "TTFT (ms)",
        "fraction of requests",
        &[Series {
            name: outcome.label.clone(),
            points: cdf_ms(&ttfts),
        }],
        false,
    )?;
    let kv = dir.join("kv_usage.svg");
    line_chart(
        &kv,
        "KV cache usage per replica",
        "time (s)",
        "kv_cache_usage_perc",
        &per_replica(outcome, |s| s.kv_usage),
        false,
    )?;
    let waiting = dir.join("waiting.svg");
    let mut lines = per_replica(outcome, |s| f64::from(s.waiting));
    let queue: Vec<(f64, f64)> = outcome
        .timeline
        .iter()
        .filter(|s| s.replica == 0)
        .map(|s| (s.t, f64::from(s.admission_queue)))
        .collect();
    if queue.iter().any(|p| p.1 > 0.0) {
        lines.push(Series {
            name: "admission queue".into(),
            points: queue,
        });
    }
    line_chart(
        &waiting,
        "Waiting requests",
        "time (s)",
        "requests",
        &lines,
        false,
    )?;
    Ok(vec![cdf, kv, waiting])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_ends_at_one_and_is_monotone() {
        let c = cdf_ms(&[0.3, 0.1, 0.2, f64::NAN]);
        assert_eq!(c.last(), Some(&(300.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn writes_an_svg_even_for_empty_series() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.svg");
        line_chart(
            &p,
            "t",
            "x",
            "y",
            &[Series {
                name: "a".into(),
                points: vec![],
            }],
            true,
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("<svg"));
    }
}
