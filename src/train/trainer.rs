//! The training loop on one device: data to steps, steps through the stage runtime, with
//! validation, early stopping, checkpoints, resumption and Ctrl-C handled between steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use pp_stages::{Partition, StageSlice};

use super::checkpoint::{self, TrainerState};
use super::metrics::MetricsLog;
use super::optim::{Optimizer, Rounder};
use super::runtime::{as_matrix, MemorySavers, Precision, StageOutput, StageRunner};
use super::schedule::LrSchedule;
use super::sharding::{steps_shards, ShardCutter, ShardOf};
use crate::checkpoint::{checksum::Checksum, Format, ModelInfo, WeightSource};
use crate::data::{
    read_jsonl, split_validation, LossOn, MicroBatch, RowOptions, RowTemplate, Sequence,
    SequenceOptions, SequenceSet,
};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::TrainBackend;
use crate::model::{ModelConfig, StageModel};
use crate::plan::{device_plan, human_bytes, plan_training, TrainingSetup};
use crate::tokenizer::Tokenizer;

/// Where validation data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Validation {
    /// No validation.
    None,
    /// A separate JSONL file.
    File(PathBuf),
    /// This fraction of the training rows, held out.
    Split(f64),
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// This many optimizer steps.
    Steps(u64),
    /// This many passes over the training data.
    Epochs(u64),
}

/// Which checkpoint to continue from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest under `OUT_DIR/checkpoints`.
    Latest,
    /// This checkpoint directory.
    Path(PathBuf),
}

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The model to start from (Hugging Face or native).
    pub model_dir: PathBuf,
    /// Training data (JSONL).
    pub data: PathBuf,
    /// Where checkpoints, the final model and metrics go.
    pub out_dir: PathBuf,
    /// Validation data.
    pub validation: Validation,
    /// Which tokens are scored.
    pub loss_on: LossOn,
    /// A template for rows of other shapes.
    pub template: Option<RowTemplate>,
    /// Truncation and packing.
    pub sequences: SequenceOptions,
    /// Seed of the data order, or `None` to keep file order.
    pub shuffle_seed: Option<u64>,
    /// Dtype of the trained weights (what the final model is saved in; bf16 computes in bf16
    /// on devices that have it).
    pub dtype: DType,
    /// Dtype the optimizer keeps the weights in between steps: float32 (master weights), or
    /// `dtype` (each update rounded to it). Checkpoints store the weights in it.
    pub master_weights: DType,
    /// The device the run computes on (its memory is reported each step).
    pub device: Device,
    /// The update rule.
    pub optimizer: Optimizer,
    /// Peak learning rate, decay, floor and warmup (its `total_steps` is filled in).
    pub schedule: LrSchedule,
    /// How long to train.
    pub length: Length,
    /// Rows per optimizer step.
    pub batch_size: usize,
    /// Rows per forward/backward pass.
    pub micro_batch_size: usize,
    /// Global gradient-norm clipping threshold.
    pub max_grad_norm: Option<f64>,
    /// Memory savers.
    pub savers: MemorySavers,
    /// Save a checkpoint every this many steps.
    pub save_every: Option<u64>,
    /// Keep only this many checkpoints.
    pub keep: Option<usize>,
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Validate every this many steps (and at the start and the end).
    pub eval_every: Option<u64>,
    /// Stop after this many validations without a new best loss.
    pub early_stopping_patience: Option<u32>,
}

