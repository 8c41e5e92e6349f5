//! The lab report: an experiment written up the way an inference engineer
//! would — question, environment, workload, metrics, results, explanation,
//! conclusion — plus tuning suggestions derived from what the run saw.
//! Every number comes from the run's records and engine statistics.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;
use sluice_bench::metrics::LatencyStats;
use sluice_bench::stats::{mean, percentile_sorted, sorted, std_dev};

use crate::outcome::{Derived, Outcome};
use crate::prepare::PreparedWorkload;
use crate::scenario::Scenario;

/// What the report needs besides the run itself.
#[derive(Debug, Clone, Default)]
pub struct ReportContext {
    /// The hypothesis; a default question is derived from the deployment when absent.
    pub question: Option<String>,
    /// The command that produced the run.
    pub command: String,
    /// Where the workload came from.
    pub workload_path: String,
}

/// Percentiles of one workload quantity.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Spread {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Self {
        let s = sorted(v);
        let p = |q| percentile_sorted(&s, q).unwrap_or(0.0);
        Spread {
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            max: p(100.0),
        }
    }
}

/// The workload as the report describes it.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct WorkloadProfile {
    /// Requests.
    pub requests: usize,
    /// Seconds from the first to the last arrival (after rate scaling).
    pub span_s: f64,
    /// Mean arrival rate, requests per second.
    pub mean_rate: f64,
    /// Coefficient of variation of inter-arrival gaps (1 for Poisson, > 1 bursty).
    pub interarrival_cv: f64,
    /// Requests per class.
    pub classes: BTreeMap<String, usize>,
    /// Requests per tenant.
    pub tenants: BTreeMap<String, usize>,
    /// Prompt tokens.
    pub prompt_tokens: Spread,
    /// Requested output tokens.
    pub max_tokens: Spread,
    /// Distinct shared-prefix groups.
    pub prefix_groups: usize,
    /// Hit rate an infinite prefix cache on one replica would reach.
    pub ideal_prefix_hit_rate: f64,
    /// Share of streamed requests.
    pub stream_share: f64,
}

/// Profiles `w` as replayed at `rate_scale`.
pub fn profile(w: &PreparedWorkload, rate_scale: f64) -> WorkloadProfile {
    let n = w.requests.len();
    let arrivals: Vec<f64> = w
        .requests
        .iter()
        .map(|r| r.arrival_s / rate_scale)
        .collect();
    let gaps: Vec<f64> = arrivals.windows(2).map(|p| p[1] - p[0]).collect();
    let cv = match (mean(&gaps), std_dev(&gaps)) {
        (Some(m), Some(s)) if m > 0.0 => s / m,
        _ => 0.0,
    };
    let span = arrivals.last().copied().unwrap_or(0.0) - arrivals.first().copied().unwrap_or(0.0);
    let mut classes = BTreeMap::new();
    let mut tenants = BTreeMap::new();
    let mut groups = HashSet::new();
    let mut seen = HashSet::new();
    let (mut blocks, mut hits) = (0usize, 0usize);
    for r in &w.requests {
        *classes
            .entry(r.class.clone().unwrap_or_else(|| "-".into()))
            .or_insert(0) += 1;
        *tenants.entry(r.tenant.clone()).or_insert(0) += 1;
        if let Some(g) = &r.prefix_group {
            groups.insert(g.clone());
        }
        for h in r.hashes.iter() {
            blocks += 1;
            if !seen.insert(*h) {
                hits += 1;
            }
        }
    }
    let prompts: Vec<f64> = w
        .requests
        .iter()
        .map(|r| f64::from(r.prompt_tokens()))
        .collect();
    let outs: Vec<f64> = w.requests.iter().map(|r| f64::from(r.max_tokens)).collect();
    WorkloadProfile {
        requests: n,
        span_s: span,
        mean_rate: if span > 0.0 {
            (n.saturating_sub(1)) as f64 / span
        } else {
            0.0
        },
        interarrival_cv: cv,
        classes,
        tenants,
        prompt_tokens: Spread::of(&prompts),
        max_tokens: Spread::of(&outs),
        prefix_groups: groups.len(),
        ideal_prefix_hit_rate: if blocks > 0 {
            hits as f64 / blocks as f64
        } else {
            0.0
        },
        stream_share: w.requests.iter().filter(|r| r.stream).count() as f64 / n.max(1) as f64,
    }
}

