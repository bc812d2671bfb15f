//! Pipeline training, one process per rank: the rank loads only its stages, follows its list of
//! the schedule each step, and the ranks together write one native checkpoint at the end.
//! Rank 0 reports progress and metrics; every rank knows the loss and gradient norm after each
//! step (they are summed over the ranks), so all stop together.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use pp_stages::{Partition, Schedule, ScheduleKind};
use pp_transport::{Transport, TransportError};

use super::checkpoint::{self, read_optimizer_state, weights_of, TrainerState};
use super::metrics::MetricsLog;
use super::optim::Rounder;
use super::pipeline::{measured_and_simulated_bubble, RankWorker};
use super::runtime::StageRunner;
use super::trainer::{
    check_options, param_shapes, set_up, track_early_stopping, RunSetup, StepReport, TrainOptions,
    TrainReport,
};
use super::Observer;
use crate::checkpoint::native::{stage_file_name, StageEntry};
use crate::checkpoint::{Format, ModelInfo, OwnedWeights, WeightSource};
use crate::convert::{write_native_manifest, write_native_stages};
use crate::data::{MicroBatch, Sequence};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::StageModel;
use crate::plan::{part_costs, Balance};

/// How the pipeline is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineOptions {
    /// The schedule.
    pub schedule: ScheduleKind,
    /// Worker processes (ranks).
    pub ranks: usize,
    /// Micro-batches per step.
    pub microbatches: usize,
    /// Stage slices per rank for interleaved.
    pub virtual_stages: usize,
}

