//! Driving a workload against a target: open loop (arrival times honoured
//! whatever the server does) or closed loop (a fixed number of users, each
//! sending its next request when the previous one finishes).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{Semaphore, mpsc, watch};

use super::client::ApiClient;
use super::record::RequestRecord;
use crate::error::{BenchError, Result};
use crate::workload::WorkloadRequest;
use crate::workload::arrival::{Arrival, ArrivalClock};

/// How requests are paced.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadMode {
    /// Send at arrival times: the workload's own (scaled), or drawn at `rate`.
    Open {
        /// Requests per second (gamma arrivals with `burstiness`); `None` replays the workload's times.
        rate: Option<f64>,
        /// Gamma shape for drawn arrivals (1 = Poisson).
        burstiness: f64,
        /// Cap on requests in flight (later arrivals wait for a slot, as `--max-concurrency` in vLLM).
        max_concurrency: Option<usize>,
    },
    /// `concurrency` users send back to back.
    Closed {
        /// Number of users.
        concurrency: usize,
    },
}

/// What to send and for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Pacing.
    pub mode: LoadMode,
    /// Requests to send (the workload is cycled when larger); default: the workload once,
    /// or unbounded when a duration is given.
    pub requests: Option<usize>,
    /// Stop sending new requests after this long.
    pub duration: Option<Duration>,
    /// Factor on the workload's arrival offsets (open loop without a rate).
    pub time_scale: f64,
    /// Seed for drawn arrivals.
    pub seed: u64,
    /// Bound on one request, send to last byte.
    pub request_timeout: Duration,
    /// Draw a progress bar on stderr (hidden when it is not a terminal).
    pub progress: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            mode: LoadMode::Open {
                rate: None,
                burstiness: 1.0,
                max_concurrency: None,
            },
            requests: None,
            duration: None,
            time_scale: 1.0,
            seed: 0,
            request_timeout: Duration::from_secs(600),
            progress: false,
        }
    }
}

/// A finished (or interrupted) run.
#[derive(Debug, Clone)]
pub struct LoadOutput {
    /// One record per request sent, in completion order.
    pub records: Vec<RequestRecord>,
    /// First send to last completion, seconds (the benchmark duration).
    pub duration_s: f64,
    /// Stopped by the stop signal before finishing.
    pub interrupted: bool,
}

/// Most requests one run may send.
const MAX_RUN_REQUESTS: usize = 50_000_000;

fn validate(cfg: &LoadConfig, workload: &[WorkloadRequest]) -> Result<usize> {
    if workload.is_empty() {
        return Err(BenchError::invalid("load", "the workload is empty"));
    }
    if !(cfg.time_scale.is_finite() && cfg.time_scale > 0.0) {
        return Err(BenchError::invalid("load", "--time-scale must be > 0"));
    }
    match cfg.mode {
        LoadMode::Open {
            rate,
            burstiness,
            max_concurrency,
        } => {
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                return Err(BenchError::invalid("load", "--rate must be > 0"));
            }
            if !(burstiness.is_finite() && burstiness > 0.0) {
                return Err(BenchError::invalid("load", "--burstiness must be > 0"));
            }
            if max_concurrency == Some(0) {
                return Err(BenchError::invalid(
                    "load",
                    "--max-concurrency must be at least 1",
                ));
            }
        }
        LoadMode::Closed { concurrency: 0 } => {
            return Err(BenchError::invalid(
                "load",
                "--concurrency must be at least 1",
            ));
        }
        LoadMode::Closed { .. } => {}
    }
    let total = match (cfg.requests, cfg.duration) {
        (Some(0), _) => return Err(BenchError::invalid("load", "--requests must be at least 1")),
        (Some(n), _) => n,
        (None, Some(_)) => MAX_RUN_REQUESTS,
        (None, None) => workload.len(),
    };
    Ok(total.min(MAX_RUN_REQUESTS))
}

/// Everything a request task needs.
struct Shared {
    client: ApiClient,
    workload: Vec<WorkloadRequest>,
    t0: Instant,
    timeout: Duration,
    stop: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<RequestRecord>,
}

impl Shared {
    /// The `i`-th request of the cycled workload and its record id.
    fn nth(&self, i: usize) -> (&WorkloadRequest, String) {
        let n = self.workload.len();
        let req = &self.workload[i % n];
        let id = if i < n {
            req.id.clone()
        } else {
            format!("{}#{}", req.id, i / n)
        };
        (req, id)
    }

