//! `sluice plan`: prints the KV-cache capacity worksheet.

use std::path::PathBuf;

use anyhow::Context;
use sluice_policies::capacity::{self, ClassFile, Plan, PlanInput, RequestClass};
use sluice_policies::hardware::{Dtype, GIB, GpuSpec, ModelSpec};

/// Arguments of `sluice plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Model: a built-in name (llama-3.1-8b, llama-3.1-70b, llama-2-7b, qwen2.5-7b,
    /// mistral-7b), its Hugging Face id, or a path to a model TOML.
    #[arg(long)]
    model: String,
    /// GPU: a built-in name (h100-sxm-80gb, h200, a100-80gb, l4) or a path to a GPU TOML.
    #[arg(long)]
    gpu: String,
    /// GPUs per replica (tensor parallel size).
    #[arg(long = "gpus", default_value_t = 1)]
    gpus: u32,
    /// Share of GPU memory vLLM may use.
    #[arg(long, default_value_t = capacity::DEFAULT_GPU_MEMORY_UTILIZATION)]
    gpu_memory_utilization: f64,
    /// Weight dtype (default: the model's own).
    #[arg(long)]
    dtype: Option<Dtype>,
    /// KV-cache dtype (default: the weight dtype, as vLLM's `auto`).
    #[arg(long)]
    kv_dtype: Option<Dtype>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = capacity::DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// GiB per GPU held by activations, CUDA graphs and the runtime.
    #[arg(long, default_value_t = capacity::DEFAULT_RUNTIME_RESERVE_GIB)]
    runtime_reserve_gib: f64,
    /// A request class `name:prompt_p50/p95:output_p50/p95` (repeatable).
    #[arg(long = "class")]
    classes: Vec<RequestClass>,
    /// A TOML file of `[[class]]` tables with the same fields.
    #[arg(long)]
    classes_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `sluice plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let model = ModelSpec::resolve(&args.model)?;
    let gpu = GpuSpec::resolve(&args.gpu)?;
    let mut input = PlanInput::new(model, gpu);
    input.tensor_parallel = args.gpus;
    input.gpu_memory_utilization = args.gpu_memory_utilization;
    if let Some(d) = args.dtype {
        input.dtype = d;
        input.kv_dtype = d;
    }
    if let Some(d) = args.kv_dtype {
        input.kv_dtype = d;
    }
    input.block_size = args.block_size;
    input.runtime_reserve_gib = args.runtime_reserve_gib;
    input.classes = args.classes;
    if let Some(path) = &args.classes_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        input
            .classes
            .extend(ClassFile::from_toml(&path.display().to_string(), &text)?);
    }
    let plan = capacity::plan(&input)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render_table(&plan));
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// The human-readable worksheet.
fn render_table(p: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let per_gpu = if p.tensor_parallel > 1 {
        " per GPU"
    } else {
        ""
    };
    let rows: Vec<(String, String)> = vec![
        ("model".into(), p.model.clone()),
        ("gpu".into(), format!("{} × {}", p.tensor_parallel, p.gpu)),
        (
            "dtype / kv dtype".into(),
            format!("{} / {}", p.dtype.name(), p.kv_dtype.name()),
        ),
        ("gpu memory".into(), gib(p.gpu_memory_bytes)),
        (
            format!("usable at {:.2}", p.gpu_memory_utilization),
            gib(p.usable_bytes_per_gpu),
        ),
        (format!("weights{per_gpu}"), gib(p.weight_bytes_per_gpu)),
        (
            format!("runtime reserve{per_gpu}"),
            gib(p.runtime_reserve_bytes_per_gpu),
        ),
        (format!("kv cache{per_gpu}"), gib(p.kv_cache_bytes_per_gpu)),
        (
            "kv bytes per token".into(),
            format!(
                "{} ({} KiB)",
                p.kv_bytes_per_token,
                p.kv_bytes_per_token / 1024
            ),
        ),
        (
            "kv blocks".into(),
            format!("{} × {} tokens", p.num_gpu_blocks, p.block_size),
        ),
        ("kv token capacity".into(), p.kv_token_capacity.to_string()),
        (
            "max concurrency at full context".into(),
            format!("{:.2}", p.max_concurrency_at_max_context),
        ),
        (
            "roofline ridge point".into(),
            format!("{:.0} FLOP/byte", p.ridge_flops_per_byte),
        ),
        (
            "decode turns compute-bound at".into(),
            format!("~{} tokens per step", p.decode_compute_bound_batch),
        ),
    ];
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (k, v) in rows {
        let _ = writeln!(s, "{k:<width$}  {v}");
    }
    if !p.classes.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<12} {:>12} {:>12} {:>10} {:>10} {:>16}",
            "class", "tokens p50", "tokens p95", "fit p50", "fit p95", "compute-bound at"
        );
        for c in &p.classes {
            let k = &c.class;
            let bound = c
                .compute_bound_batch_p50
                .map_or("never".to_string(), |b| format!("{b} seqs"));
            let _ = writeln!(
                s,
                "{:<12} {:>12} {:>12} {:>10} {:>10} {:>16}{}",
                k.name,
                k.prompt_p50 + k.output_p50,
                k.prompt_p95 + k.output_p95,
                c.concurrent_p50,
                c.concurrent_p95,
                bound,
                if c.p95_exceeds_context {
                    "  (p95 exceeds context)"
                } else {
                    ""
                }
            );
        }
    }
    s
}
