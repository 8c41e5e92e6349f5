//! Configuration: `sluice check` explains the annotated example and names
//! the line of a mistake; SIGHUP reloads a good file, rejects a broken one
//! while serving on, and does not drop a request in flight; a changed file
//! is reloaded without a signal, however it was replaced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod proxy_common;

use std::process::Command;
use std::time::{Duration, Instant};

use proxy_common::*;
use serde_json::Value;

fn check(path: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config", path])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_explains_the_example_and_names_lines() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/configs/sluice.toml");
    let (ok, text) = check(example);
    assert!(ok, "{text}");
    for want in [
        "pool `chat`",
        "cache_aware",
        "rag-long -> pool `rag`",
        "health: GET /health",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(example).unwrap();
    let typo = write_config(
        dir.path(),
        "typo.toml",
        &src.replace("first_token_ms = 60000", "first_tokn_ms = 60000"),
    );
    let (ok, text) = check(typo.to_str().unwrap());
    assert!(!ok);
    let line = src
        .lines()
        .position(|l| l.contains("first_token_ms = 60000"))
        .unwrap()
        + 1;
    assert!(
        text.contains(&format!("line {line}")) && text.contains("first_tokn_ms"),
        "{text}"
    );

    let dangling = write_config(
        dir.path(),
        "dangling.toml",
        &src.replace("pool = \"rag\"", "pool = \"nope\""),
    );
    let (ok, text) = check(dangling.to_str().unwrap());
    assert!(!ok);
    assert!(text.contains("nope") && text.contains("line "), "{text}");
}

