//! Graceful shutdown of the real `sluice serve` in front of a real `sluice
//! sim`, as Kubernetes and compose stop it: on SIGTERM `/readyz` answers 503
//! at once while the admin listener keeps serving, the API listener closes,
//! a stream in flight runs to its end, then the process exits 0. With a
//! short `drain_timeout_ms` it exits at the deadline instead of waiting for
//! a stream that would outlast it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "deploy_common/mod.rs"]
mod deploy;
#[path = "sim_common/mod.rs"]
mod sim;

use std::net::TcpStream;
use std::time::Duration;

use deploy::Serve;
use serde_json::json;
use sim::{Event, Sim, wait_until};

/// A proxy over `sim` with extra `[server]` keys.
fn serve(sim: &Sim, server_extra: &str) -> Serve {
    Serve::start(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_extra}\n\
             [[pools]]\nname = \"chat\"\nmodel = \"llama-3.1-8b\"\nendpoints = [\"{}\"]\n",
            sim.addr
        ),
        &[],
    )
}

/// A streamed chat request of exactly `tokens` output tokens.
fn long_chat(tokens: u32) -> serde_json::Value {
    json!({
        "model": "llama-3.1-8b",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": tokens,
        "ignore_eos": true,
        "stream": true,
    })
}

#[test]
fn sigterm_fails_readiness_closes_the_listener_and_lets_the_stream_finish() {
    let sim = Sim::start(&["--speedup", "20", "--seed", "1"]);
    let mut proxy = serve(&sim, "drain_timeout_ms = 120000");
    proxy.wait_ready();

    let mut stream = proxy.api.stream("/v1/chat/completions", &long_chat(300));
    assert_eq!(stream.status, 200);
    let Event::Data(first) = stream.next_event() else {
        panic!("no first event");
    };
    assert!(first.contains("chat.completion.chunk"), "{first}");
    // The engine stops stepping: the stream stays in flight, however fast
    // or slow this machine is, until the checks below are done.
    assert_eq!(
        sim.post("/admin/faults", &json!({"stall": true})).status,
        200
    );

    proxy.signal("TERM");
    // Readiness fails first, on the admin listener that keeps serving.
    let why = wait_until(
        Duration::from_secs(15),
        Duration::from_millis(10),
        || {
            let r = proxy.admin.get("/readyz");
            if r.status == 503 {
                Ok(r.text())
            } else {
                Err(r.status)
            }
        },
        |s| format!("/readyz still {s} after SIGTERM"),
    );
    assert!(why.contains("draining"), "{why}");
    assert_eq!(proxy.admin.get("/healthz").status, 200);
    // The API listener closes: new connections are refused.
    wait_until(
        Duration::from_secs(15),
        Duration::from_millis(10),
        || match TcpStream::connect(&proxy.api.addr) {
            Err(_) => Ok(()),
            Ok(_) => Err(()),
        },
        |_| "the API listener still accepts after SIGTERM".to_string(),
    );
    assert!(proxy.running(), "the proxy exited with a stream in flight");

    // The stream in flight runs to its end once the engine steps again.
    let lift = sim.request("DELETE", "/admin/faults", None);
    assert!(lift.status < 300, "lifting the stall: {}", lift.status);
    let (rest, end) = stream.collect();
    assert_eq!(end, Event::End, "the stream was cut");
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let tokens = 1 + rest
        .iter()
        .filter(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\""))
        .count();
    assert!(tokens >= 300, "only {tokens} content chunks arrived");

    // Then the process exits cleanly.
    let status = proxy.wait_exit();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn drain_deadline_bounds_the_wait_for_a_stream() {
    // 20,000 tokens at real-time speed: minutes, far beyond the 200 ms deadline.
    let sim = Sim::start(&["--speedup", "1", "--seed", "2"]);
    let mut proxy = serve(&sim, "drain_timeout_ms = 200");
    proxy.wait_ready();

    let mut stream = proxy.api.stream("/v1/chat/completions", &long_chat(20_000));
    assert_eq!(stream.status, 200);
    assert!(matches!(stream.next_event(), Event::Data(_)));

    proxy.signal("TERM");
    let status = proxy.wait_exit();
    assert!(status.success(), "exit status {status}");
    // The stream was cut at the deadline, not finished.
    let (rest, end) = stream.collect();
    assert!(
        end == Event::Broken || rest.last().map(String::as_str) != Some("[DONE]"),
        "the stream finished before the deadline: {} events",
        rest.len()
    );
}

#[test]
fn a_second_sigterm_during_the_drain_exits_at_once() {
    let sim = Sim::start(&["--speedup", "1", "--seed", "3"]);
    let mut proxy = serve(&sim, "drain_timeout_ms = 600000");
    proxy.wait_ready();

    let mut stream = proxy.api.stream("/v1/chat/completions", &long_chat(20_000));
    assert_eq!(stream.status, 200);
    assert!(matches!(stream.next_event(), Event::Data(_)));

    proxy.signal("TERM");
    // Draining (the first signal was seen), with a 10-minute deadline ahead...
    wait_until(
        Duration::from_secs(15),
        Duration::from_millis(10),
        || {
            let r = proxy.admin.get("/readyz");
            if r.status == 503 {
                Ok(())
            } else {
                Err(r.status)
            }
        },
        |s| format!("/readyz still {s} after SIGTERM"),
    );
    assert!(proxy.running());
    // ...a second SIGTERM ends it now.
    proxy.signal("TERM");
    let status = proxy.wait_exit();
    assert!(status.success(), "exit status {status}");
    let (_, end) = stream.collect();
    assert_eq!(end, Event::Broken, "the stream was not cut");
}
