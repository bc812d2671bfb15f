//! `pp eval MODEL_DIR --data FILE.jsonl`: loss and perplexity on a dataset.

use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pp::kernels::Kernels;
use pp::model::loss::IGNORE_INDEX;
use pp::model::StageModel;
use pp::tokenizer::Tokenizer;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory: Hugging Face or pp native.
    model: PathBuf,
    /// JSONL rows: {"text"}, {"prompt", "completion"}, {"messages"} or {"input_ids", "labels"};
    /// every token is scored.
    #[arg(long)]
    data: PathBuf,
    /// Longest sequence fed to the model; longer rows are scored in windows
    /// [default: the context length, at most 2048].
    #[arg(long)]
    max_len: Option<usize>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object on one line of stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: super::DeviceFlag,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = args.device.resolve()?;
    pp::with_backend!(device, |B, dev| evaluate_on::<B>(&args, &device, &dev))
}

fn evaluate_on<B: Kernels>(
    args: &Args,
    target: &pp::device::Device,
    device: &B::Device,
) -> anyhow::Result<()> {
    let files = pp::checkpoint::open(&args.model)?;
    let cfg = &files.info.config;
    let max_len = args
        .max_len
        .unwrap_or(cfg.max_position_embeddings.min(2048));
    if max_len < 2 {
        bail!("--max-len must be at least 2 (a token and the one it predicts)");
    }
    let tokenizer = Tokenizer::load_if_present(&args.model)?;
    let examples = pp::data::read_jsonl(
        &args.data,
        &pp::data::RowOptions::plain(tokenizer.as_ref(), cfg.vocab_size),
    )?;
    let model = StageModel::<B>::load_whole(cfg, files.weights.as_ref(), device)?;

    let total: usize = examples
        .iter()
        .map(|e| {
            e.labels
                .iter()
                .skip(1)
                .filter(|&&l| l != IGNORE_INDEX)
                .count()
        })
        .sum();
    if total == 0 {
        bail!(
            "{}: no token has a label to score (every label is -100)",
            args.data.display()
        );
    }
    super::announce(target);
    let progress = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tokens  {per_sec}  eta {eta}")
            .expect("valid progress template"),
    );
    let pad_id = cfg.pad_token_id.unwrap_or(0);
    let result = pp::eval::evaluate(
        &model,
        &examples,
        max_len,
        args.batch_size,
        pad_id,
        device,
        |n| progress.inc(n as u64),
    );
    progress.finish_and_clear();
    let result = result.context("no token was scored")?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "loss {:.4}  perplexity {:.3}  tokens {}  rows {}  sequences {}",
            result.loss, result.perplexity, result.tokens, result.rows, result.sequences
        );
    }
    Ok(())
}