    /// Sends request `i` now and records it; cancellation and timeout give unsuccessful records.
    async fn run_one(&self, i: usize, scheduled_s: f64) {
        let (req, id) = self.nth(i);
        let (body, prompt_tokens) = self.client.body(req);
        let mut rec = RequestRecord::for_request(req, id, scheduled_s, prompt_tokens);
        let start = Instant::now();
        rec.start_s = start.duration_since(self.t0).as_secs_f64();
        let mut stop = self.stop.clone();
        let template = rec.clone();
        let rec = tokio::select! {
            r = tokio::time::timeout(self.timeout, self.client.send(req, body, rec, start)) => match r {
                Ok(rec) => rec,
                Err(_) => failed(template, start, format!("timed out after {:?}", self.timeout)),
            },
            _ = stop.wait_for(|s| *s) => failed(template, start, "cancelled".into()),
        };
        // The receiver only goes away when the run is over.
        let _ = self.tx.send(rec);
    }
}

fn failed(mut rec: RequestRecord, start: Instant, error: String) -> RequestRecord {
    rec.latency_s = start.elapsed().as_secs_f64();
    rec.success = false;
    rec.error = Some(error);
    rec
}

/// Runs `workload` against `client` as `cfg` says until done, the duration
/// ends, or `stop` turns true (in-flight requests are then cancelled and recorded).
pub async fn run_load(
    client: ApiClient,
    workload: Vec<WorkloadRequest>,
    cfg: &LoadConfig,
    stop: watch::Receiver<bool>,
) -> Result<LoadOutput> {
    let total = validate(cfg, &workload)?;
    let mut workload = workload;
    if matches!(cfg.mode, LoadMode::Open { rate: None, .. }) {
        workload.sort_by(|a, b| a.arrival_ms.total_cmp(&b.arrival_ms));
    }
    let pb = if cfg.progress {
        let pb = if total < MAX_RUN_REQUESTS {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::no_length()
        };
        if let Ok(style) = ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} {per_sec} {msg}",
        ) {
            pb.set_style(style);
        }
        pb
    } else {
        ProgressBar::hidden()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        client,
        workload,
        t0,
        timeout: cfg.request_timeout,
        stop: stop.clone(),
        tx,
    });
    let deadline = cfg.duration.map(|d| t0 + d);
    let dispatcher = match cfg.mode.clone() {
        LoadMode::Open {
            rate,
            burstiness,
            max_concurrency,
        } => {
            let arrival = match rate {
                Some(rate) => Arrival::Gamma { rate, burstiness },
                None => Arrival::Replay {
                    path: Default::default(),
                    time_scale: cfg.time_scale,
                },
            };
            let offsets = shared.workload.iter().map(|r| r.arrival_ms).collect();
            let clock = ArrivalClock::new(&arrival, Some(offsets))
                .map_err(|m| BenchError::invalid("load", m))?;
            tokio::spawn(open_loop(
                shared,
                clock,
                StdRng::seed_from_u64(cfg.seed),
                total,
                deadline,
                max_concurrency,
            ))
        }
        LoadMode::Closed { concurrency } => {
            tokio::spawn(closed_loop(shared, concurrency, total, deadline))
        }
    };
    let mut records = Vec::with_capacity(total.min(1 << 20));
    let mut ok = 0usize;
    while let Some(rec) = rx.recv().await {
        ok += usize::from(rec.success);
        pb.inc(1);
        if records.len() % 64 == 0 {
            pb.set_message(format!("ok {ok}"));
        }
        records.push(rec);
    }
    // Every sender is gone, so the dispatcher has returned.
    let _ = dispatcher.await;
    pb.finish_and_clear();
    let duration_s = records
        .iter()
        .map(|r| r.start_s + r.latency_s)
        .fold(0.0, f64::max);
    Ok(LoadOutput {
        records,
        duration_s,
        interrupted: *stop.borrow(),
    })
}

async fn open_loop(
    shared: Arc<Shared>,
    mut clock: ArrivalClock,
    mut rng: StdRng,
    total: usize,
    deadline: Option<Instant>,
    max_concurrency: Option<usize>,
) {
    let slots = max_concurrency.map(|n| Arc::new(Semaphore::new(n)));
    let mut stop = shared.stop.clone();
    for i in 0..total {
        let at_ms = clock.next_ms(&mut rng);
        let at = shared.t0 + Duration::from_secs_f64(at_ms / 1000.0);
        if deadline.is_some_and(|d| at > d) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let shared = shared.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let _permit = match slots {
                Some(s) => {
                    let mut stop = shared.stop.clone();
                    tokio::select! {
                        p = s.acquire_owned() => p.ok(),
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                None => None,
            };
            shared.run_one(i, at_ms / 1000.0).await;
        });
    }
}

async fn closed_loop(
    shared: Arc<Shared>,
    concurrency: usize,
    total: usize,
    deadline: Option<Instant>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut users = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(total) {
        let shared = shared.clone();
        let next = next.clone();
        users.spawn(async move {
            loop {
                if *shared.stop.borrow() || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let scheduled = shared.t0.elapsed().as_secs_f64();
                shared.run_one(i, scheduled).await;
            }
        });
    }
    while users.join_next().await.is_some() {}
}
