//! KV-cache capacity arithmetic: the worksheet behind `sluice plan`, and the
//! block-pool size the engine simulator starts with.
//!
//! The memory split follows vLLM's: of `gpu_memory_utilization × device
//! memory`, weights take their share, a runtime reserve (activations at the
//! profiling run, CUDA graphs, non-torch allocations) takes its share, and
//! what remains is carved into KV blocks of `block_size` tokens. Under tensor
//! parallelism both weights and KV heads are split across the GPUs, so every
//! GPU holds the same number of blocks and the pool's token capacity is one
//! GPU's block count times the block size.

use serde::{Deserialize, Serialize};

use crate::PolicyError;
use crate::hardware::{Dtype, GIB, GpuSpec, ModelSpec};

/// vLLM's default `--gpu-memory-utilization`.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;
/// vLLM's default `--block-size` on CUDA.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;
/// Memory vLLM's profiling run typically finds in use beside weights and KV
/// on a 7–8B model at the default `max_num_batched_tokens` (peak activations,
/// CUDA graphs, NCCL and allocator overhead), in GiB per GPU.
pub const DEFAULT_RUNTIME_RESERVE_GIB: f64 = 3.0;

/// What the worksheet is asked about.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The model.
    pub model: ModelSpec,
    /// The accelerator.
    pub gpu: GpuSpec,
    /// Tensor-parallel degree (GPUs per replica).
    pub tensor_parallel: u32,
    /// Share of device memory vLLM may use, (0, 1].
    pub gpu_memory_utilization: f64,
    /// Weight dtype (defaults to the model's own).
    pub dtype: Dtype,
    /// KV-cache dtype (defaults to the weight dtype, as vLLM's `auto`).
    pub kv_dtype: Dtype,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Per-GPU memory neither weights nor KV, in GiB.
    pub runtime_reserve_gib: f64,
    /// Request classes to size.
    pub classes: Vec<RequestClass>,
}

impl PlanInput {
    /// The usual defaults for a model on a GPU.
    pub fn new(model: ModelSpec, gpu: GpuSpec) -> Self {
        let dtype = model.dtype;
        Self {
            model,
            gpu,
            tensor_parallel: 1,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            dtype,
            kv_dtype: dtype,
            block_size: DEFAULT_BLOCK_SIZE,
            runtime_reserve_gib: DEFAULT_RUNTIME_RESERVE_GIB,
            classes: Vec::new(),
        }
    }
}

/// A request shape to size: prompt and output lengths at p50 and p95.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestClass {
    /// Class name (`chat`, `rag`, ...).
    pub name: String,
    /// Median prompt tokens.
    pub prompt_p50: u32,
    /// 95th-percentile prompt tokens.
    pub prompt_p95: u32,
    /// Median output tokens.
    pub output_p50: u32,
    /// 95th-percentile output tokens.
    pub output_p95: u32,
}

impl std::str::FromStr for RequestClass {
    type Err = String;

    /// Parses `name:prompt_p50/p95:output_p50/p95`, e.g. `chat:512/2048:256/1024`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected name:prompt_p50/prompt_p95:output_p50/output_p95, e.g. chat:512/2048:256/1024";
        let parts: Vec<&str> = s.split(':').collect();
        let [name, prompt, output] = parts.as_slice() else {
            return Err(format!("bad class `{s}`: {usage}"));
        };
        let pair = |p: &str| -> Result<(u32, u32), String> {
            let (a, b) = p
                .split_once('/')
                .ok_or_else(|| format!("bad class `{s}`: {usage}"))?;
            let parse = |x: &str| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("bad class `{s}`: `{x}` is not a token count"))
            };
            Ok((parse(a)?, parse(b)?))
        };
        let (prompt_p50, prompt_p95) = pair(prompt)?;
        let (output_p50, output_p95) = pair(output)?;
        let class = RequestClass {
            name: name.to_string(),
            prompt_p50,
            prompt_p95,
            output_p50,
            output_p95,
        };
        class
            .validate()
            .map_err(|e| format!("bad class `{s}`: {e}"))?;
        Ok(class)
    }
}

impl RequestClass {
    /// Checks that the name is set and the percentiles are ordered.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("empty class name".into());
        }
        if self.prompt_p50 > self.prompt_p95 || self.output_p50 > self.output_p95 {
            return Err("p50 must not exceed p95".into());
        }
        if self.prompt_p50 + self.output_p50 == 0 {
            return Err("a request of zero tokens".into());
        }
        Ok(())
    }
}

