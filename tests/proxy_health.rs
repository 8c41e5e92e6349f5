//! Replica health: active checks take a failing replica out and bring it
//! back; passive ejection removes a replica that keeps failing requests, but
//! a request that fails on every replica ejects nobody; a client that goes
//! away aborts its upstream request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod proxy_common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use proxy_common::*;
use serde_json::json;

fn endpoints_used(p: &Proxy, from: usize, n: usize) -> HashSet<String> {
    let recs = p.records(from + n);
    recs[from..from + n]
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap().to_string())
        .collect()
}

fn send_chats(p: &Proxy, n: usize) {
    for i in 0..n {
        let r = p.api.post(
            "/v1/chat/completions",
            &chat(&format!("question {i}"), 1, false),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[test]
fn failing_health_check_takes_a_replica_out_and_back() {
    let sims = sims(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "h.toml",
        &format!(
            r#"
[[pools]]
name = "p"
model = "{MODEL}"
endpoints = ["{}", "{}"]
[pools.routing]
policy = "round_robin"
[pools.health]
interval_ms = 50
unhealthy_threshold = 2
healthy_threshold = 2
"#,
            sims[0].addr, sims[1].addr
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    let sick = sims[1].addr.clone();
    send_chats(&p, 4);
    assert_eq!(endpoints_used(&p, 0, 4).len(), 2);

    sims[1].post("/admin/faults", &json!({"health_503": true}));
    p.wait_state("replica unhealthy", |s| {
        endpoint_state(s, &sick)["healthy"] == false
    });
    send_chats(&p, 6);
    let used = endpoints_used(&p, 4, 6);
    assert!(
        !used.contains(&sick),
        "an unhealthy replica got traffic: {used:?}"
    );

    sims[1].request("DELETE", "/admin/faults", None);
    p.wait_state("replica healthy again", |s| {
        endpoint_state(s, &sick)["healthy"] == true
    });
    send_chats(&p, 4);
    assert!(
        endpoints_used(&p, 10, 4).contains(&sick),
        "the recovered replica got no traffic"
    );
}

#[test]
fn replica_answering_503_is_retried_and_ejected_then_recovers() {
    let sims = sims(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "e.toml",
        &format!(
            r#"
[limits]
retry_backoff_ms = 1
[[pools]]
name = "p"
model = "{MODEL}"
endpoints = ["{}", "{}"]
[pools.routing]
policy = "round_robin"
[pools.health]
interval_ms = 60000
[pools.ejection]
consecutive_failures = 2
base_ejection_ms = 1500
"#,
            sims[0].addr, sims[1].addr
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    let bad = sims[1].addr.clone();
    // The API (not only /health) answers 503 for a while, like a replica still loading.
    sims[1].post("/admin/faults", &json!({"slow_start_ms": 60000}));
    send_chats(&p, 6);
    let recs = p.records(6);
    assert!(
        recs.iter().all(|r| r["endpoint"] != bad.as_str()),
        "{recs:?}"
    );
    assert!(
        recs.iter().any(|r| r["retries"] == 1),
        "503s were retried on the other replica: {recs:?}"
    );
    let s = p.state();
    assert_eq!(endpoint_state(&s, &bad)["ejected"], true, "{s}");

    // Recovery: the fault ends, the ejection expires, traffic comes back.
    sims[1].request("DELETE", "/admin/faults", None);
    p.wait_state("ejection expired", |s| {
        endpoint_state(s, &bad)["ejected"] == false
    });
    send_chats(&p, 4);
    assert!(endpoints_used(&p, 6, 4).contains(&bad));
}

#[test]
fn a_request_failing_everywhere_ejects_nobody() {
    let sims = sims(3, &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "poison.toml",
        &format!(
            r#"
[limits]
max_retries = 2
retry_backoff_ms = 1
[[pools]]
name = "p"
model = "{MODEL}"
endpoints = ["{}", "{}", "{}"]
[pools.health]
interval_ms = 60000
[pools.ejection]
consecutive_failures = 1
max_ejection_percent = 100
"#,
            sims[0].addr, sims[1].addr, sims[2].addr
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    for s in &sims {
        s.post("/admin/faults", &json!({"slow_start_ms": 60000}));
    }
    for _ in 0..4 {
        let r = p
            .api
            .post("/v1/chat/completions", &chat("poison", 1, false));
        // The last replica's 503 is passed through unchanged.
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("x-sluice-error"), None);
    }
    let s = p.state();
    assert_eq!(
        s["pools"][0]["routable_endpoints"], 3,
        "healthy replicas were ejected: {s}"
    );
    let recs = p.records(4);
    assert!(recs.iter().all(|r| r["retries"] == 2), "{recs:?}");
    for s in &sims {
        s.request("DELETE", "/admin/faults", None);
    }
    send_chats(&p, 3);
}

/// Polls a sim's running + waiting gauges until they are zero.
fn wait_idle(sim: &Sim, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = sim.get("/metrics").text();
        let running = metric_value(&m, "vllm:num_requests_running").unwrap();
        let waiting = metric_value(&m, "vllm:num_requests_waiting").unwrap();
        if running == 0.0 && waiting == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica still has running={running} waiting={waiting}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_busy(sim: &Sim) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = sim.get("/metrics").text();
        let n = metric_value(&m, "vllm:num_requests_running").unwrap()
            + metric_value(&m, "vllm:num_requests_waiting").unwrap();
        if n > 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "request never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn client_disconnect_aborts_the_upstream_request() {
    // Real-time replica: a 4000-token answer takes far longer than the test.
    let sim = Sim::start(&["--seed", "7"]);
    let p = Proxy::over(std::slice::from_ref(&sim), &[]);

    // Mid-stream: read a few events, then hang up.
    let mut s = p.api.stream(
        "/v1/chat/completions",
        &chat("write a long essay", 4000, true),
    );
    assert_eq!(s.status, 200);
    for _ in 0..3 {
        assert!(matches!(s.next_event(), Event::Data(_)));
    }
    wait_busy(&sim);
    drop(s);
    wait_idle(&sim, Duration::from_secs(5));

    // Before the first token: the engine is stalled, the client gives up.
    sim.post("/admin/faults", &json!({"stall": true}));
    let conn = p.api.send(
        "POST",
        "/v1/chat/completions",
        Some(&chat("and another", 4000, true)),
    );
    wait_busy(&sim);
    drop(conn);
    sim.request("DELETE", "/admin/faults", None);
    wait_idle(&sim, Duration::from_secs(5));

    // Non-streaming, waiting for the whole answer.
    let conn = p.api.send(
        "POST",
        "/v1/chat/completions",
        Some(&chat("a third one", 4000, false)),
    );
    wait_busy(&sim);
    drop(conn);
    wait_idle(&sim, Duration::from_secs(5));

    let recs = p.records(3);
    assert!(
        recs.iter()
            .all(|r| r["status"] == 499 && r["error"] == "client_gone"),
        "{recs:?}"
    );
    // Nothing leaked: the proxy counts nothing in flight.
    let st = p.state();
    assert_eq!(st["pools"][0]["endpoints"][0]["in_flight"], 0, "{st}");
}
