//! Model and GPU descriptions, loaded from the TOML files in `fixtures/`.
//!
//! The files in `fixtures/models/` and `fixtures/gpus/` are compiled into the
//! binary, so `--model llama-3.1-8b` works from any directory; a path to
//! another TOML file of the same shape works too. Every value is validated
//! once at load, and errors name the file and the key.

use std::path::Path;

use serde::Deserialize;

use crate::PolicyError;

/// Numeric formats of weights and KV-cache entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE single precision.
    Fp32,
    /// IEEE half precision.
    Fp16,
    /// bfloat16.
    Bf16,
    /// 8-bit float (E4M3/E5M2), as vLLM's `--kv-cache-dtype fp8`.
    Fp8,
    /// 8-bit integer weights.
    Int8,
    /// 4-bit integer weights (AWQ/GPTQ).
    Int4,
}

impl Dtype {
    /// Bytes one value occupies.
    pub fn bytes(self) -> f64 {
        match self {
            Dtype::Fp32 => 4.0,
            Dtype::Fp16 | Dtype::Bf16 => 2.0,
            Dtype::Fp8 | Dtype::Int8 => 1.0,
            Dtype::Int4 => 0.5,
        }
    }

    /// Whether matrix multiplies run on the 8-bit tensor-core path.
    pub fn is_8bit(self) -> bool {
        matches!(self, Dtype::Fp8 | Dtype::Int8 | Dtype::Int4)
    }

    /// The lowercase name used in files and flags.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
            Dtype::Int8 => "int8",
            Dtype::Int4 => "int4",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "float32" | "float" => Ok(Dtype::Fp32),
            "fp16" | "float16" | "half" => Ok(Dtype::Fp16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "fp8" | "fp8_e4m3" | "fp8_e5m2" => Ok(Dtype::Fp8),
            "int8" => Ok(Dtype::Int8),
            "int4" => Ok(Dtype::Int4),
            other => Err(format!(
                "unknown dtype `{other}` (expected fp32, fp16, bf16, fp8, int8 or int4)"
            )),
        }
    }
}

/// The architecture facts about a decoder-only transformer that capacity and
/// step-time arithmetic need.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Short name used on the command line (`llama-3.1-8b`).
    pub name: String,
    /// The Hugging Face repository id; also what `/v1/models` reports.
    pub hf_id: String,
    /// Transformer layers (`num_hidden_layers`).
    pub num_layers: u32,
    /// Residual stream width.
    pub hidden_size: u32,
    /// MLP inner width.
    pub intermediate_size: u32,
    /// Query heads.
    pub num_attention_heads: u32,
    /// Key/value heads (fewer than query heads under GQA/MQA).
    pub num_kv_heads: u32,
    /// Width of one attention head.
    pub head_dim: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Total parameter count.
    pub num_params: f64,
    /// Native weight dtype.
    pub dtype: Dtype,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_context: u32,
}

/// Constants that fit the roofline step-time model to measured engines.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Share of peak dense FLOPS that large GEMMs reach (0, 1].
    pub compute_efficiency: f64,
    /// Share of peak memory bandwidth that weight/KV streaming reaches (0, 1].
    pub bandwidth_efficiency: f64,
    /// Fixed per-step cost: scheduling, sampling, kernel launches (ms).
    pub step_overhead_ms: f64,
}

/// An accelerator as the capacity and roofline arithmetic see it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Short name used on the command line (`h100-sxm-80gb`).
    pub name: String,
    /// Device memory as CUDA reports it, in GiB.
    pub memory_gib: f64,
    /// Peak memory bandwidth in GB/s (10^9 bytes per second).
    pub memory_bandwidth_gbps: f64,
    /// Peak dense BF16/FP16 tensor throughput in TFLOPS.
    pub bf16_tflops: f64,
    /// Peak dense FP8 tensor throughput in TFLOPS, if the GPU has FP8.
    #[serde(default)]
    pub fp8_tflops: Option<f64>,
    /// Step-time model calibration.
    pub calibration: Calibration,
}

/// A compiled-in data file: its name and text.
type Builtin = (&'static str, &'static str);

const BUILTIN_MODELS: &[Builtin] = &[
    (
        "llama-3.1-8b",
        include_str!("../../fixtures/models/llama-3.1-8b.toml"),
    ),
    (
        "llama-3.1-70b",
        include_str!("../../fixtures/models/llama-3.1-70b.toml"),
    ),
    (
        "llama-2-7b",
        include_str!("../../fixtures/models/llama-2-7b.toml"),
    ),
    (
        "qwen2.5-7b",
        include_str!("../../fixtures/models/qwen2.5-7b.toml"),
    ),
    (
        "mistral-7b",
        include_str!("../../fixtures/models/mistral-7b.toml"),
    ),
];

