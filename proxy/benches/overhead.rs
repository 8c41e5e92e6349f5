//! Proxy overhead, side by side: the same fixed upstream reached directly,
//! through `sluice serve` (the release binary) and through nginx as a plain
//! reverse proxy, in one run, phases interleaved so drift hits all three.
//!
//! ```text
//! cargo build --release --bin sluice
//! cargo bench -p sluice-proxy --bench overhead             # everything
//! cargo bench -p sluice-proxy --bench overhead -- streams 9500
//! ```
//!
//! The upstream is a second copy of this program (`-- upstream PORT`) that
//! answers instantly with a fixed OpenAI-shaped body (or a short SSE stream),
//! so what is measured is the proxy, not an engine. nginx is used when it is
//! on PATH. A plain Pingora reverse proxy (its `ProxyHttp` with only an
//! `upstream_peer`, 2 threads, keep-alive pool) is a further target: the
//! floor of the framework Sluice is built on. Every phase is bounded in
//! requests and time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Semaphore;

type Body = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------- upstream

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn upstream_handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/health" => return Ok(Response::new(full("ok"))),
        "/metrics" => {
            return Ok(Response::new(full(
                "vllm:num_requests_running{model_name=\"m\"} 0\nvllm:num_requests_waiting{model_name=\"m\"} 0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\n",
            )));
        }
        _ => {}
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let len = body.len();
    let stream = memfind(&body, b"\"stream\":true");
    // Long streams for the open-streams test: `"max_tokens":1000` means one event a second.
    let long = memfind(&body, b"\"max_tokens\":1000");
    if !stream {
        let json = format!(
            r#"{{"id":"x","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{},"completion_tokens":1,"total_tokens":{}}}}}"#,
            len / 4,
            len / 4 + 1
        );
        let mut r = Response::new(full(json));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(r);
    }
    let (events, gap) = if long {
        (30u32, Duration::from_secs(1))
    } else {
        (5, Duration::from_millis(2))
    };
    let s = futures::stream::unfold(0u32, move |i| async move {
        if i > events {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        let data = if i == events {
            Bytes::from_static(b"data: [DONE]\n\n")
        } else {
            Bytes::from(format!(
                "data: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}},\"finish_reason\":null}}]}}\n\n"
            ))
        };
        Some((Ok::<_, Infallible>(Frame::data(data)), i + 1))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(s)));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    Ok(r)
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn run_upstream(port: u16) {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    println!("upstream listening on {}", l.local_addr().unwrap());
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), hyper::service::service_fn(upstream_handle))
                .await;
        });
    }
}

// ---------------------------------------------------------------- plain Pingora

/// Pingora's own reverse proxy with nothing on the request path: every
/// request goes to the one upstream over Pingora's keep-alive pool. It marks
/// what the framework costs before any of Sluice's work (body parsing,
/// token counting, routing, metrics).
struct PlainPingora(SocketAddr);

#[async_trait::async_trait]
impl pingora::proxy::ProxyHttp for PlainPingora {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut pingora::proxy::Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<pingora::upstreams::peer::HttpPeer>> {
        Ok(Box::new(pingora::upstreams::peer::HttpPeer::new(
            self.0,
            false,
            String::new(),
        )))
    }
}

fn run_plain_pingora(port: u16, upstream: SocketAddr) -> ! {
    let conf = pingora::server::configuration::ServerConf {
        threads: 2,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        upstream_keepalive_pool_size: 256,
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, PlainPingora(upstream));
    svc.add_tcp(&format!("127.0.0.1:{port}"));
    server.add_service(svc);
    server.run_forever()
}

fn start_plain_pingora(upstream: SocketAddr) -> (Proc, SocketAddr) {
    let port = free_port();
    let c = Command::new(std::env::current_exe().unwrap())
        .args(["pingora", &port.to_string(), &upstream.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "plain Pingora did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(c), addr)
}

// ---------------------------------------------------------------- processes

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM, so nginx's master takes its workers down with it.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn first_line(child: &mut Child) -> String {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    line
}

fn start_upstream() -> (Proc, SocketAddr) {
    let port = free_port();
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(["upstream", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut c);
    assert!(line.contains("listening"), "{line}");
    (Proc(c), format!("127.0.0.1:{port}").parse().unwrap())
}

fn sluice_bin() -> PathBuf {
    std::env::var_os("SLUICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/sluice")
        })
}

