//! `pp generate MODEL_DIR --prompt TEXT | --data FILE.jsonl`: a model's answers, greedy or
//! sampled.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use pp::generate::{generate, GenerationOptions};
use pp::kernels::Kernels;
use pp::model::StageModel;
use pp::sampling::Sampling;
use pp::tokenizer::{Message, Tokenizer};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory: Hugging Face or pp native.
    model: PathBuf,
    /// Continue this text.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    prompt: Option<String>,
    /// JSONL rows of {"messages"} (answered as the next assistant turn; a final assistant turn
    /// is dropped) or {"prompt"}; prints one {"line", "completion"} object per row.
    #[arg(long)]
    data: Option<PathBuf>,
    /// At most this many new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Also stop at this text (repeatable), e.g. a chat template's end-of-turn marker.
    #[arg(long)]
    stop: Vec<String>,
    /// Sample at this temperature [default: 0, greedy].
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Make tokens already in the text less likely (transformers' rule; 1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Seed of the draws (the same seed repeats the same answers).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: super::DeviceFlag,
}

impl Args {
    /// How to pick tokens, checked.
    fn sampling(&self) -> anyhow::Result<Sampling> {
        let sampling = Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        sampling.validate().map_err(anyhow::Error::msg)?;
        Ok(sampling)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Bad values are reported before the model is loaded.
    args.sampling()?;
    let device = args.device.resolve()?;
    pp::with_backend!(device, |B, dev| generate_on::<B>(&args, &device, &dev))
}

fn generate_on<B: Kernels>(
    args: &Args,
    target: &pp::device::Device,
    device: &B::Device,
) -> anyhow::Result<()> {
    let files = pp::checkpoint::open(&args.model)?;
    let cfg = &files.info.config;
    let tokenizer = Tokenizer::load(&args.model)?;
    let model = StageModel::<B>::load_whole(cfg, files.weights.as_ref(), device)?;
    super::announce(target);
    let mut stop_tokens = cfg.eos_token_ids.clone();
    stop_tokens.extend(tokenizer.eos_id());
    let options = GenerationOptions {
        sampling: args.sampling()?,
        max_new_tokens: args.max_new_tokens,
        stop_tokens,
        stop_strings: args.stop.clone(),
    };
    if let Some(prompt) = &args.prompt {
        let ids = tokenizer.encode(prompt, true)?;
        println!("{}", generate(&model, &tokenizer, &ids, &options, device)?);
        return Ok(());
    }
    let path = args
        .data
        .as_ref()
        .expect("clap requires --prompt or --data");
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut out = std::io::stdout().lock();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line_no = index + 1;
        let text = line.with_context(|| format!("{}:{line_no}", path.display()))?;
        if text.trim().is_empty() {
            continue;
        }
        let row_error =
            |message: String| anyhow::anyhow!("{}:{line_no}: {message}", path.display());
        let row: Value =
            serde_json::from_str(&text).map_err(|e| row_error(format!("not valid JSON: {e}")))?;
        let ids = if let Some(messages) = row.get("messages") {
            let mut messages: Vec<Message> = serde_json::from_value(messages.clone())
                .map_err(|e| row_error(format!("\"messages\" is not a list of messages: {e}")))?;
            if messages.last().is_some_and(|m| m.role == "assistant") {
                messages.pop();
            }
            tokenizer.encode_chat(&messages, true)?
        } else if let Some(prompt) = row.get("prompt").and_then(Value::as_str) {
            tokenizer.encode(prompt, true)?
        } else {
            bail!(
                "{}:{line_no}: expected \"messages\" or \"prompt\"",
                path.display()
            );
        };
        let completion = generate(&model, &tokenizer, &ids, &options, device)?;
        let record = serde_json::json!({"line": line_no, "completion": completion});
        writeln!(out, "{record}")?;
    }
    Ok(())
}
