//! Every metric the Grafana dashboard and the Prometheus rules in `deploy/`
//! read must be one the proxy or the engine really exports: a misspelled or
//! renamed metric would leave a panel blank or an alert silent forever.
//!
//! The test starts a real `sluice sim` and a real `sluice serve` running the
//! compose stack's config (deploy/sluice/compose.toml, pointed at the sim and
//! at a Redis that is down), sends requests that touch every family the
//! dashboards use (tenants with and without keys, a request that waits in
//! the admission queue, a stream, a reload), scrapes both `/metrics`, and
//! checks every metric name in every PromQL expression against the scrapes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "deploy_common/mod.rs"]
mod deploy;
#[path = "sim_common/mod.rs"]
mod sim;

use std::collections::BTreeSet;
use std::time::Duration;

use deploy::{Serve, read};
use serde_json::{Value, json};
use sim::{Client, Event, Response, Sim, metric_value, wait_until};

/// Names Prometheus itself writes for every scrape target.
const PROMETHEUS_SYNTHETIC: &[&str] = &["up"];

/// Keywords whose parenthesised list names labels, not series.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other PromQL words that look like identifiers but are not metrics.
const KEYWORDS: &[&str] = &[
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "Inf",
    "NaN",
    // Aggregations, which may come before their `by (...)` clause and
    // only then their parenthesised argument.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Index just past the bracket group opening at `i` (`{`, `[` or `(`),
/// skipping quoted strings inside it.
fn skip_group(b: &[u8], i: usize) -> usize {
    let (open, close) = match b[i] {
        b'{' => (b'{', b'}'),
        b'[' => (b'[', b']'),
        _ => (b'(', b')'),
    };
    let mut depth = 0;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'"' | b'\'' | b'`' => j = skip_string(b, j) - 1,
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    b.len()
}

/// Index just past the quoted string opening at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() {
        if b[j] == b'\\' && q != b'`' {
            j += 2;
            continue;
        }
        if b[j] == q {
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

/// The series names a PromQL expression (or a Grafana `label_values(...)`
/// variable query) reads: identifiers that are not functions, keywords,
/// label names, label values, durations, numbers or `$variables`.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
        } else if c == b'{' || c == b'[' {
            // Label matchers and range/subquery durations.
            i = skip_group(b, i);
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'$' {
            // Grafana variables: $pool, ${datasource}, $__rate_interval.
            i += 1;
            if i < b.len() && b[i] == b'{' {
                i = skip_group(b, i);
            } else {
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            // Numbers (1e-9, 0.99, 0x1f) and durations (5m).
            i += 1;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric()
                    || b[i] == b'.'
                    || ((b[i] == b'-' || b[i] == b'+') && matches!(b[i - 1], b'e' | b'E')))
            {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut k = i;
            while k < b.len() && b[k].is_ascii_whitespace() {
                k += 1;
            }
            let call = k < b.len() && b[k] == b'(';
            if call && LABEL_LISTS.contains(&word) {
                i = skip_group(b, k);
            } else if call && word == "label_values" {
                // Grafana: label_values(metric{...}, label) or label_values(label).
                let end = skip_group(b, k);
                let inner = &expr[k + 1..end.saturating_sub(1)];
                if let Some((series, _label)) = split_top_comma(inner) {
                    out.extend(metric_names(series));
                }
                i = end;
            } else if !call && !KEYWORDS.contains(&word) && !LABEL_LISTS.contains(&word) {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// `a, b` split at the last comma outside brackets and strings.
fn split_top_comma(s: &str) -> Option<(&str, &str)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut at = None;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => {
                i = skip_string(b, i);
                continue;
            }
            b'{' | b'[' | b'(' => {
                i = skip_group(b, i);
                continue;
            }
            b',' => at = Some(i),
            _ => {}
        }
        i += 1;
    }
    at.map(|a| (&s[..a], &s[a + 1..]))
}

/// Every PromQL query string in a Grafana dashboard: panel targets (rows
/// nest panels) and query variables.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    ("query" | "definition", Value::String(s)) if s.contains('(') => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// (expressions, names the rules record) of a Prometheus rules file.
fn rule_queries(yaml: &str) -> (Vec<String>, BTreeSet<String>) {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).expect("rules parse as YAML");
    let mut exprs = Vec::new();
    let mut recorded = BTreeSet::new();
    let groups = doc["groups"].as_sequence().expect("rules: groups");
    assert!(!groups.is_empty());
    for g in groups {
        for r in g["rules"].as_sequence().expect("group: rules") {
            let expr = r["expr"].as_str().expect("rule: expr");
            exprs.push(expr.to_string());
            if let Some(name) = r["record"].as_str() {
                recorded.insert(name.to_string());
            } else {
                assert!(
                    r["alert"].as_str().is_some(),
                    "rule without record/alert: {r:?}"
                );
            }
        }
    }
    (exprs, recorded)
}

/// Every series name in a Prometheus text exposition: sample names
/// (`_bucket`, `_sum`, `_count` included) and `# TYPE` family names.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[test]
fn the_extractor_finds_metrics_and_only_metrics() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (pool, le) (rate(sluice_time_to_first_token_seconds_bucket{pool=~"$pool",arm!="x{y}"}[$__rate_interval])))
           / clamp_min(sum without (instance) (vllm:prefix_cache_hits_total offset 5m), 1e-9) > bool 2
           and on (pool) group_left (arm) up{job="sluice"} # a comment naming not_a_metric"#,
    );
    assert_eq!(
        names,
        [
            "sluice_time_to_first_token_seconds_bucket",
            "vllm:prefix_cache_hits_total",
            "up"
        ]
    );
    assert_eq!(
        metric_names("label_values(sluice_requests_in_flight{x=\"a,b\"}, pool)"),
        ["sluice_requests_in_flight"]
    );
    assert!(metric_names("label_values(pool)").is_empty());
    // A misspelling is a name like any other: the cross-check below catches it.
    assert_eq!(
        metric_names("sum(rate(sluice_requets_total[5m]))"),
        ["sluice_requets_total"]
    );
}