#[test]
fn example_config_serves_once_endpoints_are_filled_in() {
    // The annotated example, pointed at real replicas, is a working config.
    let sims = sims(3, &[]);
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/configs/sluice.toml"
    ))
    .unwrap()
    .replace("127.0.0.1:8001", &sims[0].addr)
    .replace("127.0.0.1:8002", &sims[1].addr)
    .replace("127.0.0.1:8003", &sims[2].addr);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "example.toml", &src);
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    let r = p
        .api
        .post("/v1/chat/completions", &chat("short question", 2, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let long = "a fairly long retrieved passage about many things ".repeat(600);
    let r = p.api.post("/v1/chat/completions", &chat(&long, 2, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let recs = p.records(2);
    assert_eq!(
        (recs[0]["class"].as_str(), recs[0]["pool"].as_str()),
        (Some("chat-short"), Some("chat"))
    );
    assert_eq!(
        (recs[1]["class"].as_str(), recs[1]["pool"].as_str()),
        (Some("rag-long"), Some("rag"))
    );
    assert_eq!(recs[1]["endpoint"], sims[2].addr.as_str());
}

fn pool_config(model: &str, addr: &str) -> String {
    format!("[[pools]]\nname = \"p\"\nmodel = \"{model}\"\nendpoints = [\"{addr}\"]\n")
}

fn model_ids(p: &Proxy) -> Vec<String> {
    let r = p.api.get("/v1/models");
    assert_eq!(r.status, 200);
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn wait_models(p: &Proxy, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while model_ids(p) != [want] {
        assert!(
            Instant::now() < deadline,
            "models never became [{want}]: {:?}",
            model_ids(p)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_good_configs_and_rejects_broken_ones() {
    let sim = Sim::start(&["--seed", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "live.toml", &pool_config(MODEL, &sim.addr));
    // Signals only: the file watcher would race the signal for the same change.
    let p = Proxy::start(&["--config", cfg.to_str().unwrap(), "--no-watch-config"]);
    assert_eq!(model_ids(&p), [MODEL]);

    // A long stream in flight across both reloads.
    let mut inflight = p
        .api
        .stream("/v1/chat/completions", &chat("keep talking", 150, true));
    assert_eq!(inflight.status, 200);

    std::fs::write(
        &cfg,
        "[[pools]]\nname = \"p\"\nmodel = \"m\"\nendpoints = [\"not-an-address\"]\n",
    )
    .unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.stderr().contains("reload rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection reported: {}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(model_ids(&p), [MODEL], "the old config stays");
    assert_eq!(
        p.api
            .post("/v1/chat/completions", &chat("still there?", 1, false))
            .status,
        200
    );

    std::fs::write(&cfg, pool_config("renamed-model", &sim.addr)).unwrap();
    p.signal("HUP");
    wait_models(&p, "renamed-model");
    assert_eq!(p.state()["generation"], 2);

    let (events, end) = inflight.collect();
    assert_eq!(end, Event::End, "the in-flight stream was cut by a reload");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let metrics = p.admin.get("/metrics").text();
    assert_eq!(
        metric_value(&metrics, "sluice_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "sluice_config_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
}

fn routed_pool(addrs: &[&str], policy: &str) -> String {
    let eps: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[pools]]\nname = \"p\"\nmodel = \"{MODEL}\"\nendpoints = [{}]\n[pools.routing]\npolicy = \"{policy}\"\n",
        eps.join(", ")
    )
}

#[test]
fn config_file_changes_reload_without_a_signal() {
    let sims = sims(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Laid out like a Kubernetes ConfigMap volume: sluice.toml -> ..data/sluice.toml,
    // ..data -> ..v1; an update writes ..v2 and swaps the ..data link.
    std::fs::create_dir(d.join("..v1")).unwrap();
    write_config(
        &d.join("..v1"),
        "sluice.toml",
        &routed_pool(&[&sims[0].addr], "round_robin"),
    );
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    let cfg = d.join("sluice.toml");
    std::os::unix::fs::symlink("..data/sluice.toml", &cfg).unwrap();
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    let s = p.state();
    assert_eq!(s["pools"][0]["routing"], "round_robin");
    assert!(s["last_reload"].is_null(), "{s}");

    // 1. ConfigMap update: another policy and a second replica.
    std::fs::create_dir(d.join("..v2")).unwrap();
    write_config(
        &d.join("..v2"),
        "sluice.toml",
        &routed_pool(&[&sims[0].addr, &sims[1].addr], "least_requests"),
    );
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let s = p.wait_state("the ConfigMap update", |s| s["generation"] == 2);
    assert_eq!(s["pools"][0]["routing"], "least_requests");
    assert_eq!(s["pools"][0]["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(s["last_reload"]["trigger"], "file_change");
    assert_eq!(s["last_reload"]["ok"], true);

    // 2. A broken file, written in place: rejected, reported, the old config serves on.
    std::fs::write(
        &cfg,
        "[[pools]]\nname = \"p\"\nmodel = \"m\"\nendpoints = [\"nowhere\"]\n",
    )
    .unwrap();
    let s = p.wait_state("the rejection", |s| s["last_reload"]["ok"] == false);
    assert_eq!(s["generation"], 2);
    assert_eq!(s["pools"][0]["routing"], "least_requests");
    let err = s["last_reload"]["error"].as_str().unwrap();
    assert!(err.contains("endpoints[0]"), "{err}");
    assert!(p.stderr().contains("reload rejected"), "{}", p.stderr());
    let r = p
        .api
        .post("/v1/chat/completions", &chat("still there?", 1, false));
    assert_eq!(r.status, 200, "{}", r.text());

    // 3. An editor's save: a new file renamed over the path (the link becomes a file).
    let tmp = write_config(
        d,
        ".sluice.toml.swp",
        &routed_pool(&[&sims[1].addr], "power_of_two"),
    );
    std::fs::rename(&tmp, &cfg).unwrap();
    let s = p.wait_state("the editor's save", |s| s["generation"] == 3);
    assert_eq!(s["pools"][0]["routing"], "power_of_two");
    assert_eq!(s["last_reload"]["ok"], true);
    let metrics = p.admin.get("/metrics").text();
    assert_eq!(
        metric_value(&metrics, "sluice_config_reloads_total{result=\"failure\"}"),
        Some(1.0),
        "a broken file is tried once"
    );
    assert_eq!(
        metric_value(&metrics, "sluice_config_reloads_total{result=\"success\"}"),
        Some(2.0)
    );
}

#[test]
fn tokenizer_file_changes_reload_without_a_signal() {
    let sims = sims(1, &[]);
    let tok = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/tokenizers/tiny-wordlevel.json"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(tok, d.join("tokenizer.json")).unwrap();
    let cfg = write_config(
        d,
        "sluice.toml",
        &format!(
            "[[pools]]\nname = \"p\"\nmodel = \"{MODEL}\"\ntokenizer = \"tokenizer.json\"\nendpoints = [\"{}\"]\n",
            sims[0].addr
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(p.state()["generation"], 1);

    // 1. A broken tokenizer replaces the file: rejected once, the old one serves on.
    std::fs::write(d.join("tokenizer.new"), "{}").unwrap();
    std::fs::rename(d.join("tokenizer.new"), d.join("tokenizer.json")).unwrap();
    let s = p.wait_state("the rejection", |s| s["last_reload"]["ok"] == false);
    assert_eq!(s["generation"], 1);
    assert_eq!(s["last_reload"]["trigger"], "file_change");
    let err = s["last_reload"]["error"].as_str().unwrap();
    assert!(err.contains("tokenizer"), "{err}");
    let r = p.api.post(
        "/v1/completions",
        &serde_json::json!({"model": MODEL, "prompt": "still counted", "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Three more polls of the same broken file: still one failure.
    std::thread::sleep(config_watch_polls(3));
    let metrics = p.admin.get("/metrics").text();
    assert_eq!(
        metric_value(&metrics, "sluice_config_reloads_total{result=\"failure\"}"),
        Some(1.0),
        "a broken tokenizer is tried once"
    );

    // 2. The good file back (written in place): reloaded.
    std::fs::copy(tok, d.join("tokenizer.json")).unwrap();
    let s = p.wait_state("the fixed tokenizer", |s| s["generation"] == 2);
    assert_eq!(s["last_reload"]["ok"], true);
}

/// How long the file watcher takes for `n` polls (1 s each, plus settling).
fn config_watch_polls(n: u32) -> Duration {
    Duration::from_millis(1_300) * n
}

#[test]
fn sigusr1_reopens_the_lifecycle_log_after_logrotate() {
    let sims = sims(1, &[]);
    let p = Proxy::over(&sims, &[]);
    let post = || p.api.post("/v1/chat/completions", &chat("x", 1, false));
    assert_eq!(post().status, 200);
    p.records(1);
    // logrotate's default: move the file away, then signal the writer.
    let moved = p.lifecycle.with_extension("jsonl.1");
    std::fs::rename(&p.lifecycle, &moved).unwrap();
    p.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(post().status, 200);
        if p.lifecycle.exists() {
            break;
        }
        assert!(Instant::now() < deadline, "the log was never reopened");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!p.records(1).is_empty());
    let old = std::fs::read_to_string(&moved).unwrap();
    assert!(old.lines().count() >= 1 && old.ends_with('\n'));
    for l in old.lines() {
        serde_json::from_str::<Value>(l).expect("whole JSON lines in the rotated file");
    }
}

#[test]
fn admin_listener_reports_state_and_metrics() {
    let sims = sims(2, &[]);
    let p = Proxy::over(&sims, &["--policy", "least_requests"]);
    assert_eq!(
        p.api
            .post("/v1/chat/completions", &chat("x", 2, true))
            .status,
        200
    );
    // The lifecycle record is written after the request's metrics are counted.
    p.records(1);
    assert_eq!(p.admin.get("/healthz").status, 200);
    assert_eq!(p.admin.get("/readyz").status, 200);
    // Scraped engine gauges show up with their age.
    let s = p.wait_state("engine gauges scraped", |s: &Value| {
        s["pools"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["num_gpu_blocks"].as_u64().is_some())
    });
    assert_eq!(s["pools"][0]["routing"], "least_requests");
    let e = &s["pools"][0]["endpoints"][0];
    assert!(e["scrape_age_seconds"].as_f64().unwrap() < 5.0, "{e}");
    assert_eq!(e["engine_stale"], false);
    let m = p.admin.get("/metrics").text();
    for name in [
        "sluice_requests_total{arm=\"\",class=\"default\",pool=\"default\",status=\"200\"} 1",
        "sluice_time_to_first_token_seconds_bucket",
        "sluice_routing_decisions_total{arm=\"\",policy=\"least_requests\",pool=\"default\"",
        "sluice_upstream_healthy{",
        "sluice_upstream_scrape_age_seconds{",
        "sluice_routing_overhead_seconds_bucket",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
}

#[test]
fn serve_without_flags_starts_an_embedded_simulated_pool() {
    let p = Proxy::start(&[]);
    assert_eq!(model_ids(&p), [MODEL]);
    let r = p.api.post("/v1/chat/completions", &chat("hello", 2, false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        p.state()["pools"][0]["endpoints"].as_array().unwrap().len(),
        3
    );
    assert!(p.stderr().contains("simulated"), "{}", p.stderr());
}

#[test]
fn dns_endpoints_are_resolved() {
    let sim = Sim::start(&["--speedup", "20"]);
    let port = sim.addr.rsplit_once(':').unwrap().1;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "dns.toml",
        &format!(
            "[[pools]]\nname = \"p\"\nmodel = \"{MODEL}\"\ndns = \"localhost:{port}\"\ndns_refresh_ms = 200\n[pools.health]\ninterval_ms = 50\nunhealthy_threshold = 1\n"
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    p.wait_state("DNS resolved", |s| {
        s["pools"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["address"] == sim.addr.as_str())
    });
    let r = p
        .api
        .post("/v1/chat/completions", &chat("resolved?", 1, false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(p.records(1)[0]["endpoint"], sim.addr.as_str());
}

#[test]
fn configured_tokenizer_decides_prefix_hashes() {
    // With the tiny word-level vocabulary every unknown word is token 0, so
    // prompts with different words but the same length have the same token
    // ids: prefix_affinity must send them all to one replica, and that
    // replica (given the same tokenizer) serves them from its prefix cache.
    let tok = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/tokenizers/tiny-wordlevel.json"
    );
    let sims: Vec<Sim> = (0..3)
        .map(|i| {
            Sim::start(&[
                "--speedup",
                "20",
                "--seed",
                &(i + 1).to_string(),
                "--tokenizer",
                tok,
            ])
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tok, dir.path().join("tokenizer.json")).unwrap();
    let cfg = write_config(
        dir.path(),
        "tok.toml",
        &format!(
            "[[pools]]\nname = \"p\"\nmodel = \"{MODEL}\"\ntokenizer = \"tokenizer.json\"\nendpoints = [\"{}\", \"{}\", \"{}\"]\n[pools.routing]\npolicy = \"prefix_affinity\"\n[pools.scrape]\nenabled = false\n",
            sims[0].addr, sims[1].addr, sims[2].addr
        ),
    );
    let (ok, text) = check(cfg.to_str().unwrap());
    assert!(ok && text.contains("tokenizer.json"), "{text}");
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);
    for w in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"] {
        let prompt = format!("{w} ").repeat(96);
        let r = p.api.post(
            "/v1/completions",
            &serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["usage"]["prompt_tokens"],
            96,
            "the replica used the same tokenizer"
        );
    }
    let recs = p.records(6);
    let used: std::collections::HashSet<&str> = recs
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        used.len(),
        1,
        "equal token ids went to different replicas: {recs:?}"
    );
    assert!(
        recs[5]["cached_tokens"].as_u64().unwrap() > 0,
        "{}",
        recs[5]
    );

    // A broken tokenizer file is a config error, named.
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let (ok, text) = check(cfg.to_str().unwrap());
    assert!(!ok && text.contains("tokenizer"), "{text}");
}