impl TrainOptions {
    /// How the stages keep and compute their numbers on this run's device.
    pub fn precision(&self) -> Precision {
        let mixed = self.dtype == DType::BF16 && self.device.supports_bf16();
        Precision {
            master: self.master_weights,
            compute: if mixed { DType::BF16 } else { DType::F32 },
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Steps completed, this one included.
    pub step: u64,
    /// Steps in the run.
    pub total_steps: u64,
    /// Token-weighted mean loss of the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens (padding excluded) per second of the step.
    pub tokens_per_s: f64,
    /// Pass over the data the step belongs to (0-based).
    pub epoch: u64,
    /// Scored tokens of the step.
    pub scored_tokens: usize,
    /// Most device memory the allocator has held so far (GPU backends).
    pub device_memory_peak: Option<u64>,
}

/// What the run reports to its user as it goes.
pub trait Observer {
    /// Training starts at `start_step` of `total_steps`.
    fn started(&mut self, start_step: u64, total_steps: u64);
    /// A step finished.
    fn step(&mut self, report: &StepReport);
    /// A line worth showing (validation results, checkpoints, early stopping).
    fn note(&mut self, message: &str);
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Steps completed.
    pub steps: u64,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// Validation loss before training (or at the resumed step) and at the end.
    pub val_loss: Option<(f64, f64)>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// The final model.
    pub final_dir: PathBuf,
}

/// Trains on `device` as `options` say.
pub fn train<B: TrainBackend>(
    options: &TrainOptions,
    device: B::Device,
    observer: &mut dyn Observer,
) -> Result<TrainReport> {
    check_options(options)?;
    let setup = set_up(options)?;
    let weights = crate::checkpoint::open(&setup.info.dir)?;
    let whole = StageSlice::whole(setup.config.num_layers);
    let runner = setup.stage_runner::<B>(
        options,
        whole.clone(),
        weights.weights.as_ref(),
        None,
        &device,
    )?;
    let whole_model = Partition::new(vec![whole], setup.config.num_layers)
        .expect("one stage holding everything tiles the model");
    observer.note(&device_note(
        options,
        &setup.config,
        &whole_model,
        &[0],
        options.micro_batch_size,
        vec![1],
    ));
    let mut engine = SingleDevice {
        runner,
        info: &setup.info,
        partition: output_partition(&setup.info)?,
        options,
        pad_id: pad_token(&setup.config),
    };
    setup
        .run(options)
        .train(&mut engine, setup.state.clone(), observer)
}

/// The line a run starts with: its device, and on a GPU `pp plan`'s estimate of the peak
/// memory of `stages` of `partition`, to read beside the measured peak of each step.
pub(super) fn device_note(
    options: &TrainOptions,
    config: &ModelConfig,
    partition: &Partition,
    stages: &[usize],
    micro_batch_size: usize,
    in_flight: Vec<usize>,
) -> String {
    let device = &options.device;
    if !device.is_gpu() {
        return format!("device: {device}");
    }
    let setup = TrainingSetup {
        dtype: options.dtype,
        seq_len: options.sequences.max_len,
        micro_batch_size,
        optimizer: options.optimizer.clone(),
        savers: options.savers,
        in_flight,
    };
    let plans = plan_training(config, partition, &setup);
    let planned = device_plan(&plans, stages.to_vec(), &options.savers);
    format!(
        "device: {device}; pp plan estimates a peak of {} at --max-len {}",
        human_bytes(planned.memory.total),
        options.sequences.max_len
    )
}

/// The padding token: the model's, else its end-of-sequence token.
pub(super) fn pad_token(config: &ModelConfig) -> u32 {
    config
        .pad_token_id
        .or(config.eos_token_ids.first().copied())
        .unwrap_or(0)
}

/// How a run's steps are carried out: on one device, or as one rank of a pipeline. The loop
/// around them — schedule, metrics, validation, early stopping, checkpoints, Ctrl-C — is one
/// ([`Run::train`]).
pub(super) trait Engine {
    /// Runs optimizer step `step` on `rows` (`scored` scored tokens in all) at `lr`, clipping
    /// by the global gradient norm.
    fn step(
        &mut self,
        step: u64,
        rows: &[&Sequence],
        scored: usize,
        lr: f64,
    ) -> Result<StepOutcome>;
    /// Summed loss and scored tokens of the validation micro-batches after step `step`.
    fn validate(&mut self, step: u64, batches: &[MicroBatch]) -> Result<(f64, usize)>;
    /// Writes the training checkpoint `dir` (weights, optimizer state, `state`).
    fn save(&mut self, dir: &Path, state: &TrainerState) -> Result<()>;
    /// Writes the final model to `dir`; `step` is the last step.
    fn write_final(&mut self, dir: &Path, step: u64) -> Result<()>;
    /// Whether this process reports (metrics, notes, pruning checkpoints): a single device
    /// does; of a pipeline, rank 0.
    fn leads(&self) -> bool;
}

/// What an engine's step did.
pub(super) struct StepOutcome {
    /// Summed loss of the step's rows.
    pub loss_sum: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Ctrl-C was pressed (in a pipeline: on any rank); the run saves and stops.
    pub interrupted: bool,
    /// A checkpoint was asked for (SIGUSR1, from `pp ctl save`); the run saves and goes on.
    pub save_requested: bool,
    /// Further metrics of the step (a pipeline's bubble and each rank's compute time).
    pub metrics: Vec<(String, f64)>,
}

/// The clipping factor for a global gradient norm.
pub(super) fn clip_scale(grad_norm: f64, max_grad_norm: Option<f64>) -> f64 {
    match max_grad_norm {
        Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
        _ => 1.0,
    }
}

/// The data and schedule of a run, and the loop that drives an [`Engine`] through it.
pub(super) struct Run<'a> {
    options: &'a TrainOptions,
    train_set: &'a SequenceSet,
    val_set: Option<&'a SequenceSet>,
    schedule: LrSchedule,
    pad_id: u32,
    /// The checkpoint the run continues, if any.
    resumed_from: Option<&'a Path>,
}

impl Run<'_> {
    /// Trains from `state` to the end (or early stopping), then writes the final model.
    pub fn train(
        &self,
        engine: &mut dyn Engine,
        mut state: TrainerState,
        observer: &mut dyn Observer,
    ) -> Result<TrainReport> {
        let options = self.options;
        let total_steps = self.schedule.total_steps;
        if let Some(dir) = self.resumed_from {
            observer.note(&format!(
                "resumed from {} at step {}",
                dir.display(),
                state.step
            ));
        }
        let checkpoints = options.out_dir.join("checkpoints");
        let mut metrics = if engine.leads() {
            Some(MetricsLog::open(&options.out_dir)?)
        } else {
            None
        };
        // The validation set in `--micro-batch-size` chunks.
        let val_batches: Option<Vec<MicroBatch>> = self.val_set.map(|set| {
            let rows: Vec<&Sequence> = set.all().collect();
            rows.chunks(options.micro_batch_size)
                .map(|chunk| MicroBatch::new(chunk, self.pad_id))
                .collect()
        });
        let validate = |engine: &mut dyn Engine,
                        metrics: &mut Option<MetricsLog>,
                        observer: &mut dyn Observer,
                        step: u64|
         -> Result<Option<f64>> {
            let Some(batches) = &val_batches else {
                return Ok(None);
            };
            let (sum, tokens) = engine.validate(step, batches)?;
            let loss = sum / tokens.max(1) as f64;
            observer.note(&format!(
                "step {step}: validation loss {loss:.4}, perplexity {:.3}",
                loss.exp()
            ));
            if let Some(metrics) = metrics.as_mut() {
                metrics.record(step, &[("val/loss", loss), ("val/perplexity", loss.exp())])?;
            }
            Ok(Some(loss))
        };

        let first_val = validate(engine, &mut metrics, observer, state.step)?;
        // Training must beat the starting point to count as an improvement.
        if state.best_val_loss.is_none() {
            state.best_val_loss = first_val;
        }
        let mut last_val = first_val;
        let mut last_loss = None;
        let mut stopped_early = false;
        let mut memory_peak: Option<u64> = None;
        observer.started(state.step, total_steps);
        while state.step < total_steps {
            let started = Instant::now();
            let lr = self.schedule.lr(state.step);
            let (epoch, rows) =
                self.train_set
                    .step(state.step, options.batch_size, options.shuffle_seed);
            let scored: usize = rows.iter().map(|s| s.scored_tokens()).sum();
            let input_tokens: usize = rows.iter().map(|s| s.input_ids.len()).sum();
            let outcome = engine.step(state.step, &rows, scored, lr)?;
            let loss = outcome.loss_sum / scored as f64;
            if !loss.is_finite() || !outcome.grad_norm.is_finite() {
                return Err(Error::Training(format!(
                    "the loss diverged at step {} (loss {loss}, gradient norm {}); lower --lr \
                     or keep --max-grad-norm on",
                    state.step + 1,
                    outcome.grad_norm
                )));
            }
            state.step += 1;
            state.tokens_seen += scored as u64;
            last_loss = Some(loss);
            if let Some(bytes) = options.device.memory_reserved() {
                memory_peak = Some(memory_peak.unwrap_or(0).max(bytes));
            }
            let report = StepReport {
                step: state.step,
                total_steps,
                loss,
                lr,
                grad_norm: outcome.grad_norm,
                tokens_per_s: input_tokens as f64 / started.elapsed().as_secs_f64(),
                epoch,
                scored_tokens: scored,
                device_memory_peak: memory_peak,
            };
            if let Some(metrics) = metrics.as_mut() {
                let mut values = vec![
                    ("train/loss", loss),
                    ("train/lr", lr),
                    ("train/grad_norm", outcome.grad_norm),
                    ("train/tokens_per_s", report.tokens_per_s),
                    ("train/epoch", epoch as f64),
                ];
                if let Some(bytes) = memory_peak {
                    values.push(("train/device_memory_peak", bytes as f64));
                }
                values.extend(outcome.metrics.iter().map(|(key, v)| (key.as_str(), *v)));
                metrics.record(state.step, &values)?;
            }
            observer.step(&report);

            let eval_due = options
                .eval_every
                .is_some_and(|n| state.step.is_multiple_of(n))
                || state.step == total_steps;
            if eval_due {
                if let Some(loss) = validate(engine, &mut metrics, observer, state.step)? {
                    last_val = Some(loss);
                    stopped_early = track_early_stopping(&mut state, loss, options);
                    if stopped_early {
                        observer.note(&format!(
                            "early stopping at step {}: no better validation loss in {} \
                             evaluations",
                            state.step, state.evals_without_improvement
                        ));
                    }
                }
            }
            let save_due = options
                .save_every
                .is_some_and(|n| state.step.is_multiple_of(n));
            if save_due || outcome.interrupted || outcome.save_requested {
                let dir = checkpoint::step_dir(&checkpoints, state.step);
                engine.save(&dir, &state)?;
                if engine.leads() {
                    if let Some(keep) = options.keep {
                        checkpoint::prune(&checkpoints, keep, &dir)?;
                    }
                }
                observer.note(&format!("saved checkpoint {}", dir.display()));
            }
            if outcome.interrupted {
                observer.note(&format!(
                    "interrupted after step {}; continue with --resume",
                    state.step
                ));
                return Err(Error::Interrupted);
            }
            if stopped_early {
                break;
            }
        }
        let final_dir = options.out_dir.join("final");
        engine.write_final(&final_dir, state.step)?;
        observer.note(&format!("final model written to {}", final_dir.display()));
        Ok(TrainReport {
            steps: state.step,
            last_loss,
            val_loss: first_val.zip(last_val),
            stopped_early,
            final_dir,
        })
    }
}