/// The compose stack's proxy config, pointed at `sim`, listening on port 0,
/// with Redis at a closed port (quota checks fail open and are counted) and
/// the gate's KV capacity fixed at the sim's 20 blocks.
fn compose_config_for_test(sim: &Sim, dead_redis: &str) -> String {
    let text = read("deploy/sluice/compose.toml");
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "compose.toml no longer has {from:?}");
        text.replace(from, to)
    };
    let text = replace(text, "\"0.0.0.0:8080\"", "\"127.0.0.1:0\"");
    let text = replace(text, "\"0.0.0.0:9090\"", "\"127.0.0.1:0\"");
    let text = replace(text, "log = \"stdout\"", "log = \"off\"");
    let text = replace(
        text,
        "dns = \"engine:8000\"",
        &format!("endpoints = [\"{}\"]", sim.addr),
    );
    let text = replace(text, "dns_refresh_ms = 5000\n", "");
    let text = replace(
        text,
        "\"redis://redis:6379/0\"",
        &format!("\"redis://{dead_redis}/0\""),
    );
    replace(
        text,
        "[pools.admission]\nenabled = true\n",
        "[pools.admission]\nenabled = true\nendpoint_kv_blocks = 20\n",
    )
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "llama-3.1-8b",
        "messages": [{"role": "user", "content": "What is a KV cache?"}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}

fn post(c: &Client, key: Option<&str>, body: &Value) -> std::net::TcpStream {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    c.send_with_headers("POST", "/v1/chat/completions", &headers, Some(body))
}

fn wait_metric(admin: &Client, prefix: &str, pred: impl Fn(f64) -> bool) {
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let v = metric_value(&admin.get("/metrics").text(), prefix).unwrap_or(0.0);
            if pred(v) { Ok(()) } else { Err(v) }
        },
        |v| format!("{prefix} stuck at {v}"),
    );
}

