//! `pp train MODEL_DIR --data FILE.jsonl --out OUT_DIR [flags]`, or `pp train --config
//! FILE.toml` with flags overriding the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use burn::backend::Autodiff;
use clap::{CommandFactory, FromArgMatches, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use pp::cluster::files::NodeCopies;
use pp::data::{LossOn, RowTemplate, SequenceOptions};
use pp::device::Device;
use pp::dtype::DType;
use pp::train::optim::Optimizer;
use pp::train::runtime::MemorySavers;
use pp::train::schedule::{Decay, LrSchedule};
use pp::train::{Length, Observer, Resume, StepReport, TrainOptions, Validation};

/// Where saved activations may be offloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OffloadTarget {
    /// Host memory.
    Cpu,
}

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay (`torch.optim.AdamW`).
    Adamw,
    /// Factored second moment, no momentum (`transformers` Adafactor): the least state.
    Adafactor,
    /// Stochastic gradient descent, optional momentum.
    Sgd,
}

/// The memory-saver flags, shared by `pp train` and `pp plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct SaverFlags {
    /// Keep only each layer's input and recompute the layer in backward.
    #[arg(long)]
    checkpoint_activations: bool,
    /// Step each layer as soon as its gradients are complete and free them.
    #[arg(long)]
    optimizer_in_backward: bool,
    /// Keep the saved layer inputs in host memory (implies --checkpoint-activations).
    #[arg(long, value_enum)]
    offload_activations: Option<OffloadTarget>,
}

impl SaverFlags {
    pub fn savers(&self) -> MemorySavers {
        let offload = self.offload_activations.is_some();
        MemorySavers {
            checkpoint_activations: self.checkpoint_activations || offload,
            offload_activations: offload,
            optimizer_in_backward: self.optimizer_in_backward,
        }
    }
}

/// The update rule and its hyperparameters, shared by `pp train` and `pp plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct OptimizerFlags {
    /// Update rule.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    optimizer: OptimizerKind,
    /// Weight decay (decoupled for AdamW and Adafactor, L2 for SGD).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// AdamW's first-moment decay.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// AdamW's second-moment decay.
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    /// Added to the denominator [default: 1e-8 for AdamW, 1e-30 for Adafactor].
    #[arg(long)]
    eps: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
}

