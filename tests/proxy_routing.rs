//! The proxy in front of real `sluice sim` replicas: chat and completions,
//! streaming and not, request ids, lifecycle records, 1 MiB bodies, and
//! prefix-aware routing keeping shared prefixes together.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod proxy_common;

use std::collections::HashSet;

use proxy_common::*;
use serde_json::{Value, json};

fn data_events(mut s: SseReader) -> Vec<String> {
    assert_eq!(s.status, 200);
    let (events, end) = s.collect();
    assert_eq!(end, Event::End, "stream ended badly after {events:?}");
    events
}

#[test]
fn chat_and_completions_streaming_and_not() {
    let sims = sims(3, &[]);
    let p = Proxy::over(&sims, &["--policy", "round_robin", "--model", MODEL]);

    let r = p.api.post(
        "/v1/chat/completions",
        &chat("Hello there, how are you?", 5, false),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 1
    );
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let id = r.header("x-request-id").expect("x-request-id generated");
    assert_eq!(id.len(), 32);

    // A stream the client did not ask usage for: the proxy's own usage chunk is hidden.
    let events = data_events(
        p.api
            .stream("/v1/chat/completions", &chat("Tell me a story", 4, true)),
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())),
        "{chunks:?}"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());

    // A client that asks for usage gets it.
    let mut body = chat("Tell me a story", 3, true);
    body["stream_options"] = json!({"include_usage": true});
    let events = data_events(p.api.stream("/v1/chat/completions", &body));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3, "{events:?}");

    let r = p.api.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "text_completion");
    let events = data_events(p.api.stream(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "stream": true}),
    ));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let models = p.api.get("/v1/models");
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], MODEL);

    // Round robin spread the five requests over all three replicas, and every
    // request left one complete lifecycle record.
    let all = p.records(6);
    assert_eq!(all.len(), 6);
    assert_eq!(all[5]["api"], "/v1/models");
    let recs = &all[..5];
    let endpoints: HashSet<&str> = recs
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints.len(), 3, "{recs:?}");
    let first = &recs[0];
    assert_eq!(first["request_id"], id);
    assert_eq!(first["status"], 200);
    assert_eq!(first["policy"], "round_robin");
    assert_eq!(first["reason"], "rotation");
    assert_eq!(first["output_tokens"], 5);
    assert_eq!(first["pool"], "default");
    assert_eq!(first["class"], "default");
    for k in [
        "arrival_ms",
        "routed_ms",
        "upstream_sent_ms",
        "first_byte_ms",
        "end_ms",
    ] {
        assert!(
            first[k].as_f64().unwrap() >= first["arrival_ms"].as_f64().unwrap(),
            "{k}: {first}"
        );
    }
    let streamed = &recs[1];
    assert_eq!(streamed["stream"], true);
    assert_eq!(
        streamed["output_tokens"], 4,
        "usage read from the hidden chunk: {streamed}"
    );
    assert!(
        streamed["first_token_ms"].as_f64().unwrap() <= streamed["last_token_ms"].as_f64().unwrap()
    );
    assert_eq!(streamed["finish_reason"], "length");
}

#[test]
fn request_id_is_kept_and_returned() {
    let sims = sims(1, &[]);
    let p = Proxy::over(&sims, &[]);
    let body = chat("hi", 2, false).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Id: my-trace-42\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = raw_exchange(&p.api.addr, req.as_bytes());
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("x-request-id: my-trace-42"),
        "{raw}"
    );
    assert_eq!(p.records(1)[0]["request_id"], "my-trace-42");
}

#[test]
fn one_mebibyte_prompt_passes_through() {
    let sims = sims(2, &[]);
    let p = Proxy::over(&sims, &[]);
    // `\u00e9` is six body bytes for one letter, so a 1 MiB body stays within
    // the model's context (about 44k estimated tokens).
    let unit = "\\u00e9";
    let n = (1 << 20) / unit.len();
    let content = unit.repeat(n);
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":2}}"#
    );
    assert!(body.len() >= 1 << 20);
    let value: Value = serde_json::from_str(&body).unwrap();
    let r = p.api.post("/v1/chat/completions", &value);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > 40_000,
        "the replica saw the whole prompt: {v}"
    );
    let rec = &p.records(1)[0];
    assert_eq!(rec["prompt_tokens"].as_u64().unwrap(), prompt_tokens);

    // And streamed.
    let mut sv = value.clone();
    sv["stream"] = json!(true);
    let events = data_events(p.api.stream("/v1/chat/completions", &sv));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

fn shared_prefix_requests(p: &Proxy) -> (HashSet<String>, HashSet<String>) {
    let system = "You are a meticulous assistant for the Sluice project. ".repeat(40);
    for q in [
        "What is a pool?",
        "How do retries work?",
        "Explain prefix caching.",
        "What is TTFT?",
        "Why SSE?",
    ] {
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "max_tokens": 2,
        });
        let r = p.api.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima",
    ];
    for w in words {
        let body = json!({
            "model": MODEL,
            "prompt": format!("{w} {}", format!("{w} talks about topic {w}. ").repeat(30)),
            "max_tokens": 2,
        });
        let r = p.api.post("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let recs = p.records(17);
    let shared: HashSet<String> = recs[..5]
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap().to_string())
        .collect();
    let unrelated: HashSet<String> = recs[5..]
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap().to_string())
        .collect();
    (shared, unrelated)
}

#[test]
fn prefix_affinity_keeps_shared_prefixes_together() {
    let sims = sims(3, &[]);
    // Without engine gauges: a scrape taken while the previous request was
    // still running would (rightly) trip the bounded-load rule and make the
    // placement depend on timing. The proxy's own in-flight count stays.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "pa.toml",
        &format!(
            "[[pools]]\nname = \"p\"\nmodel = \"{MODEL}\"\nendpoints = [\"{}\", \"{}\", \"{}\"]\n[pools.routing]\npolicy = \"prefix_affinity\"\n[pools.scrape]\nenabled = false\n",
            sims[0].addr, sims[1].addr, sims[2].addr
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    let (shared, unrelated) = shared_prefix_requests(&p);
    assert_eq!(
        shared.len(),
        1,
        "a shared prefix went to several replicas: {shared:?}"
    );
    assert!(
        unrelated.len() >= 2,
        "unrelated prompts were not spread: {unrelated:?}"
    );
    let recs = p.records(17);
    assert!(recs.iter().all(|r| r["policy"] == "prefix_affinity"));
}

#[test]
fn cache_aware_keeps_shared_prefixes_together() {
    let sims = sims(3, &[]);
    let p = Proxy::over(&sims, &["--policy", "cache_aware"]);
    let (shared, unrelated) = shared_prefix_requests(&p);
    assert_eq!(
        shared.len(),
        1,
        "a shared prefix went to several replicas: {shared:?}"
    );
    assert!(
        unrelated.len() >= 2,
        "unrelated prompts were not spread: {unrelated:?}"
    );
    let recs = p.records(17);
    let hits = recs[1..5]
        .iter()
        .filter(|r| r["reason"] == "prefix_hit")
        .count();
    assert_eq!(hits, 4, "{recs:?}");
    // The replica really served the shared prefix from its cache.
    assert!(
        recs[4]["cached_tokens"].as_u64().unwrap() > 0,
        "{}",
        recs[4]
    );
}
