//! Tenants and quotas through the real binary: `sluice sim` replicas behind
//! `sluice serve`, API keys, 401/400/429 with OpenAI bodies and
//! `x-ratelimit-*` headers, token reserve/settle, concurrency slots that come
//! back on client disconnect, Redis-backed budgets and concurrency leases
//! shared by two proxies (surviving one proxy's SIGKILL), and cache
//! isolation between tenants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "proxy_common/mod.rs"]
mod common;
#[path = "tenants_common/mod.rs"]
mod tenants;

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use tenants::*;

fn tenant(name: &str, key: &str, extra: &str) -> String {
    format!(
        "[[tenants]]\nname = \"{name}\"\napi_key_sha256 = [\"{}\"]\n{extra}\n",
        sha256_hex(key)
    )
}

fn error_of(r: &Reply, status: u16) -> serde_json::Value {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-sluice-error"), Some("true"));
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    v
}

#[test]
fn keys_map_to_tenants_and_unknown_keys_get_401() {
    let sims = common::sims(1, &[]);
    let (_dir, p) = start(
        &sims,
        "",
        &format!(
            "{}{}",
            tenant("acme", "sk-acme", ""),
            tenant("beta", "sk-beta", "models = [\"other-model\"]")
        ),
    );
    let e = error_of(&post(&p.api.addr, None, &chat("hi", 4, false)), 401);
    assert_eq!(e["error"]["code"], "missing_api_key");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let e = error_of(
        &post(&p.api.addr, Some("sk-nope"), &chat("hi", 4, false)),
        401,
    );
    assert_eq!(e["error"]["code"], "invalid_api_key");
    // A tenant only reaches its models.
    let e = error_of(
        &post(&p.api.addr, Some("sk-beta"), &chat("hi", 4, false)),
        404,
    );
    assert_eq!(e["error"]["code"], "model_not_found");
    let ok = post(&p.api.addr, Some("sk-acme"), &chat("hello there", 5, false));
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let recs = p.records(4);
    let tenants: Vec<&str> = recs.iter().map(|r| r["tenant"].as_str().unwrap()).collect();
    assert_eq!(tenants[3], "acme", "{recs:?}");
    assert_eq!(recs[0]["status"], 401);
    assert_eq!(
        metric(&p, "sluice_tenant_requests_total{tenant=\"acme\"}"),
        1.0
    );
    assert_eq!(
        metric(&p, "sluice_tenant_completion_tokens_total{tenant=\"acme\"}"),
        5.0
    );
    assert_eq!(
        metric(
            &p,
            "sluice_tenant_rejected_requests_total{reason=\"invalid_api_key\",tenant=\"\"}"
        ),
        1.0
    );
}

#[test]
fn request_rate_limit_answers_429_with_headers() {
    let sims = common::sims(1, &[]);
    let (_dir, p) = start(
        &sims,
        "",
        &tenant("acme", "k", "[tenants.limits]\nrequests_per_minute = 3"),
    );
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = post(&p.api.addr, Some("k"), &chat("hi", 2, false));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        remaining.push(
            r.header("x-ratelimit-remaining-requests")
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let r = post(&p.api.addr, Some("k"), &chat("hi", 2, false));
    let e = error_of(&r, 429);
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["error"]["type"], "requests");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(r.header("x-ratelimit-reset-requests").is_some());
    assert_eq!(
        metric(
            &p,
            "sluice_tenant_rejected_requests_total{reason=\"requests_per_minute\",tenant=\"acme\"}"
        ),
        1.0
    );
}

#[test]
fn token_budget_reserves_then_settles_to_usage() {
    let sims = common::sims(1, &[]);
    let (_dir, p) = start(
        &sims,
        "",
        &tenant("acme", "k", "[tenants.limits]\ntokens_per_minute = 1000"),
    );
    // Reserves prompt + 600 at admission: a second such request cannot fit
    // while the first holds its reservation, but the settled usage (prompt +
    // 10) leaves room afterwards.
    let mut held = send(
        &p.api.addr,
        "/v1/chat/completions",
        Some("k"),
        &serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 600, "ignore_eos": true, "stream": true}),
    );
    let mut first = String::new();
    BufReader::new(&mut held).read_line(&mut first).unwrap();
    assert!(first.contains("200"), "{first}");
    let r = post(&p.api.addr, Some("k"), &chat("hi", 600, false));
    let e = error_of(&r, 429);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute"),
        "{e}"
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    drop(held);
    wait_metric(&p, "sluice_tenant_reserved_tokens{tenant=\"acme\"}", |v| {
        v == 0.0
    });
    let r = post(&p.api.addr, Some("k"), &chat("hi", 10, false));
    assert_eq!(r.status, 200);
    let usage = &r.json()["usage"];
    let used = usage["prompt_tokens"].as_u64().unwrap() + 10;
    let remaining: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    // After this request's reservation (prompt + 10) and the first one's
    // settled charge (at least its prompt), well over half the budget is left.
    assert!(
        remaining >= 1000 - 2 * used - 650 && remaining < 1000,
        "{remaining}"
    );
    wait_metric(&p, "sluice_tenant_reserved_tokens{tenant=\"acme\"}", |v| {
        v == 0.0
    });
    // Over the whole budget in one request: refused, not retryable.
    let r = post(&p.api.addr, Some("k"), &chat("hi", 5000, false));
    let e = error_of(&r, 429);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("whole budget")
    );
}

