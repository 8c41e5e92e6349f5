//! Importers for public LLM-serving traces.
//!
//! - Mooncake JSONL (`timestamp`, `input_length`, `output_length`, `hash_ids`
//!   of 512-token blocks): each block id becomes one deterministic 512-token
//!   segment, so requests that share leading block ids share their token prefix.
//! - Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`): arrival
//!   times and lengths; every prompt is unique (the trace has no content).
//! - ShareGPT JSON (`[{"id","conversations":[{"from","value"}]}]`): real prompt
//!   texts; arrivals are Poisson at a given rate, or all at once.

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Deserialize;
use sluice_policies::prefix::stable_hash;

use super::arrival::{Arrival, ArrivalClock};
use super::request::{Content, Message, Segment, WorkloadRequest};
use super::synth::Api;
use crate::error::{BenchError, Result};

/// Tokens per Mooncake `hash_ids` block.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// A trace format [`import`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceFormat {
    /// Mooncake/Kimi JSONL with `hash_ids`.
    Mooncake,
    /// Azure LLM inference trace CSV.
    Azure,
    /// ShareGPT JSON (first human turn of each conversation).
    Sharegpt,
}

/// How a trace becomes a workload.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The trace's format.
    pub format: TraceFormat,
    /// Keep at most this many requests.
    pub limit: Option<usize>,
    /// Factor applied to trace arrival offsets (0.5 replays twice as fast).
    pub time_scale: f64,
    /// Spread requests that share a (quantised) timestamp evenly up to the next distinct one.
    pub smooth: bool,
    /// Chat or completions API.
    pub api: Api,
    /// Stream responses.
    pub stream: bool,
    /// Poisson arrival rate for traces without timestamps (ShareGPT); all at 0 when absent.
    pub rate: Option<f64>,
    /// Seed for drawn arrivals.
    pub seed: u64,
    /// `max_tokens` for traces without output lengths (ShareGPT).
    pub max_tokens: u32,
    /// Tenant recorded on every request.
    pub tenant: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            format: TraceFormat::Mooncake,
            limit: None,
            time_scale: 1.0,
            smooth: false,
            api: Api::Completions,
            stream: true,
            rate: None,
            seed: 0,
            max_tokens: 256,
            tenant: "default".into(),
        }
    }
}

/// One request of a trace before it becomes a workload request.
struct TraceRow {
    arrival_ms: f64,
    content: Content,
    max_tokens: u32,
    group: Option<String>,
}

