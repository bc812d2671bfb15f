//! `pp convert SOURCE OUT`: Hugging Face ↔ native, and re-partitioning native checkpoints.

use std::path::PathBuf;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use pp::checkpoint::hf_writer::DEFAULT_MAX_SHARD_BYTES;
use pp::convert::{convert, ConvertOptions, Stages, Target};
use pp::dtype::DType;
use pp::plan::{human_bytes, Balance};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum To {
    /// pp's native format, partitioned into stages.
    Native,
    /// A Hugging Face directory (config.json, safetensors shards, tokenizer).
    Hf,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model to convert: a Hugging Face directory or a native checkpoint.
    source: PathBuf,
    /// Where to write the result; must not exist unless --force.
    out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = To::Native)]
    to: To,
    /// Number of pipeline stages, balanced by --balance [default: a native source keeps its
    /// partition, a Hugging Face source becomes one stage].
    #[arg(long, conflicts_with = "split")]
    stages: Option<usize>,
    /// Explicit stage boundaries: the layers at which stages 2, 3, ... begin (e.g. 10,20).
    #[arg(long, value_delimiter = ',')]
    split: Option<Vec<usize>>,
    /// What --stages balances: layers, params, or memory (estimated training memory, which
    /// counts the embedding, the head and its logits).
    #[arg(long, default_value = "memory", requires = "stages")]
    balance: Balance,
    /// Storage dtype of the output [default: unchanged, byte for byte].
    #[arg(long)]
    dtype: Option<DType>,
    /// Largest safetensors shard for --to hf, e.g. 5GB, 500MB or 2GiB.
    #[arg(long, value_parser = super::parse_size)]
    max_shard_size: Option<u64>,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// Skip the self-check that runs source and result on a probe input.
    #[arg(long)]
    no_verify: bool,
    /// Where the self-check computes.
    #[command(flatten)]
    device: super::DeviceFlag,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let target = match args.to {
        To::Native => {
            if args.max_shard_size.is_some() {
                bail!("--max-shard-size applies to --to hf only");
            }
            Target::Native(match (args.stages, args.split) {
                (Some(n), _) => Stages::Balanced(n, args.balance),
                (None, Some(split)) => Stages::Split(split),
                (None, None) => Stages::Keep,
            })
        }
        To::Hf => {
            if args.stages.is_some() || args.split.is_some() {
                bail!("--stages and --split apply to the native format, not --to hf");
            }
            Target::HuggingFace {
                max_shard_bytes: args.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_BYTES),
            }
        }
    };
    let options = ConvertOptions {
        target,
        dtype: args.dtype,
        force: args.force,
        verify: if args.no_verify {
            None
        } else {
            Some(args.device.resolve()?)
        },
    };
    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes}  {bytes_per_sec}  eta {eta}")
            .expect("valid progress template"),
    );
    let report = convert(&args.source, &args.out, &options, &progress)?;
    let format = match args.to {
        To::Native => "pp native",
        To::Hf => "Hugging Face",
    };
    println!(
        "wrote {} ({format}, {} of tensors)",
        args.out.display(),
        human_bytes(report.bytes_written)
    );
    if let Some(partition) = &report.partition {
        for (i, stage) in partition.stages().iter().enumerate() {
            println!("  stage {i}: {stage}");
        }
    }
    match (report.verify, &options.verify) {
        (Some(v), Some(device)) => println!(
            "self-check passed on {device}: {} parts run on a {}-token probe, max |Δ| {:e}",
            v.parts, v.probe_tokens, v.max_abs_diff
        ),
        _ => println!("self-check skipped (--no-verify)"),
    }
    Ok(())
}
