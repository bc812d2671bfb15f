//! Argument parsing and dispatch; one module per subcommand.

mod convert;
mod eval;
mod generate;
mod inspect;
mod train;

use clap::{Parser, Subcommand};

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
    /// Greedy answers from a model, to a prompt or to each row of a JSONL file.
    Generate(generate::Args),
    /// Fine-tune a model on a JSONL dataset.
    Train(Box<train::Args>),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Inspect(args) => inspect::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Train(args) => train::run(*args),
        Command::Generate(args) => generate::run(args),
    }
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
