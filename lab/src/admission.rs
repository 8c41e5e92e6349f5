//! The admission gate of the simulated pool is the proxy's own
//! ([`sluice_policies::admission::PoolAdmission`]); this module only reads
//! its settings from a command-line spec.

use sluice_policies::admission::AdmissionConfig;

use crate::error::{LabError, Result};

/// Parses `kv` (the proxy's defaults) or comma-separated `key=value` pairs
/// using the `[pools.admission]` table's keys, e.g.
/// `max_kv_usage=0.8,max_engine_waiting=2,order=shortest_first,max_queue_wait_ms=5000`.
/// `block_size` defaults to the engines' block size.
pub fn parse_admission(spec: &str, block_size: u32) -> Result<AdmissionConfig> {
    let mut table = serde_json::Map::new();
    table.insert("block_size".into(), block_size.into());
    for part in spec
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "kv")
    {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            LabError::invalid(format!("--admission: expected key=value, got {part:?}"))
        })?;
        let v = v.trim();
        let value = match v {
            "true" => serde_json::Value::Bool(true),
            "false" => serde_json::Value::Bool(false),
            _ => match v.parse::<u64>() {
                Ok(n) => n.into(),
                Err(_) => match v.parse::<f64>() {
                    Ok(x) => x.into(),
                    Err(_) => v.into(),
                },
            },
        };
        table.insert(k.trim().to_string(), value);
    }
    let cfg: AdmissionConfig = serde_json::from_value(serde_json::Value::Object(table))
        .map_err(|e| LabError::invalid(format!("--admission {spec:?}: {e}")))?;
    cfg.validate("--admission")?;
    Ok(cfg)
}

/// The spec that [`parse_admission`] reads back to `cfg`.
pub fn admission_spec(cfg: &AdmissionConfig) -> String {
    format!(
        "max_kv_usage={},max_engine_waiting={},order={},max_queue_len={},max_queue_wait_ms={},starvation_ms={},expected_output_tokens={}",
        cfg.max_kv_usage,
        cfg.max_engine_waiting,
        cfg.order.as_str(),
        cfg.max_queue_len,
        cfg.max_queue_wait_ms,
        cfg.starvation_ms,
        cfg.expected_output_tokens
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policies::admission::QueueOrder;

    #[test]
    fn parses_defaults_and_pairs() {
        let d = parse_admission("kv", 16).unwrap();
        assert_eq!(d, AdmissionConfig::default());
        let c = parse_admission(
            "max_kv_usage=0.5, max_engine_waiting=2,order=shortest_first,max_queue_wait_ms=500",
            32,
        )
        .unwrap();
        assert_eq!(
            (
                c.max_kv_usage,
                c.max_engine_waiting,
                c.order,
                c.max_queue_wait_ms,
                c.block_size
            ),
            (0.5, 2.0, QueueOrder::ShortestFirst, 500, 32)
        );
        assert_eq!(parse_admission(&admission_spec(&c), 32).unwrap(), c);
        for bad in [
            "max_kv_usage=2",
            "colour=red",
            "order=lifo",
            "max_queue_len",
        ] {
            assert!(parse_admission(bad, 16).is_err(), "{bad}");
        }
    }
}