/// One tuning suggestion: what the run saw and what to change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    /// The observation, with its numbers.
    pub observed: String,
    /// The change to try next.
    pub action: String,
}

/// Share of a request's pre-first-token time spent waiting to be scheduled
/// above which queueing, not prefill, is said to dominate TTFT.
const QUEUE_DOMINATES: f64 = 0.5;
/// Mean wait (ms) below which queueing is not worth a suggestion whatever its share.
const QUEUE_NOTICEABLE_MS: f64 = 20.0;

/// Suggestions that follow from the run (an empty list means nothing stood out).
pub fn suggestions(sc: &Scenario, wp: &WorkloadProfile, o: &Outcome) -> Vec<Suggestion> {
    let d = o.derived();
    let mut out = Vec::new();
    let cfg = sc.engine_config().ok();
    if d.preemptions > 0 && d.peak_kv_usage >= 0.95 {
        let seqs = cfg.as_ref().map_or(0, |c| c.max_num_seqs);
        out.push(Suggestion {
            observed: format!(
                "KV cache saturated (peak usage {:.1}%) with {} preemptions: requests were evicted and recomputed.",
                d.peak_kv_usage * 100.0,
                d.preemptions
            ),
            action: format!(
                "Lower `max_num_seqs` (now {seqs}) so the running batch fits in KV, add replicas, or use a GPU with more memory; `--scheduler edf` admits only what fits and never preempts."
            ),
        });
    }
    if wp.ideal_prefix_hit_rate >= 0.2 && d.prefix_hit_rate < 0.5 * wp.ideal_prefix_hit_rate {
        out.push(Suggestion {
            observed: format!(
                "Prompts share prefixes (an ideal cache would hit {:.1}% of prompt tokens' blocks) but the pool hit {:.1}% under `{}`.",
                wp.ideal_prefix_hit_rate * 100.0,
                d.prefix_hit_rate * 100.0,
                sc.routing.policy
            ),
            action: "Route by prefix: `cache_aware` (or `prefix_affinity`) keeps each shared prefix on the replica that already holds it.".into(),
        });
    }
    let pre_first = d.mean_queue_ms + d.mean_prefill_ms;
    if pre_first > 0.0
        && d.mean_queue_ms / pre_first > QUEUE_DOMINATES
        && d.mean_queue_ms > QUEUE_NOTICEABLE_MS
    {
        out.push(Suggestion {
            observed: format!(
                "TTFT is dominated by queueing: {:.1} ms of waiting before the engine scheduled a request against {:.1} ms of prefill (means).",
                d.mean_queue_ms, d.mean_prefill_ms
            ),
            action: if wp.prompt_tokens.p99 > 4.0 * wp.prompt_tokens.p50.max(1.0) {
                format!(
                    "Long prompts (p99 {:.0} tokens vs median {:.0}) hold up short ones: give them their own pool, or admit with `--admission` limits and `--scheduler spf`.",
                    wp.prompt_tokens.p99, wp.prompt_tokens.p50
                )
            } else {
                "Add replicas, or set admission limits (`--admission max_engine_waiting=…`) so excess load waits in the proxy, where it can be shed or reordered, instead of in the engines.".into()
            },
        });
    }
    if d.imbalance > 1.3 && sc.replicas > 1 {
        out.push(Suggestion {
            observed: format!("Load is uneven: the busiest replica received {:.2}× the mean request count.", d.imbalance),
            action: "Use a load-aware policy (`least_requests`, `power_of_two`) or tighten `cache_aware`'s balance thresholds.".into(),
        });
    }
    if !o.slo.is_empty() && d.goodput_share < 0.99 {
        out.push(Suggestion {
            observed: format!(
                "{:.1}% of requests met every SLO ({} failed outright).",
                d.goodput_share * 100.0,
                o.summary.failed
            ),
            action: "Run `sluice capacity` over replica counts and GPUs to find the cheapest pool that meets the SLOs at this traffic.".into(),
        });
    }
    if d.mean_utilization < 0.3 && d.goodput_share >= 0.99 && sc.replicas > 1 {
        out.push(Suggestion {
            observed: format!("Replicas were busy {:.1}% of the time on average and every SLO held.", d.mean_utilization * 100.0),
            action: "The pool is oversized for this traffic: try fewer replicas (`sluice capacity` finds the smallest that still meets the SLOs).".into(),
        });
    }
    out
}