#[test]
fn concurrency_slots_come_back_when_clients_disconnect() {
    let sims = common::sims(1, &[]);
    let (_dir, p) = start(
        &sims,
        "",
        &tenant("acme", "k", "[tenants.limits]\nmax_concurrent = 2"),
    );
    let slots = "sluice_tenant_concurrency_slots{tenant=\"acme\"}";
    for round in 0..3 {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = send(
                &p.api.addr,
                "/v1/chat/completions",
                Some("k"),
                &chat("a long answer please", 2000, true),
            );
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line).unwrap();
            assert!(line.contains("200"), "round {round}: {line}");
            held.push(s);
        }
        assert_eq!(metric(&p, slots), 2.0);
        let r = post(&p.api.addr, Some("k"), &chat("hi", 2, false));
        let e = error_of(&r, 429);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("concurrent")
        );
        assert!(r.header("retry-after").is_some());
        // Clients go away mid-stream: both slots must come back.
        drop(held);
        wait_metric(&p, slots, |v| v == 0.0);
    }
    assert_eq!(
        post(&p.api.addr, Some("k"), &chat("hi", 2, false)).status,
        200
    );
    wait_metric(&p, slots, |v| v == 0.0);
}

#[test]
fn per_request_caps_reject_or_clamp() {
    let sims = common::sims(1, &[]);
    let (_dir, p) = start(
        &sims,
        "",
        &format!(
            "{}{}",
            tenant(
                "strict",
                "s",
                "[tenants.limits]\nmax_output_tokens = 8\nmax_prompt_tokens = 50"
            ),
            tenant(
                "lenient",
                "l",
                "[tenants.limits]\nmax_output_tokens = 8\non_output_over_cap = \"clamp\""
            )
        ),
    );
    let e = error_of(&post(&p.api.addr, Some("s"), &chat("hi", 100, false)), 400);
    assert_eq!(e["error"]["param"], "max_tokens");
    let long = "word ".repeat(200);
    let e = error_of(&post(&p.api.addr, Some("s"), &chat(&long, 4, false)), 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("prompt"));
    let r = post(&p.api.addr, Some("l"), &chat("hi", 100, false));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["usage"]["completion_tokens"],
        8,
        "clamped to the cap"
    );
}

