//! Reading a replica's Prometheus `/metrics` for the vLLM gauges routing
//! uses. Series with several label sets (several models or engines behind one
//! port) are summed; `kv_cache_usage_perc` is averaged.

use sluice_policies::routing::EngineGauges;

/// The vLLM gauges in `text`, or `None` when it has none of them (not a vLLM endpoint).
pub fn parse_vllm_gauges(text: &str) -> Option<EngineGauges> {
    let mut g = EngineGauges::default();
    let mut found = false;
    let mut kv_sum = 0.0;
    let mut kv_n = 0u32;
    let mut legacy_kv_sum = 0.0;
    let mut legacy_kv_n = 0u32;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, value) = match split_sample(line) {
            Some(s) => s,
            None => continue,
        };
        match name {
            "vllm:num_requests_running" => {
                g.running += value;
                found = true;
            }
            "vllm:num_requests_waiting" => {
                g.waiting += value;
                found = true;
            }
            "vllm:kv_cache_usage_perc" => {
                kv_sum += value;
                kv_n += 1;
                found = true;
            }
            // vLLM before 0.10 named it this way.
            "vllm:gpu_cache_usage_perc" => {
                legacy_kv_sum += value;
                legacy_kv_n += 1;
                found = true;
            }
            "vllm:cache_config_info" => {
                if let Some(n) = label(labels, "num_gpu_blocks").and_then(|v| v.parse::<u64>().ok())
                {
                    *g.num_gpu_blocks.get_or_insert(0) += n;
                }
                found = true;
            }
            _ => {}
        }
    }
    if kv_n > 0 {
        g.kv_usage = kv_sum / f64::from(kv_n);
    } else if legacy_kv_n > 0 {
        g.kv_usage = legacy_kv_sum / f64::from(legacy_kv_n);
    }
    found.then_some(g)
}

/// Splits `name{labels} value [timestamp]` into its parts.
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (name, rest) = match line.find('{') {
        Some(i) => {
            let close = line.rfind('}')?;
            (&line[..i], (&line[i + 1..close], &line[close + 1..]))
        }
        None => {
            let i = line.find(char::is_whitespace)?;
            (&line[..i], ("", &line[i..]))
        }
    };
    let (labels, tail) = rest;
    let value = tail.split_whitespace().next()?.parse::<f64>().ok()?;
    value.is_finite().then_some((name, labels, value))
}

/// The value of label `key` in `a="x",b="y"` (values without escaped quotes).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let k = rest[..eq].trim().trim_start_matches(',').trim();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let end = after.find('"')?;
        if k == key {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_metrics() {
        let text = r#"
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="4096",enable_prefix_caching="True"} 1.0
vllm:prompt_tokens_total{model_name="m"} 123
"#;
        let g = parse_vllm_gauges(text).unwrap();
        assert_eq!(g.running, 3.0);
        assert_eq!(g.waiting, 2.0);
        assert_eq!(g.kv_usage, 0.25);
        assert_eq!(g.num_gpu_blocks, Some(4096));
    }

    #[test]
    fn legacy_names_and_non_vllm() {
        let g = parse_vllm_gauges("vllm:gpu_cache_usage_perc 0.5\n").unwrap();
        assert_eq!(g.kv_usage, 0.5);
        assert!(parse_vllm_gauges("up 1\nprocess_cpu_seconds_total 3\n").is_none());
        assert!(parse_vllm_gauges("vllm:num_requests_running{x=\"1\"} notanumber\n").is_none());
    }
}
