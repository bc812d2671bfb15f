//! `pp generate MODEL_DIR --prompt TEXT | --data FILE.jsonl`: a model's answers, greedy or
//! sampled.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use burn::tensor::DType;
use pp::data::PromptRow;
use pp::generate::{generate_all, stop_tokens, GenerationOptions};
use pp::kernels::Kernels;
use pp::model::StageModel;
use pp::sampling::Sampling;
use pp::tokenizer::Tokenizer;

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
    /// Rows answered together (continuous batching: the next row joins when one finishes).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
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
    if args.max_batch == 0 {
        anyhow::bail!("--max-batch must be at least 1");
    }
    if args.max_new_tokens == 0 {
        anyhow::bail!("--max-new-tokens must be at least 1");
    }
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
    let rows = match (&args.prompt, &args.data) {
        (Some(prompt), _) => vec![PromptRow {
            line: 0,
            prompt: tokenizer.encode(prompt, true)?,
            reference: None,
        }],
        (None, Some(path)) => pp::data::read_prompts(path, &tokenizer)?,
        (None, None) => unreachable!("clap requires --prompt or --data"),
    };
    let source = args
        .data
        .as_ref()
        .map_or("--prompt".into(), |path| path.display().to_string());
    super::check_prompt_room(&rows, &source, cfg.max_position_embeddings)?;
    let model = StageModel::<B>::load_whole(cfg, files.weights.as_ref(), device)?;
    super::announce(target);
    let options = GenerationOptions {
        sampling: args.sampling()?,
        max_new_tokens: args.max_new_tokens,
        stop_tokens: stop_tokens(&args.model, cfg, &tokenizer)?,
        stop_strings: args.stop.clone(),
    };
    let mut out = std::io::stdout().lock();
    // Answers finish in any order; they are printed in the rows' order.
    let mut finished = BTreeMap::new();
    let mut next = 0;
    let prompts = rows.iter().map(|row| row.prompt.clone());
    generate_all(
        &model,
        &tokenizer,
        prompts,
        &options,
        args.max_batch,
        DType::F32,
        device,
        |index, completion| {
            finished.insert(index, completion.text().to_string());
            while let Some(text) = finished.remove(&next) {
                let printed = if args.prompt.is_some() {
                    writeln!(out, "{text}")
                } else {
                    let record = serde_json::json!({"line": rows[next].line, "completion": text});
                    writeln!(out, "{record}")
                };
                printed.map_err(|e| pp::Error::Usage(format!("cannot write the answers: {e}")))?;
                next += 1;
            }
            Ok(())
        },
    )?;
    Ok(())
}
