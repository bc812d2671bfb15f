//! `pp plan MODEL_DIR [training flags]`: the estimated peak memory per device of a training
//! configuration, so a user sees before starting what fits their cards.

use std::path::PathBuf;

use anyhow::Context;
use pp::checkpoint::Format;
use pp::dtype::DType;
use pp::plan::{human_bytes, part_costs, plan_training, Balance, TrainingSetup};
use pp_stages::{Partition, Schedule, ScheduleKind};

use super::train::{OptimizerFlags, SaverFlags};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory (Hugging Face or pp native), or a directory holding just a
    /// config.json such as configs/models/llama-3-8b.
    model: PathBuf,
    /// Tokens per sequence [default: the context length, at most 4096].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per forward/backward pass.
    #[arg(long, default_value_t = 1)]
    micro_batch_size: usize,
    /// Dtype of the trained weights [default: the stored dtype].
    #[arg(long)]
    dtype: Option<DType>,
    #[command(flatten)]
    optimizer: OptimizerFlags,
    #[command(flatten)]
    savers: SaverFlags,
    /// Plan a pipeline of this many stages, balanced by --balance [default: a native
    /// checkpoint's stages, else 1].
    #[arg(long, conflicts_with = "split")]
    stages: Option<usize>,
    /// What the stages balance.
    #[arg(long, default_value = "memory")]
    balance: Balance,
    /// Stages starting at these layers: `--split 10,20`.
    #[arg(long, value_delimiter = ',')]
    split: Option<Vec<usize>>,
    /// The pipeline schedule, which decides how many micro-batches each stage holds:
    /// gpipe, 1f1b or zbh1 (one stage per device).
    #[arg(long, default_value = "1f1b")]
    schedule: ScheduleKind,
    /// Micro-batches per optimizer step [default: twice the stages].
    #[arg(long)]
    microbatches: Option<usize>,
    /// Say whether each stage fits a device of this size (`24GB`, `80GiB`).
    #[arg(long, value_parser = super::parse_size)]
    device_memory: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let info = pp::checkpoint::describe(&args.model)?;
    let cfg = &info.config;
    let seq_len = args
        .seq_len
        .unwrap_or(cfg.max_position_embeddings.min(4096));
    let dtype = args.dtype.unwrap_or(cfg.dtype);
    let partition = match (&args.split, args.stages, &info.format) {
        (Some(split), _, _) => Partition::from_split(split, cfg.num_layers),
        (None, Some(n), _) => {
            Partition::balanced(&part_costs(cfg, args.balance, dtype, seq_len), n)
        }
        (None, None, Format::Native(native)) => Ok(native.partition().clone()),
        (None, None, Format::HuggingFace) => Partition::from_split(&[], cfg.num_layers),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("cannot plan the stages")?;
    if matches!(args.schedule, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
        anyhow::bail!(
            "pp plan plans one stage per device (gpipe, 1f1b, zbh1); `{}` puts several on each",
            args.schedule.name()
        );
    }
    let ranks = partition.len();
    let microbatches = args.microbatches.unwrap_or(2 * ranks);
    let schedule =
        Schedule::new(args.schedule, ranks, microbatches, 1).context("cannot plan the schedule")?;
    let setup = TrainingSetup {
        dtype,
        seq_len,
        micro_batch_size: args.micro_batch_size,
        optimizer: args.optimizer.optimizer(),
        savers: args.savers.savers(),
        in_flight: pp::plan::in_flight(&schedule)?,
    };
    let plans = plan_training(cfg, &partition, &setup);
    let fits = |total: u64| args.device_memory.map(|m| total <= m);
    if args.json {
        let stages: Vec<_> = plans
            .iter()
            .map(|p| serde_json::json!({"plan": p, "fits": fits(p.total)}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"dtype": dtype, "seq_len": seq_len,
                "micro_batch_size": args.micro_batch_size, "stages": stages})
        );
        return Ok(());
    }
    let savers = setup.savers;
    let on: Vec<&str> = [
        (savers.checkpoint_activations, "checkpoint-activations"),
        (savers.optimizer_in_backward, "optimizer-in-backward"),
        (savers.offload_activations, "offload-activations cpu"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    println!(
        "{} tokens per micro-batch ({} × {seq_len}), {dtype}, {}, memory savers: {}",
        seq_len * args.micro_batch_size,
        args.micro_batch_size,
        args.optimizer.optimizer().name(),
        if on.is_empty() {
            "none".to_string()
        } else {
            on.join(", ")
        }
    );
    if ranks > 1 {
        let held: Vec<String> = plans.iter().map(|p| p.in_flight.to_string()).collect();
        println!(
            "{} with {microbatches} micro-batches: the stages hold {} at once",
            args.schedule.name(),
            held.join(", ")
        );
    }
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10}",
        "stage", "weights", "grads", "optimizer", "activations", "transient", "total", "host"
    );
    for (index, plan) in plans.iter().enumerate() {
        let slice = &plan.slice;
        let parts = format!(
            "{index}: {}layers {}..{}{}",
            if slice.embedding { "embed + " } else { "" },
            slice.layers.start,
            slice.layers.end,
            if slice.head { " + head" } else { "" }
        );
        let verdict = match fits(plan.total) {
            Some(true) => "  fits",
            Some(false) => "  does not fit",
            None => "",
        };
        println!(
            "{parts:<32} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10}{verdict}",
            human_bytes(plan.weights),
            human_bytes(plan.gradients),
            human_bytes(plan.optimizer_state),
            human_bytes(plan.activations),
            human_bytes(plan.transient),
            human_bytes(plan.total),
            human_bytes(plan.host_activations),
        );
    }
    Ok(())
}