fn parse_err(path: &Path, line: Option<usize>, message: impl Into<String>) -> BenchError {
    BenchError::Parse {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Reads a trace file and converts it to a workload.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Vec<WorkloadRequest>> {
    if !(opts.time_scale.is_finite() && opts.time_scale > 0.0) {
        return Err(BenchError::invalid(
            "import options",
            "time scale must be > 0",
        ));
    }
    if opts.max_tokens == 0 {
        return Err(BenchError::invalid(
            "import options",
            "max tokens must be at least 1",
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    let limit = opts.limit.unwrap_or(usize::MAX);
    let mut rows = match opts.format {
        TraceFormat::Mooncake => mooncake(path, &text, limit)?,
        TraceFormat::Azure => azure(path, &text, limit)?,
        TraceFormat::Sharegpt => sharegpt(path, &text, limit, opts)?,
    };
    if rows.is_empty() {
        return Err(parse_err(path, None, "the trace has no requests"));
    }
    if opts.smooth {
        smooth_quantised(&mut rows);
    }
    let prefix = match opts.format {
        TraceFormat::Mooncake => "mooncake",
        TraceFormat::Azure => "azure",
        TraceFormat::Sharegpt => "sharegpt",
    };
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let (messages, prompt) = match opts.api {
                Api::Chat => (
                    Some(vec![Message {
                        role: "user".into(),
                        content: row.content,
                    }]),
                    None,
                ),
                Api::Completions => (None, Some(row.content)),
            };
            WorkloadRequest {
                id: format!("{prefix}-{i}"),
                arrival_ms: (row.arrival_ms * opts.time_scale * 1000.0).round() / 1000.0,
                tenant: opts.tenant.clone(),
                class: Some(prefix.into()),
                prefix_group: row.group,
                messages,
                prompt,
                max_tokens: row.max_tokens.max(1),
                stream: opts.stream,
                ignore_eos: opts.format != TraceFormat::Sharegpt,
            }
        })
        .collect())
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

fn mooncake(path: &Path, text: &str, limit: usize) -> Result<Vec<TraceRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if rows.len() >= limit {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let m: MooncakeLine =
            serde_json::from_str(line).map_err(|e| parse_err(path, Some(i + 1), e.to_string()))?;
        if m.hash_ids.is_empty() || m.input_length == 0 {
            return Err(parse_err(
                path,
                Some(i + 1),
                "empty hash_ids or zero input_length",
            ));
        }
        let n = m.hash_ids.len() as u32;
        let full = MOONCAKE_BLOCK_TOKENS * (n - 1);
        let last = m
            .input_length
            .saturating_sub(full)
            .clamp(1, MOONCAKE_BLOCK_TOKENS);
        let segments = m
            .hash_ids
            .iter()
            .enumerate()
            .map(|(j, id)| Segment {
                seed: stable_hash(&format!("mooncake/{id}")),
                tokens: if j as u32 == n - 1 {
                    last
                } else {
                    MOONCAKE_BLOCK_TOKENS
                },
            })
            .collect();
        // The longest shared prefix the trace can express is a run of block ids; the
        // second block names the conversation (the first is shared by every request).
        let group = m.hash_ids.get(1).map(|id| format!("mooncake-{id}"));
        rows.push(TraceRow {
            arrival_ms: m.timestamp,
            content: Content::Segments(segments),
            max_tokens: m.output_length,
            group,
        });
    }
    Ok(rows)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the epoch of `YYYY-MM-DD HH:MM:SS[.fffffff]`.
fn parse_timestamp_ms(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let frac_s = if frac.is_empty() {
        0.0
    } else {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("0.{frac}").parse::<f64>().ok()?
    };
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se;
    Some((secs as f64 + frac_s) * 1000.0)
}

fn azure(path: &Path, text: &str, limit: usize) -> Result<Vec<TraceRow>> {
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| h.trim_start_matches('\u{feff}').trim())
        .unwrap_or("");
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| parse_err(path, Some(1), format!("missing column {name}")))
    };
    let (ts, ctx, gen_col) = (
        col("TIMESTAMP")?,
        col("ContextTokens")?,
        col("GeneratedTokens")?,
    );
    let mut rows = Vec::new();
    let mut first = None;
    for (i, line) in lines {
        if rows.len() >= limit {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |c: usize| {
            f.get(c)
                .copied()
                .ok_or_else(|| parse_err(path, Some(i + 1), "too few columns"))
        };
        let t = parse_timestamp_ms(get(ts)?).ok_or_else(|| {
            parse_err(
                path,
                Some(i + 1),
                format!("bad TIMESTAMP {:?}", get(ts).unwrap_or("")),
            )
        })?;
        let num = |c: usize, name: &str| -> Result<u32> {
            get(c)?
                .parse::<u32>()
                .map_err(|_| parse_err(path, Some(i + 1), format!("bad {name}")))
        };
        let (context, generated) = (num(ctx, "ContextTokens")?, num(gen_col, "GeneratedTokens")?);
        let t0 = *first.get_or_insert(t);
        rows.push(TraceRow {
            arrival_ms: (t - t0).max(0.0),
            content: Content::Segments(vec![Segment {
                seed: stable_hash(&format!("azure/{i}")),
                tokens: context.max(1),
            }]),
            max_tokens: generated,
            group: None,
        });
    }
    Ok(rows)
}

#[derive(Deserialize)]
struct ShareGptItem {
    #[serde(default)]
    id: Option<String>,
    conversations: Vec<ShareGptTurn>,
}

#[derive(Deserialize)]
struct ShareGptTurn {
    from: String,
    value: String,
}

fn sharegpt(path: &Path, text: &str, limit: usize, opts: &ImportOptions) -> Result<Vec<TraceRow>> {
    let items: Vec<ShareGptItem> =
        serde_json::from_str(text).map_err(|e| parse_err(path, None, e.to_string()))?;
    let mut clock = match opts.rate {
        Some(rate) => Some(
            ArrivalClock::new(&Arrival::Poisson { rate }, None)
                .map_err(|m| BenchError::invalid("import options", m))?,
        ),
        None => None,
    };
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut rows = Vec::new();
    for item in items {
        if rows.len() >= limit {
            break;
        }
        let Some(turn) = item
            .conversations
            .iter()
            .find(|t| t.from == "human" || t.from == "user")
        else {
            continue;
        };
        if turn.value.trim().is_empty() {
            continue;
        }
        rows.push(TraceRow {
            arrival_ms: clock.as_mut().map_or(0.0, |c| c.next_ms(&mut rng)),
            content: Content::Text(turn.value.clone()),
            max_tokens: opts.max_tokens,
            group: item.id.map(|id| format!("sharegpt-{id}")),
        });
    }
    Ok(rows)
}

/// Spreads runs of equal timestamps evenly over the gap to the next distinct timestamp.
fn smooth_quantised(rows: &mut [TraceRow]) {
    let mut i = 0;
    let mut prev_t = None;
    while i < rows.len() {
        let t = rows[i].arrival_ms;
        let j = (i..rows.len())
            .find(|&k| rows[k].arrival_ms != t)
            .unwrap_or(rows.len());
        let next = if j < rows.len() {
            rows[j].arrival_ms
        } else {
            // The last run gets the previous gap.
            prev_t.map_or(t, |p| t + (t - p))
        };
        prev_t = Some(t);
        let n = (j - i) as f64;
        for (k, row) in rows[i..j].iter_mut().enumerate() {
            row.arrival_ms = t + (next - t) * k as f64 / n;
        }
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policies::prefix::block_hashes;
    use sluice_policies::tokens::estimate_token_ids;

    #[test]
    fn timestamps_parse_to_epoch_ms() {
        assert_eq!(parse_timestamp_ms("1970-01-01 00:00:01.5"), Some(1500.0));
        let a = parse_timestamp_ms("2023-11-16 18:15:46.6805900").unwrap();
        let b = parse_timestamp_ms("2023-11-16 18:15:47.0000000").unwrap();
        assert!((b - a - 319.41).abs() < 1e-3);
        assert_eq!(
            parse_timestamp_ms("2024-03-01 00:00:00").unwrap()
                - parse_timestamp_ms("2024-02-28 00:00:00").unwrap(),
            2.0 * 86_400_000.0
        );
        assert_eq!(parse_timestamp_ms("2023-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp_ms("garbage"), None);
    }

    #[test]
    fn mooncake_blocks_become_shared_token_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        std::fs::write(
            &p,
            "{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 5, \"hash_ids\": [0, 1, 2]}\n\
             {\"timestamp\": 3000, \"input_length\": 1500, \"output_length\": 9, \"hash_ids\": [0, 1, 3]}\n",
        )
        .unwrap();
        let w = import(
            &p,
            &ImportOptions {
                time_scale: 0.5,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].arrival_ms, 1500.0);
        let (a, b) = (
            estimate_token_ids(&w[0].rendered_prompt()),
            estimate_token_ids(&w[1].rendered_prompt()),
        );
        assert_eq!((a.len(), b.len()), (1100, 1500));
        assert_eq!(a[..1024], b[..1024]);
        assert_ne!(a[1024..1034], b[1024..1034]);
        let (ha, hb) = (block_hashes(&a, 16, None), block_hashes(&b, 16, None));
        assert_eq!(ha.iter().zip(&hb).take_while(|(x, y)| x == y).count(), 64);
    }

    #[test]
    fn bad_rows_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        std::fs::write(&p, "TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.6805900,374,44\r\n2023-11-16 18:15:47,x,1\r\n").unwrap();
        let err = import(
            &p,
            &ImportOptions {
                format: TraceFormat::Azure,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains(":3:"), "{err}");
        std::fs::write(&p, "a,b\n1,2\n").unwrap();
        assert!(
            import(
                &p,
                &ImportOptions {
                    format: TraceFormat::Azure,
                    ..Default::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn smoothing_spreads_equal_timestamps() {
        let row = |t: f64| TraceRow {
            arrival_ms: t,
            content: Content::Text("x".into()),
            max_tokens: 1,
            group: None,
        };
        let mut rows = vec![row(0.0), row(0.0), row(0.0), row(3000.0), row(3000.0)];
        smooth_quantised(&mut rows);
        let t: Vec<f64> = rows.iter().map(|r| r.arrival_ms).collect();
        assert_eq!(t, vec![0.0, 1000.0, 2000.0, 3000.0, 4500.0]);
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/workloads")
            .join(name)
    }

    #[test]
    fn reads_the_committed_mooncake_excerpt() {
        let w = import(
            &fixture("mooncake_conversation_head1000.jsonl"),
            &ImportOptions::default(),
        )
        .unwrap();
        assert_eq!(w.len(), 1000);
        // First line: {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0..=13]}.
        assert_eq!(w[0].arrival_ms, 0.0);
        assert_eq!(w[0].max_tokens, 500);
        assert_eq!(w[0].prompt_tokens_estimate(), 6758);
        // Every Mooncake request starts with block 0: all share the first 512 tokens.
        let a = estimate_token_ids(&w[0].rendered_prompt());
        let b = estimate_token_ids(&w[999].rendered_prompt());
        assert_eq!(a[..512], b[..512]);
        assert!(w.windows(2).all(|p| p[0].arrival_ms <= p[1].arrival_ms));
    }

    #[test]
    fn reads_the_committed_azure_excerpt() {
        let opts = ImportOptions {
            format: TraceFormat::Azure,
            time_scale: 2.0,
            ..Default::default()
        };
        let w = import(&fixture("azure_conv_head500.csv"), &opts).unwrap();
        assert_eq!(w.len(), 500);
        // Header + first row: 2023-11-16 18:15:46.6805900,374,44.
        assert_eq!(
            (
                w[0].arrival_ms,
                w[0].max_tokens,
                w[0].prompt_tokens_estimate()
            ),
            (0.0, 44, 374)
        );
        assert!(
            w[499].arrival_ms > 0.0 && w.windows(2).all(|p| p[0].arrival_ms <= p[1].arrival_ms)
        );
        let plain = import(
            &fixture("azure_conv_head500.csv"),
            &ImportOptions {
                format: TraceFormat::Azure,
                ..Default::default()
            },
        )
        .unwrap();
        assert!((w[499].arrival_ms - 2.0 * plain[499].arrival_ms).abs() < 0.01);
    }

    #[test]
    fn reads_the_committed_sharegpt_excerpt() {
        let opts = ImportOptions {
            format: TraceFormat::Sharegpt,
            api: Api::Chat,
            rate: Some(10.0),
            seed: 3,
            ..Default::default()
        };
        let w = import(&fixture("sharegpt_first_turn_50.json"), &opts).unwrap();
        assert_eq!(w.len(), 50);
        let first = &w[0].messages.as_ref().unwrap()[0].content;
        assert_eq!(
            first,
            &Content::Text(
                "How to stop automatic updates from the WSUS Server to a target machine".into()
            )
        );
        assert_eq!(w[0].max_tokens, 256);
        assert!(w[49].arrival_ms > 0.0);
        assert_eq!(
            w,
            import(&fixture("sharegpt_first_turn_50.json"), &opts).unwrap()
        );
    }
}
