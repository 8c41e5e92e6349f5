//! One JSON line per request: who, what shape, where it went and why, and
//! what happened when.
//!
//! Records are handed to a writer thread over a bounded channel so a slow
//! disk never stalls a request; when the channel is full the record is
//! dropped and counted (`sluice_lifecycle_dropped_total`). The writer
//! serializes each record into its own buffer and writes whole lines only,
//! so a reader (or a rotation) never sees half a record. A file can rotate
//! by size (`max_bytes`, keeping `keep` old files as `file.1` … `file.N`)
//! and can be reopened on request, for an external logrotate that moved it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::ProxyError;
use crate::metrics::Metrics;

/// Records the writer may fall behind by before dropping.
const QUEUE: usize = 65_536;
/// Bytes of whole lines gathered before one write to the sink.
const WRITE_BATCH: usize = 64 * 1024;

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

/// Size-based rotation of a lifecycle file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rotation {
    /// Rotate before a line would take the file past this many bytes (0: never).
    pub max_bytes: u64,
    /// Rotated files kept (`file.1` is the newest); 0 keeps none.
    pub keep: u32,
}

/// What the request path and the signal handler share with the writer thread.
struct Control {
    /// Reopen the file before the next write (set by SIGHUP/SIGUSR1).
    reopen: AtomicBool,
    max_bytes: AtomicU64,
    keep: AtomicU64,
}

enum Msg {
    Record(Box<Record>),
    /// Nothing to write: look at the control flags now.
    Wake,
}

/// Sends records to the writer thread.
#[derive(Clone)]
pub struct LifecycleLog {
    tx: Option<SyncSender<Msg>>,
    control: Arc<Control>,
    dest: String,
    metrics: Metrics,
}

impl LifecycleLog {
    /// Opens `dest` (`stdout`, `off`, or a file path to append to) and starts the writer.
    pub fn open(dest: &str, rotation: Rotation, metrics: Metrics) -> Result<Self, ProxyError> {
        Self::open_with_queue(dest, rotation, metrics, QUEUE)
    }

    fn open_with_queue(
        dest: &str,
        rotation: Rotation,
        metrics: Metrics,
        queue: usize,
    ) -> Result<Self, ProxyError> {
        let control = Arc::new(Control {
            reopen: AtomicBool::new(false),
            max_bytes: AtomicU64::new(rotation.max_bytes),
            keep: AtomicU64::new(u64::from(rotation.keep)),
        });
        let sink = match dest {
            "off" | "" => {
                return Ok(Self {
                    tx: None,
                    control,
                    dest: dest.to_string(),
                    metrics,
                });
            }
            "stdout" | "-" => Sink::Stdout,
            path => Sink::File(FileSink::open(PathBuf::from(path))?),
        };
        let (tx, rx) = sync_channel(queue);
        let writer_control = Arc::clone(&control);
        std::thread::Builder::new()
            .name("sluice-lifecycle".into())
            .spawn(move || write_loop(rx, sink, &writer_control))
            .map_err(|source| ProxyError::Io {
                context: "cannot start the lifecycle writer".into(),
                source,
            })?;
        Ok(Self {
            tx: Some(tx),
            control,
            dest: dest.to_string(),
            metrics,
        })
    }

    /// Whether records go anywhere.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Where records go, as configured (`off`, `stdout` or the path).
    pub fn dest(&self) -> &str {
        &self.dest
    }

    /// Applies new rotation limits (a reload that kept the same file).
    pub fn set_rotation(&self, rotation: Rotation) {
        self.control
            .max_bytes
            .store(rotation.max_bytes, Ordering::Relaxed);
        self.control
            .keep
            .store(u64::from(rotation.keep), Ordering::Relaxed);
    }

    /// Closes and reopens the file before the next record, for an external
    /// logrotate that moved it away (SIGHUP, SIGUSR1). Never blocks.
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            self.control.reopen.store(true, Ordering::Relaxed);
            // A full queue means the writer is busy and sees the flag soon anyway.
            let _ = tx.try_send(Msg::Wake);
        }
    }

    /// Queues one record (never blocks).
    pub fn emit(&self, record: Record) {
        if let Some(tx) = &self.tx {
            match tx.try_send(Msg::Record(Box::new(record))) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.metrics.lifecycle_dropped.inc(),
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

enum Sink {
    Stdout,
    File(FileSink),
}

/// An append-only file that knows its size, for rotation.
struct FileSink {
    path: PathBuf,
    file: File,
    size: u64,
}

impl FileSink {
    fn open(path: PathBuf) -> Result<Self, ProxyError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| ProxyError::Io {
                context: format!("cannot open lifecycle log {}", path.display()),
                source,
            })?;
        let size = file.metadata().map_or(0, |m| m.len());
        Ok(Self { path, file, size })
    }

    /// Reopens the path (it may have been moved away); on failure keeps
    /// writing to the old file, which is better than losing records.
    fn reopen(&mut self) {
        match Self::open(self.path.clone()) {
            Ok(fresh) => *self = fresh,
            Err(e) => {
                tracing::error!(error = %e, "lifecycle log: reopen failed; still writing to the old file")
            }
        }
    }

    /// `file` → `file.1` → … → `file.keep`; the oldest falls off.
    fn rotate(&mut self, keep: u64) {
        let _ = self.file.flush();
        if keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(numbered(&self.path, keep));
            for i in (1..keep).rev() {
                let _ = std::fs::rename(numbered(&self.path, i), numbered(&self.path, i + 1));
            }
            if let Err(e) = std::fs::rename(&self.path, numbered(&self.path, 1)) {
                tracing::error!(error = %e, path = %self.path.display(), "lifecycle log: rotation failed");
            }
        }
        self.reopen();
    }

    /// Appends whole lines.
    fn write_lines(&mut self, lines: &[u8]) {
        match self.file.write_all(lines) {
            Ok(()) => self.size += lines.len() as u64,
            Err(e) => tracing::warn!(error = %e, "lifecycle log: write failed"),
        }
    }
}

