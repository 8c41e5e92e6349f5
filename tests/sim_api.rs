//! `sluice sim` over HTTP: the OpenAI/vLLM API shapes, streaming, errors,
//! `/metrics`, and the prefix cache as a client sees it.

mod sim_common;

use serde_json::{Value, json};
use sim_common::{Event, Sim};

const MODEL: &str = "llama-3.1-8b";

fn assert_usage(u: &Value) {
    let p = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    let c = u["completion_tokens"].as_u64().expect("completion_tokens");
    assert_eq!(u["total_tokens"].as_u64(), Some(p + c), "{u}");
}

/// The fields every OpenAI client reads from a completion or chunk.
fn assert_envelope(v: &Value, object: &str, id_prefix: &str) {
    assert_eq!(v["object"], object, "{v}");
    assert!(v["id"].as_str().expect("id").starts_with(id_prefix), "{v}");
    assert!(v["created"].as_u64().is_some(), "{v}");
    assert_eq!(v["model"], MODEL);
    assert!(v["choices"].is_array());
}

#[test]
fn completions_and_chat_match_the_openai_schema() {
    let sim = Sim::start(&["--model", MODEL, "--speedup", "50"]);

    let r = sim.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Say something.", "max_tokens": 7, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let v = r.json();
    assert_envelope(&v, "text_completion", "cmpl-");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert!(!c["text"].as_str().unwrap().is_empty());
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_usage(&v["usage"]);

    let r = sim.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_completion_tokens": 4, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_envelope(&v, "chat.completion", "chatcmpl-");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_usage(&v["usage"]);

    // Streaming chat with usage: role chunk, one chunk per token, usage chunk, [DONE].
    let mut s = sim.stream(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 5, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(s.status, 200);
    let (events, end) = s.collect();
    assert_eq!(end, Event::End);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks.len(), 1 + 5 + 1, "{events:?}");
    for c in &chunks {
        assert_envelope(c, "chat.completion.chunk", "chatcmpl-");
        assert_eq!(c["id"], chunks[0]["id"], "one id per stream");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..6]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert!(!text.is_empty());
    assert!(
        chunks[1..5]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[6]["choices"].as_array().unwrap().len(), 0);
    assert_eq!(chunks[6]["usage"]["completion_tokens"], 5);
    assert_usage(&chunks[6]["usage"]);

    // Streaming completions with continuous usage: usage on every chunk.
    let mut s = sim.stream(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 3, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
    );
    let (events, end) = s.collect();
    assert_eq!(end, Event::End);
    assert_eq!(events.len(), 3 + 1 + 1);
    for (i, e) in events[..3].iter().enumerate() {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_envelope(&c, "text_completion", "cmpl-");
        assert_eq!(c["usage"]["prompt_tokens"], 4);
        assert_eq!(c["usage"]["completion_tokens"], i + 1);
    }
}

#[test]
fn same_output_for_same_prompt_and_eos_ends_with_stop() {
    let sim = Sim::start(&[
        "--speedup",
        "100",
        "--output-len-median",
        "6",
        "--output-len-sigma",
        "0",
    ]);
    let body = json!({"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 100});
    let a = sim.post("/v1/completions", &body).json();
    let b = sim.post("/v1/completions", &body).json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // The 6th token is EOS: 6 tokens, 5 words, finish_reason stop.
    assert_eq!(a["choices"][0]["finish_reason"], "stop");
    assert_eq!(a["usage"]["completion_tokens"], 6);
    assert_eq!(
        a["choices"][0]["text"].as_str().unwrap().split(' ').count(),
        5
    );
}

#[test]
fn errors_are_vllm_error_bodies() {
    let sim = Sim::start(&["--speedup", "100", "--max-model-len", "256"]);
    let check = |r: sim_common::Response, status: u16, param: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert_eq!(e["code"], status);
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{v}");
        }
        e["message"].as_str().unwrap().to_string()
    };
    let msg = check(
        sim.post("/v1/completions", &json!({"model": "gpt-4", "prompt": "x"})),
        404,
        Some("model"),
    );
    assert!(msg.contains("gpt-4"));
    let long: Vec<u32> = (0..300).collect();
    let msg = check(
        sim.post("/v1/completions", &json!({"model": MODEL, "prompt": long})),
        400,
        None,
    );
    assert!(msg.contains("maximum context length is 256"), "{msg}");
    check(
        sim.post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 1000}),
        ),
        400,
        Some("max_tokens"),
    );
    check(sim.request("POST", "/v1/chat/completions", None), 400, None);
    check(
        sim.post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": []}),
        ),
        400,
        Some("messages"),
    );
    assert_eq!(sim.get("/v1/nope").status, 404);
    assert_eq!(sim.get("/v1/completions").status, 405);
}