/// Scrapes of a real proxy and a real engine after traffic that touches
/// every family the dashboards and rules use.
fn scrape_live_stack() -> (String, String) {
    // 20 KV blocks: one 150-token request fits under max_kv_usage 0.9, two do not.
    let sim = Sim::start(&["--speedup", "20", "--seed", "1", "--num-gpu-blocks", "20"]);
    let dead_redis = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let proxy = Serve::start(
        &compose_config_for_test(&sim, &dead_redis),
        &[("TEAM_A_API_KEY", "sk-a"), ("TEAM_B_API_KEY", "sk-b")],
    );
    proxy.wait_ready();

    // A keyed tenant, non-streaming.
    let r = Response::read(post(&proxy.api, Some("sk-a"), &chat(8, false)));
    assert_eq!(r.status, 200, "{}", r.text());
    // An unknown key: a tenant rejection.
    let r = Response::read(post(&proxy.api, Some("sk-wrong"), &chat(8, false)));
    assert_eq!(r.status, 401, "{}", r.text());

    // Stall the engine so request A holds its KV reservation, and B (which
    // does not fit beside it) waits in the admission queue.
    assert_eq!(
        sim.post("/admin/faults", &json!({"stall": true})).status,
        200
    );
    let api = proxy.api.clone();
    let a = std::thread::spawn(move || {
        let mut s = api.stream("/v1/chat/completions", &chat(150, true));
        let (events, end) = s.collect();
        (s.status, events, end)
    });
    wait_metric(
        &proxy.admin,
        "sluice_admission_kv_reserved_blocks{pool=\"chat\"}",
        |v| v > 0.0,
    );
    let b = post(&proxy.api, Some("sk-b"), &chat(150, false));
    wait_metric(
        &proxy.admin,
        "sluice_admission_queue_length{pool=\"chat\"}",
        |v| v >= 1.0,
    );
    let lift = Client::new(&sim.addr).request("DELETE", "/admin/faults", None);
    assert!(lift.status < 300, "lifting the stall: {}", lift.status);
    let (status, events, end) = a.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(end, Event::End);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let b = Response::read(b);
    assert_eq!(b.status, 200, "{}", b.text());

    // A reload (the file is unchanged: it succeeds).
    proxy.signal("HUP");
    wait_metric(
        &proxy.admin,
        "sluice_config_reloads_total{result=\"success\"}",
        |v| v >= 1.0,
    );
    wait_metric(&proxy.admin, "sluice_quota_backend_errors_total", |v| {
        v >= 1.0
    });

    let p = proxy.admin.get("/metrics");
    assert_eq!(p.status, 200);
    let e = sim.get("/metrics");
    assert_eq!(e.status, 200);
    (p.text(), e.text())
}

#[test]
fn every_metric_in_the_dashboard_and_the_rules_is_exported() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/sluice.json"))
        .expect("dashboard JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 30, "only {} queries found", queries.len());
    let (rule_exprs, recorded) = rule_queries(&read("deploy/prometheus/rules.yaml"));

    let (proxy_text, engine_text) = scrape_live_stack();
    let proxy = exported(&proxy_text);
    let engine = exported(&engine_text);
    assert!(proxy.iter().all(|n| n.starts_with("sluice_")), "{proxy:?}");
    assert!(engine.iter().all(|n| n.starts_with("vllm:")), "{engine:?}");

    let mut missing = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (source, q) in queries
        .iter()
        .map(|q| ("dashboard", q))
        .chain(rule_exprs.iter().map(|q| ("rules", q)))
    {
        let names = metric_names(q);
        assert!(!names.is_empty(), "{source}: no metric in {q:?}");
        for n in names {
            let known = proxy.contains(&n)
                || engine.contains(&n)
                || recorded.contains(&n)
                || PROMETHEUS_SYNTHETIC.contains(&n.as_str());
            if !known {
                missing.insert(format!("{source}: {n} (in {q:?})"));
            }
            used.insert(n);
        }
    }
    assert!(
        missing.is_empty(),
        "names neither the proxy nor the engine exports:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );

    // The panels the deploy issue asks for read these families.
    for family in [
        "sluice_requests_total",
        "sluice_tenant_requests_total",
        "sluice_time_to_first_token_seconds_bucket",
        "sluice_inter_token_latency_seconds_bucket",
        "sluice_e2e_request_latency_seconds_bucket",
        "sluice_admission_queue_length",
        "sluice_admission_queue_wait_seconds_bucket",
        "sluice_admission_decisions_total",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "sluice_routing_decisions_total",
        "sluice_tenant_prompt_tokens_total",
        "sluice_tenant_completion_tokens_total",
    ] {
        assert!(used.contains(family), "no panel or rule reads {family}");
    }
}

#[test]
fn the_rules_alert_on_what_an_sre_pages_for() {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/rules.yaml")).expect("rules YAML");
    let alerts: Vec<(String, String)> = doc["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .filter_map(|r| {
            Some((
                r["alert"].as_str()?.to_string(),
                r["expr"].as_str()?.to_string(),
            ))
        })
        .collect();
    let reads = |alert: &str, metric: &str| {
        let (_, expr) = alerts
            .iter()
            .find(|(a, _)| a == alert)
            .unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(
            expr.contains(metric),
            "{alert} does not read {metric}: {expr}"
        );
    };
    reads(
        "SluicePoolNoHealthyReplica",
        "sluice_pool_routable_endpoints",
    );
    reads("SluiceSheddingHigh", "sluice:shed_ratio:5m");
    reads("SluiceTTFTOverSLO", "sluice:ttft_seconds:p99_5m");
    reads(
        "SluiceEngineMetricsStale",
        "sluice_upstream_scrape_age_seconds",
    );
    reads("SluiceScrapeTargetDown", "up");
    reads(
        "SluiceQuotaBackendDown",
        "sluice_quota_backend_errors_total",
    );
    for (alert, _) in &alerts {
        assert!(
            alert.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
            "alert names are CamelCase: {alert}"
        );
    }
}
