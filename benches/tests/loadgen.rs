//! The load generator against a small in-test OpenAI-like server.
#![allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sluice_bench::arms::summarize_by_arm;
use sluice_bench::loadgen::{ApiClient, LoadConfig, LoadMode, run_load};
use sluice_bench::metrics::{Slo, summarize};
use sluice_bench::workload::{Content, Message, WorkloadRequest};
use tokio::net::TcpListener;
use tokio::sync::watch;

const TOKEN_GAP: Duration = Duration::from_millis(2);

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

/// Like a proxy running an experiment, every response to a request with an
/// `x-session-id` carries `x-sluice-arm` — here the echo `s=<session>;k=<bearer
/// key>;t=<x-tenant>` of what the client sent, so a test can check all three.
async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let echo = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let arm = echo("x-session-id").map(|s| {
        let key = echo("authorization").unwrap_or_default();
        let key = key.trim_start_matches("Bearer ").to_string();
        format!("s={s};k={key};t={}", echo("x-tenant").unwrap_or_default())
    });
    let mut resp = respond(req).await?;
    if let Some(arm) = arm {
        resp.headers_mut()
            .insert("x-sluice-arm", arm.parse().unwrap());
    }
    Ok(resp)
}

async fn respond(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/v1/models" {
        return Ok(full(
            200,
            json!({"object": "list", "data": [{"id": "mock-model"}]}),
        ));
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let n = v["max_tokens"].as_u64().unwrap();
    let chat = v.get("messages").is_some();
    match v["user"].as_str() {
        Some("error") => {
            return Ok(full(
                503,
                json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": 503}}),
            ));
        }
        Some("stall") => tokio::time::sleep(Duration::from_secs(3600)).await,
        _ => {}
    }
    if v["stream"] != json!(true) {
        tokio::time::sleep(TOKEN_GAP * n as u32).await;
        return Ok(full(
            200,
            json!({"choices": [{"message": {"role": "assistant", "content": "x ".repeat(n as usize)}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 4}}}),
        ));
    }
    // Events are cut in two frames each, so the client must reassemble them.
    let stream = futures::stream::unfold(0u64, move |i| async move {
        if i > n + 1 {
            return None;
        }
        let event = if i == 0 {
            if chat {
                json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}).to_string()
            } else {
                String::new()
            }
        } else if i <= n {
            tokio::time::sleep(TOKEN_GAP).await;
            if chat {
                json!({"choices": [{"delta": {"content": "tok"}}]}).to_string()
            } else {
                json!({"choices": [{"text": "tok"}]}).to_string()
            }
        } else {
            json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n}})
                .to_string()
        };
        let mut text = if event.is_empty() {
            String::new()
        } else {
            format!("data: {event}\n\n")
        };
        if i == n + 1 {
            text.push_str("data: [DONE]\n\n");
        }
        let (a, b) = text.split_at(text.len() / 2);
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from(a.to_string()))),
            Ok(Frame::data(Bytes::from(b.to_string()))),
        ];
        Some((futures::stream::iter(frames), i + 1))
    });
    use futures::StreamExt;
    let body = StreamBody::new(stream.flatten());
    Ok(Response::new(BodyExt::boxed(body)))
}

async fn mock_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                    .await;
            });
        }
    });
    addr
}

fn workload(n: usize, tenant: &str, stream: bool, chat: bool, gap_ms: f64) -> Vec<WorkloadRequest> {
    (0..n)
        .map(|i| {
            let content = Content::Text(format!("question number {i}"));
            WorkloadRequest {
                id: format!("r{i}"),
                arrival_ms: i as f64 * gap_ms,
                tenant: tenant.into(),
                class: Some("c".into()),
                prefix_group: None,
                messages: chat.then(|| {
                    vec![Message {
                        role: "user".into(),
                        content: content.clone(),
                    }]
                }),
                prompt: (!chat).then_some(content),
                max_tokens: 5 + (i % 4) as u32,
                stream,
                ignore_eos: true,
            }
        })
        .collect()
}

fn no_stop() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    std::mem::forget(tx);
    rx
}

#[tokio::test]
async fn open_loop_streams_and_times_every_token() {
    let addr = mock_server().await;
    let client = ApiClient::connect(&format!("http://{addr}"), None, None)
        .await
        .unwrap();
    assert_eq!(client.model, "mock-model");
    for chat in [true, false] {
        let w = workload(30, "t", true, chat, 5.0);
        let out = run_load(client.clone(), w.clone(), &LoadConfig::default(), no_stop())
            .await
            .unwrap();
        assert_eq!(out.records.len(), 30);
        assert!(!out.interrupted);
        for r in &out.records {
            assert!(r.success, "{r:?}");
            let want = w.iter().find(|q| q.id == r.id).unwrap();
            assert_eq!(r.output_tokens, want.max_tokens);
            assert_eq!(r.prompt_tokens, 10, "usage wins over the estimate");
            // The first token is timed once; every later one is a chunk.
            assert_eq!(r.chunk_times_s.len() as u32, want.max_tokens - 1);
            assert!(r.ttft_s.unwrap() >= TOKEN_GAP.as_secs_f64());
            let mut times = vec![r.ttft_s.unwrap()];
            times.extend(&r.chunk_times_s);
            assert!(
                times.windows(2).all(|w| w[0] <= w[1]) && r.latency_s >= times[times.len() - 1]
            );
            // Arrival times are honoured: sent no earlier than scheduled.
            assert!(r.start_s + 1e-3 >= r.scheduled_s);
        }
        let s = summarize(
            &out.records,
            out.duration_s,
            &Slo {
                ttft_ms: Some(60_000.0),
                ..Default::default()
            },
        );
        assert_eq!(s.completed, 30);
        assert_eq!(
            s.total_output_tokens,
            w.iter().map(|r| u64::from(r.max_tokens)).sum::<u64>()
        );
        let itls: usize = out.records.iter().map(|r| r.itls().len()).sum();
        assert_eq!(itls as u64, s.total_output_tokens - 30);
        assert!((s.request_goodput.unwrap() - s.request_throughput).abs() < 1e-9);
        // The schedule spans 145 ms; the run cannot be shorter.
        assert!(out.duration_s >= 0.145);
    }
}