/// The whole model on one device, in one runner.
struct SingleDevice<'a, B: TrainBackend> {
    runner: StageRunner<B>,
    info: &'a ModelInfo,
    /// The partition checkpoints are written with.
    partition: Partition,
    options: &'a TrainOptions,
    pad_id: u32,
}

impl<B: TrainBackend> Engine for SingleDevice<'_, B> {
    /// The rows `--micro-batch-size` at a time, each micro-batch's backward right after its
    /// forward (so one graph is alive at a time), then the step.
    fn step(
        &mut self,
        _step: u64,
        rows: &[&Sequence],
        scored: usize,
        lr: f64,
    ) -> Result<StepOutcome> {
        let runner = &mut self.runner;
        runner.set_lr(lr);
        let chunks: Vec<_> = rows.chunks(self.options.micro_batch_size).collect();
        let mut loss_sum = 0.0;
        for (i, chunk) in chunks.iter().enumerate() {
            let batch = MicroBatch::new(chunk, self.pad_id);
            if let StageOutput::Loss { sum, .. } = runner.forward(i, &batch, None) {
                loss_sum += sum;
            }
            runner.backward(i, None, 1.0 / scored as f64, i + 1 == chunks.len());
        }
        let grad_norm = runner.grad_sum_squares().sqrt();
        runner.step(clip_scale(grad_norm, self.options.max_grad_norm));
        Ok(StepOutcome {
            loss_sum,
            grad_norm,
            interrupted: crate::interrupt::check().is_err(),
            save_requested: crate::interrupt::take_save_request(),
            metrics: Vec::new(),
        })
    }

    fn validate(&mut self, _step: u64, batches: &[MicroBatch]) -> Result<(f64, usize)> {
        let (mut sum, mut tokens) = (0.0, 0usize);
        for batch in batches {
            if let StageOutput::Loss { sum: s, tokens: t } = self.runner.evaluate(batch, None) {
                sum += s;
                tokens += t;
            }
        }
        Ok((sum, tokens))
    }

    fn save(&mut self, dir: &Path, state: &TrainerState) -> Result<()> {
        checkpoint::save(
            dir,
            self.runner.model(),
            self.runner.optimizer_state(),
            self.info,
            &self.partition,
            self.options.master_weights,
            state,
        )
    }

    fn write_final(&mut self, dir: &Path, _step: u64) -> Result<()> {
        let staging = crate::convert::Staging::create(dir, true)?;
        crate::convert::write_native_model(
            &checkpoint::weights_of(self.runner.model(), self.options.dtype),
            self.info,
            &self.partition,
            staging.path(),
        )?;
        staging.commit()
    }

    fn leads(&self) -> bool {
        true
    }
}

