//! `pp eval MODEL_DIR --data FILE.jsonl`: loss and perplexity on a dataset, or with `--task
//! tool-calls`, how many of the model's answers are valid and exact tool calls.

use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::DType;
use indicatif::{ProgressBar, ProgressStyle};
use pp::generate::{generate_all, stop_tokens, GenerationOptions};
use pp::kernels::Kernels;
use pp::model::loss::IGNORE_INDEX;
use pp::model::StageModel;
use pp::sampling::Sampling;
use pp::tokenizer::Tokenizer;
use pp::tool_calls::{CallScore, ToolCallFormat};

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
    /// Sequences per forward pass (tool-calls: answers decoded together).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object on one line of stdout.
    #[arg(long)]
    json: bool,
    /// What to measure: the loss, or the answers' tool calls against each row's final
    /// assistant turn (greedy answers to {"messages"} rows).
    #[arg(long, value_enum, default_value_t = Task::Loss)]
    task: Task,
    /// tool-calls: how the model and the references write calls.
    #[arg(long, value_enum, default_value_t = ToolCallFormat::Auto)]
    tool_call_format: ToolCallFormat,
    /// tool-calls: at most this many tokens per answer.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// tool-calls: also end an answer at this text (repeatable), e.g. "<|im_end|>".
    #[arg(long)]
    stop: Vec<String>,
    #[command(flatten)]
    device: super::DeviceFlag,
}

/// What `pp eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Task {
    /// Loss and perplexity of every token.
    Loss,
    /// The share of answers that are valid tool calls, and exact ones.
    ToolCalls,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.task == Task::ToolCalls && args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let device = args.device.resolve()?;
    match args.task {
        Task::Loss => pp::with_backend!(device, |B, dev| evaluate_on::<B>(&args, &device, &dev)),
        Task::ToolCalls => {
            pp::with_backend!(device, |B, dev| score_tool_calls::<B>(&args, &device, &dev))
        }
    }
}

/// Answers every row greedily and scores the answers' tool calls against the rows' own.
fn score_tool_calls<B: Kernels>(
    args: &Args,
    target: &pp::device::Device,
    device: &B::Device,
) -> anyhow::Result<()> {
    let files = pp::checkpoint::open(&args.model)?;
    let cfg = &files.info.config;
    let tokenizer = Tokenizer::load(&args.model)?;
    let format = args.tool_call_format;
    let rows = pp::data::read_prompts(&args.data, &tokenizer)?;
    let source = args.data.display().to_string();
    super::check_prompt_room(&rows, &source, cfg.max_position_embeddings)?;
    let references = rows
        .iter()
        .map(|row| {
            let at = || format!("{}:{}", args.data.display(), row.line);
            let reference = row.reference.as_deref().with_context(|| {
                format!(
                    "{}: the row has no final assistant turn to compare with",
                    at()
                )
            })?;
            format
                .parse(reference)
                .with_context(|| format!("{}: the reference answer is not a tool call", at()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model = StageModel::<B>::load_whole(cfg, files.weights.as_ref(), device)?;
    super::announce(target);
    let options = GenerationOptions {
        sampling: Sampling::default(),
        max_new_tokens: args.max_new_tokens,
        stop_tokens: stop_tokens(&args.model, cfg, &tokenizer)?,
        stop_strings: args.stop.clone(),
    };
    let progress = ProgressBar::new(rows.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} answers  {per_sec}  eta {eta}")
            .expect("valid progress template"),
    );
    let mut score = CallScore::default();
    generate_all(
        &model,
        &tokenizer,
        rows.iter().map(|row| row.prompt.clone()),
        &options,
        args.batch_size,
        DType::F32,
        device,
        |index, answer| {
            score.add(format, &references[index], answer.text());
            progress.inc(1);
            Ok(())
        },
    )?;
    progress.finish_and_clear();
    let rate = |n: usize| n as f64 / score.rows as f64;
    if args.json {
        let record = serde_json::json!({
            "rows": score.rows, "valid_json": rate(score.valid), "exact": rate(score.exact)});
        println!("{record}");
    } else {
        println!(
            "{} rows: {} valid tool calls ({:.1}%), {} exact ({:.1}%)",
            score.rows,
            score.valid,
            100.0 * rate(score.valid),
            score.exact,
            100.0 * rate(score.exact)
        );
    }
    Ok(())
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
