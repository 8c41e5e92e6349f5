//! Server-sent events: upstream chunks do not align with events, so bytes are
//! buffered and split on blank lines before any event is parsed.

/// Accumulates bytes and yields complete events' `data` payloads.
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
}

/// Largest event the splitter buffers before giving up on the stream.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

impl SseSplitter {
    /// Appends `chunk` and calls `on_data` with the joined `data:` lines of
    /// every event it completes. Errors when one event grows past [`MAX_EVENT_BYTES`].
    pub fn feed(&mut self, chunk: &[u8], mut on_data: impl FnMut(&str)) -> Result<(), String> {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some((end, sep)) = find_blank_line(&self.buf[start..]) {
            let event = &self.buf[start..start + end];
            emit(event, &mut on_data);
            start += end + sep;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(format!("an SSE event exceeded {MAX_EVENT_BYTES} bytes"));
        }
        Ok(())
    }

    /// Emits a final event left without a trailing blank line (a stream cut after its last event).
    pub fn finish(&mut self, mut on_data: impl FnMut(&str)) {
        if !self.buf.iter().all(u8::is_ascii_whitespace) {
            let event = std::mem::take(&mut self.buf);
            emit(&event, &mut on_data);
        }
        self.buf.clear();
    }
}

/// Position and length of the first blank-line separator (`\n\n`, `\r\n\r\n`, `\r\r`).
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' if b.get(i + 1) == Some(&b'\n') => return Some((i, 2)),
            b'\n' if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') => {
                return Some((i, 3));
            }
            b'\r'
                if b.get(i + 1) == Some(&b'\n')
                    && b.get(i + 2) == Some(&b'\r')
                    && b.get(i + 3) == Some(&b'\n') =>
            {
                return Some((i, 4));
            }
            b'\r' if b.get(i + 1) == Some(&b'\r') => return Some((i, 2)),
            _ => {}
        }
        i += 1;
    }
    None
}

fn emit(event: &[u8], on_data: &mut impl FnMut(&str)) {
    let Ok(text) = std::str::from_utf8(event) else {
        return;
    };
    let mut data: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    if let Some(d) = data {
        on_data(&d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |d| out.push(d.to_string())).unwrap();
        }
        s.finish(|d| out.push(d.to_string()));
        out
    }

    #[test]
    fn splits_events_across_arbitrary_chunk_boundaries() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: comment\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let whole = events(&[stream]);
        assert_eq!(whole, vec!["{\"a\":1}", "{\"b\":2}", "x\ny", "[DONE]"]);
        for cut in 1..stream.len() {
            assert_eq!(
                events(&[&stream[..cut], &stream[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytewise), whole);
    }

    #[test]
    fn a_final_event_without_blank_line_is_kept() {
        assert_eq!(events(&[b"data: last"]), vec!["last"]);
    }

    #[test]
    fn oversized_events_are_an_error() {
        let mut s = SseSplitter::default();
        let big = vec![b'a'; MAX_EVENT_BYTES + 1];
        assert!(s.feed(&big, |_| {}).is_err());
    }
}