/// A TOML file of request classes: `[[class]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassFile {
    /// The classes.
    pub class: Vec<RequestClass>,
}

impl ClassFile {
    /// Parses and validates a class file.
    pub fn from_toml(origin: &str, text: &str) -> Result<Vec<RequestClass>, PolicyError> {
        let file: ClassFile = toml::from_str(text).map_err(|e| PolicyError::Parse {
            origin: origin.to_string(),
            message: e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })?;
        for (i, c) in file.class.iter().enumerate() {
            c.validate().map_err(|message| PolicyError::Invalid {
                origin: origin.to_string(),
                key: format!("class[{i}]"),
                message,
            })?;
        }
        Ok(file.class)
    }
}

/// How many sequences of one class fit at once.
#[derive(Debug, Clone, Serialize)]
pub struct ClassFit {
    /// The class.
    pub class: RequestClass,
    /// KV blocks one p50 sequence holds at its longest (prompt + output).
    pub blocks_per_seq_p50: u64,
    /// KV blocks one p95 sequence holds at its longest.
    pub blocks_per_seq_p95: u64,
    /// Concurrent p50 sequences the KV cache holds.
    pub concurrent_p50: u64,
    /// Concurrent p95 sequences the KV cache holds.
    pub concurrent_p95: u64,
    /// Whether a p95 sequence exceeds the model's context window.
    pub p95_exceeds_context: bool,
    /// Decode batch (sequences) at which a step of p50 sequences turns
    /// compute-bound; `None` when KV reads keep it memory-bound at any batch.
    pub compute_bound_batch_p50: Option<u64>,
}

/// The worksheet's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Model name.
    pub model: String,
    /// GPU name.
    pub gpu: String,
    /// Tensor-parallel degree.
    pub tensor_parallel: u32,
    /// Utilization used.
    pub gpu_memory_utilization: f64,
    /// Weight dtype.
    pub dtype: Dtype,
    /// KV dtype.
    pub kv_dtype: Dtype,
    /// Tokens per block.
    pub block_size: u32,
    /// Device memory per GPU, bytes.
    pub gpu_memory_bytes: u64,
    /// Memory vLLM may use per GPU, bytes.
    pub usable_bytes_per_gpu: u64,
    /// Weight bytes for the whole model.
    pub weight_bytes: u64,
    /// Weight bytes on each GPU.
    pub weight_bytes_per_gpu: u64,
    /// Runtime reserve per GPU, bytes.
    pub runtime_reserve_bytes_per_gpu: u64,
    /// KV bytes per token for the whole model (all layers, all KV heads).
    pub kv_bytes_per_token: u64,
    /// KV bytes per token held on each GPU.
    pub kv_bytes_per_token_per_gpu: u64,
    /// KV cache bytes per GPU.
    pub kv_cache_bytes_per_gpu: u64,
    /// KV blocks per GPU (vLLM's `num_gpu_blocks`).
    pub num_gpu_blocks: u64,
    /// Tokens the KV cache holds (`num_gpu_blocks × block_size`).
    pub kv_token_capacity: u64,
    /// Sequences at the full context window that fit.
    pub max_concurrency_at_max_context: f64,
    /// The GPU's roofline ridge point: FLOPs per byte above which work is compute-bound.
    pub ridge_flops_per_byte: f64,
    /// Decode batch (tokens per step, ignoring KV reads) at which decode turns compute-bound.
    pub decode_compute_bound_batch: u64,
    /// Per-class fits.
    pub classes: Vec<ClassFit>,
}

