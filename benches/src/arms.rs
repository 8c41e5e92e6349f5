//! Evaluating a live split: a proxy with `[pools.experiment]` names the arm that
//! served each request (`x-sluice-arm`), and the run is summarised per arm.
//!
//! Each arm's summary is [`summarize`] over that arm's records and the whole
//! run's duration: the arms ran side by side over the same window, so an arm's
//! throughputs are its share of the run, and its latencies are directly
//! comparable with the other arms'.

use std::collections::BTreeMap;

use crate::loadgen::record::RequestRecord;
use crate::metrics::{Slo, Summary, summarize};

/// The summary of each arm, by arm name, when the records carry more than one
/// arm; empty otherwise (no experiment, or every request on one arm, where the
/// run's own summary says it all). Requests without an arm — no response head
/// came back — count only in the run's summary.
pub fn summarize_by_arm(
    records: &[RequestRecord],
    duration_s: f64,
    slo: &Slo,
) -> BTreeMap<String, Summary> {
    let mut by_arm: BTreeMap<&str, Vec<RequestRecord>> = BTreeMap::new();
    for r in records {
        if let Some(arm) = r.arm.as_deref() {
            by_arm.entry(arm).or_default().push(r.clone());
        }
    }
    if by_arm.len() < 2 {
        return BTreeMap::new();
    }
    by_arm
        .into_iter()
        .map(|(arm, recs)| (arm.to_string(), summarize(&recs, duration_s, slo)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(arm: Option<&str>, ttft: f64, success: bool) -> RequestRecord {
        RequestRecord {
            id: "r".into(),
            stream: true,
            ttft_s: Some(ttft),
            latency_s: ttft * 2.0,
            prompt_tokens: 10,
            output_tokens: 4,
            status: if success { 200 } else { 503 },
            success,
            arm: arm.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn each_arm_is_summarized_over_its_own_records_and_the_run_duration() {
        let records = vec![
            rec(Some("a"), 0.1, true),
            rec(Some("b"), 0.5, true),
            rec(Some("a"), 0.3, true),
            rec(Some("b"), 0.0, false),
            rec(None, 0.0, false),
        ];
        let arms = summarize_by_arm(&records, 2.0, &Slo::default());
        assert_eq!(arms.keys().collect::<Vec<_>>(), ["a", "b"]);
        let (a, b) = (&arms["a"], &arms["b"]);
        assert_eq!((a.completed, a.failed), (2, 0));
        assert_eq!((b.completed, b.failed), (1, 1));
        assert_eq!(a.duration_s, 2.0);
        assert!((a.request_throughput - 1.0).abs() < 1e-12);
        assert!((a.ttft.mean_ms - 200.0).abs() < 1e-9);
        assert!((b.ttft.mean_ms - 500.0).abs() < 1e-9);
        // The record without an arm is in neither.
        let per_arm: usize = arms.values().map(|s| s.completed + s.failed).sum();
        assert_eq!(per_arm, records.len() - 1);
    }

    #[test]
    fn one_arm_or_none_gives_no_breakdown() {
        let one = vec![rec(Some("a"), 0.1, true), rec(None, 0.2, true)];
        assert!(summarize_by_arm(&one, 1.0, &Slo::default()).is_empty());
        assert!(summarize_by_arm(&[rec(None, 0.1, true)], 1.0, &Slo::default()).is_empty());
    }
}