impl OptimizerFlags {
    pub fn optimizer(&self) -> Optimizer {
        match self.optimizer {
            OptimizerKind::Adamw => Optimizer::AdamW {
                betas: (self.beta1, self.beta2),
                eps: self.eps.unwrap_or(1e-8),
                weight_decay: self.weight_decay,
            },
            OptimizerKind::Adafactor => Optimizer::Adafactor {
                eps: (self.eps.unwrap_or(1e-30), 1e-3),
                clip_threshold: 1.0,
                decay_rate: -0.8,
                weight_decay: self.weight_decay,
            },
            OptimizerKind::Sgd => Optimizer::Sgd {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The model to fine-tune: Hugging Face or pp native (or `model` in --config).
    model: Option<PathBuf>,
    /// A TOML file of settings (keys are the flags' names); flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training data: JSONL rows of {"text"}, {"prompt","completion"}, {"messages"} or
    /// {"input_ids","labels"}.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory: checkpoints/, final/, metrics.jsonl, tensorboard/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Validation data (JSONL).
    #[arg(long, conflicts_with = "val_split")]
    val_data: Option<PathBuf>,
    /// Hold out this fraction of the training rows for validation.
    #[arg(long)]
    val_split: Option<f64>,
    /// Dtype of the trained weights [default: the checkpoint's]. bf16 computes matmuls and
    /// activations in bf16 on GPUs that have it (norm statistics, softmax, the loss and the
    /// optimizer state stay float32); on the CPU and wgpu the arithmetic stays float32.
    #[arg(long)]
    dtype: Option<DType>,
    /// Dtype the weights are kept in between steps: f32 (master weights; the model is cast
    /// where it is used) or the --dtype itself (each update rounded to it).
    #[arg(long, default_value = "f32")]
    master_weights: DType,
    #[command(flatten)]
    device: super::DeviceFlag,
    /// Which tokens of prompt/completion and chat rows are scored.
    #[arg(long, value_enum, default_value_t = LossOn::Completion)]
    loss_on: LossOn,
    /// Build each row's text from its fields: "Question: {question}\nAnswer: ".
    #[arg(long)]
    template: Option<String>,
    /// With --template, the completion built from the row's fields: "{answer}".
    #[arg(long, requires = "template")]
    completion_template: Option<String>,
    /// Longest sequence [default: the context length, at most 2048].
    #[arg(long)]
    max_len: Option<usize>,
    /// Refuse rows longer than --max-len instead of cutting them.
    #[arg(long)]
    no_truncate: bool,
    /// Put several rows in each sequence (attention stays within each row).
    #[arg(long)]
    pack: bool,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the file's row order.
    #[arg(long)]
    no_shuffle: bool,
    /// Rows per optimizer step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Rows per forward/backward pass (gradients accumulate over a step) [default: --batch-size].
    #[arg(long)]
    micro_batch_size: Option<usize>,
    #[command(flatten)]
    optimizer: OptimizerFlags,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Learning-rate decay after warmup.
    #[arg(long, value_enum, default_value_t = Decay::Cosine)]
    lr_schedule: Decay,
    /// Steps of linear warmup.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// The learning rate the decay ends at.
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    /// Clip gradients to this global L2 norm; 0 disables [default: 1, or 0 with
    /// --optimizer-in-backward].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Optimizer steps to run.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Passes over the training data [default: 1].
    #[arg(long)]
    epochs: Option<u64>,
    #[command(flatten)]
    savers: SaverFlags,
    /// Save a checkpoint every N steps.
    #[arg(long)]
    save_every: Option<u64>,
    /// Keep only the newest K checkpoints.
    #[arg(long)]
    keep: Option<usize>,
    /// Continue from the newest checkpoint in OUT/checkpoints, or from PATH.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "PATH")]
    resume: Option<String>,
    /// Validate every N steps (and at the start and the end).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Stop after N validations without a better loss.
    #[arg(long)]
    early_stopping_patience: Option<u32>,
    /// Print the final report as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub(super) pipeline: super::cluster::PipelineFlags,
}

/// `pp train` alone, to re-parse a command line merged with a config file; later occurrences
/// of a flag override earlier ones, so the user's flags win over the file's.
#[derive(Debug, Parser)]
#[command(name = "pp train", args_override_self = true)]
struct Standalone {
    #[command(flatten)]
    args: Args,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let args = match &args.config {
        Some(path) => with_config_file(path, args.model.is_some())?,
        None => args,
    };
    if args.pipeline.is_launcher() {
        if let Some((node, layout)) = args.pipeline.node()? {
            let devices = args.pipeline.local_devices(args.device.device)?;
            let model_dir = args.model.clone().unwrap_or_default();
            let options = |copies: &NodeCopies| {
                options(&args, copies).map_err(|e| pp::error::Error::Usage(format!("{e:#}")))
            };
            return Ok(pp::cluster::node::run(
                &model_dir, &options, &layout, &node, &devices,
            )?);
        }
    }
    let options = options(&args, &args.pipeline.copies())?;
    if args.pipeline.probe_local_rank.is_some() {
        let speed = pp::with_backend!(options.device, |B, device| {
            pp::train::probe::measure::<Autodiff<B>>(&options, &device)
        })?;
        println!("{}", serde_json::to_string(&speed)?);
        return Ok(());
    }
    if args.pipeline.is_launcher() {
        if let Some(pipeline) = args.pipeline.options()? {
            args.pipeline.local_devices(args.device.device)?;
            pp::train::worker::check_pipeline_options(&options, &pipeline)?;
            return Ok(pp::cluster::launch_local(pipeline.layout().world_size())?);
        }
    }
    let mut observer = Progress::new();
    let report = match args.pipeline.options()? {
        Some(pipeline) => {
            super::cluster::run_worker(&options, &pipeline, &args.pipeline, &mut observer)
        }
        None => pp::with_backend!(options.device, |B, device| {
            pp::train::train::<Autodiff<B>>(&options, device, &mut observer)
        })
        .map_err(anyhow::Error::from),
    };
    observer.bar.finish_and_clear();
    let report = report?;
    if args.pipeline.worker_rank.is_some_and(|rank| rank != 0) {
        return Ok(());
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "steps": report.steps,
                "last_loss": report.last_loss,
                "val_loss_start": report.val_loss.map(|v| v.0),
                "val_loss_end": report.val_loss.map(|v| v.1),
                "stopped_early": report.stopped_early,
                "final": report.final_dir,
            })
        );
    } else {
        let loss = report
            .last_loss
            .map_or(String::new(), |l| format!(", last loss {l:.4}"));
        let val = report.val_loss.map_or(String::new(), |(a, b)| {
            format!(", validation loss {a:.4} -> {b:.4}")
        });
        println!(
            "trained {} steps{loss}{val}; final model in {}",
            report.steps,
            report.final_dir.display()
        );
    }
    Ok(())
}

