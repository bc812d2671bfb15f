//! `pp inspect MODEL_DIR`: what a model is and what training it takes.

use std::path::PathBuf;

use pp::checkpoint::Format;
use pp::dtype::DType;
use pp::model::config::RopeScaling;
use pp::plan::{human_bytes, human_count, MemoryEstimate};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory: Hugging Face or pp native.
    model: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Sequence length the memory estimate assumes [default: the context length, at most 4096].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Dtype of the trained weights for the memory estimate [default: the stored dtype].
    #[arg(long)]
    dtype: Option<DType>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let info = pp::checkpoint::describe(&args.model)?;
    let cfg = &info.config;
    let seq_len = args
        .seq_len
        .unwrap_or(cfg.max_position_embeddings.min(4096));
    let dtype = args.dtype.unwrap_or(cfg.dtype);
    let memory = MemoryEstimate::new(cfg, dtype, seq_len);
    let partition = match &info.format {
        Format::Native(native) => Some(native.partition()),
        Format::HuggingFace => None,
    };
    if args.json {
        let report = json!({
            "format": if partition.is_some() { "native" } else { "huggingface" },
            "stages": partition.map(|p| p.stages()),
            "architecture": cfg.architecture.hf_class(),
            "parameters": cfg.num_params(),
            "config": cfg,
            "memory": {
                "dtype": dtype,
                "estimate": memory,
                "adamw_total": memory.adamw_total(),
                "adafactor_checkpointed_total": memory.adafactor_checkpointed_total(),
            },
        });
        println!("{report}");
        return Ok(());
    }
    let rope = match cfg.rope.scaling {
        RopeScaling::Default => String::new(),
        RopeScaling::Linear { factor } => format!(", linear scaling ×{factor}"),
        RopeScaling::Dynamic { factor } => format!(", dynamic scaling ×{factor}"),
        RopeScaling::Llama3 { factor, .. } => format!(", llama3 scaling ×{factor}"),
    };
    let format = match partition {
        Some(p) => format!(
            "pp native, {} stage(s) split before layers {:?}",
            p.len(),
            p.split_points()
        ),
        None => "Hugging Face".to_string(),
    };
    let rows = [
        ("format", format),
        ("architecture", cfg.architecture.hf_class().to_string()),
        (
            "parameters",
            format!("{} ({})", human_count(cfg.num_params()), cfg.num_params()),
        ),
        ("stored dtype", cfg.dtype.torch_name().to_string()),
        ("layers", cfg.num_layers.to_string()),
        (
            "hidden size",
            format!("{} (MLP {})", cfg.hidden_size, cfg.intermediate_size),
        ),
        (
            "attention heads",
            format!(
                "{} query, {} key/value, head_dim {}",
                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            ),
        ),
        ("vocabulary", cfg.vocab_size.to_string()),
        (
            "context length",
            format!("{} tokens", cfg.max_position_embeddings),
        ),
        ("rope", format!("theta {}{rope}", cfg.rope.theta)),
        (
            "sliding window",
            cfg.sliding_window
                .map_or("none".into(), |w| format!("{w} tokens")),
        ),
        (
            "tied embeddings",
            if cfg.tie_word_embeddings { "yes" } else { "no" }.to_string(),
        ),
    ];
    for (name, value) in rows {
        println!("{name:<17}{value}");
    }
    println!();
    println!("Full fine-tuning on one device, {dtype} weights, one sequence of {seq_len} tokens (estimate):");
    let per_token = |b: u64| {
        format!(
            "{} per token, {} per sequence",
            human_bytes(b),
            human_bytes(b * seq_len as u64)
        )
    };
    let memory_rows = [
        ("weights", human_bytes(memory.weights)),
        ("gradients", human_bytes(memory.gradients)),
        ("AdamW state", human_bytes(memory.adamw_state)),
        ("Adafactor state", human_bytes(memory.adafactor_state)),
        ("activations", per_token(memory.activations_per_token)),
        (
            "  checkpointed",
            per_token(memory.checkpointed_activations_per_token),
        ),
        ("largest transient", human_bytes(memory.largest_transient)),
        ("AdamW, all activations", human_bytes(memory.adamw_total())),
        (
            "Adafactor, checkpointed",
            human_bytes(memory.adafactor_checkpointed_total()),
        ),
    ];
    for (name, value) in memory_rows {
        println!("  {name:<25}{value}");
    }
    Ok(())
}