fn start_sluice(upstream: SocketAddr, dir: &std::path::Path) -> (Proc, SocketAddr) {
    start_sluice_bin(sluice_bin(), upstream, dir, "bench")
}

fn start_sluice_bin(
    bin: PathBuf,
    upstream: SocketAddr,
    dir: &std::path::Path,
    name: &str,
) -> (Proc, SocketAddr) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[limits]\nmax_body_bytes = 8388608\n[lifecycle]\nlog = \"off\"\n[[pools]]\nname = \"bench\"\nmodel = \"m\"\nendpoints = [\"{upstream}\"]\n[pools.routing]\npolicy = \"round_robin\"\n"
        ),
    )
    .unwrap();
    assert!(
        bin.exists(),
        "{} missing: cargo build --release --bin sluice",
        bin.display()
    );
    let mut c = Command::new(bin)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut c);
    let addr = line
        .trim()
        .strip_prefix("sluice-proxy listening on http://")
        .and_then(|r| r.split_once(' '))
        .map(|(a, _)| a.parse().unwrap())
        .unwrap_or_else(|| panic!("{line}"));
    (Proc(c), addr)
}

fn start_nginx(upstream: SocketAddr, dir: &std::path::Path) -> Option<(Proc, SocketAddr)> {
    let bin = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process on; worker_processes 2; pid {d}/nginx.pid; error_log {d}/nginx.err warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 9000; }}
http {{
  access_log off;
  client_body_temp_path {d}/cb; proxy_temp_path {d}/pt; fastcgi_temp_path {d}/ft; uwsgi_temp_path {d}/ut; scgi_temp_path {d}/st;
  client_max_body_size 10m; client_body_buffer_size 2m;
  upstream u {{ server {upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}
  }}
}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let c = Command::new(bin)
        .args(["-c", path.to_str().unwrap(), "-p", &d.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Proc(c), addr))
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// CPU seconds used so far by `pid` and its direct children (nginx workers).
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |p: &str| -> Option<(u64, u32)> {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((t, ppid))
    };
    let mut total = ticks(&pid.to_string()).map_or(0, |t| t.0);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.bytes().all(|b| b.is_ascii_digit()) {
                if let Some((t, ppid)) = ticks(&name) {
                    if ppid == pid {
                        total += t;
                    }
                }
            }
        }
    }
    // USER_HZ is 100 on Linux.
    total as f64 / 100.0
}

// ---------------------------------------------------------------- load

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(20_000)
        .build(c)
}

fn body(prompt_bytes: usize, stream: bool, max_tokens: u32) -> Bytes {
    let content = "x".repeat(prompt_bytes);
    Bytes::from(format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":{max_tokens},"stream":{stream}}}"#
    ))
}

/// Sends one request; returns (time to first body chunk, time to end).
async fn one(c: &HttpClient, addr: SocketAddr, body: Bytes) -> Option<(Duration, Duration)> {
    let t0 = Instant::now();
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .ok()?;
    let resp = c.request(req).await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let mut b = resp.into_body();
    let mut first = None;
    while let Some(f) = b.frame().await {
        let f = f.ok()?;
        if f.is_data() && first.is_none() {
            first = Some(t0.elapsed());
        }
    }
    Some((first.unwrap_or_else(|| t0.elapsed()), t0.elapsed()))
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

/// Open loop at `rate`/s for `n` requests; returns first-chunk and total latencies.
async fn open_loop(
    c: &HttpClient,
    addr: SocketAddr,
    rate: f64,
    n: usize,
    b: Bytes,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let c = c.clone();
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), one(&c, addr, b))
                .await
                .ok()
                .flatten()
        }));
    }
    let (mut first, mut total, mut failed) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        match t.await.ok().flatten() {
            Some((f, e)) => {
                first.push(f);
                total.push(e);
            }
            None => failed += 1,
        }
    }
    (first, total, failed)
}

