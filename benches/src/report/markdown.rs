//! The Markdown report.

use std::fmt::Write;

use super::plots::Figure;
use super::{ArmRow, METRICS, cell, time_note};
use crate::ab::ExperimentResult;

/// Renders `report.md` (plots are linked from `plots/`).
pub fn render(result: &ExperimentResult, rows: &[ArmRow], figures: &[Figure]) -> String {
    let exp = &result.experiment;
    let mut s = String::new();
    let _ = writeln!(s, "# Experiment `{}`\n", exp.name);
    let fleet = if exp.fleet.urls.is_empty() {
        format!(
            "{} simulated replicas ({} on {}, speedup {}×{}), fresh per run",
            exp.fleet.replicas,
            exp.fleet.sim.model,
            exp.fleet.sim.gpu,
            exp.fleet.sim.speedup,
            exp.fleet
                .sim
                .num_gpu_blocks
                .map(|b| format!(", {b} KV blocks"))
                .unwrap_or_default()
        )
    } else {
        format!("{} existing endpoints", exp.fleet.urls.len())
    };
    let _ = writeln!(s, "- fleet: {fleet}");
    let _ = writeln!(
        s,
        "- arms: {}",
        exp.arms
            .iter()
            .map(|a| format!("`{}` ({})", a.name, a.policy.as_deref().unwrap_or("config")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "- repetitions: {} (arms interleaved); runs: {}{}",
        exp.repetitions,
        result.runs.len(),
        if result.interrupted {
            " — interrupted"
        } else {
            ""
        }
    );
    if !exp.load.slo.is_empty() {
        let _ = writeln!(s, "- goodput SLOs: {:?}", exp.load.slo);
    }
    let _ = writeln!(
        s,
        "\nLatencies as vLLM's serving benchmark defines them; `±x%` is (max − min) / mean over repetitions. {}\n",
        time_note(exp)
    );
    let mut header = vec!["arm".to_string()];
    header.extend(METRICS.iter().map(|m| m.name.to_string()));
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", " --- |".repeat(header.len()));
    for r in rows {
        let name = match r.rate {
            Some(rate) => format!("{} @ {rate} req/s", r.arm),
            None => r.arm.clone(),
        };
        let cells: Vec<String> = METRICS
            .iter()
            .zip(&r.values)
            .map(|(m, v)| cell(v, m.decimals, r.runs))
            .collect();
        let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
    }
    let _ = writeln!(s, "\n## Load balance (requests finished per replica)\n");
    let _ = writeln!(
        s,
        "| arm | rep | rate | per replica | hit % per replica |\n| --- | --- | --- | --- | --- |"
    );
    for run in &result.runs {
        let counts: Vec<String> = run
            .replicas
            .iter()
            .map(|r| format!("{:.0}", r.requests))
            .collect();
        let hits: Vec<String> = run
            .replicas
            .iter()
            .map(|r| {
                if r.prefix_queries > 0.0 {
                    format!("{:.0}", r.prefix_hits / r.prefix_queries * 100.0)
                } else {
                    "-".into()
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            run.arm,
            run.rep,
            run.rate.map(|r| r.to_string()).unwrap_or("-".into()),
            counts.join(" / "),
            hits.join(" / ")
        );
    }
    let _ = writeln!(s, "\n## Plots\n");
    for f in figures {
        let _ = writeln!(s, "![{}](plots/{}.svg)\n", f.title, f.id);
    }
    let _ = writeln!(
        s,
        "Per-request records, summaries and scraped engine series: `runs/<arm>/rep<k>/`."
    );
    s
}
