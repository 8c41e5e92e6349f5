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

/// The spec that [`parse_admission`] reads back to `cfg` (given the same
/// block size): the main keys always, the others only when they differ from
/// the proxy's defaults.
pub fn admission_spec(cfg: &AdmissionConfig) -> String {
    let mut spec = format!(
        "max_kv_usage={},max_engine_waiting={},order={},max_queue_len={},max_queue_wait_ms={},starvation_ms={},expected_output_tokens={}",
        cfg.max_kv_usage,
        cfg.max_engine_waiting,
        cfg.order.as_str(),
        cfg.max_queue_len,
        cfg.max_queue_wait_ms,
        cfg.starvation_ms,
        cfg.expected_output_tokens
    );
    let d = AdmissionConfig::default();
    let mut extra = |key: &str, value: String, default: String| {
        if value != default {
            spec.push_str(&format!(",{key}={value}"));
        }
    };
    extra("enabled", cfg.enabled.to_string(), d.enabled.to_string());
    extra(
        "output_token_cost",
        cfg.output_token_cost.to_string(),
        d.output_token_cost.to_string(),
    );
    extra(
        "default_deadline_ms",
        cfg.default_deadline_ms.to_string(),
        d.default_deadline_ms.to_string(),
    );
    if let Some(blocks) = cfg.endpoint_kv_blocks {
        extra("endpoint_kv_blocks", blocks.to_string(), String::new());
    }
    extra(
        "shed_on_ttft_slo",
        cfg.shed_on_ttft_slo.to_string(),
        d.shed_on_ttft_slo.to_string(),
    );
    extra(
        "engine_ttft_ms",
        cfg.engine_ttft_ms.to_string(),
        d.engine_ttft_ms.to_string(),
    );
    if let Some(n) = cfg.max_prefilling {
        extra("max_prefilling", n.to_string(), String::new());
    }
    spec
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
        // Every key survives the round trip, the newer ones too.
        let all = parse_admission(
            "max_kv_usage=0.7,max_engine_waiting=1,order=deadline,max_queue_len=9,\
             max_queue_wait_ms=700,starvation_ms=900,expected_output_tokens=160,\
             output_token_cost=2.5,default_deadline_ms=1500,endpoint_kv_blocks=512,\
             shed_on_ttft_slo=true,engine_ttft_ms=25,max_prefilling=1",
            16,
        )
        .unwrap();
        assert_eq!(all.max_prefilling, Some(1));
        assert_eq!(all.endpoint_kv_blocks, Some(512));
        let spec = admission_spec(&all);
        assert!(spec.contains("shed_on_ttft_slo=true"), "{spec}");
        assert_eq!(parse_admission(&spec, 16).unwrap(), all);
        assert!(!admission_spec(&AdmissionConfig::default()).contains("max_prefilling"));
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