/// Runs the worksheet. Fails when the input is inconsistent or the weights do not fit.
pub fn plan(input: &PlanInput) -> Result<Plan, PolicyError> {
    let origin = "plan";
    let bad = |key: &str, message: String| PolicyError::Invalid {
        origin: origin.to_string(),
        key: key.to_string(),
        message,
    };
    let m = &input.model;
    let tp = input.tensor_parallel;
    if tp == 0 {
        return Err(bad("gpus", "must be at least 1".into()));
    }
    if m.num_attention_heads % tp != 0 {
        return Err(bad(
            "gpus",
            format!(
                "{} attention heads are not divisible by tensor parallel size {tp}",
                m.num_attention_heads
            ),
        ));
    }
    let util = input.gpu_memory_utilization;
    if !(util > 0.0 && util <= 1.0) {
        return Err(bad(
            "gpu_memory_utilization",
            format!("must be in (0, 1], got {util}"),
        ));
    }
    if input.block_size == 0 || !input.block_size.is_power_of_two() {
        return Err(bad(
            "block_size",
            format!("must be a power of two, got {}", input.block_size),
        ));
    }
    if !(input.runtime_reserve_gib.is_finite() && input.runtime_reserve_gib >= 0.0) {
        return Err(bad("runtime_reserve_gib", "must be >= 0".into()));
    }

    let gpu_memory = input.gpu.memory_bytes();
    let usable = gpu_memory * util;
    let weights = m.weight_bytes(input.dtype);
    let weights_per_gpu = weights / f64::from(tp);
    let reserve = input.runtime_reserve_gib * GIB;
    // KV heads are split across GPUs; with fewer KV heads than GPUs each GPU keeps a replica of one.
    let kv_heads_per_gpu = (m.num_kv_heads / tp).max(1);
    let kv_per_token = m.kv_bytes_per_token(input.kv_dtype);
    let kv_per_token_per_gpu =
        kv_per_token * f64::from(kv_heads_per_gpu) / f64::from(m.num_kv_heads);
    let kv_cache = usable - weights_per_gpu - reserve;
    if kv_cache <= 0.0 {
        return Err(bad(
            "gpus",
            format!(
                "{} does not fit: {:.1} GiB of weights per GPU + {:.1} GiB reserve exceed {:.1} GiB usable on {} at utilization {util}",
                m.name,
                weights_per_gpu / GIB,
                reserve / GIB,
                usable / GIB,
                input.gpu.name
            ),
        ));
    }
    let block_bytes = kv_per_token_per_gpu * f64::from(input.block_size);
    let num_gpu_blocks = (kv_cache / block_bytes).floor() as u64;
    let kv_token_capacity = num_gpu_blocks * u64::from(input.block_size);

    let ridge = input.gpu.peak_flops(input.dtype) / input.gpu.bandwidth_bytes_per_s();
    let bytes_per_param = input.dtype.bytes();
    // Decode FLOPs per token ≈ 2 × params; bytes per step ≈ params × bytes.
    // Batch B is compute-bound when 2·P·B / (P·b) ≥ ridge.
    let decode_batch = (ridge * bytes_per_param / 2.0).ceil() as u64;

    let blocks_for = |tokens: u32| u64::from(tokens).div_ceil(u64::from(input.block_size));
    let classes = input
        .classes
        .iter()
        .map(|c| {
            let p50 = blocks_for(c.prompt_p50 + c.output_p50).max(1);
            let p95 = blocks_for(c.prompt_p95 + c.output_p95).max(1);
            // Mean context of a decoding p50 sequence: the prompt plus half its output.
            let ctx = f64::from(c.prompt_p50) + f64::from(c.output_p50) / 2.0;
            let denom = 2.0 * m.num_params - ridge * ctx * kv_per_token;
            let compute_bound_batch_p50 = (denom > 0.0)
                .then(|| (ridge * m.num_params * bytes_per_param / denom).ceil() as u64);
            ClassFit {
                class: c.clone(),
                blocks_per_seq_p50: p50,
                blocks_per_seq_p95: p95,
                concurrent_p50: num_gpu_blocks / p50,
                concurrent_p95: num_gpu_blocks / p95,
                p95_exceeds_context: c.prompt_p95 + c.output_p95 > m.max_context,
                compute_bound_batch_p50,
            }
        })
        .collect();

    Ok(Plan {
        model: m.name.clone(),
        gpu: input.gpu.name.clone(),
        tensor_parallel: tp,
        gpu_memory_utilization: util,
        dtype: input.dtype,
        kv_dtype: input.kv_dtype,
        block_size: input.block_size,
        gpu_memory_bytes: gpu_memory as u64,
        usable_bytes_per_gpu: usable as u64,
        weight_bytes: weights as u64,
        weight_bytes_per_gpu: weights_per_gpu as u64,
        runtime_reserve_bytes_per_gpu: reserve as u64,
        kv_bytes_per_token: kv_per_token as u64,
        kv_bytes_per_token_per_gpu: kv_per_token_per_gpu as u64,
        kv_cache_bytes_per_gpu: kv_cache as u64,
        num_gpu_blocks,
        kv_token_capacity,
        max_concurrency_at_max_context: kv_token_capacity as f64 / f64::from(m.max_context),
        ridge_flops_per_byte: ridge,
        decode_compute_bound_batch: decode_batch,
        classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(model: &str, gpu: &str) -> PlanInput {
        PlanInput::new(
            ModelSpec::resolve(model).unwrap(),
            GpuSpec::resolve(gpu).unwrap(),
        )
    }

    #[test]
    fn llama_8b_on_h100_matches_vllm() {
        let p = plan(&input("llama-3.1-8b", "h100-sxm-80gb")).unwrap();
        assert_eq!(p.kv_bytes_per_token, 131_072);
        // vLLM 0.6–0.8 logs roughly 420–440k tokens of KV cache for this setup.
        assert!(
            (420_000..=440_000).contains(&p.kv_token_capacity),
            "{}",
            p.kv_token_capacity
        );
        assert_eq!(p.kv_token_capacity % 16, 0);
    }

    #[test]
    fn mha_model_holds_a_quarter_of_the_tokens() {
        let gqa = plan(&input("llama-3.1-8b", "h100")).unwrap();
        let mha = plan(&input("llama-2-7b", "h100")).unwrap();
        assert_eq!(mha.kv_bytes_per_token, 524_288);
        // Llama-2-7B has slightly smaller weights, so a bit more than a quarter.
        let ratio = mha.kv_token_capacity as f64 / gqa.kv_token_capacity as f64;
        assert!(ratio > 0.25 && ratio < 0.28, "{ratio}");
    }

    #[test]
    fn tensor_parallel_splits_weights_and_kv() {
        let mut i = input("llama-3.1-70b", "h100");
        assert!(plan(&i).is_err(), "70B bf16 cannot fit on one 80 GB GPU");
        i.tensor_parallel = 4;
        let p = plan(&i).unwrap();
        assert_eq!(p.kv_bytes_per_token_per_gpu * 4, p.kv_bytes_per_token);
        assert_eq!(p.weight_bytes_per_gpu, p.weight_bytes / 4);
        // 35.4 GiB of KV per GPU at 80 KiB per token per GPU.
        assert!(
            (440_000..480_000).contains(&p.kv_token_capacity),
            "{}",
            p.kv_token_capacity
        );
    }

    #[test]
    fn fp8_kv_doubles_capacity() {
        let base = plan(&input("llama-3.1-8b", "h100")).unwrap();
        let mut i = input("llama-3.1-8b", "h100");
        i.kv_dtype = Dtype::Fp8;
        let fp8 = plan(&i).unwrap();
        let ratio = fp8.num_gpu_blocks as f64 / base.num_gpu_blocks as f64;
        assert!((ratio - 2.0).abs() < 0.001, "{ratio}");
    }

    #[test]
    fn classes_fit_by_blocks() {
        let mut i = input("llama-3.1-8b", "h100");
        i.classes = vec!["chat:1000/4000:200/1000".parse().unwrap()];
        let p = plan(&i).unwrap();
        let c = &p.classes[0];
        assert_eq!(c.blocks_per_seq_p50, 75); // ceil(1200 / 16)
        assert_eq!(c.blocks_per_seq_p95, 313); // ceil(5000 / 16)
        assert_eq!(c.concurrent_p50, p.num_gpu_blocks / 75);
        assert!(!c.p95_exceeds_context);
    }

    #[test]
    fn ridge_point_of_h100() {
        let p = plan(&input("llama-3.1-8b", "h100")).unwrap();
        // 989 TFLOPS / 3.35 TB/s ≈ 295 FLOP/byte; bf16 decode turns compute-bound near 295 tokens.
        assert!((p.ridge_flops_per_byte - 295.2).abs() < 0.5);
        assert_eq!(p.decode_compute_bound_batch, 296);
    }

    #[test]
    fn bad_inputs_are_errors() {
        for bad in [
            "chat",
            "chat:1/2",
            "chat:a/2:1/2",
            "chat:5/2:1/2",
            ":1/2:1/2",
        ] {
            assert!(bad.parse::<RequestClass>().is_err(), "{bad}");
        }
        let mut i = input("llama-3.1-8b", "h100");
        i.block_size = 15;
        assert!(plan(&i).is_err());
        let mut i = input("llama-3.1-8b", "h100");
        i.gpu_memory_utilization = 1.5;
        assert!(plan(&i).is_err());
        let mut i = input("llama-3.1-8b", "h100");
        i.tensor_parallel = 3;
        assert!(plan(&i).is_err());
    }

    #[test]
    fn class_file_parses() {
        let text = "[[class]]\nname = \"rag\"\nprompt_p50 = 8000\nprompt_p95 = 16000\noutput_p50 = 300\noutput_p95 = 800\n";
        let classes = ClassFile::from_toml("c.toml", text).unwrap();
        assert_eq!(classes[0].name, "rag");
        let err = ClassFile::from_toml("c.toml", "[[class]]\nname = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:"), "{err}");
    }
}