const BUILTIN_GPUS: &[Builtin] = &[
    (
        "h100-sxm-80gb",
        include_str!("../../fixtures/gpus/h100-sxm-80gb.toml"),
    ),
    ("h200", include_str!("../../fixtures/gpus/h200.toml")),
    (
        "a100-80gb",
        include_str!("../../fixtures/gpus/a100-80gb.toml"),
    ),
    ("l4", include_str!("../../fixtures/gpus/l4.toml")),
];

/// Short aliases users type for GPUs.
const GPU_ALIASES: &[(&str, &str)] = &[
    ("h100", "h100-sxm-80gb"),
    ("h100-sxm", "h100-sxm-80gb"),
    ("h200-sxm", "h200"),
    ("a100", "a100-80gb"),
];

/// Parses TOML text into `T`, turning parser errors into one line that names the origin.
fn parse_toml<T: serde::de::DeserializeOwned>(origin: &str, text: &str) -> Result<T, PolicyError> {
    toml::from_str(text).map_err(|e| PolicyError::Parse {
        origin: origin.to_string(),
        // toml's messages span several lines (a source excerpt); keep them on one.
        message: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

fn read_file(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether a command-line value names a file rather than a built-in.
fn looks_like_path(s: &str) -> bool {
    s.ends_with(".toml") || s.contains('/') && Path::new(s).exists()
}

fn invalid(origin: &str, key: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        origin: origin.to_string(),
        key: key.to_string(),
        message: message.into(),
    }
}

fn require_positive(origin: &str, key: &str, value: f64) -> Result<(), PolicyError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(origin, key, format!("must be > 0, got {value}")))
    }
}

impl ModelSpec {
    /// Names of the compiled-in models.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN_MODELS.iter().map(|(n, _)| *n).collect()
    }

    /// Loads a model by built-in name (case-insensitive; the Hugging Face id
    /// works too) or from a TOML file path.
    pub fn resolve(name_or_path: &str) -> Result<Self, PolicyError> {
        if looks_like_path(name_or_path) {
            let path = Path::new(name_or_path);
            return Self::from_toml(&path.display().to_string(), &read_file(path)?);
        }
        let wanted = name_or_path.to_ascii_lowercase();
        for (name, text) in BUILTIN_MODELS {
            let spec = Self::from_toml(&format!("built-in model {name}"), text)?;
            if *name == wanted || spec.hf_id.to_ascii_lowercase() == wanted {
                return Ok(spec);
            }
        }
        Err(PolicyError::Unknown {
            kind: "model",
            name: name_or_path.to_string(),
            known: Self::builtin_names().join(", "),
        })
    }

    /// Parses and validates one model description.
    pub fn from_toml(origin: &str, text: &str) -> Result<Self, PolicyError> {
        let spec: Self = parse_toml(origin, text)?;
        spec.validate(origin)?;
        Ok(spec)
    }

    fn validate(&self, origin: &str) -> Result<(), PolicyError> {
        for (key, v) in [
            ("num_layers", self.num_layers),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_context", self.max_context),
        ] {
            if v == 0 {
                return Err(invalid(origin, key, "must be > 0"));
            }
        }
        require_positive(origin, "num_params", self.num_params)?;
        if self.num_attention_heads % self.num_kv_heads != 0 {
            return Err(invalid(
                origin,
                "num_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.num_attention_heads, self.num_kv_heads
                ),
            ));
        }
        Ok(())
    }

    /// KV-cache bytes one token occupies across all layers:
    /// `2 (K and V) × layers × kv_heads × head_dim × bytes`.
    pub fn kv_bytes_per_token(&self, kv_dtype: Dtype) -> f64 {
        2.0 * f64::from(self.num_layers)
            * f64::from(self.num_kv_heads)
            * f64::from(self.head_dim)
            * kv_dtype.bytes()
    }

    /// Bytes of weights at `dtype`.
    pub fn weight_bytes(&self, dtype: Dtype) -> f64 {
        self.num_params * dtype.bytes()
    }
}

