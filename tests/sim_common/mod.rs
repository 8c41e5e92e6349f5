//! Shared by the `sim_*` tests: start the real `sluice sim` binary on an
//! ephemeral port, and a small blocking HTTP/1.1 client (with chunked
//! decoding and incremental SSE reading) to talk to it. Every read has a
//! timeout, so a broken server fails a test instead of hanging it.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest any single read may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `sluice sim`, killed on drop; derefs to a [`Client`] of it.
pub struct Sim {
    child: Child,
    client: Client,
}

impl std::ops::Deref for Sim {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// A blocking HTTP/1.1 client of one address (a new connection per request).
#[derive(Debug, Clone)]
pub struct Client {
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Sim {
    /// Starts `sluice sim --port 0` with extra arguments and waits for its listening line.
    pub fn start(extra: &[&str]) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["sim", "--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sluice sim");
        let line = first_stdout_line(&mut child, IO_TIMEOUT).expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("sluice-sim listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Sim {
            child,
            client: Client { addr },
        }
    }
}

/// Calls `check` every `every` until it gives `Ok`; after `limit`, panics
/// with `explain` of the last `Err` (what the condition looked like when time
/// ran out — built only then).
pub fn wait_until<T, E>(
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, E>,
    explain: impl FnOnce(E) -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!("{}", explain(last)),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// The first line a child writes to its piped stdout (its "listening on"
/// line), or `None` if none comes within `limit`.
pub fn first_stdout_line(child: &mut Child, limit: Duration) -> Option<String> {
    let stdout = child.stdout.take()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit).ok()
}

impl Client {
    /// A client of `addr`.
    pub fn new(addr: &str) -> Client {
        Client {
            addr: addr.to_string(),
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Sends a request and returns the raw stream positioned after the request.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> TcpStream {
        self.send_with_headers(method, path, &[], body)
    }

    /// Like [`Client::send`], with extra request headers (API keys, session ids).
    pub fn send_with_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> TcpStream {
        let mut s = self.connect();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes()).unwrap();
        s
    }

    /// A whole request/response.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let s = self.send(method, path, body);
        Response::read(s)
    }

    /// GET.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    /// POST a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(body))
    }

    /// Starts a streaming POST and returns a reader of its SSE events.
    pub fn stream(&self, path: &str, body: &Value) -> SseReader {
        let s = self.send("POST", path, Some(body));
        SseReader::new(s)
    }

    /// The value of one metric sample (`name{labels}` prefix match) from `/metrics`.
    pub fn metric(&self, prefix: &str) -> f64 {
        let m = self.get("/metrics");
        assert_eq!(m.status, 200);
        metric_value(&m.text(), prefix).unwrap_or_else(|| panic!("no metric {prefix}"))
    }

    /// Polls `/metrics` until `pred` holds for the whole text (so several
    /// samples come from one scrape), or panics after `limit`.
    pub fn wait_scrape(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        wait_until(
            limit,
            Duration::from_millis(5),
            || {
                let m = self.get("/metrics");
                assert_eq!(m.status, 200);
                let text = m.text();
                if pred(&text) { Ok(text) } else { Err(text) }
            },
            |text| format!("condition never held; last scrape:\n{text}"),
        )
    }

    /// Polls `/metrics` until `pred` holds for the sample, or panics after `limit`.
    pub fn wait_metric(&self, prefix: &str, limit: Duration, pred: impl Fn(f64) -> bool) -> f64 {
        wait_until(
            limit,
            Duration::from_millis(5),
            || {
                let v = self.metric(prefix);
                if pred(v) { Ok(v) } else { Err(v) }
            },
            |v| format!("{prefix} stayed at {v}"),
        )
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first sample whose line starts with `prefix`.
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A complete HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Decoded body.
    pub body: Vec<u8>,
}

fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Reads one chunk of a chunked body; `None` at the last chunk.
fn read_chunk(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed inside a chunked body",
        ));
    }
    let size = usize::from_str_radix(line.trim(), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    let mut data = vec![0; size];
    r.read_exact(&mut data)?;
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf)?;
    Ok((size > 0).then_some(data))
}

impl Response {
    /// Reads a whole response (head, then a chunked, sized or to-EOF body).
    pub fn read(s: TcpStream) -> Response {
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r);
        let mut body = Vec::new();
        if header(&headers, "transfer-encoding") == Some("chunked") {
            while let Some(c) = read_chunk(&mut r).expect("chunk") {
                body.extend(c);
            }
        } else if let Some(n) = header(&headers, "content-length") {
            body = vec![0; n.parse().unwrap()];
            r.read_exact(&mut body).unwrap();
        } else {
            r.read_to_end(&mut body).unwrap();
        }
        Response {
            status,
            headers,
            body,
        }
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Reads SSE events off a chunked response as they arrive.
pub struct SseReader {
    reader: BufReader<TcpStream>,
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    buf: Vec<u8>,
    ended: bool,
}

/// What reading the next event gave.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A `data:` payload.
    Data(String),
    /// The body ended cleanly.
    End,
    /// The connection broke mid-body.
    Broken,
}

impl SseReader {
    fn new(s: TcpStream) -> SseReader {
        let mut reader = BufReader::new(s);
        let (status, headers) = read_head(&mut reader);
        SseReader {
            reader,
            status,
            headers,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// The next event (events are split on blank lines, whatever the chunking).
    pub fn next_event(&mut self) -> Event {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8(raw).unwrap();
                let data = text
                    .trim_end()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data event: {text:?}"));
                return Event::Data(data.to_string());
            }
            if self.ended {
                return Event::End;
            }
            match read_chunk(&mut self.reader) {
                Ok(Some(c)) => self.buf.extend(c),
                Ok(None) => self.ended = true,
                Err(_) => return Event::Broken,
            }
        }
    }

    /// Every remaining data payload, and how the body ended.
    pub fn collect(&mut self) -> (Vec<String>, Event) {
        let mut out = Vec::new();
        loop {
            match self.next_event() {
                Event::Data(d) => out.push(d),
                end => return (out, end),
            }
        }
    }
}
