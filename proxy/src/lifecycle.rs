//! One JSON line per request: who, what shape, where it went and why, and
//! what happened when.
//!
//! Records are handed to a writer thread over a bounded channel so a slow
//! disk never stalls a request; when the channel is full the record is
//! dropped and counted (`sluice_lifecycle_dropped_total`).

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::ProxyError;
use crate::metrics::Metrics;

/// Records the writer may fall behind by before dropping.
const QUEUE: usize = 65_536;

/// The lifecycle record of one request. Timestamps are Unix milliseconds
/// (fractional); a missing one means the request never reached that point.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// `x-request-id`, from the client or generated.
    pub request_id: String,
    /// Tenant (`default` until API keys are configured).
    pub tenant: String,
    /// API: `chat`, `completions`, `embeddings`, or the path for others.
    pub api: String,
    /// Requested model.
    pub model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Request class.
    pub class: Option<String>,
    /// Pool.
    pub pool: Option<String>,
    /// Final endpoint (`ip:port`; internal, so logged but never sent to clients).
    pub endpoint: Option<String>,
    /// Routing policy that chose.
    pub policy: Option<&'static str>,
    /// Experiment arm, when the proxy runs as one arm of an A/B test.
    pub arm: Option<String>,
    /// Why the policy chose it (`rotation`, `prefix_hit`, `balance`, ...).
    pub reason: Option<&'static str>,
    /// Prompt blocks the policy believed cached at the endpoint.
    pub matched_blocks: Option<u32>,
    /// Prompt tokens (from upstream usage when reported, else the proxy's count).
    pub prompt_tokens: Option<u32>,
    /// Prompt tokens served from the engine's prefix cache (upstream usage).
    pub cached_tokens: Option<u32>,
    /// Output tokens (upstream usage).
    pub output_tokens: Option<u32>,
    /// Output tokens planned for (`max_tokens` or the class default).
    pub max_tokens: Option<u32>,
    /// Request head read.
    pub arrival_ms: f64,
    /// Routing decision made.
    pub routed_ms: Option<f64>,
    /// Request written to the upstream.
    pub upstream_sent_ms: Option<f64>,
    /// Upstream response head received.
    pub first_byte_ms: Option<f64>,
    /// First token-carrying event (streaming).
    pub first_token_ms: Option<f64>,
    /// Last token-carrying event (streaming).
    pub last_token_ms: Option<f64>,
    /// Last byte sent to the client (or the request abandoned).
    pub end_ms: Option<f64>,
    /// HTTP status sent to the client (499: client went away).
    pub status: u16,
    /// `finish_reason` reported by the engine.
    pub finish_reason: Option<String>,
    /// Attempts on another replica after the first.
    pub retries: u32,
    /// Proxy-side error label, if any.
    pub error: Option<String>,
    /// The prompt text, only when `lifecycle.include_prompts` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

/// Converts monotonic instants to Unix milliseconds against one anchor.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    anchor: Instant,
    anchor_unix_ms: f64,
}

impl Clock {
    /// Anchors now.
    pub fn new() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        Self {
            anchor: Instant::now(),
            anchor_unix_ms: unix,
        }
    }

    /// `t` as Unix milliseconds.
    pub fn unix_ms(&self, t: Instant) -> f64 {
        let d = t.saturating_duration_since(self.anchor).as_secs_f64() * 1000.0;
        ((self.anchor_unix_ms + d) * 1000.0).round() / 1000.0
    }

    /// Monotonic milliseconds since the anchor (routing's `now_ms`).
    pub fn mono_ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.anchor).as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends records to the writer thread.
#[derive(Clone)]
pub struct LifecycleLog {
    tx: Option<SyncSender<Record>>,
    metrics: Metrics,
}

impl LifecycleLog {
    /// Opens `dest` (`stdout`, `off`, or a file path to append to) and starts the writer.
    pub fn open(dest: &str, metrics: Metrics) -> Result<Self, ProxyError> {
        let sink: Box<dyn Write + Send> = match dest {
            "off" | "" => return Ok(Self { tx: None, metrics }),
            "stdout" | "-" => Box::new(std::io::stdout()),
            path => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ProxyError::Io {
                        context: format!("cannot open lifecycle log {path}"),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("sluice-lifecycle".into())
            .spawn(move || write_loop(rx, sink))
            .map_err(|source| ProxyError::Io {
                context: "cannot start the lifecycle writer".into(),
                source,
            })?;
        Ok(Self {
            tx: Some(tx),
            metrics,
        })
    }

    /// Whether records go anywhere.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one record (never blocks).
    pub fn emit(&self, record: Record) {
        if let Some(tx) = &self.tx {
            match tx.try_send(record) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.metrics.lifecycle_dropped.inc(),
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

fn write_loop(rx: Receiver<Record>, sink: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, sink);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(r) = next {
            if serde_json::to_writer(&mut out, &r).is_ok() {
                let _ = out.write_all(b"\n");
            }
            next = rx.try_recv().ok();
        }
        // Flush whenever the queue runs dry, so a tailing reader sees records promptly.
        let _ = out.flush();
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let log = LifecycleLog::open(path.to_str().unwrap(), Metrics::new()).unwrap();
        log.emit(Record {
            request_id: "r1".into(),
            status: 200,
            ..Record::default()
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("\"request_id\":\"r1\"") {
                assert!(text.ends_with('\n'));
                break;
            }
            assert!(Instant::now() < deadline, "record never written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