/// Records a validation loss; says whether early stopping's patience has run out.
fn track_early_stopping(state: &mut TrainerState, loss: f64, options: &TrainOptions) -> bool {
    if state.best_val_loss.is_none_or(|best| loss < best) {
        state.best_val_loss = Some(loss);
        state.evals_without_improvement = 0;
    } else {
        state.evals_without_improvement += 1;
    }
    options
        .early_stopping_patience
        .is_some_and(|p| state.evals_without_improvement >= p)
}

/// What single-device and pipeline training both set up from the options.
pub(super) struct RunSetup {
    /// The model's configuration, in the master weights' dtype (RoPE's frequencies follow it,
    /// as transformers' buffer follows the dtype a model is loaded in).
    pub config: ModelConfig,
    /// Where the weights come from: the model, or the checkpoint being resumed.
    pub info: ModelInfo,
    pub train_set: SequenceSet,
    pub val_set: Option<SequenceSet>,
    /// The learning-rate schedule over the run's steps.
    pub schedule: LrSchedule,
    /// Where the run stands: fresh, or the resumed checkpoint's state.
    pub state: TrainerState,
    /// Whether `info` is a checkpoint being resumed.
    pub resumed: bool,
}

impl RunSetup {
    /// A runner for `slice`, loaded from `weights` in the training dtype, with the optimizer
    /// state of the checkpoint being resumed, if any.
    pub fn stage_runner<B: TrainBackend>(
        &self,
        options: &TrainOptions,
        slice: StageSlice,
        weights: &dyn WeightSource,
        shard: Option<ShardOf>,
        device: &B::Device,
    ) -> Result<StageRunner<B>> {
        // FSDP: each part is cut to this rank's shard as soon as it is on the device.
        let mut cutter = shard.map(ShardCutter::new);
        let mut model = match &mut cutter {
            Some(cutter) => {
                StageModel::<B>::load_mapped(&self.config, slice, weights, device, cutter)?
            }
            None => StageModel::<B>::load(&self.config, slice, weights, device)?,
        };
        let precision = options.precision();
        if precision.master != DType::F32 {
            model = model.map(&mut Rounder(precision.master));
        }
        let shapes = match &cutter {
            Some(cutter) => cutter.full_shapes(&param_names(&model)),
            None => param_shapes(&model),
        };
        let mut runner = StageRunner::new(
            model,
            options.optimizer.clone(),
            options.savers,
            precision,
            device.clone(),
        );
        if self.resumed {
            runner.set_optimizer_state(checkpoint::read_optimizer_state(
                &self.info.dir,
                self.info.stage_count(),
                self.state.step,
                &options.optimizer,
                &shapes,
                shard.filter(|_| steps_shards(&options.optimizer)),
                device,
            )?);
        }
        Ok(match cutter {
            Some(cutter) => runner.with_loaded_shards(cutter),
            None => runner,
        })
    }