impl GpuSpec {
    /// Names of the compiled-in GPUs.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN_GPUS.iter().map(|(n, _)| *n).collect()
    }

    /// Loads a GPU by built-in name or alias (case-insensitive) or from a TOML file path.
    pub fn resolve(name_or_path: &str) -> Result<Self, PolicyError> {
        if looks_like_path(name_or_path) {
            let path = Path::new(name_or_path);
            return Self::from_toml(&path.display().to_string(), &read_file(path)?);
        }
        let lower = name_or_path.to_ascii_lowercase();
        let wanted = GPU_ALIASES
            .iter()
            .find(|(alias, _)| *alias == lower)
            .map_or(lower.as_str(), |(_, name)| name);
        match BUILTIN_GPUS.iter().find(|(name, _)| *name == wanted) {
            Some((name, text)) => Self::from_toml(&format!("built-in gpu {name}"), text),
            None => Err(PolicyError::Unknown {
                kind: "gpu",
                name: name_or_path.to_string(),
                known: Self::builtin_names().join(", "),
            }),
        }
    }

    /// Parses and validates one GPU description.
    pub fn from_toml(origin: &str, text: &str) -> Result<Self, PolicyError> {
        let spec: Self = parse_toml(origin, text)?;
        require_positive(origin, "memory_gib", spec.memory_gib)?;
        require_positive(origin, "memory_bandwidth_gbps", spec.memory_bandwidth_gbps)?;
        require_positive(origin, "bf16_tflops", spec.bf16_tflops)?;
        if let Some(fp8) = spec.fp8_tflops {
            require_positive(origin, "fp8_tflops", fp8)?;
        }
        let c = &spec.calibration;
        for (key, v) in [
            ("calibration.compute_efficiency", c.compute_efficiency),
            ("calibration.bandwidth_efficiency", c.bandwidth_efficiency),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(invalid(origin, key, format!("must be in (0, 1], got {v}")));
            }
        }
        if !(c.step_overhead_ms.is_finite() && c.step_overhead_ms >= 0.0) {
            return Err(invalid(
                origin,
                "calibration.step_overhead_ms",
                "must be a finite number >= 0",
            ));
        }
        Ok(spec)
    }

    /// Bytes of device memory.
    pub fn memory_bytes(&self) -> f64 {
        self.memory_gib * GIB
    }

    /// Peak dense tensor FLOP/s for matrix multiplies in `dtype`
    /// (8-bit dtypes use the FP8 path where the GPU has one).
    pub fn peak_flops(&self, dtype: Dtype) -> f64 {
        let tflops = match (dtype.is_8bit(), self.fp8_tflops) {
            (true, Some(fp8)) => fp8,
            _ => self.bf16_tflops,
        };
        tflops * 1e12
    }

    /// Peak memory bandwidth in bytes per second.
    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        self.memory_bandwidth_gbps * 1e9
    }
}

/// Bytes in a GiB.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_loads() {
        for name in ModelSpec::builtin_names() {
            let m = ModelSpec::resolve(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(m.name, name);
        }
        for name in GpuSpec::builtin_names() {
            let g = GpuSpec::resolve(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(g.name, name);
        }
    }

    #[test]
    fn kv_bytes_per_token_matches_known_values() {
        let fp16 = Dtype::Fp16;
        let l31 = ModelSpec::resolve("llama-3.1-8b").unwrap();
        assert_eq!(l31.kv_bytes_per_token(fp16), 131_072.0); // 128 KiB
        let l2 = ModelSpec::resolve("llama-2-7b").unwrap();
        assert_eq!(l2.kv_bytes_per_token(fp16), 524_288.0); // 512 KiB
        assert_eq!(l31.kv_bytes_per_token(Dtype::Fp8), 65_536.0);
    }

    #[test]
    fn lookups_accept_aliases_and_hf_ids() {
        assert_eq!(GpuSpec::resolve("H100").unwrap().name, "h100-sxm-80gb");
        assert_eq!(
            ModelSpec::resolve("meta-llama/Llama-3.1-8B-Instruct")
                .unwrap()
                .name,
            "llama-3.1-8b"
        );
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = ModelSpec::resolve("gpt-5").unwrap_err().to_string();
        assert!(err.contains("unknown model `gpt-5`"), "{err}");
        assert!(err.contains("llama-3.1-8b"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn errors_name_the_key() {
        let text = include_str!("../../fixtures/models/llama-3.1-8b.toml")
            .replace("num_kv_heads = 8", "num_kv_heads = 0");
        let err = ModelSpec::from_toml("x.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.toml") && err.contains("num_kv_heads"),
            "{err}"
        );

        let text = include_str!("../../fixtures/models/llama-3.1-8b.toml")
            .replace("num_layers", "num_layerz");
        let err = ModelSpec::from_toml("y.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("y.toml") && err.contains("num_layerz"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");

        let err = GpuSpec::from_toml("z.toml", "name = [")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("z.toml:"), "{err}");
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = ModelSpec::resolve("/nonexistent/model.toml").unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }));
    }
}
