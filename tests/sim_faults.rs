//! `sluice sim` fault injection, from flags and from `/admin/faults`.

mod sim_common;

use std::time::{Duration, Instant};

use serde_json::json;
use sim_common::{Event, Sim};

const MODEL: &str = "llama-3.1-8b";

fn completion(max_tokens: u32, stream: bool) -> serde_json::Value {
    json!({"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": true, "stream": stream})
}

#[test]
fn error_rate_from_a_flag_answers_500s() {
    let sim = Sim::start(&["--speedup", "100", "--fault-error-rate", "1"]);
    for _ in 0..3 {
        let r = sim.post("/v1/completions", &completion(2, false));
        assert_eq!(r.status, 500);
        let v = r.json();
        assert_eq!(v["error"]["code"], 500);
        assert_eq!(v["error"]["type"], "InternalServerError");
    }
    // Health is not part of the fault.
    assert_eq!(sim.get("/health").status, 200);
    // Half the requests fail at rate 0.5, deterministically per seed.
    let r = sim.post("/admin/faults", &json!({"error_rate": 0.5}));
    assert_eq!(r.status, 200, "{}", r.text());
    let fails = (0..200)
        .filter(|_| sim.post("/v1/completions", &completion(1, false)).status == 500)
        .count();
    assert!((60..140).contains(&fails), "{fails}");
}

#[test]
fn added_latency_delays_answers() {
    let sim = Sim::start(&["--speedup", "100", "--fault-latency-ms", "300"]);
    let t = Instant::now();
    let r = sim.post("/v1/completions", &completion(1, false));
    assert_eq!(r.status, 200);
    // A lower bound only: the fault sleeps at least this long.
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(sim.get("/admin/faults").json()["latency_ms"], 300);
}

#[test]
fn stall_accepts_but_never_answers_until_lifted() {
    let sim = Sim::start(&["--speedup", "100"]);
    assert_eq!(
        sim.post("/admin/faults", &json!({"stall": true})).status,
        200
    );
    let mut s = sim.send("POST", "/v1/completions", Some(&completion(3, false)));
    // The request is queued in the engine...
    sim.wait_metric("vllm:num_requests_waiting{", Duration::from_secs(20), |v| {
        v == 1.0
    });
    // ...and nothing comes back while the stall lasts.
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let err = std::io::Read::read(&mut s, &mut byte).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    // A stream stalls mid-way too: lift, read a token, stall again.
    assert_eq!(sim.request("DELETE", "/admin/faults", None).status, 200);
    let mut stream = sim.stream("/v1/completions", &completion(100_000, true));
    assert!(matches!(stream.next_event(), Event::Data(_)));
    assert_eq!(
        sim.post("/admin/faults", &json!({"stall": true})).status,
        200
    );
    let before = sim.metric("vllm:generation_tokens_total{");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sim.metric("vllm:generation_tokens_total{"), before);
    assert_eq!(sim.request("DELETE", "/admin/faults", None).status, 200);
    assert!(matches!(stream.next_event(), Event::Data(_)));
}

#[test]
fn drop_cuts_streams_mid_way() {
    let sim = Sim::start(&[
        "--speedup",
        "100",
        "--fault-drop-rate",
        "1",
        "--fault-drop-after-tokens",
        "2",
    ]);
    let mut s = sim.stream("/v1/completions", &completion(50, true));
    assert_eq!(s.status, 200);
    let (events, end) = s.collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| e != "[DONE]"));
    assert_eq!(
        end,
        Event::Broken,
        "the connection breaks without a clean end"
    );
    // The engine does not keep generating for the dropped client.
    sim.wait_metric("vllm:num_requests_running{", Duration::from_secs(20), |v| {
        v == 0.0
    });
    // Non-streaming requests are unaffected.
    assert_eq!(
        sim.post("/v1/completions", &completion(3, false)).status,
        200
    );
}

#[test]
fn health_503_and_slow_start() {
    let sim = Sim::start(&["--speedup", "100"]);
    assert_eq!(
        sim.post("/admin/faults", &json!({"health_503": true}))
            .status,
        200
    );
    assert_eq!(sim.get("/health").status, 503);
    assert_eq!(
        sim.post("/v1/completions", &completion(1, false)).status,
        200
    );

    assert_eq!(
        sim.post("/admin/faults", &json!({"slow_start_ms": 600000}))
            .status,
        200
    );
    assert_eq!(sim.get("/health").status, 503);
    let r = sim.post("/v1/completions", &completion(1, false));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], 503);

    // A short slow start ends by itself.
    assert_eq!(
        sim.post("/admin/faults", &json!({"slow_start_ms": 100}))
            .status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim.get("/health").status != 200 {
        assert!(Instant::now() < deadline, "slow start never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        sim.post("/v1/completions", &completion(1, false)).status,
        200
    );
}

#[test]
fn slow_start_from_a_flag_and_bad_fault_bodies() {
    let sim = Sim::start(&["--speedup", "100", "--fault-slow-start-ms", "600000"]);
    assert_eq!(sim.get("/health").status, 503);
    assert_eq!(
        sim.post("/admin/faults", &json!({"error_rate": 3})).status,
        400
    );
    assert_eq!(
        sim.post("/admin/faults", &json!({"nonsense": true})).status,
        400
    );
    assert_eq!(sim.request("DELETE", "/admin/faults", None).status, 200);
    assert_eq!(sim.get("/health").status, 200);
}