    /// The loop over this run's data.
    pub fn run<'a>(&'a self, options: &'a TrainOptions) -> Run<'a> {
        Run {
            options,
            train_set: &self.train_set,
            val_set: self.val_set.as_ref(),
            schedule: self.schedule,
            pad_id: pad_token(&self.config),
            resumed_from: self.resumed.then_some(self.info.dir.as_path()),
        }
    }
}

/// Reads the model's description and the data, works out the run's length, and finds and
/// checks the checkpoint to resume, if any. Creates the output directory.
pub(super) fn set_up(options: &TrainOptions) -> Result<RunSetup> {
    let info = crate::checkpoint::describe(&options.model_dir)?;
    let mut config = info.config.clone();
    // RoPE's frequencies follow the dtype the weights are kept in, as transformers' buffer
    // follows the model's: bf16 for a bf16 model, float32 under autocast with float32 masters.
    config.dtype = options.master_weights;
    let tokenizer = Tokenizer::load_if_present(&options.model_dir)?;
    let (train_set, val_set) = load_data(options, &config, tokenizer.as_ref())?;
    let total_steps = match options.length {
        Length::Steps(n) => n,
        Length::Epochs(n) => n
            .checked_mul(train_set.steps_per_epoch(options.batch_size))
            .ok_or_else(|| Error::Usage(format!("--epochs {n} is too many")))?,
    };
    let data_checksum = fingerprint(&train_set);
    std::fs::create_dir_all(&options.out_dir).map_err(|e| Error::io(&options.out_dir, e))?;
    let checkpoints = options.out_dir.join("checkpoints");
    let resumed = match &options.resume {
        None => None,
        Some(resume) => Some(open_resume(
            resume,
            &checkpoints,
            options,
            &config,
            &data_checksum,
        )?),
    };
    let (info, state, resumed) = match resumed {
        Some((dir, saved)) => (
            crate::checkpoint::describe(&dir)?,
            TrainerState {
                total_steps,
                ..saved
            },
            true,
        ),
        None => (
            info,
            TrainerState {
                step: 0,
                total_steps,
                optimizer: options.optimizer.name().into(),
                dtype: options.dtype,
                master_weights: Some(options.master_weights),
                batch_size: options.batch_size,
                shuffle_seed: options.shuffle_seed,
                data_sequences: train_set.len(),
                data_checksum,
                best_val_loss: None,
                evals_without_improvement: 0,
                tokens_seen: 0,
            },
            false,
        ),
    };
    Ok(RunSetup {
        config,
        info,
        train_set,
        val_set,
        schedule: LrSchedule {
            total_steps,
            ..options.schedule
        },
        state,
        resumed,
    })
}

