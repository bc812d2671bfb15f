//! Argument parsing and dispatch; one module per subcommand.

mod cluster;
mod convert;
mod ctl;
mod eval;
mod generate;
mod inspect;
mod plan;
mod schedule;
mod serve;
mod train;

use clap::{Parser, Subcommand};
use pp::device::{Device, DeviceSpec};

/// Pipeline-parallel fine-tuning of Llama and Mistral models.
#[derive(Debug, Parser)]
#[command(name = "pp", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a model's architecture, size and the memory full fine-tuning needs.
    Inspect(inspect::Args),
    /// Convert a Hugging Face checkpoint to pp's stage-partitioned format, re-partition one, or
    /// convert back to Hugging Face.
    Convert(convert::Args),
    /// Mean token cross-entropy and perplexity of a model on a JSONL dataset.
    Eval(eval::Args),
    /// A model's answers (greedy or sampled) to a prompt or to each row of a JSONL file.
    Generate(generate::Args),
    /// Estimated peak memory per device of a training configuration.
    Plan(plan::Args),
    /// Show a pipeline schedule's timeline per rank and its bubble.
    Schedule(schedule::Args),
    /// Fine-tune a model on a JSONL dataset.
    Train(Box<train::Args>),
    /// Ask a running multi-node training for its status, a checkpoint, a stop or an abort.
    Ctl(ctl::Args),
    /// Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, tools).
    Serve(serve::Args),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Inspect(args) => inspect::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Train(args) => train::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Schedule(args) => schedule::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// `--device`, for the commands that compute.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceFlag {
    /// Where to compute: auto (the first usable NVIDIA GPU, else the CPU), cpu, cuda[:N] or
    /// wgpu[:N] (Vulkan, Metal or DirectX 12).
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

impl DeviceFlag {
    /// The device, checked usable (an unusable one is a one-line error).
    pub fn resolve(&self) -> anyhow::Result<Device> {
        Ok(Device::resolve(self.device)?)
    }
}

/// Checks, before the model loads, that every prompt leaves room for an answer in the model's
/// `context`, naming the row (`source:line`) that does not.
fn check_prompt_room(
    rows: &[pp::data::PromptRow],
    source: &str,
    context: usize,
) -> anyhow::Result<()> {
    let Some(row) = rows.iter().find(|row| row.prompt.len() >= context) else {
        return Ok(());
    };
    // `--prompt` has no lines.
    let at = match row.line {
        0 => source.to_string(),
        line => format!("{source}:{line}"),
    };
    anyhow::bail!(
        "{at}: the prompt has {} tokens, which leaves no room in the model's context of {context}",
        row.prompt.len()
    )
}

/// Says on stderr which device a command computes on.
pub fn announce(device: &Device) {
    eprintln!("device: {device}");
}

/// Logs go to stderr; `PP_LOG=debug` (or any `tracing` filter) shows more.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// `5GB` → 5·10⁹, `2GiB` → 2·2³⁰, `1000` → 1000 (transformers' `max_shard_size` units).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 5GB or 500MB"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = (number * scale) as u64;
    if bytes == 0 {
        return Err("the shard size must be positive".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn parses_shard_sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("GB").is_err());
        assert!(parse_size("3XB").is_err());
    }
}
