//! KV-aware admission through the real binary: a small simulated pool
//! (`--num-gpu-blocks 64`), a blocker request that fills it, requests that
//! wait in the admission queue and come out in policy order as it drains,
//! `fair` service by weight, queue timeouts and disconnects that leave no
//! trace.
//!
//! The blocker is a request to a stalled replica (`/admin/faults`), which
//! holds its admission until the test lifts the stall and disconnects it,
//! so no assertion depends on how fast anything runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "proxy_common/mod.rs"]
mod common;
#[path = "tenants_common/mod.rs"]
mod tenants;

use std::net::TcpStream;
use std::thread::JoinHandle;

use serde_json::json;
use tenants::*;

/// 64 blocks of 16 tokens. Every test request has a prompt of 300+ tokens
/// (19+ blocks once running) and a KV demand of 40+ blocks, so under
/// `max_kv_usage` 0.8 (51 blocks) exactly one is admitted at a time, and
/// admission order is service order. `max_engine_waiting` 0 makes the
/// stalled replica's queued blocker saturate the pool.
const BLOCKS: &str = "64";

fn pool_sims() -> Vec<Sim> {
    common::sims(1, &["--num-gpu-blocks", BLOCKS])
}

fn admission(order: &str, extra: &str) -> String {
    format!(
        "[pools.admission]\norder = \"{order}\"\nmax_kv_usage = 0.8\nmax_engine_waiting = 0\nexpected_output_tokens = 400\nmax_queue_wait_ms = 20000\n{extra}"
    )
}

fn tenant(name: &str, key: &str, extra: &str) -> String {
    format!(
        "[[tenants]]\nname = \"{name}\"\napi_key_sha256 = [\"{}\"]\n{extra}\n",
        sha256_hex(key)
    )
}

/// A chat prompt of about `words` + 30 tokens (" the" is one token),
/// distinct per `tag` from the first block (no shared prefix cache).
fn prompt(tag: &str, words: usize) -> String {
    format!("{tag} ") + &"the ".repeat(words)
}

/// Stalls the replica and starts the blocker; it holds its admission
/// (and its KV reservation) until [`release`].
fn blocker(p: &Proxy, sims: &[Sim], key: &str) -> TcpStream {
    // The gate judges by scraped gauges: wait for the first scrape.
    wait_metric(p, "sluice_upstream_scrape_age_seconds", |v| v >= 0.0);
    let f = sims[0].post("/admin/faults", &json!({"stall": true}));
    assert_eq!(f.status, 200);
    let s = send(
        &p.api.addr,
        "/v1/chat/completions",
        Some(key),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": prompt("blocker", 300)}],
                "max_tokens": 300, "ignore_eos": true, "stream": true}),
    );
    wait_metric(
        p,
        "sluice_admission_kv_reserved_blocks{pool=\"chat\"}",
        |v| v > 0.0,
    );
    // Until a scrape shows it waiting in the engine, the gate only knows the
    // blocker from its own books, which a scrape taken before the engine saw
    // it would clear.
    let addr = sims[0].addr.clone();
    p.wait_state("the blocker in the engine's waiting queue", |s| {
        common::endpoint_state(s, &addr)["num_requests_waiting"]
            .as_f64()
            .is_some_and(|w| w >= 1.0)
    });
    s
}

/// Lifts the stall and ends the blocker: the queue drains.
fn release(sims: &[Sim], blocker: TcpStream) {
    sims[0].request("DELETE", "/admin/faults", None);
    drop(blocker);
}

/// Sends a request on its own thread; returns its status and request id.
fn spawn(p: &Proxy, key: &str, tag: &str, words: usize, max_tokens: u32) -> JoinHandle<Reply> {
    let addr = p.api.addr.clone();
    let key = key.to_string();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt(tag, words)}],
                      "max_tokens": max_tokens, "ignore_eos": true});
    std::thread::spawn(move || post(&addr, Some(&key), &body))
}

/// `sluice_admission_decisions_total` of the chat pool for one outcome.
fn decisions(p: &Proxy, outcome: &str) -> f64 {
    metric(
        p,
        &format!("sluice_admission_decisions_total{{outcome=\"{outcome}\",pool=\"chat\"}}"),
    )
}

fn queue_len(p: &Proxy) -> f64 {
    metric(p, "sluice_admission_queue_length{pool=\"chat\"}")
}