pub(super) fn check_options(options: &TrainOptions) -> Result<()> {
    let bad = |message: &str| Err(Error::Usage(message.into()));
    if options.batch_size == 0 || options.micro_batch_size == 0 {
        return bad("--batch-size and --micro-batch-size must be at least 1");
    }
    if options.micro_batch_size > options.batch_size {
        return bad("--micro-batch-size cannot exceed --batch-size");
    }
    if options.sequences.max_len < 2 {
        return bad("--max-len must be at least 2 (a token and the one it predicts)");
    }
    if matches!(options.length, Length::Steps(0) | Length::Epochs(0)) {
        return bad("--steps and --epochs must be at least 1");
    }
    let zero = |value: Option<u64>| value == Some(0);
    if zero(options.eval_every) || zero(options.save_every) {
        return bad("--eval-every and --save-every must be at least 1");
    }
    if options.keep == Some(0) {
        return bad("--keep must be at least 1: it counts the checkpoints kept");
    }
    if let Some(patience) = options.early_stopping_patience {
        if patience == 0 {
            return bad("--early-stopping-patience must be at least 1");
        }
        if options.validation == Validation::None {
            return bad("--early-stopping-patience needs --val-data or --val-split");
        }
    }
    if options.savers.optimizer_in_backward {
        if options.max_grad_norm.is_some() {
            return bad(
                "--optimizer-in-backward steps each layer before the global gradient norm is \
                 known, so it cannot clip by it: pass --max-grad-norm 0",
            );
        }
        if options.micro_batch_size != options.batch_size {
            return bad(
                "--optimizer-in-backward steps each layer during the backward pass, so a step \
                 cannot accumulate several micro-batches: make --micro-batch-size equal \
                 --batch-size",
            );
        }
    }
    if let Validation::Split(fraction) = options.validation {
        if !(fraction > 0.0 && fraction < 1.0) {
            return bad("--val-split must be between 0 and 1");
        }
    }
    Ok(())
}