/// Closed loop with `conc` workers for `secs`; returns requests/s.
async fn closed_loop(
    c: &HttpClient,
    addr: SocketAddr,
    conc: usize,
    secs: f64,
    b: Bytes,
) -> (f64, usize) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let c = c.clone();
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0usize, 0usize);
            while Instant::now() < end {
                match one(&c, addr, b.clone()).await {
                    Some(_) => ok += 1,
                    None => bad += 1,
                }
            }
            (ok, bad)
        }));
    }
    let (mut ok, mut bad) = (0, 0);
    for t in tasks {
        let (o, b) = t.await.unwrap();
        ok += o;
        bad += b;
    }
    (ok as f64 / secs, bad)
}

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if args.first().map(String::as_str) == Some("pingora") {
        let port = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        let up = args
            .get(2)
            .and_then(|a| a.parse().ok())
            .expect("pingora PORT UPSTREAM");
        run_plain_pingora(port, up);
    }
    if args.first().map(String::as_str) == Some("upstream") {
        let port = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        rt.block_on(run_upstream(port));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_up, up) = start_upstream();
    let (sluice_proc, sluice) = start_sluice(up, dir.path());
    let nginx = start_nginx(up, dir.path());
    let mut targets = vec![("direct", up), ("sluice", sluice)];
    let mut pids = vec![None, Some(sluice_proc.0.id())];
    if let Some((proc_, a)) = &nginx {
        targets.push(("nginx", *a));
        pids.push(Some(proc_.0.id()));
    } else {
        println!("nginx not found: throughput comparison skipped (apt-get install nginx)");
    }
    let plain = start_plain_pingora(up);
    targets.push(("pingora", plain.1));
    pids.push(Some(plain.0.0.id()));
    // `SLUICE_BASELINE_BIN=path`: an older build as one more target, for before/after in one run.
    let baseline = std::env::var_os("SLUICE_BASELINE_BIN")
        .map(|b| start_sluice_bin(PathBuf::from(b), up, dir.path(), "baseline"));
    if let Some((proc_, a)) = &baseline {
        targets.push(("baseline", *a));
        pids.push(Some(proc_.0.id()));
    }
    // `SLUICE_BENCH_TARGETS=sluice` restricts the run (for profiling one of them).
    if let Ok(keep) = std::env::var("SLUICE_BENCH_TARGETS") {
        let keep: Vec<&str> = keep.split(',').collect();
        let (t, p): (Vec<_>, Vec<_>) = targets
            .into_iter()
            .zip(pids)
            .filter(|((name, _), _)| keep.contains(name))
            .unzip();
        targets = t;
        pids = p;
    }
    let only = args.first().cloned();
    let c = client();
    rt.block_on(async {
        // Warm up connections and caches.
        for (_, a) in &targets {
            let _ = closed_loop(&c, *a, 8, 0.5, body(64, false, 8)).await;
        }
        if only.is_none() || only.as_deref() == Some("latency") {
            for (label, stream) in [("small non-streaming requests", false), ("small streams (time to first chunk)", true)] {
                println!("\n## Latency at 1000 requests/s, {label}: 3 rounds x 2000 requests per target, interleaved");
                let mut first: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
                let mut total: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
                let mut failed = vec![0; targets.len()];
                for _round in 0..3 {
                    for (i, (_, a)) in targets.iter().enumerate() {
                        let (f, t, bad) = open_loop(&c, *a, 1000.0, 2000, body(64, stream, 8)).await;
                        first[i].extend(f);
                        total[i].extend(t);
                        failed[i] += bad;
                    }
                }
                println!("| target | p50 ms | p90 ms | p99 ms | failed |");
                println!("|---|---|---|---|---|");
                let mut p = Vec::new();
                for (i, (name, _)) in targets.iter().enumerate() {
                    let v = if stream { &mut first[i] } else { &mut total[i] };
                    let (p50, p90, p99) = (pct(v, 0.5), pct(v, 0.9), pct(v, 0.99));
                    p.push((p50, p99));
                    println!("| {name} | {p50:.3} | {p90:.3} | {p99:.3} | {} |", failed[i]);
                }
                if p.len() >= 2 {
                    println!("sluice overhead vs direct: p50 +{:.3} ms, p99 +{:.3} ms", p[1].0 - p[0].0, p[1].1 - p[0].1);
                }
            }
        }
        if only.is_none() || only.as_deref() == Some("throughput") {
            println!("\n## Throughput, small non-streaming requests, closed loop, 64 connections, 3 rounds x 3 s per target");
            let mut rps = vec![Vec::new(); targets.len()];
            let mut cpu = vec![(0.0f64, 0.0f64); targets.len()];
            for _ in 0..3 {
                for (i, (_, a)) in targets.iter().enumerate() {
                    let before = pids[i].map(cpu_seconds);
                    let (r, bad) = closed_loop(&c, *a, 64, 3.0, body(64, false, 8)).await;
                    assert_eq!(bad, 0, "failed requests during throughput");
                    if let (Some(b), Some(pid)) = (before, pids[i]) {
                        cpu[i].0 += cpu_seconds(pid) - b;
                        cpu[i].1 += r * 3.0;
                    }
                    rps[i].push(r);
                }
            }
            println!("| target | requests/s (per round) | best | proxy CPU per request |");
            println!("|---|---|---|---|");
            for (i, (name, _)) in targets.iter().enumerate() {
                let best = rps[i].iter().cloned().fold(0.0, f64::max);
                let rounds: Vec<String> = rps[i].iter().map(|r| format!("{r:.0}")).collect();
                let per = if cpu[i].1 > 0.0 {
                    format!("{:.1} µs", cpu[i].0 / cpu[i].1 * 1e6)
                } else {
                    "-".to_string()
                };
                println!("| {name} | {} | {best:.0} | {per} |", rounds.join(", "));
            }
        }
        if only.is_none() || only.as_deref() == Some("bodies") {
            println!("\n## 1 MiB vs 1 KiB prompt, 300 requests each at 50 requests/s, interleaved");
            let sizes = [("1 KiB", 1024usize), ("1 MiB", 1 << 20)];
            println!("| prompt | target | p50 ms | p99 ms |");
            println!("|---|---|---|---|");
            let mut added = Vec::new();
            for (label, size) in sizes {
                let b = body(size, false, 8);
                let mut res = Vec::new();
                for (name, a) in targets.iter().take(2) {
                    let (_, mut t, bad) = open_loop(&c, *a, 50.0, 300, b.clone()).await;
                    assert_eq!(bad, 0);
                    let (p50, p99) = (pct(&mut t, 0.5), pct(&mut t, 0.99));
                    println!("| {label} | {name} | {p50:.3} | {p99:.3} |");
                    res.push(p50);
                }
                if res.len() >= 2 {
                    added.push(res[1] - res[0]);
                }
            }
            if added.len() == 2 {
                println!("proxy-added p50: 1 KiB +{:.3} ms, 1 MiB +{:.3} ms; a 1 MiB prompt adds {:.3} ms over a 1 KiB one", added[0], added[1], added[1] - added[0]);
            }
        }
        if only.as_deref() == Some("streams") || only.is_none() {
            let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(9_500);
            println!("\n## {n} concurrent open streams through sluice (one event per second, 30 s each)");
            let pid = sluice_proc.0.id();
            let (base, _) = rss_kib(pid);
            let gate = Arc::new(Semaphore::new(500));
            let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = Vec::new();
            let t0 = Instant::now();
            for _ in 0..n {
                let c = c.clone();
                let gate = Arc::clone(&gate);
                let opened = Arc::clone(&opened);
                tasks.push(tokio::spawn(async move {
                    let permit = gate.acquire_owned().await.ok()?;
                    let req = Request::post(format!("http://{sluice}/v1/chat/completions"))
                        .body(Full::new(body(64, true, 1000)))
                        .ok()?;
                    let resp = c.request(req).await.ok()?;
                    let mut b = resp.into_body();
                    let first = b.frame().await?.ok()?;
                    drop(permit);
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = first;
                    // Hold the stream open, reading events, until it ends or 40 s pass.
                    let _ = tokio::time::timeout(Duration::from_secs(40), async { while b.frame().await.is_some() {} }).await;
                    Some(())
                }));
            }
            while opened.load(std::sync::atomic::Ordering::Relaxed) < n && t0.elapsed() < Duration::from_secs(25) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let open = opened.load(std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (rss, hwm) = rss_kib(pid);
            println!("streams open: {open}/{n} after {:.1} s", t0.elapsed().as_secs_f64());
            println!(
                "sluice RSS: idle {:.1} MiB, with streams {:.1} MiB (peak {:.1} MiB) = {:.1} KiB per stream",
                base as f64 / 1024.0,
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0,
                (rss.saturating_sub(base)) as f64 / open.max(1) as f64
            );
            for t in tasks {
                t.abort();
            }
        }
    });
    drop(nginx);
}