#[tokio::test]
async fn closed_loop_cycles_the_workload_without_streaming() {
    let addr = mock_server().await;
    let client = ApiClient::connect(&format!("http://{addr}"), Some("m".into()), None)
        .await
        .unwrap();
    let cfg = LoadConfig {
        mode: LoadMode::Closed { concurrency: 4 },
        requests: Some(22),
        ..Default::default()
    };
    let out = run_load(
        client,
        workload(5, "t", false, true, 1000.0),
        &cfg,
        no_stop(),
    )
    .await
    .unwrap();
    assert_eq!(out.records.len(), 22);
    assert!(
        out.records
            .iter()
            .all(|r| r.success && r.cached_tokens == Some(4))
    );
    assert!(out.records.iter().any(|r| r.id == "r1#4"));
    // Closed loop ignores the workload's one-second gaps.
    assert!(out.duration_s < 5.0);
}

#[tokio::test]
async fn rate_overrides_arrivals_and_errors_are_recorded() {
    let addr = mock_server().await;
    let client = ApiClient::connect(&format!("http://{addr}"), None, None)
        .await
        .unwrap();
    let cfg = LoadConfig {
        mode: LoadMode::Open {
            rate: Some(500.0),
            burstiness: 1.0,
            max_concurrency: Some(3),
        },
        requests: Some(12),
        ..Default::default()
    };
    let out = run_load(
        client,
        workload(4, "error", true, true, 10_000.0),
        &cfg,
        no_stop(),
    )
    .await
    .unwrap();
    assert_eq!(out.records.len(), 12);
    for r in &out.records {
        assert!(!r.success);
        assert_eq!(r.status, 503);
        assert_eq!(r.error.as_deref(), Some("HTTP 503: overloaded"));
    }
    assert!(
        out.duration_s < 5.0,
        "the 10 s gaps were replaced by the rate"
    );
}

#[tokio::test]
async fn stop_cancels_in_flight_requests_and_keeps_their_records() {
    let addr = mock_server().await;
    let client = ApiClient::connect(&format!("http://{addr}"), None, None)
        .await
        .unwrap();
    let (tx, rx) = watch::channel(false);
    let w = workload(6, "stall", true, true, 0.0);
    let t = Instant::now();
    let run = tokio::spawn(async move { run_load(client, w, &LoadConfig::default(), rx).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(true).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(out.interrupted);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(out.records.len(), 6);
    assert!(
        out.records
            .iter()
            .all(|r| !r.success && r.error.as_deref() == Some("cancelled"))
    );
}

#[tokio::test]
async fn bad_targets_fail_clearly() {
    assert!(
        ApiClient::connect("https://127.0.0.1:1", Some("m".into()), None)
            .await
            .is_err()
    );
    let err = ApiClient::connect("http://127.0.0.1:1", None, None)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/v1/models"), "{err}");
}

#[tokio::test]
async fn arms_sessions_and_tenant_keys_go_both_ways() {
    let addr = mock_server().await;
    let keys = [("error".to_string(), "k-error".to_string())].into();
    let client = ApiClient::connect(&format!("http://{addr}"), None, Some("k-default".into()))
        .await
        .unwrap()
        .with_session_header(Some("x-session-id".parse().unwrap()))
        .with_tenant_header(Some("x-tenant".parse().unwrap()))
        .with_tenant_keys(keys);
    // Streamed chat in two conversations, unstreamed completions without a group,
    // and a tenant whose every request gets a 503.
    let mut w = workload(6, "t", true, true, 1.0);
    for (i, r) in w.iter_mut().enumerate() {
        r.prefix_group = Some(format!("conv-{}", i % 2));
    }
    w.extend(
        workload(3, "t", false, false, 1.0)
            .into_iter()
            .map(|mut r| {
                r.id = format!("solo-{}", r.id);
                r
            }),
    );
    w.extend(
        workload(2, "error", true, true, 1.0)
            .into_iter()
            .map(|mut r| {
                r.id = format!("err-{}", r.id);
                r
            }),
    );
    let out = run_load(client, w, &LoadConfig::default(), no_stop())
        .await
        .unwrap();
    assert_eq!(out.records.len(), 11);
    for r in &out.records {
        let session = r.prefix_group.clone().unwrap_or_else(|| r.id.clone());
        let key = if r.tenant == "error" {
            "k-error"
        } else {
            "k-default"
        };
        let want = format!("s={session};k={key};t={}", r.tenant);
        assert_eq!(r.arm.as_deref(), Some(want.as_str()), "{r:?}");
        assert_eq!(r.success, r.tenant != "error", "{r:?}");
    }
    // Per arm: one summary per distinct arm, over that arm's records only.
    let arms = summarize_by_arm(&out.records, out.duration_s, &Slo::default());
    assert_eq!(arms.len(), 2 + 3 + 2);
    assert_eq!(arms["s=conv-0;k=k-default;t=t"].completed, 3);
    assert_eq!(arms["s=err-r0;k=k-error;t=error"].failed, 1);
    assert!(arms["s=solo-r1;k=k-default;t=t"].ttft.mean_ms > 0.0);
}
