//! The self-contained HTML report: tables and inline SVG plots, no external assets.

use std::fmt::Write;

use super::plots::Figure;
use super::{ArmRow, METRICS, cell, time_note};
use crate::ab::ExperimentResult;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders `report.html`.
pub fn render(result: &ExperimentResult, rows: &[ArmRow], figures: &[Figure]) -> String {
    let exp = &result.experiment;
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sluice experiment {name}</title>\n<style>\
body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1500px}}\
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}td.best{{background:#e3f6e3;font-weight:600}}\
.figs{{display:flex;flex-wrap:wrap;gap:12px}}figure{{margin:0;border:1px solid #ddd}}figcaption{{font-size:13px;padding:4px}}\
</style></head><body>\n<h1>Sluice experiment <code>{name}</code></h1>\n",
        name = esc(&exp.name)
    );
    let fleet = if exp.fleet.urls.is_empty() {
        format!(
            "{} simulated replicas ({} on {}, speedup {}×), fresh per run",
            exp.fleet.replicas, exp.fleet.sim.model, exp.fleet.sim.gpu, exp.fleet.sim.speedup
        )
    } else {
        format!("{} existing endpoints", exp.fleet.urls.len())
    };
    let _ = write!(
        s,
        "<p>{} · {} repetition(s), arms interleaved · {} run(s){}</p>\n<p>Latencies as vLLM's serving benchmark defines them; ±x% is (max − min) / mean over repetitions. Best value per column is highlighted. {}</p>\n",
        esc(&fleet),
        exp.repetitions,
        result.runs.len(),
        if result.interrupted {
            " · <b>interrupted</b>"
        } else {
            ""
        },
        esc(&time_note(exp))
    );
    let _ = write!(s, "<table><tr><th>arm</th>");
    for m in METRICS {
        let _ = write!(s, "<th>{}</th>", esc(m.name));
    }
    let _ = writeln!(s, "</tr>");
    // The best arm per column (per rate).
    let best: Vec<Vec<bool>> = rows
        .iter()
        .map(|r| {
            METRICS
                .iter()
                .enumerate()
                .map(|(c, m)| {
                    let Some(v) = r.values[c].map(|x| x.mean) else {
                        return false;
                    };
                    let peers = rows
                        .iter()
                        .filter(|o| o.rate.map(f64::to_bits) == r.rate.map(f64::to_bits));
                    peers
                        .filter_map(|o| o.values[c].map(|x| x.mean))
                        .all(|o| if m.higher_is_better { v >= o } else { v <= o })
                        && rows.len() > 1
                })
                .collect()
        })
        .collect();
    for (r, best) in rows.iter().zip(&best) {
        let name = match r.rate {
            Some(rate) => format!("{} @ {rate} req/s", r.arm),
            None => r.arm.clone(),
        };
        let _ = write!(s, "<tr><td>{}</td>", esc(&name));
        for ((m, v), b) in METRICS.iter().zip(&r.values).zip(best) {
            let _ = write!(
                s,
                "<td{}>{}</td>",
                if *b { " class=\"best\"" } else { "" },
                esc(&cell(v, m.decimals, r.runs))
            );
        }
        let _ = writeln!(s, "</tr>");
    }
    let _ = writeln!(s, "</table>\n<h2>Plots</h2>\n<div class=\"figs\">");
    for f in figures {
        let _ = writeln!(
            s,
            "<figure id=\"{}\">{}<figcaption>{}</figcaption></figure>",
            esc(&f.id),
            f.svg,
            esc(&f.title)
        );
    }
    let _ = writeln!(
        s,
        "</div>\n<h2>Load balance</h2>\n<table><tr><th>arm</th><th>rep</th><th>rate</th><th>requests per replica</th><th>max/mean</th><th>preemptions</th><th>lifecycle records</th></tr>"
    );
    for run in &result.runs {
        let counts: Vec<String> = run
            .replicas
            .iter()
            .map(|r| format!("{:.0}", r.requests))
            .collect();
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td></tr>",
            esc(&run.arm),
            run.rep,
            run.rate.map(|r| r.to_string()).unwrap_or("-".into()),
            counts.join(" / "),
            run.max_over_mean_requests
                .map(|m| format!("{m:.2}"))
                .unwrap_or("-".into()),
            run.preemptions,
            run.lifecycle_records
                .map(|n| n.to_string())
                .unwrap_or("-".into())
        );
    }
    let _ = writeln!(s, "</table>\n</body></html>");
    s
}