fn assert_no_trace(p: &Proxy) {
    wait_metric(p, "sluice_admission_queue_length{pool=\"chat\"}", |v| {
        v == 0.0
    });
    wait_metric(
        p,
        "sluice_admission_kv_reserved_blocks{pool=\"chat\"}",
        |v| v == 0.0,
    );
    let text = metrics(p);
    for line in text.lines() {
        if line.starts_with("sluice_tenant_concurrency_slots")
            || line.starts_with("sluice_tenant_reserved_tokens")
        {
            assert!(line.ends_with(" 0"), "leak: {line}");
        }
    }
}

/// The order requests were routed in, by the tag at the start of their prompt.
fn routed_order(p: &Proxy, n: usize) -> Vec<String> {
    let mut recs: Vec<serde_json::Value> = p
        .records(n)
        .into_iter()
        .filter(|r| r["status"] == 200 && r["routed_ms"].is_number())
        .collect();
    recs.sort_by(|a, b| {
        a["routed_ms"]
            .as_f64()
            .unwrap()
            .total_cmp(&b["routed_ms"].as_f64().unwrap())
    });
    recs.iter()
        .map(|r| {
            r["tenant"].as_str().unwrap().to_string() + ":" + r["request_id"].as_str().unwrap()
        })
        .collect()
}

#[test]
fn queue_holds_requests_while_saturated_and_releases_shortest_first() {
    let sims = pool_sims();
    let (_dir, p) = start(
        &sims,
        &admission("shortest_first", ""),
        &tenant("t", "k", ""),
    );
    let b = blocker(&p, &sims, "k");
    // Prompt sizes chosen so each alone fits but no two do (with the blocker gone).
    let sizes = [(420usize, "c"), (300, "a"), (360, "b")];
    let mut handles = Vec::new();
    for (i, (words, tag)) in sizes.iter().enumerate() {
        handles.push((tag.to_string(), spawn(&p, "k", tag, *words, 300)));
        wait_metric(&p, "sluice_admission_queue_length{pool=\"chat\"}", |v| {
            v >= (i + 1) as f64
        });
    }
    assert_eq!(queue_len(&p), 3.0, "held while the pool is saturated");
    release(&sims, b);
    let mut finished = Vec::new();
    for (tag, h) in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{tag}: {}", String::from_utf8_lossy(&r.body));
        finished.push((tag, r));
    }
    // Lifecycle records carry the tenant; the sim's prompt sizes order them.
    let recs = p.records(4);
    let mut served: Vec<(f64, u64)> = recs
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| {
            assert_eq!(r["tenant"], "t");
            (
                r["routed_ms"].as_f64().unwrap(),
                r["prompt_tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    served.sort_by(|a, b| a.0.total_cmp(&b.0));
    let prompts: Vec<u64> = served.iter().map(|s| s.1).collect();
    let mut sorted = prompts.clone();
    sorted.sort_unstable();
    assert_eq!(prompts, sorted, "shortest prompt first: {prompts:?}");
    assert!(decisions(&p, "queued") >= 3.0);
    assert_no_trace(&p);
}

#[test]
fn fair_order_serves_weights_two_to_one() {
    let sims = pool_sims();
    let (_dir, p) = start(
        &sims,
        &admission("fair", "max_queue_len = 64"),
        &format!(
            "{}{}{}",
            tenant("heavy", "kh", "weight = 2.0"),
            tenant("light", "kl", "weight = 1.0"),
            tenant("blocker", "kb", "")
        ),
    );
    let b = blocker(&p, &sims, "kb");
    let mut handles = Vec::new();
    for i in 0..9 {
        handles.push(spawn(&p, "kh", &format!("h{i}"), 300, 300));
        handles.push(spawn(&p, "kl", &format!("l{i}"), 300, 300));
    }
    wait_metric(&p, "sluice_admission_queue_length{pool=\"chat\"}", |v| {
        v >= 18.0
    });
    release(&sims, b);
    for h in handles {
        assert_eq!(h.join().unwrap().status, 200);
    }
    let order = routed_order(&p, 19);
    let first: Vec<&String> = order
        .iter()
        .filter(|t| !t.starts_with("blocker"))
        .take(9)
        .collect();
    let heavy = first.iter().filter(|t| t.starts_with("heavy")).count();
    assert!(
        (5..=7).contains(&heavy),
        "heavy got {heavy} of the first 9 (weights 2:1 → 6): {first:?}"
    );
    assert_no_trace(&p);
}

fn small_queue_proxy(dir: &std::path::Path, sims: &[Sim], wait_ms: u64) -> Proxy {
    proxy(
        dir,
        &config(
            sims,
            &format!(
                "[pools.admission]\nmax_kv_usage = 0.8\nmax_engine_waiting = 0\nexpected_output_tokens = 400\nmax_queue_wait_ms = {wait_ms}"
            ),
            &tenant(
                "t",
                "k",
                "[tenants.limits]\nmax_concurrent = 10\ntokens_per_minute = 1000000",
            ),
        ),
    )
}

#[test]
fn queue_timeouts_shed_with_retry_after_and_leave_no_trace() {
    let sims = pool_sims();
    let dir = tempfile::tempdir().unwrap();
    let p = small_queue_proxy(dir.path(), &sims, 300);
    let b = blocker(&p, &sims, "k");
    // Times out in the queue: 503 (the pool is overloaded) with Retry-After.
    let r = spawn(&p, "k", "late", 300, 300).join().unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-sluice-error"), Some("true"));
    assert!(r.json()["error"]["message"].is_string());
    assert_eq!(decisions(&p, "timeout"), 1.0);
    assert_eq!(
        metric(
            &p,
            "sluice_tenant_rejected_requests_total{reason=\"queue_timeout\",tenant=\"t\"}"
        ),
        1.0
    );
    assert_eq!(queue_len(&p), 0.0);
    release(&sims, b);
    assert_no_trace(&p);
    assert_eq!(spawn(&p, "k", "after", 50, 10).join().unwrap().status, 200);
    assert_no_trace(&p);
}

#[test]
fn a_client_that_leaves_the_queue_leaves_no_trace() {
    let sims = pool_sims();
    let dir = tempfile::tempdir().unwrap();
    let p = small_queue_proxy(dir.path(), &sims, 20_000);
    let b = blocker(&p, &sims, "k");
    let s = send(
        &p.api.addr,
        "/v1/chat/completions",
        Some("k"),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": prompt("gone", 300)}],
                "max_tokens": 300, "ignore_eos": true}),
    );
    wait_metric(&p, "sluice_admission_queue_length{pool=\"chat\"}", |v| {
        v == 1.0
    });
    assert_eq!(
        metric(&p, "sluice_tenant_concurrency_slots{tenant=\"t\"}"),
        2.0
    );
    drop(s);
    wait_metric(
        &p,
        "sluice_admission_decisions_total{outcome=\"cancelled\",pool=\"chat\"}",
        |v| v == 1.0,
    );
    assert_eq!(queue_len(&p), 0.0);
    wait_metric(&p, "sluice_tenant_concurrency_slots{tenant=\"t\"}", |v| {
        v == 1.0
    });
    release(&sims, b);
    assert_no_trace(&p);
    assert_eq!(spawn(&p, "k", "after", 50, 10).join().unwrap().status, 200);
    assert_no_trace(&p);
}

