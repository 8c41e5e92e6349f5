//! Every error the proxy itself returns: the right status, the OpenAI error
//! body, `x-sluice-error: true`, and no internal address in the message.
//! Upstream errors pass through unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod proxy_common;

use proxy_common::*;
use serde_json::json;

#[test]
fn client_errors() {
    let sims = sims(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "small.toml",
        &format!(
            r#"
[server]
max_header_bytes = 4096
[limits]
max_body_bytes = 100000
[[pools]]
name = "p"
model = "{MODEL}"
endpoints = ["{}"]
"#,
            sims[0].addr
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);

    // 400: not JSON, and JSON missing a field.
    let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 9\r\n\r\n{not json";
    let resp = raw_exchange(&p.api.addr, raw);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("x-sluice-error: true"), "{resp}");
    let v = assert_proxy_error(
        &p.api.post("/v1/chat/completions", &json!({"model": MODEL})),
        400,
    );
    assert_eq!(v["error"]["param"], "messages");

    // 404: unknown model, unknown path, and engine admin paths are not proxied.
    let v = assert_proxy_error(
        &p.api.post(
            "/v1/chat/completions",
            &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        ),
        404,
    );
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_proxy_error(&p.api.get("/metrics"), 404);
    assert_proxy_error(&p.api.post("/admin/faults", &json!({"stall": true})), 404);
    assert_proxy_error(&p.api.get("/health"), 404);
    // 405: right path, wrong method.
    assert_proxy_error(&p.api.get("/v1/chat/completions"), 405);

    // 413: body over the configured limit (declared, then streamed without a length).
    let big = chat(&"x ".repeat(60_000), 1, false);
    let v = assert_proxy_error(&p.api.post("/v1/chat/completions", &big), 413);
    assert_eq!(v["error"]["code"], "request_too_large");
    let body = big.to_string();
    let mut chunked = String::from(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for part in body.as_bytes().chunks(8192) {
        chunked.push_str(&format!(
            "{:x}\r\n{}\r\n",
            part.len(),
            std::str::from_utf8(part).unwrap()
        ));
    }
    chunked.push_str("0\r\n\r\n");
    let resp = raw_exchange(&p.api.addr, chunked.as_bytes());
    assert!(
        resp.starts_with("HTTP/1.1 413"),
        "{}",
        &resp[..resp.len().min(300)]
    );

    // 431: headers over the configured limit.
    let req = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    let resp = raw_exchange(&p.api.addr, req.as_bytes());
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert!(resp.contains("\"headers_too_large\""), "{resp}");

    // The proxy still serves after all that.
    assert_eq!(
        p.api
            .post("/v1/chat/completions", &chat("hi", 1, false))
            .status,
        200
    );
    let recs = p.records(10);
    assert!(
        recs.iter()
            .any(|r| r["status"] == 413 && r["error"] == "body_too_large")
    );
    assert!(
        recs.iter()
            .any(|r| r["status"] == 404 && r["error"] == "unknown_model")
    );
}

#[test]
fn upstream_failures() {
    let sims = sims(2, &[]);
    // A port nothing listens on: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "pools.toml",
        &format!(
            r#"
[limits]
max_retries = 1
retry_backoff_ms = 1
[[pools]]
name = "dead"
model = "dead-model"
endpoints = ["{dead}"]
[pools.health]
interval_ms = 60000
[[pools]]
name = "stall"
model = "{MODEL}"
endpoints = ["{}"]
[pools.timeouts]
first_token_ms = 300
total_ms = 2000
[[pools]]
name = "errors"
model = "error-model"
endpoints = ["{}"]
"#,
            sims[0].addr, sims[1].addr
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);

    // 502: nothing listens where the only replica should be.
    let body = json!({"model": "dead-model", "messages": [{"role": "user", "content": "x"}]});
    let v = assert_proxy_error(&p.api.post("/v1/chat/completions", &body), 502);
    assert_eq!(v["error"]["code"], "upstream_failed");

    // 504: a stalled engine hits the first-token bound, streaming or not.
    let f = sims[0].post("/admin/faults", &json!({"stall": true}));
    assert_eq!(f.status, 200, "{}", f.text());
    let v = assert_proxy_error(
        &p.api.post("/v1/chat/completions", &chat("hello", 3, true)),
        504,
    );
    assert_eq!(v["error"]["code"], "upstream_timeout");
    assert_proxy_error(
        &p.api.post("/v1/chat/completions", &chat("hello", 3, false)),
        504,
    );
    sims[0].request("DELETE", "/admin/faults", None);

    // Upstream errors pass through unchanged (no x-sluice-error).
    sims[1].post("/admin/faults", &json!({"error_rate": 1.0}));
    let r = p.api.post(
        "/v1/chat/completions",
        &json!({"model": "error-model", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.header("x-sluice-error"), None);

    // 503: the pool's only replica fails health checks.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = write_config(
        dir2.path(),
        "h.toml",
        &format!(
            r#"
[[pools]]
name = "p"
model = "{MODEL}"
endpoints = ["{}"]
[pools.health]
interval_ms = 50
unhealthy_threshold = 1
"#,
            sims[1].addr
        ),
    );
    sims[1].post("/admin/faults", &json!({"health_503": true}));
    let q = Proxy::start(&["--config", cfg2.to_str().unwrap()]);
    q.wait_state("endpoint unhealthy", |s| {
        s["pools"][0]["routable_endpoints"] == 0
    });
    let v = assert_proxy_error(
        &q.api.post("/v1/chat/completions", &chat("x", 1, false)),
        503,
    );
    assert_eq!(v["error"]["code"], "no_healthy_upstream");
    let ready = q.admin.get("/readyz");
    assert_eq!(ready.status, 503);
}