fn latency_row(out: &mut String, name: &str, l: &LatencyStats) {
    let _ = writeln!(
        out,
        "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        l.mean_ms, l.median_ms, l.p90_ms, l.p95_ms, l.p99_ms
    );
}

fn fmt_map(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as Markdown.
pub fn lab_report(ctx: &ReportContext, w: &PreparedWorkload, sc: &Scenario, o: &Outcome) -> String {
    let wp = profile(w, sc.rate_scale);
    let d: Derived = o.derived();
    let s = &o.summary;
    let mut r = String::new();
    let question = ctx.question.clone().unwrap_or_else(|| {
        format!(
            "How does a pool of {} × {} serving {} with `{}` routing and `{}` engine scheduling handle this workload{}?",
            sc.replicas,
            sc.gpu.name,
            sc.model.name,
            sc.routing.policy,
            sc.scheduler,
            if o.slo.is_empty() { String::new() } else { " within its SLOs".into() }
        )
    });
    let _ = writeln!(r, "# Lab report: {}\n", o.label);
    let _ = writeln!(r, "## Question\n\n{question}\n");

    let _ = writeln!(r, "## Environment\n");
    let _ = writeln!(
        r,
        "- Simulator: `sluice simulate` (sluice-lab {}), discrete-event replay in virtual time; engine model sluice-enginesim (vLLM v1 scheduler, paged KV with prefix caching, chunked prefill, preemption by recompute, roofline step time).",
        env!("CARGO_PKG_VERSION")
    );
    match sc.engine_config() {
        Ok(c) => {
            let _ = writeln!(
                r,
                "- Model: {} ({}), weights {}, KV cache {}",
                c.model.name,
                c.model.hf_id,
                c.dtype.name(),
                c.kv_dtype.name()
            );
            let _ = writeln!(
                r,
                "- GPU: {} ({:.0} GiB, {:.0} GB/s, {:.0} dense BF16 TFLOPS), tensor parallel {}",
                c.gpu.name,
                c.gpu.memory_gib,
                c.gpu.memory_bandwidth_gbps,
                c.gpu.bf16_tflops,
                c.tensor_parallel
            );
            let _ = writeln!(
                r,
                "- Engine: {} replicas, num_gpu_blocks {} × block_size {} ({} tokens of KV each), max_num_seqs {}, max_num_batched_tokens {}, max_model_len {}, prefix caching {}, gpu_memory_utilization {}",
                sc.replicas,
                c.num_gpu_blocks,
                c.block_size,
                c.num_gpu_blocks * u64::from(c.block_size),
                c.max_num_seqs,
                c.max_num_batched_tokens,
                c.max_model_len,
                if c.enable_prefix_caching { "on" } else { "off" },
                c.gpu_memory_utilization
            );
        }
        Err(e) => {
            let _ = writeln!(r, "- Engine configuration unavailable: {e}");
        }
    }
    let _ = writeln!(
        r,
        "- Engine scheduler: `{}`; routing: `{}`; admission: {}",
        sc.scheduler,
        sc.routing.policy,
        sc.admission.map_or("none".to_string(), |a| format!(
            "`{}`",
            crate::admission::admission_spec(&a)
        ))
    );
    let _ = writeln!(
        r,
        "- Router gauge age (scrape interval): {} ms; tokenization cost {} µs/token; seed {}",
        sc.scrape_interval_s * 1000.0,
        sc.tokenize_s_per_token * 1e6,
        sc.seed
    );
    if !ctx.command.is_empty() {
        let _ = writeln!(r, "- Command: `{}`", ctx.command);
    }
    let _ = writeln!(r);

    let _ = writeln!(r, "## Workload\n");
    if !ctx.workload_path.is_empty() {
        let _ = writeln!(r, "- File: `{}`", ctx.workload_path);
    }
    let _ = writeln!(
        r,
        "- {} requests over {:.1} s (rate scale ×{}): mean {:.2} req/s, inter-arrival CV {:.2} ({})",
        wp.requests,
        wp.span_s,
        sc.rate_scale,
        wp.mean_rate,
        wp.interarrival_cv,
        if wp.interarrival_cv > 1.2 {
            "bursty"
        } else if wp.interarrival_cv > 0.8 {
            "Poisson-like"
        } else {
            "regular"
        }
    );
    let _ = writeln!(
        r,
        "- Classes: {}; tenants: {}",
        fmt_map(&wp.classes),
        fmt_map(&wp.tenants)
    );
    let _ = writeln!(
        r,
        "\n| tokens | p50 | p90 | p99 | max |\n|---|---|---|---|---|"
    );
    for (name, sp) in [
        ("prompt", &wp.prompt_tokens),
        ("max_tokens", &wp.max_tokens),
    ] {
        let _ = writeln!(
            r,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            sp.p50, sp.p90, sp.p99, sp.max
        );
    }
    let _ = writeln!(
        r,
        "\n- Shared prefixes: {} prefix groups; an infinite cache on one replica would hit {:.1}% of prompt blocks; {:.0}% of requests stream.\n",
        wp.prefix_groups,
        wp.ideal_prefix_hit_rate * 100.0,
        wp.stream_share * 100.0
    );

    let _ = writeln!(r, "## Metrics\n");
    let _ = writeln!(
        r,
        "As vLLM's serving benchmark defines them, over successful requests: TTFT (arrival to first token), TPOT ((E2EL − TTFT) / (output tokens − 1)), ITL (gaps between streamed tokens), E2EL (arrival to last token); throughput over the run's duration (first arrival to last completion, virtual seconds); goodput counts requests meeting every SLO{}. Engine-side: KV watermark (peak `kv_cache_usage_perc`), prefix cache hit rate (hits / queried prompt tokens), utilization (time computing steps / duration), preemptions.\n",
        if o.slo.is_empty() {
            " (none given)".to_string()
        } else {
            format!(" ({})", slo_text(&o.slo))
        }
    );

    let _ = writeln!(r, "## Results\n");
    let _ = writeln!(r, "| metric | value |\n|---|---|");
    let _ = writeln!(r, "| successful requests | {} |", s.completed);
    let _ = writeln!(r, "| failed requests | {} |", s.failed);
    let _ = writeln!(r, "| duration (s) | {:.2} |", s.duration_s);
    let _ = writeln!(
        r,
        "| request throughput (req/s) | {:.2} |",
        s.request_throughput
    );
    if let Some(g) = s.request_goodput {
        let _ = writeln!(r, "| request goodput (req/s) | {g:.2} |");
        let _ = writeln!(
            r,
            "| share of requests meeting the SLOs | {:.1}% |",
            d.goodput_share * 100.0
        );
    }
    let _ = writeln!(
        r,
        "| output throughput (tok/s) | {:.1} |",
        s.output_throughput
    );
    let _ = writeln!(
        r,
        "| total token throughput (tok/s) | {:.1} |",
        s.total_token_throughput
    );
    let _ = writeln!(
        r,
        "| prefix cache hit rate | {:.1}% |",
        d.prefix_hit_rate * 100.0
    );
    let _ = writeln!(
        r,
        "| KV watermark (peak usage) | {:.1}% |",
        d.peak_kv_usage * 100.0
    );
    let _ = writeln!(r, "| preemptions | {} |", d.preemptions);
    let _ = writeln!(
        r,
        "| mean utilization | {:.1}% |",
        d.mean_utilization * 100.0
    );
    let _ = writeln!(r, "| shed by admission | {} |", d.shed);
    let _ = writeln!(
        r,
        "\n| latency (ms) | mean | p50 | p90 | p95 | p99 |\n|---|---|---|---|---|---|"
    );
    latency_row(&mut r, "TTFT", &s.ttft);
    latency_row(&mut r, "TPOT", &s.tpot);
    latency_row(&mut r, "ITL", &s.itl);
    latency_row(&mut r, "E2EL", &s.e2el);
    let _ = writeln!(
        r,
        "\n| replica | requests | utilization | prefix hit rate | peak KV | peak waiting | preemptions |\n|---|---|---|---|---|---|---|"
    );
    for rep in &o.replicas {
        let _ = writeln!(
            r,
            "| {} | {} | {:.1}% | {:.1}% | {:.1}% | {} | {} |",
            rep.key,
            rep.routed,
            rep.utilization * 100.0,
            rep.hit_rate() * 100.0,
            rep.peak_kv_usage * 100.0,
            rep.peak_waiting,
            rep.preemptions
        );
    }
    let _ = writeln!(
        r,
        "\nPlots: `ttft_cdf.svg`, `kv_usage.svg`, `waiting.svg`; per-request data: `records.jsonl`, `lifecycle.jsonl`.\n"
    );

    let _ = writeln!(r, "## Explanation\n");
    let pre_first = d.mean_queue_ms + d.mean_prefill_ms;
    let _ = writeln!(
        r,
        "- Before the first token a request spent on average {:.1} ms in the engine's API server, {:.1} ms waiting (admission queue, tokenization and the engine queue) and {:.1} ms from first scheduling to its first token (prefill, in chunks of at most the step's token budget, sharing steps with decodes){}.",
        d.frontend_ms,
        d.mean_queue_ms,
        d.mean_prefill_ms,
        if pre_first > 0.0 {
            format!(
                ": queueing is {:.0}% of it",
                100.0 * d.mean_queue_ms / pre_first
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        r,
        "- Decode: TPOT median {:.2} ms — every running sequence advances one token per engine step, so TPOT is the step time, which grows with the batch's tokens and KV read.",
        s.tpot.median_ms
    );
    let _ = writeln!(
        r,
        "- KV cache: peak usage {:.1}% with {} preemptions{}.",
        d.peak_kv_usage * 100.0,
        d.preemptions,
        if d.preemptions > 0 {
            " — when blocks ran out, the newest running requests were evicted and recomputed, adding prefill work and latency"
        } else {
            " — the running batches fit"
        }
    );
    let _ = writeln!(
        r,
        "- Prefix cache: {:.1}% of queried prompt tokens hit, against {:.1}% for an ideal single cache; the gap is prefixes spread over replicas by `{}` or evicted under pressure.",
        d.prefix_hit_rate * 100.0,
        wp.ideal_prefix_hit_rate * 100.0,
        sc.routing.policy
    );
    let _ = writeln!(
        r,
        "- Balance: the busiest replica received {:.2}× the mean request count; mean utilization {:.1}%.\n",
        d.imbalance,
        d.mean_utilization * 100.0
    );

    let _ = writeln!(r, "## Conclusion\n");
    if o.slo.is_empty() {
        let _ = writeln!(
            r,
            "No SLO was given. The pool completed {} of {} requests at {:.2} req/s with TTFT p99 {:.2} ms and TPOT p99 {:.2} ms.\n",
            s.completed, d.requests, s.request_throughput, s.ttft.p99_ms, s.tpot.p99_ms
        );
    } else {
        let _ = writeln!(
            r,
            "{:.1}% of requests met the SLOs ({} of {}). {}\n",
            d.goodput_share * 100.0,
            o.good_requests(),
            d.requests,
            if d.goodput_share >= 0.99 {
                "This deployment meets the objectives at this traffic."
            } else {
                "This deployment does not meet the objectives at this traffic."
            }
        );
    }

    let _ = writeln!(r, "## Tuning suggestions\n");
    let sug = suggestions(sc, &wp, o);
    if sug.is_empty() {
        let _ = writeln!(
            r,
            "Nothing stood out: no KV saturation, cache behaviour close to what the workload allows, TTFT not dominated by queueing, balanced load."
        );
    }
    for sg in sug {
        let _ = writeln!(r, "- **Observed:** {} **Try:** {}", sg.observed, sg.action);
    }
    r
}

/// `TTFT ≤ 500 ms, TPOT ≤ 50 ms` for the objectives that are set.
pub fn slo_text(slo: &sluice_bench::metrics::Slo) -> String {
    [
        ("TTFT", slo.ttft_ms),
        ("TPOT", slo.tpot_ms),
        ("E2EL", slo.e2el_ms),
    ]
    .iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k} ≤ {v} ms")))
    .collect::<Vec<_>>()
    .join(", ")
}