fn numbered(path: &Path, i: u64) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

fn write_loop(rx: Receiver<Msg>, mut sink: Sink, control: &Control) {
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    let mut line: Vec<u8> = Vec::with_capacity(1024);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            if control.reopen.swap(false, Ordering::Relaxed) {
                flush(&mut sink, &mut batch);
                if let Sink::File(f) = &mut sink {
                    f.reopen();
                }
            }
            if let Msg::Record(r) = msg {
                line.clear();
                if serde_json::to_writer(&mut line, &r).is_ok() {
                    line.push(b'\n');
                    let max = control.max_bytes.load(Ordering::Relaxed);
                    let full = match &sink {
                        // Rotate at a line boundary, before the line would pass the bound.
                        Sink::File(f) if max > 0 => {
                            let pending = f.size + batch.len() as u64;
                            pending > 0 && pending + line.len() as u64 > max
                        }
                        _ => false,
                    };
                    if full || batch.len() + line.len() > WRITE_BATCH {
                        flush(&mut sink, &mut batch);
                    }
                    if full {
                        if let Sink::File(f) = &mut sink {
                            f.rotate(control.keep.load(Ordering::Relaxed));
                        }
                    }
                    batch.extend_from_slice(&line);
                }
            }
            next = rx.try_recv().ok();
        }
        // Write whenever the queue runs dry, so a tailing reader sees records promptly.
        flush(&mut sink, &mut batch);
    }
    flush(&mut sink, &mut batch);
}

fn flush(sink: &mut Sink, batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    match sink {
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(batch);
            let _ = out.flush();
        }
        Sink::File(f) => f.write_lines(batch),
    }
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let log = LifecycleLog::open(path.to_str().unwrap(), Rotation::default(), Metrics::new())
            .unwrap();
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

    fn wait_for(path: &Path, needle: &str) -> String {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "{needle} never written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn ids(text: &str) -> Vec<u32> {
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a whole JSON line");
                v["request_id"].as_str().unwrap()[1..].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn rotates_at_the_size_bound_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let rotation = Rotation {
            max_bytes: 4096,
            keep: 3,
        };
        let log = LifecycleLog::open(path.to_str().unwrap(), rotation, Metrics::new()).unwrap();
        for i in 0..300 {
            log.emit(Record {
                request_id: format!("r{i}"),
                api: "chat".into(),
                pool: Some("p".into()),
                status: 200,
                ..Record::default()
            });
        }
        wait_for(&path, "\"r299\"");
        let mut all = Vec::new();
        for i in (1..=3).rev() {
            let f = numbered(&path, i);
            let text = std::fs::read_to_string(&f).unwrap();
            let line = text.lines().next().unwrap().len() as u64 + 1;
            let size = text.len() as u64;
            assert!(size <= 4096, "{} has {size} bytes", f.display());
            assert!(
                size + line > 4096,
                "{} rotated early at {size}",
                f.display()
            );
            assert!(text.ends_with('\n'));
            all.extend(ids(&text));
        }
        assert!(!numbered(&path, 4).exists(), "more than `keep` files");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 4096 && text.ends_with('\n'));
        all.extend(ids(&text));
        // The kept files hold the newest records, in order, none lost or torn.
        let first = all[0];
        assert!(first > 0, "nothing rotated away");
        assert_eq!(all, (first..300).collect::<Vec<_>>());
    }

    #[test]
    fn reopen_follows_an_external_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let log = LifecycleLog::open(path.to_str().unwrap(), Rotation::default(), Metrics::new())
            .unwrap();
        let rec = |id: &str| Record {
            request_id: id.into(),
            ..Record::default()
        };
        log.emit(rec("r1"));
        wait_for(&path, "\"r1\"");
        let moved = dir.path().join("l.jsonl.old");
        std::fs::rename(&path, &moved).unwrap();
        log.reopen();
        log.emit(rec("r2"));
        let text = wait_for(&path, "\"r2\"");
        assert_eq!(ids(&text), [2]);
        assert_eq!(ids(&std::fs::read_to_string(&moved).unwrap()), [1]);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let metrics = Metrics::new();
        let log = LifecycleLog::open_with_queue(
            path.to_str().unwrap(),
            Rotation::default(),
            metrics.clone(),
            1,
        )
        .unwrap();
        let n = 20_000u64;
        for i in 0..n {
            log.emit(Record {
                request_id: format!("r{i}"),
                ..Record::default()
            });
        }
        // The last record marks the end only if it was not dropped itself; an
        // extra one after a pause always gets in.
        std::thread::sleep(std::time::Duration::from_millis(200));
        log.emit(Record {
            request_id: "r999999".into(),
            ..Record::default()
        });
        let text = wait_for(&path, "\"r999999\"");
        let written = text.lines().count() as u64 - 1;
        let dropped = metrics.lifecycle_dropped.get();
        assert!(dropped > 0, "a queue of one never filled");
        assert_eq!(written + dropped, n, "every record is written or counted");
    }
}
