//! Shared by the `proxy_tenants_*` tests: requests with API keys, raw
//! responses with all headers, metrics, config files and a throwaway
//! `redis-server`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub use crate::common::sim::metric_value;
pub use crate::common::{Client, MODEL, Proxy, Sim, write_config};

/// A whole response (the sim tests' client reads it).
pub use crate::common::Response as Reply;

/// Sends a POST with an optional bearer key; returns the open stream.
pub fn send(addr: &str, path: &str, key: Option<&str>, body: &Value) -> TcpStream {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let s = Client::new(addr).send_with_headers("POST", path, &headers, Some(body));
    // Tenant tests wait on queues and slow streams: longer than the client's default.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads a whole response.
pub fn read_reply(s: TcpStream) -> Reply {
    Reply::read(s)
}

/// POST a chat request with `key`.
pub fn post(addr: &str, key: Option<&str>, body: &Value) -> Reply {
    read_reply(send(addr, "/v1/chat/completions", key, body))
}

/// A chat request body with a deterministic output length.
pub fn chat(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}

/// Hex SHA-256 of a key, as `api_key_sha256` wants it (computed with `sha256sum`).
pub fn sha256_hex(key: &str) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The proxy's `/metrics` text.
pub fn metrics(p: &Proxy) -> String {
    p.admin.get("/metrics").text()
}

/// One sample (prefix match on `name{labels}`), 0 when absent.
pub fn metric(p: &Proxy, prefix: &str) -> f64 {
    metric_value(&metrics(p), prefix).unwrap_or(0.0)
}

/// Polls a metric until `pred` holds, or panics after 15 s.
pub fn wait_metric(p: &Proxy, prefix: &str, pred: impl Fn(f64) -> bool) -> f64 {
    crate::common::sim::wait_until(
        Duration::from_secs(15),
        Duration::from_millis(20),
        || {
            let v = metric(p, prefix);
            if pred(v) { Ok(v) } else { Err(v) }
        },
        |v| format!("metric {prefix} stuck at {v}; stderr: {}", p.stderr()),
    )
}

/// A `redis-server` on a free loopback port, killed on drop.
pub struct Redis {
    child: std::process::Child,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// Starts one, or returns `None` (with a message) when `redis-server` is not installed.
    pub fn start() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = match std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "SKIPPED: redis-server is not installed ({e}); `./dev setup` installs it"
                );
                return None;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        })
    }
}

/// A one-pool config over `sims` plus `extra` TOML (tenants, quota, admission).
pub fn config(sims: &[Sim], pool_extra: &str, extra: &str) -> String {
    let eps: Vec<String> = sims.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!(
        "[[pools]]\nname = \"chat\"\nmodel = \"{MODEL}\"\nendpoints = [{}]\n[pools.scrape]\ninterval_ms = 50\n{pool_extra}\n{extra}\n",
        eps.join(", ")
    )
}

/// Starts a proxy from config text.
pub fn proxy(dir: &std::path::Path, text: &str) -> Proxy {
    let path = write_config(dir, "sluice.toml", text);
    Proxy::start(&["--config", path.to_str().unwrap()])
}

/// A proxy over `sims` from [`config`]`(sims, pool_extra, extra)`; the
/// temporary directory holds its config file and must outlive it.
pub fn start(sims: &[Sim], pool_extra: &str, extra: &str) -> (tempfile::TempDir, Proxy) {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(dir.path(), &config(sims, pool_extra, extra));
    (dir, p)
}