/// How long a rank waits for a tensor before giving up on its peer. A dead peer is noticed
/// sooner, by the transport's keep-alives.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Trains this rank's share of the pipeline; `run_id` names the shared staging directory of
/// the final checkpoint (the same on every rank).
pub fn train_rank<B: AutodiffBackend>(
    options: &TrainOptions,
    pipeline: &PipelineOptions,
    transport: Box<dyn Transport>,
    run_id: &str,
    device: B::Device,
    observer: &mut dyn Observer,
) -> Result<TrainReport> {
    check_pipeline_options(options, pipeline)?;
    let rank = transport.rank();
    let RunSetup {
        config,
        info,
        train_set,
        val_set,
        schedule: schedule_plan,
        mut state,
        resumed,
    } = set_up(options)?;
    let total_steps = schedule_plan.total_steps;
    let schedule = pipeline_schedule(pipeline)?;
    // Every step must have a row for each micro-batch; the last of an epoch may be short.
    let last_batch = train_set.len() % options.batch_size;
    if last_batch != 0 && last_batch < pipeline.microbatches {
        return Err(Error::Usage(format!(
            "the last step of each epoch has {last_batch} rows ({} sequences, --batch-size {}), \
             fewer than --microbatches {}: choose a --batch-size that divides the data, or fewer \
             micro-batches",
            train_set.len(),
            options.batch_size,
            pipeline.microbatches
        )));
    }
    let checkpoints = options.out_dir.join("checkpoints");
    let partition = match &info.format {
        Format::Native(native) if native.partition().len() == schedule.stages() => {
            native.partition().clone()
        }
        _ => {
            let costs = part_costs(
                &config,
                Balance::Memory,
                options.dtype,
                options.sequences.max_len,
            );
            Partition::balanced(&costs, schedule.stages()).map_err(|e| {
                Error::Usage(format!(
                    "the model cannot be cut into the {} stages the schedule needs: {e}",
                    schedule.stages()
                ))
            })?
        }
    };
    // A native checkpoint cut as the schedule needs: map only this rank's stage files.
    let weights: Box<dyn WeightSource> = match &info.format {
        Format::Native(native) if native.partition() == &partition => {
            Box::new(native.weights(&schedule.stages_of(rank))?)
        }
        _ => crate::checkpoint::open(&info.dir)?.weights,
    };
    let mut runners = BTreeMap::new();
    for stage in schedule.stages_of(rank) {
        let slice = partition.stages()[stage].clone();
        let mut stage_model = StageModel::<B>::load(&config, slice, weights.as_ref(), &device)?;
        if options.dtype != DType::F32 {
            stage_model = stage_model.map(&mut Rounder(options.dtype));
        }
        let runner = StageRunner::new(
            stage_model,
            options.optimizer.clone(),
            options.savers,
            options.dtype,
            device.clone(),
        );
        let runner = if pipeline.schedule.splits_backward() {
            runner.with_split_backward()
        } else {
            runner
        };
        runners.insert(stage, runner);
    }
    if resumed {
        for runner in runners.values_mut() {
            let shapes = param_shapes(runner.model());
            runner.set_optimizer_state(read_optimizer_state(
                &info.dir,
                info.stage_count(),
                state.step,
                &options.optimizer,
                &shapes,
                &device,
            )?);
        }
        observer.note(&format!(
            "resumed from {} at step {}",
            info.dir.display(),
            state.step
        ));
    }
    let mut worker = RankWorker::new(
        schedule,
        runners,
        config.tie_word_embeddings,
        transport,
        RECEIVE_TIMEOUT,
        device,
    );
    std::fs::create_dir_all(&options.out_dir).map_err(|e| Error::io(&options.out_dir, e))?;
    let mut metrics = if rank == 0 {
        Some(MetricsLog::open(&options.out_dir)?)
    } else {
        None
    };
    let pad_id = config
        .pad_token_id
        .or(config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let shared = SharedOutput {
        info: &info,
        partition: &partition,
        dtype: options.dtype,
        run_id,
    };
    // Validation batches: the validation set in `--micro-batch-size` chunks.
    let val_batches: Option<Vec<MicroBatch>> = val_set.as_ref().map(|set| {
        let rows: Vec<&Sequence> = set.all().collect();
        rows.chunks(options.micro_batch_size)
            .map(|chunk| MicroBatch::new(chunk, pad_id))
            .collect()
    });
    let validate = |worker: &mut RankWorker<B>,
                    metrics: &mut Option<MetricsLog>,
                    observer: &mut dyn Observer,
                    step: u64|
     -> Result<Option<f64>> {
        let Some(batches) = &val_batches else {
            return Ok(None);
        };
        let (sum, tokens) = worker
            .evaluate(step, batches)
            .map_err(|e| peer_error(e, worker))?;
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
    let first_val = validate(&mut worker, &mut metrics, observer, state.step)?;
    // Training must beat the starting point to count as an improvement.
    if state.best_val_loss.is_none() {
        state.best_val_loss = first_val;
    }
    let mut last_val = first_val;
    let mut stopped_early = false;
    observer.started(state.step, total_steps);
    let mut last_loss = None;
    while state.step < total_steps {
        let step = state.step;
        let started = Instant::now();
        let lr = schedule_plan.lr(step);
        let (epoch, rows) = train_set.step(step, options.batch_size, options.shuffle_seed);
        let micro_batches = split_micro_batches(&rows, pipeline.microbatches, pad_id, step)?;
        let scored: usize = rows.iter().map(|s| s.scored_tokens()).sum();
        let input_tokens: usize = rows.iter().map(|s| s.input_ids.len()).sum();
        let result = worker
            .step(step, &micro_batches, scored, lr, options.max_grad_norm)
            .map_err(|e| peer_error(e, &worker))?;
        let loss = result.loss_sum / scored as f64;
        if !loss.is_finite() || !result.grad_norm.is_finite() {
            return Err(Error::Training(format!(
                "the loss diverged at step {} (loss {loss}, gradient norm {}); lower --lr or \
                 keep --max-grad-norm on",
                step + 1,
                result.grad_norm
            )));
        }
        last_loss = Some(loss);
        state.step += 1;
        state.tokens_seen += scored as u64;
        let report = StepReport {
            step: step + 1,
            total_steps,
            loss,
            lr,
            grad_norm: result.grad_norm,
            tokens_per_s: input_tokens as f64 / started.elapsed().as_secs_f64(),
            epoch,
            scored_tokens: scored,
        };
        if let Some(metrics) = metrics.as_mut() {
            let (measured, simulated) =
                measured_and_simulated_bubble(worker.schedule(), &result.timings);
            metrics.record(
                step + 1,
                &[
                    ("train/loss", loss),
                    ("train/lr", lr),
                    ("train/grad_norm", result.grad_norm),
                    ("train/tokens_per_s", report.tokens_per_s),
                    ("train/epoch", epoch as f64),
                    ("pipeline/bubble", measured),
                    ("pipeline/bubble_simulated", simulated),
                ],
            )?;
        }
        observer.step(&report);
        let eval_due = options
            .eval_every
            .is_some_and(|n| state.step.is_multiple_of(n))
            || state.step == total_steps;
        if eval_due {
            if let Some(loss) = validate(&mut worker, &mut metrics, observer, state.step)? {
                last_val = Some(loss);
                stopped_early = track_early_stopping(&mut state, loss, options);
                if stopped_early {
                    observer.note(&format!(
                        "early stopping at step {}: no better validation loss in {} evaluations",
                        state.step, state.evals_without_improvement
                    ));
                }
            }
        }
        let save_due = options
            .save_every
            .is_some_and(|n| state.step.is_multiple_of(n));
        if save_due || result.interrupted {
            let dir = checkpoint::step_dir(&checkpoints, state.step);
            shared.write(&worker, &dir, state.step, Some(&state))?;
            if worker.rank() == 0 {
                if let Some(keep) = options.keep {
                    checkpoint::prune(&checkpoints, keep, &dir)?;
                }
                observer.note(&format!("saved checkpoint {}", dir.display()));
            }
        }
        if result.interrupted {
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
    shared.write(&worker, &final_dir, state.step, None)?;
    if rank == 0 {
        observer.note(&format!("final model written to {}", final_dir.display()));
    }
    Ok(TrainReport {
        steps: state.step,
        last_loss,
        val_loss: first_val.zip(last_val),
        stopped_early,
        final_dir,
    })
}

/// Checks the options of a pipeline run, before any worker starts: the single-device checks,
/// and what pipelines refuse (optimizer-in-backward, because a stage accumulates several
/// micro-batches per step).
pub fn check_pipeline_options(options: &TrainOptions, pipeline: &PipelineOptions) -> Result<()> {
    check_options(options)?;
    if options.batch_size < pipeline.microbatches {
        return Err(Error::Usage(format!(
            "--batch-size {} cannot be split into --microbatches {}: each micro-batch needs a row",
            options.batch_size, pipeline.microbatches
        )));
    }
    let schedule = pipeline_schedule(pipeline)?;
    let layers = crate::checkpoint::describe(&options.model_dir)?
        .config
        .num_layers;
    if schedule.stages() > layers {
        return Err(Error::Usage(format!(
            "{} with {} workers needs {} stages, but the model has only {layers} layers",
            pipeline.schedule.name(),
            pipeline.ranks,
            schedule.stages()
        )));
    }
    if options.savers.optimizer_in_backward {
        return Err(Error::Usage(
            "--optimizer-in-backward cannot be used with --stages: each stage accumulates the \
             gradients of several micro-batches per step"
                .into(),
        ));
    }
    Ok(())
}

fn pipeline_schedule(pipeline: &PipelineOptions) -> Result<Schedule> {
    Schedule::new(
        pipeline.schedule,
        pipeline.ranks,
        pipeline.microbatches,
        pipeline.virtual_stages,
    )
    .map_err(|e| Error::Usage(format!("--schedule {}: {e}", pipeline.schedule.name())))
}

/// The step's rows in `count` micro-batches of nearly equal size.
fn split_micro_batches(
    rows: &[&Sequence],
    count: usize,
    pad_id: u32,
    step: u64,
) -> Result<Vec<MicroBatch>> {
    if rows.len() < count {
        return Err(Error::Usage(format!(
            "step {} has {} rows for {count} micro-batches: use a --batch-size that is a multiple \
             of --microbatches and divides the data, or fewer --microbatches",
            step + 1,
            rows.len()
        )));
    }
    let mut start = 0;
    Ok((0..count)
        .map(|i| {
            let size = rows.len() / count + usize::from(i < rows.len() % count);
            let batch = MicroBatch::new(&rows[start..start + size], pad_id);
            start += size;
            batch
        })
        .collect())
}

/// Names the stages behind a transport failure.
fn peer_error<B: AutodiffBackend>(error: TransportError, worker: &RankWorker<B>) -> Error {
    let stages = |rank: usize| worker.schedule().stages_of(rank);
    match error {
        TransportError::PeerLost { rank } => Error::Training(format!(
            "lost the worker of stage(s) {:?} (rank {rank}); stopping",
            stages(rank)
        )),
        TransportError::Timeout { rank, timeout, .. } => Error::Training(format!(
            "the worker of stage(s) {:?} (rank {rank}) sent nothing for {timeout:?}; stopping",
            stages(rank)
        )),
        other => Error::Training(format!("pipeline transfer failed: {other}")),
    }
}

/// What every rank needs to write its share of a checkpoint.
struct SharedOutput<'a> {
    info: &'a ModelInfo,
    partition: &'a Partition,
    dtype: DType,
    run_id: &'a str,
}

impl SharedOutput<'_> {
    /// Every rank writes its stage files (and with `state`, a training checkpoint's optimizer
    /// files) into one staging directory beside `target`; after a barrier, rank 0 writes the
    /// manifest from their entries (and `trainer.json`) and renames the directory into place.
    fn write<B: AutodiffBackend>(
        &self,
        worker: &RankWorker<B>,
        target: &Path,
        step: u64,
        state: Option<&TrainerState>,
    ) -> Result<()> {
        let parent = target.parent().unwrap_or(Path::new("."));
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let staging = parent.join(format!(".{name}.pp-pipeline-{}", self.run_id));
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        let mut weights = OwnedWeights::default();
        for runner in worker.runners().values() {
            weights.extend(weights_of(runner.model(), self.dtype));
        }
        let stages: Vec<usize> = worker.runners().keys().copied().collect();
        for entry in write_native_stages(&weights, self.info, self.partition, &stages, &staging)? {
            let path = staging.join(format!("{}.entry.json", entry.file));
            crate::checkpoint::write_json(&path, &entry)?;
        }
        if state.is_some() {
            for (&stage, runner) in worker.runners() {
                checkpoint::write_stage_optimizer_state(
                    &staging,
                    stage,
                    runner.optimizer_state(),
                    self.partition,
                    self.info.config.tie_word_embeddings,
                )?;
            }
        }
        // Round 1 of the step: every rank's files are in place.
        worker.barrier(step, 1).map_err(|e| peer_error(e, worker))?;
        if worker.rank() == 0 {
            let mut entries = Vec::with_capacity(self.partition.len());
            for index in 0..self.partition.len() {
                let path = staging.join(format!("{}.entry.json", stage_file_name(index)));
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let entry: StageEntry =
                    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                        path: path.clone(),
                        message: format!("not a stage entry: {e}"),
                    })?;
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                entries.push(entry);
            }
            write_native_manifest(self.info, entries, None, &staging)?;
            if let Some(state) = state {
                crate::checkpoint::write_json(&staging.join(checkpoint::TRAINER_FILE), state)?;
            }
            // Move an older copy aside first, so the target is never missing.
            let old = parent.join(format!(".{name}.pp-old-{}", self.run_id));
            if target.exists() {
                std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
            }
            std::fs::rename(&staging, target).map_err(|e| Error::io(target, e))?;
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
        }
        // Round 2: the checkpoint is in place before any rank goes on.
        worker.barrier(step, 2).map_err(|e| peer_error(e, worker))
    }
}
