//! `pp plan MODEL_DIR [training flags]`: the estimated peak memory per device of a training
//! configuration, so a user sees before starting what fits their cards.

use std::path::PathBuf;

use anyhow::Context;
use pp::checkpoint::Format;
use pp::dtype::DType;
use pp::plan::{
    human_bytes, part_costs, per_device, plan_training, Balance, Memory, TrainingSetup,
};
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
    /// Plan a pipeline over this many devices, balanced by --balance (interleaved and zbv
    /// cut the model into more stages than devices) [default: a native checkpoint's stages,
    /// else 1].
    #[arg(long, conflicts_with = "split")]
    stages: Option<usize>,
    /// What the stages balance.
    #[arg(long, default_value = "memory")]
    balance: Balance,
    /// Stages starting at these layers: `--split 10,20`.
    #[arg(long, value_delimiter = ',')]
    split: Option<Vec<usize>>,
    /// The pipeline schedule, which decides how many micro-batches each stage holds:
    /// gpipe, 1f1b, zbh1 (one stage per device), interleaved (--virtual stages per device) or
    /// zbv (two per device).
    #[arg(long, default_value = "1f1b")]
    schedule: ScheduleKind,
    /// Stage slices per device for interleaved.
    #[arg(long = "virtual", default_value_t = 2)]
    virtual_stages: usize,
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
    let per_device_stages = match args.schedule {
        ScheduleKind::Interleaved => args.virtual_stages.max(1),
        ScheduleKind::ZbV => 2,
        _ => 1,
    };
    let balanced = |devices: usize| {
        Partition::balanced(
            &part_costs(cfg, args.balance, dtype, seq_len),
            devices * per_device_stages,
        )
    };
    let partition = match (&args.split, args.stages, &info.format) {
        (Some(split), _, _) => Partition::from_split(split, cfg.num_layers),
        (None, Some(n), _) => balanced(n),
        (None, None, Format::Native(native)) => Ok(native.partition().clone()),
        (None, None, Format::HuggingFace) if per_device_stages == 1 => {
            Partition::from_split(&[], cfg.num_layers)
        }
        (None, None, Format::HuggingFace) => balanced(1),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("cannot plan the stages")?;
    if partition.len() % per_device_stages != 0 {
        anyhow::bail!(
            "{} puts {per_device_stages} stages on each device; {} stages do not divide among devices",
            args.schedule.name(),
            partition.len()
        );
    }
    let ranks = partition.len() / per_device_stages;
    let microbatches = args.microbatches.unwrap_or(2 * ranks);
    let schedule = Schedule::new(args.schedule, ranks, microbatches, per_device_stages)
        .context("cannot plan the schedule")?;
    let setup = TrainingSetup {
        dtype,
        seq_len,
        micro_batch_size: args.micro_batch_size,
        optimizer: args.optimizer.optimizer(),
        savers: args.savers.savers(),
        in_flight: pp::plan::in_flight(&schedule)?,
    };
    let plans = plan_training(cfg, &partition, &setup);
    let devices = per_device(&plans, &schedule, &setup.savers);
    let fits = |total: u64| args.device_memory.map(|m| total <= m);
    // With one stage per device, a stage's verdict is its device's.
    let stage_fits = |total: u64| fits(total).filter(|_| per_device_stages == 1);
    if args.json {
        let stages: Vec<_> = plans
            .iter()
            .map(|p| serde_json::json!({"plan": p, "fits": stage_fits(p.memory.total)}))
            .collect();
        let devices: Vec<_> = devices
            .iter()
            .map(|d| serde_json::json!({"plan": d, "fits": fits(d.memory.total)}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"dtype": dtype, "seq_len": seq_len,
                "micro_batch_size": args.micro_batch_size, "stages": stages,
                "devices": devices})
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
    if partition.len() > 1 {
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
        print_row(&parts, &plan.memory, stage_fits(plan.memory.total));
    }
    if per_device_stages > 1 {
        for (rank, device) in devices.iter().enumerate() {
            let stages: Vec<String> = device.stages.iter().map(ToString::to_string).collect();
            let label = format!("device {rank} (stages {})", stages.join(", "));
            print_row(&label, &device.memory, fits(device.memory.total));
        }
    }
    Ok(())
}

/// One line of the table: `label`, the sizes, and whether it fits when a device size was
/// given.
fn print_row(label: &str, memory: &Memory, fits: Option<bool>) {
    let verdict = match fits {
        Some(true) => "  fits",
        Some(false) => "  does not fit",
        None => "",
    };
    println!(
        "{label:<32} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10}{verdict}",
        human_bytes(memory.weights),
        human_bytes(memory.gradients),
        human_bytes(memory.optimizer_state),
        human_bytes(memory.activations),
        human_bytes(memory.transient),
        human_bytes(memory.total),
        human_bytes(memory.host_activations),
    );
}