fn load_data(
    options: &TrainOptions,
    config: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<(SequenceSet, Option<SequenceSet>)> {
    let rows = RowOptions {
        tokenizer,
        vocab_size: config.vocab_size,
        loss_on: options.loss_on,
        template: options.template.as_ref(),
        append_eos: tokenizer
            .and_then(Tokenizer::eos_id)
            .or(config.eos_token_ids.first().copied()),
    };
    let train = read_jsonl(&options.data, &rows)?;
    let (train, val, val_path) = match &options.validation {
        Validation::None => (train, None, None),
        Validation::File(path) => (train, Some(read_jsonl(path, &rows)?), Some(path.as_path())),
        Validation::Split(fraction) => {
            if train.len() < 2 {
                return Err(crate::data::dataset_error(
                    &options.data,
                    "--val-split needs at least two rows".into(),
                ));
            }
            let seed = options.shuffle_seed.unwrap_or(0);
            let (train, val) = split_validation(train, *fraction, seed);
            (train, Some(val), Some(options.data.as_path()))
        }
    };
    let train = SequenceSet::build(train, options.sequences, &options.data)?;
    let val = match (val, val_path) {
        (Some(rows), Some(path)) => Some(SequenceSet::build(rows, options.sequences, path)?),
        _ => None,
    };
    Ok((train, val))
}

/// A checksum of the training sequences, so that a resumed run can tell it sees the same data.
fn fingerprint(set: &SequenceSet) -> String {
    let mut sum = Checksum::default();
    for sequence in set.all() {
        let ids: Vec<u8> = sequence
            .input_ids
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let labels: Vec<u8> = sequence
            .labels
            .iter()
            .flat_map(|l| l.to_le_bytes())
            .collect();
        sum.update(&ids);
        sum.update(&labels);
    }
    sum.hex()
}

/// The checkpoint to resume and its state, refused when it cannot continue this run.
fn open_resume(
    resume: &Resume,
    checkpoints: &Path,
    options: &TrainOptions,
    config: &ModelConfig,
    data_checksum: &str,
) -> Result<(PathBuf, TrainerState)> {
    let dir = match resume {
        Resume::Path(path) => path.clone(),
        Resume::Latest => checkpoint::list(checkpoints)
            .pop()
            .map(|(_, path)| path)
            .ok_or_else(|| {
                Error::io(
                    checkpoints,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no checkpoint to resume from",
                    ),
                )
            })?,
    };
    let saved = checkpoint::read_state(&dir)?;
    let incompatible = |message: String| Error::Checkpoint {
        path: dir.clone(),
        message: format!("cannot resume: {message}"),
    };
    let info = crate::checkpoint::describe(&dir)?;
    let same_model = |a: &ModelConfig, b: &ModelConfig| {
        ModelConfig {
            dtype: a.dtype,
            ..b.clone()
        } == *a
    };
    if !same_model(&info.config, config) {
        return Err(incompatible(format!(
            "it holds a different model than {} (hidden size {}, {} layers, vocabulary {})",
            options.model_dir.display(),
            info.config.hidden_size,
            info.config.num_layers,
            info.config.vocab_size
        )));
    }
    let optimizer = options.optimizer.name();
    if saved.optimizer != optimizer {
        return Err(incompatible(format!(
            "it was trained with --optimizer {}, this run uses {optimizer}",
            saved.optimizer
        )));
    }
    if saved.dtype != options.dtype {
        return Err(incompatible(format!(
            "it was trained in {}, this run uses --dtype {}",
            saved.dtype, options.dtype
        )));
    }
    let saved_master = saved.master_weights.unwrap_or(saved.dtype);
    if saved_master != options.master_weights {
        return Err(incompatible(format!(
            "its master weights were {saved_master}, this run uses --master-weights {}",
            options.master_weights
        )));
    }
    if saved.batch_size != options.batch_size || saved.shuffle_seed != options.shuffle_seed {
        return Err(incompatible(
            "--batch-size, --seed or --no-shuffle differ from the checkpoint's run, so the data \
             would not continue where it stopped"
                .into(),
        ));
    }
    if saved.data_checksum != data_checksum {
        return Err(incompatible(format!(
            "it was trained on other data ({} sequences then, different now): {} is not the \
             file, or the --max-len, --pack or template settings, of the checkpoint's run",
            saved.data_sequences,
            options.data.display()
        )));
    }
    Ok((dir, saved))
}

/// The partition the outputs are written with: a native source's, else one stage.
fn output_partition(info: &ModelInfo) -> Result<Partition> {
    match &info.format {
        Format::Native(native) => Ok(native.partition().clone()),
        Format::HuggingFace => {
            Partition::from_split(&[], info.config.num_layers).map_err(|e| Error::Config {
                path: info.dir.clone(),
                message: e.to_string(),
            })
        }
    }
}

/// Each parameter's name, by id.
fn param_names<B: Backend>(model: &StageModel<B>) -> HashMap<ParamId, String> {
    model
        .named_params()
        .into_iter()
        .map(|(name, id)| (id, name))
        .collect()
}

fn param_shapes<B: TrainBackend>(model: &StageModel<B>) -> HashMap<String, [usize; 2]> {
    struct Shapes(HashMap<ParamId, [usize; 2]>);
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.insert(param.id, as_matrix(param.val()).dims());
        }
    }
    let mut shapes = Shapes(HashMap::new());
    model.visit(&mut shapes);
    param_names(model)
        .into_iter()
        .map(|(id, name)| (name, shapes.0[&id]))
        .collect()
}