/// Two classes told apart by prompt length, so that `shortest_first` would
/// serve them the other way round: `urgent` (long prompts) and `relaxed`.
fn slo_classes(urgent_ms: u64, relaxed_ms: u64) -> String {
    format!(
        "[[classes]]\nname = \"urgent\"\npool = \"chat\"\nmin_prompt_tokens = 400\nttft_slo_ms = {urgent_ms}\n\
         [[classes]]\nname = \"relaxed\"\npool = \"chat\"\nmax_prompt_tokens = 399\nttft_slo_ms = {relaxed_ms}\n"
    )
}

#[test]
fn deadline_order_serves_the_class_with_the_tighter_ttft_slo_first() {
    let sims = pool_sims();
    let (_dir, p) = start(
        &sims,
        &admission("deadline", ""),
        &(tenant("t", "k", "") + &slo_classes(5_000, 19_000)),
    );
    let b = blocker(&p, &sims, "k");
    // The relaxed ones arrive first; the urgent ones' deadlines are still earlier.
    let mut handles = Vec::new();
    for (i, (tag, words)) in [("r0", 300), ("r1", 300), ("u0", 400), ("u1", 400)]
        .into_iter()
        .enumerate()
    {
        handles.push(spawn(&p, "k", tag, words, 300));
        wait_metric(&p, "sluice_admission_queue_length{pool=\"chat\"}", |v| {
            v >= (i + 1) as f64
        });
    }
    release(&sims, b);
    for h in handles {
        assert_eq!(h.join().unwrap().status, 200);
    }
    let mut recs: Vec<serde_json::Value> = p
        .records(5)
        .into_iter()
        .filter(|r| r["status"] == 200 && r["class"] != "default")
        .collect();
    recs.sort_by(|a, b| {
        a["routed_ms"]
            .as_f64()
            .unwrap()
            .total_cmp(&b["routed_ms"].as_f64().unwrap())
    });
    // The blocker was cut off (not a 200); the queued four in deadline order.
    let classes: Vec<&str> = recs.iter().map(|r| r["class"].as_str().unwrap()).collect();
    assert_eq!(
        classes,
        ["urgent", "urgent", "relaxed", "relaxed"],
        "{recs:?}"
    );
    assert_no_trace(&p);
}

