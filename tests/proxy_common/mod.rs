//! Shared by the `proxy_*` tests: start real `sluice sim` replicas and a real
//! `sluice serve` on ephemeral 127.0.0.1 ports, and talk HTTP to them. The
//! HTTP client and the sim launcher come from the sim tests' helper.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../sim_common/mod.rs"]
pub mod sim;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

#[allow(unused_imports)]
pub use sim::{Client, Event, Response, Sim, SseReader, metric_value};

/// Model name the test replicas serve.
pub const MODEL: &str = "llama-3.1-8b";

/// Starts `n` fast replicas (high speedup so tests run quickly).
pub fn sims(n: usize, extra: &[&str]) -> Vec<Sim> {
    (0..n)
        .map(|i| {
            let seed = (i + 1).to_string();
            let mut args = vec!["--speedup", "20", "--seed", seed.as_str()];
            args.extend_from_slice(extra);
            Sim::start(&args)
        })
        .collect()
}

/// A running `sluice serve`, stopped on drop.
pub struct Proxy {
    child: Child,
    /// Client of the API listener.
    pub api: Client,
    /// Client of the admin listener.
    pub admin: Client,
    /// Where stderr goes (read it when a test fails).
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
    /// The lifecycle log file.
    pub lifecycle: PathBuf,
}

impl Proxy {
    /// `sluice serve` with `args` (listeners on port 0 and a lifecycle file are added).
    pub fn start(args: &[&str]) -> Proxy {
        Self::try_start(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Proxy::start`], returning the error output when it does not come up.
    pub fn try_start(args: &[&str]) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().unwrap();
        let lifecycle = dir.path().join("lifecycle.jsonl");
        let stderr_path = dir.path().join("stderr.txt");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--lifecycle-log")
            .arg(&lifecycle)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start sluice serve");
        let line = sim::first_stdout_line(&mut child, Duration::from_secs(20)).unwrap_or_default();
        let Some(rest) = line
            .trim()
            .strip_prefix("sluice-proxy listening on http://")
        else {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            return Err(format!(
                "proxy did not start: stdout {line:?}, stderr {err}"
            ));
        };
        let (api, admin) = rest
            .split_once(" admin http://")
            .expect("listening line format");
        Ok(Proxy {
            child,
            api: Client::new(api),
            admin: Client::new(admin),
            stderr_path,
            _dir: dir,
            lifecycle,
        })
    }

    /// A proxy over `sims` with `--upstream` flags and extra args.
    pub fn over(sims: &[Sim], extra: &[&str]) -> Proxy {
        let ups: Vec<String> = sims.iter().map(|s| format!("http://{}", s.addr)).collect();
        let mut args: Vec<&str> = Vec::new();
        for u in &ups {
            args.push("--upstream");
            args.push(u);
        }
        args.extend_from_slice(extra);
        Proxy::start(&args)
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `TERM`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Lifecycle records written so far, waiting until at least `n` are there.
    pub fn records(&self, n: usize) -> Vec<Value> {
        sim::wait_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                let text = std::fs::read_to_string(&self.lifecycle).unwrap_or_default();
                let recs: Vec<Value> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str(l).expect("lifecycle line is JSON"))
                    .collect();
                if recs.len() >= n {
                    Ok(recs)
                } else {
                    Err(recs.len())
                }
            },
            |got| format!("only {got} lifecycle records, wanted {n}"),
        )
    }

    /// `/admin/state` as JSON.
    pub fn state(&self) -> Value {
        let r = self.admin.get("/admin/state");
        assert_eq!(r.status, 200);
        r.json()
    }

    /// Polls `/admin/state` until `pred` holds (bounded).
    pub fn wait_state(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        sim::wait_until(
            Duration::from_secs(15),
            Duration::from_millis(25),
            || {
                let s = self.state();
                if pred(&s) { Ok(s) } else { Err(s) }
            },
            |s| format!("timed out waiting for {what}: {s}"),
        )
    }

    /// The stderr written so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The endpoint object for `addr` in an `/admin/state` view.
pub fn endpoint_state<'a>(state: &'a Value, addr: &str) -> &'a Value {
    state["pools"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["endpoints"].as_array().unwrap().iter())
        .find(|e| e["address"] == addr)
        .unwrap_or_else(|| panic!("no endpoint {addr} in {state}"))
}

/// A small chat request body.
pub fn chat(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Sends raw bytes and returns the whole raw response (until close or timeout).
pub fn raw_exchange(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Asserts an OpenAI-shaped proxy error with `status`.
pub fn assert_proxy_error(r: &Response, status: u16) -> Value {
    assert_eq!(r.status, status, "body: {}", r.text());
    assert_eq!(
        r.header("x-sluice-error"),
        Some("true"),
        "headers: {:?}",
        r.headers
    );
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    assert!(
        !r.text().contains("127.0.0.1"),
        "error body leaks an address: {}",
        r.text()
    );
    v
}
