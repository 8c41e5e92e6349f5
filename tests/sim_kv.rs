//! `sluice sim` under KV pressure: a small block pool makes requests wait
//! and preempts running ones; a client that disconnects frees its blocks.

mod sim_common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use serde_json::json;
use sim_common::{Event, Sim};

const MODEL: &str = "llama-3.1-8b";
const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn a_full_cache_queues_and_preempts() {
    // 64 blocks × 16 = 1024 tokens of KV; each request grows to 250 + 400 tokens.
    let sim = Sim::start(&["--num-gpu-blocks", "64", "--speedup", "5"]);
    let addr = sim.addr.clone();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let sim_addr = addr.clone();
            std::thread::spawn(move || {
                let prompt: Vec<u32> = (0..250).map(|t| t + 1000 * i).collect();
                let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 400, "ignore_eos": true});
                let client = sim_common::Client::new(&sim_addr);
                client.post("/v1/completions", &body)
            })
        })
        .collect();
    // Requests queue while the cache is nearly full.
    let value = |text: &str, name: &str| sim_common::metric_value(text, name).unwrap();
    sim.wait_scrape(LIMIT, |t| {
        value(t, "vllm:num_requests_waiting{") > 0.0
            && value(t, "vllm:kv_cache_usage_perc{") > 0.8
            && value(t, "vllm:kv_cache_usage_perc{") <= 1.0
    });
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["usage"]["completion_tokens"], 400);
    }
    assert!(sim.metric("vllm:num_preemptions_total{") > 0.0);
    assert_eq!(sim.metric("vllm:kv_cache_usage_perc{"), 0.0);
    assert_eq!(sim.metric("vllm:num_requests_running{"), 0.0);
    assert_eq!(
        sim.metric("vllm:request_success_total{engine=\"0\",model_name=\"llama-3.1-8b\",finished_reason=\"length\"}"),
        8.0
    );
}

#[test]
fn a_disconnected_stream_frees_its_blocks() {
    let sim = Sim::start(&["--speedup", "1"]);
    let prompt: Vec<u32> = (0..2000).collect();
    let mut s = sim.stream(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 100000, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(s.status, 200);
    for _ in 0..3 {
        assert!(matches!(s.next_event(), Event::Data(_)));
    }
    assert_eq!(sim.metric("vllm:num_requests_running{"), 1.0);
    assert!(sim.metric("vllm:kv_cache_usage_perc{") > 0.0);
    drop(s);
    sim.wait_metric("vllm:kv_cache_usage_perc{", LIMIT, |v| v == 0.0);
    assert_eq!(sim.metric("vllm:num_requests_running{"), 0.0);
    assert_eq!(
        sim.metric("vllm:request_success_total{engine=\"0\",model_name=\"llama-3.1-8b\",finished_reason=\"abort\"}"),
        1.0
    );
}

#[test]
fn a_disconnected_waiting_request_is_aborted() {
    // Non-streaming: the client leaves before any byte of the answer.
    let sim = Sim::start(&["--speedup", "1"]);
    let prompt: Vec<u32> = (0..2000).collect();
    let mut stream = sim.send(
        "POST",
        "/v1/completions",
        Some(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 100000, "ignore_eos": true})),
    );
    stream.flush().unwrap();
    sim.wait_metric("vllm:num_requests_running{", LIMIT, |v| v == 1.0);
    stream.shutdown(Shutdown::Both).unwrap();
    drop(stream);
    sim.wait_metric("vllm:kv_cache_usage_perc{", LIMIT, |v| v == 0.0);
    assert_eq!(sim.metric("vllm:num_requests_running{"), 0.0);
}