#[test]
fn cache_isolated_tenants_never_share_cached_prefixes() {
    let sims = common::sims(1, &[]);
    let (_dir, p) = start(
        &sims,
        "",
        &format!(
            "{}{}",
            tenant("a", "ka", "cache_isolation = true"),
            tenant("b", "kb", "cache_isolation = true")
        ),
    );
    let prompt = "The same long system prompt shared word for word. ".repeat(40);
    let cached = |key: &str| {
        let r = post(&p.api.addr, Some(key), &chat(&prompt, 2, false));
        assert_eq!(r.status, 200);
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!(cached("ka"), 0, "first sight of the prompt");
    assert_eq!(cached("kb"), 0, "tenant b must not hit tenant a's cache");
    assert!(cached("ka") > 0, "tenant a still hits its own cache");
    assert!(cached("kb") > 0, "and b its own");
    assert!(metric(&p, "sluice_tenant_cached_prompt_tokens_total{tenant=\"a\"}") > 0.0);
}

fn redis_config(sims: &[Sim], url: &str, policy: &str) -> String {
    config(
        sims,
        "",
        &format!(
            "[quota]\nbackend = \"redis\"\nredis_url = \"{url}\"\non_backend_error = \"{policy}\"\nredis_timeout_ms = 200\n{}",
            tenant(
                "acme",
                "k",
                "[tenants.limits]\nrequests_per_minute = 5\ntokens_per_minute = 100000"
            )
        ),
    )
}

#[test]
fn two_proxies_share_one_redis_budget() {
    let Some(redis) = Redis::start() else { return };
    let sims = common::sims(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let d1 = dir.path().join("1");
    let d2 = dir.path().join("2");
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let p1 = proxy(&d1, &redis_config(&sims, &redis.url, "closed"));
    let p2 = proxy(&d2, &redis_config(&sims, &redis.url, "closed"));
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..8 {
        let p = if i % 2 == 0 { &p1 } else { &p2 };
        let r = post(&p.api.addr, Some("k"), &chat("hi", 2, false));
        match r.status {
            200 => ok += 1,
            429 => {
                refused += 1;
                assert!(r.header("retry-after").is_some());
                assert_eq!(r.header("x-ratelimit-limit-requests"), Some("5"));
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert_eq!((ok, refused), (5, 3), "5 per minute across both proxies");
    // Redis goes away: fail-closed answers 503 and says why.
    drop(redis);
    let r = post(&p1.api.addr, Some("k"), &chat("hi", 2, false));
    let e = error_of(&r, 503);
    assert_eq!(e["error"]["code"], "quota_backend_unavailable");
    assert!(
        metric(
            &p1,
            "sluice_quota_backend_errors_total{backend=\"redis\",policy=\"closed\"}"
        ) >= 1.0
    );
    assert_eq!(
        metric(&p1, "sluice_tenant_concurrency_slots{tenant=\"acme\"}"),
        0.0
    );
}

/// Two streams held open through `p` (a slow replica keeps them going),
/// their status lines read.
fn hold_two(p: &Proxy, max_tokens: u32) -> Vec<BufReader<std::net::TcpStream>> {
    (0..2)
        .map(|_| {
            let s = send(
                &p.api.addr,
                "/v1/chat/completions",
                Some("k"),
                &chat("a long answer please", max_tokens, true),
            );
            let mut s = BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).unwrap();
            assert!(line.contains("200"), "{line}");
            s
        })
        .collect()
}

/// Asserts that `p` refuses tenant `acme` for concurrency, as OpenAI-style 429.
fn refused_for_concurrency(p: &Proxy) {
    let r = post(&p.api.addr, Some("k"), &chat("hi", 2, false));
    let e = error_of(&r, 429);
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("concurrent") && msg.contains("allows 2"),
        "{e}"
    );
    assert_eq!(r.header("retry-after"), Some("1"));
}

/// Polls `p` with short requests until one is admitted; panics after `bound`.
fn admitted_within(p: &Proxy, bound: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let r = post(&p.api.addr, Some("k"), &chat("hi", 2, false));
        match r.status {
            200 => return start.elapsed(),
            429 => {}
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
        assert!(
            start.elapsed() < bound,
            "still refused after {bound:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_proxies_share_concurrency_slots_through_redis_leases() {
    let Some(redis) = Redis::start() else { return };
    // Real time: a 4000-token answer streams for well over the test's steps.
    let sims = vec![Sim::start(&["--speedup", "1", "--seed", "1"])];
    let text = config(
        &sims,
        "",
        &format!(
            "[quota]\nbackend = \"redis\"\nredis_url = \"{}\"\non_backend_error = \"closed\"\nredis_timeout_ms = 200\nconcurrency_lease_ttl_ms = 2000\n{}",
            redis.url,
            tenant("acme", "k", "[tenants.limits]\nmax_concurrent = 2")
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let a = proxy(&d1, &text);
    let b = proxy(&d2, &text);
    let slots = "sluice_tenant_concurrency_slots{tenant=\"acme\"}";

    // A holds both slots: B refuses, though B itself holds none.
    let held = hold_two(&a, 4000);
    assert_eq!(metric(&a, slots), 2.0);
    refused_for_concurrency(&b);
    assert_eq!(metric(&b, slots), 0.0, "the refusal holds no local slot");
    assert_eq!(
        metric(
            &b,
            "sluice_tenant_rejected_requests_total{reason=\"concurrency\",tenant=\"acme\"}"
        ),
        1.0
    );
    // Clients go away mid-stream: the leases go with them.
    drop(held);
    wait_metric(&a, slots, |v| v == 0.0);
    admitted_within(&b, Duration::from_secs(10));

    // Streams that run to their end give their slots back too.
    let held = hold_two(&a, 40);
    for mut s in held {
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert!(rest.contains("[DONE]"), "{rest}");
    }
    wait_metric(&a, slots, |v| v == 0.0);
    admitted_within(&b, Duration::from_secs(10));

    // A dies holding both slots: nothing releases them, so B refuses until
    // the leases (2 s, no longer renewed) expire — then admits.
    let _held = hold_two(&a, 4000);
    refused_for_concurrency(&b);
    a.signal("KILL");
    refused_for_concurrency(&b);
    admitted_within(&b, Duration::from_secs(15));
    // And B's own slots still come and go normally.
    let held = hold_two(&b, 4000);
    refused_for_concurrency(&b);
    drop(held);
    admitted_within(&b, Duration::from_secs(10));
}

#[test]
fn redis_down_fails_open_when_configured() {
    let sims = common::sims(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port: Redis is "down" from the start.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = proxy(
        dir.path(),
        &redis_config(&sims, &format!("redis://127.0.0.1:{port}"), "open"),
    );
    for _ in 0..7 {
        let r = post(&p.api.addr, Some("k"), &chat("hi", 2, false));
        assert_eq!(r.status, 200, "fail-open admits without the rate limit");
    }
    assert!(
        metric(
            &p,
            "sluice_quota_backend_errors_total{backend=\"redis\",policy=\"open\"}"
        ) >= 7.0
    );
    std::thread::sleep(Duration::from_millis(10));
    assert!(p.stderr().contains("failing open"), "{}", p.stderr());
}