#[test]
fn requests_that_cannot_start_within_their_ttft_slo_are_shed_and_leave_no_trace() {
    let sims = pool_sims();
    // urgent: 50 ms SLO, 50 of them the engine's own: no time to wait at all.
    // relaxed: 300 ms to wait in the queue.
    let (_dir, p) = start(
        &sims,
        &admission("deadline", "shed_on_ttft_slo = true\nengine_ttft_ms = 50"),
        &(tenant(
            "t",
            "k",
            "[tenants.limits]\nmax_concurrent = 10\ntokens_per_minute = 1000000",
        ) + &slo_classes(50, 350)),
    );
    let b = blocker(&p, &sims, "k");
    // Cannot start now and has no time to wait: shed at once, 503 + Retry-After.
    let r = spawn(&p, "k", "urgent", 400, 300).join().unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-sluice-error"), Some("true"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("time-to-first-token")
    );
    assert_eq!(decisions(&p, "queued"), 0.0, "shed without waiting");
    // Waits its budget in the queue, then is shed the same way.
    let r = spawn(&p, "k", "relaxed", 300, 300).join().unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert_eq!(decisions(&p, "ttft_slo"), 2.0);
    assert_eq!(
        metric(
            &p,
            "sluice_tenant_rejected_requests_total{reason=\"ttft_slo\",tenant=\"t\"}"
        ),
        2.0
    );
    assert_eq!(queue_len(&p), 0.0);
    release(&sims, b);
    assert_no_trace(&p);
    // With capacity back (and a scrape that shows it), requests run again.
    let addr = sims[0].addr.clone();
    p.wait_state("the engine's waiting queue empty", |s| {
        common::endpoint_state(s, &addr)["num_requests_waiting"].as_f64() == Some(0.0)
    });
    assert_eq!(spawn(&p, "k", "after", 50, 10).join().unwrap().status, 200);
    assert_no_trace(&p);
}

#[test]
fn the_gate_holds_from_the_first_request_without_any_scrape() {
    let sims = pool_sims();
    let dir = tempfile::tempdir().unwrap();
    // Scraping off: the gate only ever knows its own admissions and the
    // configured capacity (64 blocks, 51 allowed; each request needs 40+).
    let text = format!(
        "[[pools]]\nname = \"chat\"\nmodel = \"{MODEL}\"\nendpoints = [\"{}\"]\n[pools.scrape]\nenabled = false\n{}\n{}",
        sims[0].addr,
        admission("fifo", &format!("endpoint_kv_blocks = {BLOCKS}")),
        tenant("t", "k", ""),
    );
    let p = proxy(dir.path(), &text);
    let f = sims[0].post("/admin/faults", &json!({"stall": true}));
    assert_eq!(f.status, 200);
    let first = send(
        &p.api.addr,
        "/v1/chat/completions",
        Some("k"),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": prompt("first", 300)}],
                "max_tokens": 300, "ignore_eos": true, "stream": true}),
    );
    let reserved = wait_metric(
        &p,
        "sluice_admission_kv_reserved_blocks{pool=\"chat\"}",
        |v| v > 0.0,
    );
    let second = spawn(&p, "k", "second", 300, 300);
    wait_metric(&p, "sluice_admission_queue_length{pool=\"chat\"}", |v| {
        v == 1.0
    });
    assert_eq!(
        metric(&p, "sluice_admission_kv_reserved_blocks{pool=\"chat\"}"),
        reserved,
        "the second request waits for the first"
    );
    assert_eq!(decisions(&p, "admitted"), 1.0);
    release(&sims, first);
    assert_eq!(second.join().unwrap().status, 200);
    assert_no_trace(&p);
}