/// Re-parses the command line with the config file's settings in front of it.
fn with_config_file(path: &Path, model_on_command_line: bool) -> anyhow::Result<Args> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid TOML: {}", path.display(), e.message()))?;
    let command = Standalone::command();
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut argv: Vec<OsString> = vec!["pp train".into()];
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        if flag == "model" {
            if !model_on_command_line {
                let model = value
                    .as_str()
                    .with_context(|| format!("{}: `model` must be a path", path.display()))?;
                argv.push(model.into());
            }
            continue;
        }
        if flag == "config" || !known.contains(&flag) {
            bail!("{}: unknown setting `{key}`", path.display());
        }
        match value {
            // `--resume` takes an optional path: say which, so the next word is not taken.
            toml::Value::Boolean(true) if flag == "resume" => argv.push("--resume=latest".into()),
            toml::Value::Boolean(true) => argv.push(format!("--{flag}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => argv.extend([format!("--{flag}").into(), s.into()]),
            toml::Value::Integer(_) | toml::Value::Float(_) => {
                argv.extend([format!("--{flag}").into(), value.to_string().into()])
            }
            _ => bail!(
                "{}: `{key}` must be a string, number or boolean",
                path.display()
            ),
        }
    }
    // The command line as typed, after `pp train`.
    argv.extend(std::env::args_os().skip(2));
    let matches = command.try_get_matches_from(argv).map_err(|e| {
        let message = e.to_string();
        let first = message
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        anyhow::anyhow!("{first} (with {})", path.display())
    })?;
    Ok(Standalone::from_arg_matches(&matches)?.args)
}

/// The training options the flags give, with `copies` (node 0's files, received by this node)
/// in place of the paths they name.
fn options(args: &Args, copies: &NodeCopies) -> anyhow::Result<TrainOptions> {
    let require = |value: &Option<PathBuf>, what: &str| {
        value
            .clone()
            .with_context(|| format!("{what} is required (on the command line or in --config)"))
    };
    let model_dir = match &copies.model {
        Some(copy) => copy.clone(),
        None => require(&args.model, "MODEL_DIR")?,
    };
    let info = pp::checkpoint::describe(&model_dir)?;
    let cfg = &info.config;
    let dtype = args.dtype.unwrap_or(cfg.dtype);
    if args.master_weights != DType::F32 && args.master_weights != dtype {
        bail!(
            "--master-weights must be f32 or the training dtype ({dtype}), not {}",
            args.master_weights
        );
    }
    let device = Device::resolve(args.pipeline.device_spec(args.device.device)?)?;
    let savers = args.savers.savers();
    let max_grad_norm = match args.max_grad_norm {
        Some(n) if n > 0.0 => Some(n),
        Some(_) => None,
        None if savers.optimizer_in_backward => None,
        None => Some(1.0),
    };
    let validation = match (&args.val_data, args.val_split) {
        (Some(path), _) => Validation::File(path.clone()),
        (None, Some(fraction)) => Validation::Split(fraction),
        (None, None) => Validation::None,
    };
    let template = args
        .template
        .as_deref()
        .map(|t| RowTemplate::parse(t, args.completion_template.as_deref()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    Ok(copies.apply(TrainOptions {
        data: require(&args.data, "--data")?,
        out_dir: require(&args.out, "--out")?,
        validation,
        loss_on: args.loss_on,
        template,
        sequences: SequenceOptions {
            max_len: args
                .max_len
                .unwrap_or(cfg.max_position_embeddings.min(2048)),
            truncate: !args.no_truncate,
            pack: args.pack,
        },
        shuffle_seed: (!args.no_shuffle).then_some(args.seed),
        dtype,
        master_weights: args.master_weights,
        device,
        optimizer: args.optimizer.optimizer(),
        schedule: LrSchedule {
            decay: args.lr_schedule,
            peak: args.lr,
            min_lr: args.min_lr,
            warmup_steps: args.warmup_steps,
            total_steps: 0,
        },
        length: match args.steps {
            Some(steps) => Length::Steps(steps),
            None => Length::Epochs(args.epochs.unwrap_or(1)),
        },
        batch_size: args.batch_size,
        micro_batch_size: args.micro_batch_size.unwrap_or(args.batch_size),
        max_grad_norm,
        savers,
        save_every: args.save_every,
        keep: args.keep,
        resume: args.resume.as_deref().map(|r| match r {
            "latest" => Resume::Latest,
            path => Resume::Path(path.into()),
        }),
        eval_every: args.eval_every,
        early_stopping_patience: args.early_stopping_patience,
        model_dir,
    }))
}

/// A progress bar on stderr: step, loss, learning rate, tokens/s and ETA.
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new() -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} step {pos}/{len}  {msg}  {elapsed_precise} eta {eta_precise}",
            )
            .expect("valid progress template"),
        );
        Self { bar }
    }
}

impl Observer for Progress {
    fn started(&mut self, start_step: u64, total_steps: u64) {
        self.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.bar.set_length(total_steps);
        self.bar.set_position(start_step);
        self.bar.reset_eta();
    }

    fn step(&mut self, report: &StepReport) {
        let memory = report.device_memory_peak.map_or(String::new(), |bytes| {
            format!("  peak {:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
        });
        self.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s{memory}",
            report.loss, report.lr, report.tokens_per_s
        ));
        self.bar.set_position(report.step);
    }

    fn note(&mut self, message: &str) {
        if self.bar.is_hidden() {
            eprintln!("{message}");
        } else {
            self.bar.println(message);
        }
    }
}