#[test]
fn info_endpoints() {
    let sim = Sim::start(&["--served-model-name", "my-llama", "--speedup", "100"]);
    let m = sim.get("/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "my-llama");
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(m["data"][0]["root"], "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(m["data"][0]["max_model_len"], 131072);
    assert_eq!(sim.get("/health").status, 200);
    assert_eq!(sim.get("/ping").status, 200);
    assert!(sim.get("/version").json()["version"].is_string());
    let t = sim
        .post("/tokenize", &json!({"prompt": "hello world"}))
        .json();
    // The same ids the proxy computes.
    let ids = sluice_policies::tokens::estimate_token_ids("hello world");
    assert_eq!(t["count"], ids.len());
    assert_eq!(t["tokens"], json!(ids));
    // The served name is the one that works.
    let ok = sim.post(
        "/v1/completions",
        &json!({"model": "my-llama", "prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(ok.status, 200);
    assert_eq!(
        sim.post("/v1/completions", &json!({"model": MODEL, "prompt": "x"}))
            .status,
        404
    );
}

#[test]
fn metrics_use_vllm_names_labels_and_buckets() {
    let sim = Sim::start(&["--speedup", "100"]);
    let r = sim.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 3, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200);
    let m = sim.get("/metrics");
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = m.text();
    let labels = format!("{{engine=\"0\",model_name=\"{MODEL}\"}}");
    for gauge in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ] {
        assert!(text.contains(&format!("# TYPE {gauge} gauge")), "{gauge}");
        assert!(
            text.contains(&format!("{gauge}{labels} 0")),
            "{gauge}\n{text}"
        );
    }
    let prompt = sluice_policies::tokens::estimate_token_count("Hello there") as f64;
    for (counter, value) in [
        ("vllm:generation_tokens_total", 3.0),
        ("vllm:prompt_tokens_total", prompt),
        ("vllm:num_preemptions_total", 0.0),
        ("vllm:prefix_cache_queries_total", prompt),
        ("vllm:prefix_cache_hits_total", 0.0),
    ] {
        assert!(
            text.contains(&format!("# TYPE {counter} counter")),
            "{counter}"
        );
        assert_eq!(
            sim_common::metric_value(&text, &format!("{counter}{labels}")),
            Some(value),
            "{counter}"
        );
    }
    assert!(text.contains("finished_reason=\"length\"} 1"), "{text}");
    assert!(text.contains("vllm:cache_config_info{block_size=\"16\""));
    assert!(text.contains("enable_prefix_caching=\"True\""));
    assert!(text.contains("num_gpu_blocks=\""));
    for h in [
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_inference_time_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {h} histogram")), "{h}");
        let count = sim_common::metric_value(&text, &format!("{h}_count{labels}")).unwrap();
        let inf = format!("{h}_bucket{{engine=\"0\",model_name=\"{MODEL}\",le=\"+Inf\"}}");
        assert_eq!(sim_common::metric_value(&text, &inf), Some(count), "{h}");
        assert!(count >= 1.0, "{h}");
    }
    // vLLM's TTFT buckets start at 1 ms.
    assert!(text.contains("vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"llama-3.1-8b\",le=\"0.001\"}"));
}

#[test]
fn second_identical_long_prompt_hits_the_prefix_cache() {
    let sim = Sim::start(&["--speedup", "100"]);
    let prompt: String = (0..600).map(|i| format!("word{} ", i % 97)).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    let first = sim.post("/v1/completions", &body).json();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 1000, "{prompt_tokens}");
    let hits_before = sim.metric("vllm:prefix_cache_hits_total{");
    assert_eq!(hits_before, 0.0);

    let second = sim.post("/v1/completions", &body).json();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // Every full block but the one holding the last prompt token.
    assert_eq!(cached, (prompt_tokens - 1) / 16 * 16);
    let hits = sim.metric("vllm:prefix_cache_hits_total{");
    assert_eq!(hits, cached as f64);
    let queries = sim.metric("vllm:prefix_cache_queries_total{");
    assert_eq!(queries, 2.0 * prompt_tokens as f64);

    // A different cache salt shares nothing.
    let mut salted = body.clone();
    salted["cache_salt"] = json!("tenant-b");
    let third = sim.post("/v1/completions", &salted).json();
    assert_eq!(third["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[test]
fn a_tokenizer_json_drives_prompt_ids() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/tokenizers/tiny-wordlevel.json"
    );
    let sim = Sim::start(&["--tokenizer", path]);
    let t = sim
        .post("/tokenize", &json!({"prompt": "hello sluice world ."}))
        .json();
    assert_eq!(t["tokens"], json!([1, 3, 2, 4]));
    let r = sim.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "hello world", "max_tokens": 1}),
    );
    assert_eq!(r.json()["usage"]["prompt_tokens"], 2);
}

#[test]
fn a_bad_tokenizer_file_is_a_clear_startup_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "sim",
            "--port",
            "0",
            "--tokenizer",
            "/no/such/tokenizer.json",
        ])
        .output()
        .expect("run sluice sim");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/tokenizer.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
