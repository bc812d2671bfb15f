//! Pipeline training, one process per rank: the rank loads only its stages, follows its list of
//! the schedule each step, and the ranks together write one native checkpoint at the end.
//! Rank 0 reports progress and metrics; every rank knows the loss and gradient norm after each
//! step (they are summed over the ranks), so all stop together.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pp_stages::{Partition, Schedule, ScheduleKind};
use pp_transport::rendezvous::FileClient;
use pp_transport::{LinkTraffic, Transport, TransportError};

use super::checkpoint::{self, TrainerState};
use super::data_parallel::{CollectiveBackend, Layout, WorkerLinks};
use super::optim::Optimizer;
use super::pipeline::{measured_and_simulated_bubble, RankWorker};
use super::sharding::{steps_shards, ShardOf};
use super::trainer::{
    check_options, device_note, pad_token, set_up, Engine, StepOutcome, TrainOptions, TrainReport,
};
use super::Observer;
use crate::checkpoint::native::{stage_file_name, StageEntry, MANIFEST_FILE};
use crate::checkpoint::{Format, ModelInfo, OwnedWeights, WeightSource};
use crate::convert::{write_native_manifest, write_native_stages};
use crate::data::{MicroBatch, Sequence};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::TrainBackend;
use crate::plan::{part_costs, Balance};

/// How the pipeline is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineOptions {
    /// The schedule.
    pub schedule: ScheduleKind,
    /// Worker processes (ranks) of one pipeline.
    pub ranks: usize,
    /// Copies of the pipeline (`--data-parallel`), each training on its share of every step's
    /// rows: `ranks × replicas` workers in all.
    pub replicas: usize,
    /// `--fsdp`: the replicas of a stage shard its parameters, gradients and optimizer state.
    pub fsdp: bool,
    /// What the replicas of a stage sum and share their values over, when given (then even
    /// one replica all-reduces its gradients, over a group of one) [default: ring].
    pub collectives: Option<CollectiveBackend>,
    /// Micro-batches per step.
    pub microbatches: usize,
    /// Stage slices per rank for interleaved.
    pub virtual_stages: usize,
    /// The layers at which stages after the first begin [default: a native checkpoint's
    /// stages, else balanced by memory].
    pub split: Option<Vec<usize>>,
}

impl PipelineOptions {
    /// How the workers are laid out.
    pub fn layout(&self) -> Layout {
        Layout {
            stages: self.ranks,
            replicas: self.replicas,
            fsdp: self.fsdp,
        }
    }

    /// Rows each step needs at least: one per micro-batch of every replica.
    fn rows_per_step(&self) -> usize {
        self.microbatches * self.replicas
    }
}

/// How long a rank waits for a tensor before giving up on its peer. A dead peer is noticed
/// sooner, by the transport's keep-alives.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Where a rank on another node than node 0 sends its share of each checkpoint: node 0's
/// rendezvous, which stores it in node 0's output directory.
#[derive(Debug, Clone)]
pub struct Gather {
    /// This rank's node.
    pub node: usize,
    /// The rendezvous address.
    pub rendezvous: SocketAddr,
    /// The cluster token.
    pub token: String,
    /// `--save-on-each-node`: training checkpoints stay on this node.
    pub checkpoints_stay: bool,
    /// This rank is its node's first: it completes the node's share of each checkpoint.
    pub leads_node: bool,
}

/// Trains this rank's share of the pipeline; `run_id` names the shared staging directory of
/// the final checkpoint (the same on every rank). With `gather`, this rank's node is not node
/// 0, and the rank uploads its checkpoint files there.
pub fn train_rank<B: TrainBackend>(
    options: &TrainOptions,
    pipeline: &PipelineOptions,
    transport: Arc<dyn Transport>,
    run_id: &str,
    gather: Option<Gather>,
    device: B::Device,
    observer: &mut dyn Observer,
) -> Result<TrainReport> {
    check_pipeline_options(options, pipeline)?;
    let layout = pipeline.layout();
    // The pipeline rank: which stages this worker runs, whatever its replica.
    let rank = layout.pipeline_rank(transport.rank());
    let setup = set_up(options)?;
    let (config, info, train_set) = (&setup.config, &setup.info, &setup.train_set);
    let schedule = pipeline_schedule(pipeline)?;
    // Every step must have a row for each micro-batch; the last of an epoch may be short.
    let last_batch = train_set.len() % options.batch_size;
    if last_batch != 0 && last_batch < pipeline.rows_per_step() {
        return Err(Error::Usage(format!(
            "the last step of each epoch has {last_batch} rows ({} sequences, --batch-size {}), \
             fewer than --microbatches {} × --data-parallel {}: choose a --batch-size that \
             divides the data, or fewer micro-batches",
            train_set.len(),
            options.batch_size,
            pipeline.microbatches,
            pipeline.replicas
        )));
    }
    let partition = partition_for(info, options, pipeline, &schedule)?;
    // A native checkpoint cut as the schedule needs: map only this rank's stage files.
    let weights: Box<dyn WeightSource> = match &info.format {
        Format::Native(native) if native.partition() == &partition => {
            Box::new(native.weights(&schedule.stages_of(rank))?)
        }
        _ => crate::checkpoint::open(&info.dir)?.weights,
    };
    observer.note(&device_note(
        options,
        config,
        &partition,
        &schedule.stages_of(rank),
        options.batch_size.div_ceil(pipeline.rows_per_step()),
        crate::plan::in_flight(&schedule).expect("Schedule::new has played the schedule through"),
    ));
    // FSDP: this worker's place in its stage groups, whose shards it loads.
    let shard = layout.fsdp.then(|| ShardOf {
        rank: layout.replica(transport.rank()),
        size: layout.replicas,
    });
    let mut runners = BTreeMap::new();
    for stage in schedule.stages_of(rank) {
        let slice = partition.stages()[stage].clone();
        let runner = setup.stage_runner::<B>(options, slice, weights.as_ref(), shard, &device)?;
        let runner = if pipeline.schedule.splits_backward() {
            runner.with_split_backward()
        } else {
            runner
        };
        runners.insert(stage, runner);
    }
    let links = WorkerLinks::new(transport, RECEIVE_TIMEOUT)
        .with_collectives(pipeline.collectives, options.device.cuda_ordinal());
    let worker = RankWorker::new(
        schedule,
        runners,
        config.tie_word_embeddings,
        links,
        layout,
        device,
    )
    .map_err(|e| Error::Training(format!("opening the replicas' collectives: {e}")))?;
    let pad_id = pad_token(config);
    let mut engine = PipelineRank {
        worker,
        shared: SharedOutput {
            info,
            partition: &partition,
            final_dtype: options.dtype,
            checkpoint_dtype: options.master_weights,
            run_id,
            out_dir: &options.out_dir,
            gather,
            keep: options.keep,
            optimizer: options.optimizer.clone(),
        },
        microbatches: pipeline.microbatches,
        pad_id,
        max_grad_norm: options.max_grad_norm,
    };
    setup
        .run(options)
        .train(&mut engine, setup.state.clone(), observer)
}

/// This rank's share of a pipeline.
struct PipelineRank<'a, B: TrainBackend> {
    worker: RankWorker<B>,
    shared: SharedOutput<'a>,
    microbatches: usize,
    pad_id: u32,
    max_grad_norm: Option<f64>,
}

impl<B: TrainBackend> Engine for PipelineRank<'_, B> {
    fn step(
        &mut self,
        step: u64,
        rows: &[&Sequence],
        scored: usize,
        lr: f64,
    ) -> Result<StepOutcome> {
        let layout = self.worker.layout();
        let rows = &rows[layout.rows_of(rows.len(), layout.replica(self.worker.rank()))];
        let micro_batches = split_micro_batches(rows, self.microbatches, self.pad_id, step)?;
        let result = self
            .worker
            .step(step, &micro_batches, scored, lr, self.max_grad_norm)
            .map_err(|e| peer_error(e, &self.worker))?;
        let (measured, simulated) =
            measured_and_simulated_bubble(self.worker.schedule(), &result.timings);
        Ok(StepOutcome {
            loss_sum: result.loss_sum,
            grad_norm: result.grad_norm,
            interrupted: result.interrupted,
            save_requested: result.save_requested,
            metrics: [
                ("pipeline/bubble".to_string(), measured),
                ("pipeline/bubble_simulated".to_string(), simulated),
            ]
            .into_iter()
            .chain(
                result
                    .timings
                    .iter()
                    .enumerate()
                    .map(|(rank, timing)| (format!("pipeline/rank{rank}_busy_s"), timing.busy())),
            )
            .chain(link_metrics(&result.links))
            .chain(
                result.state_bytes.iter().enumerate().map(|(rank, &bytes)| {
                    (format!("memory/rank{rank}_state_mb"), bytes as f64 / 1e6)
                }),
            )
            .chain(
                (self.worker.layout().replicas > 1 || self.worker.all_reduces()).then(|| {
                    (
                        "data_parallel/reduce_wait_s".to_string(),
                        result.reduce_wait,
                    )
                }),
            )
            .collect(),
        })
    }

    fn validate(&mut self, step: u64, batches: &[MicroBatch]) -> Result<(f64, usize)> {
        self.worker
            .evaluate(step, batches)
            .map_err(|e| peer_error(e, &self.worker))
    }

    fn save(&mut self, dir: &Path, state: &TrainerState) -> Result<()> {
        self.shared
            .write(&self.worker, dir, state.step, Some(state))
    }

    fn write_final(&mut self, dir: &Path, step: u64) -> Result<()> {
        self.shared.write(&self.worker, dir, step, None)
    }

    fn leads(&self) -> bool {
        self.worker.rank() == 0
    }
}

/// Each link that carried traffic in the step: megabytes sent and the rate while sending.
fn link_metrics(links: &[Vec<LinkTraffic>]) -> Vec<(String, f64)> {
    let mut metrics = Vec::new();
    for (from, row) in links.iter().enumerate() {
        for (to, link) in row.iter().enumerate().filter(|(_, l)| l.bytes > 0) {
            let pair = format!("pipeline/link{from}to{to}");
            metrics.push((format!("{pair}_mb"), link.bytes as f64 / 1e6));
            metrics.push((format!("{pair}_mb_per_s"), link.megabytes_per_second()));
        }
    }
    metrics
}

/// How the model is cut for `schedule`: at `--split` when given, as a native checkpoint
/// already is when it has that many stages, else balanced by memory.
pub fn partition_for(
    info: &ModelInfo,
    options: &TrainOptions,
    pipeline: &PipelineOptions,
    schedule: &Schedule,
) -> Result<Partition> {
    if let Some(split) = &pipeline.split {
        let partition = Partition::from_split(split, info.config.num_layers)
            .map_err(|e| Error::Usage(format!("--split: {e}")))?;
        if partition.len() != schedule.stages() {
            return Err(Error::Usage(format!(
                "--split makes {} stages, but {} with {} workers needs {}",
                partition.len(),
                pipeline.schedule.name(),
                pipeline.ranks,
                schedule.stages()
            )));
        }
        return Ok(partition);
    }
    if let Format::Native(native) = &info.format {
        if native.partition().len() == schedule.stages() {
            return Ok(native.partition().clone());
        }
    }
    let costs = part_costs(
        &info.config,
        Balance::Memory,
        options.dtype,
        options.sequences.max_len,
    );
    Partition::balanced(&costs, schedule.stages()).map_err(|e| {
        Error::Usage(format!(
            "the model cannot be cut into the {} stages the schedule needs: {e}",
            schedule.stages()
        ))
    })
}

/// Checks the options of a pipeline run, before any worker starts: the single-device checks,
/// and what pipelines refuse (optimizer-in-backward, because a stage accumulates several
/// micro-batches per step).
pub fn check_pipeline_options(options: &TrainOptions, pipeline: &PipelineOptions) -> Result<()> {
    check_options(options)?;
    if options.batch_size < pipeline.rows_per_step() {
        return Err(Error::Usage(format!(
            "--batch-size {} cannot be split into --microbatches {} on each of --data-parallel \
             {} replicas: each micro-batch needs a row",
            options.batch_size, pipeline.microbatches, pipeline.replicas
        )));
    }
    let schedule = pipeline_schedule(pipeline)?;
    // Each of a worker's sharded stages takes two channels of its group's 256.
    if pipeline.fsdp && schedule.stages() / pipeline.ranks > 127 {
        return Err(Error::Usage(
            "--fsdp runs at most 127 stages per worker: lower --virtual".into(),
        ));
    }
    let info = crate::checkpoint::describe(&options.model_dir)?;
    let layers = info.config.num_layers;
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
            "--optimizer-in-backward cannot be used with --stages or --data-parallel: a stage \
             accumulates the gradients of several micro-batches, or replicas, per step"
                .into(),
        ));
    }
    partition_for(&info, options, pipeline, &schedule).map(drop)
}

/// The schedule `pipeline` asks for.
pub fn pipeline_schedule(pipeline: &PipelineOptions) -> Result<Schedule> {
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
            "step {} has {} rows (per replica) for {count} micro-batches: use a --batch-size \
             that is a multiple of --microbatches (times --data-parallel) and divides the data, \
             or fewer --microbatches",
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

/// Names the stages (and replica) behind a transport failure.
fn peer_error<B: TrainBackend>(error: TransportError, worker: &RankWorker<B>) -> Error {
    let layout = worker.layout();
    let who = |rank: usize| {
        let stages = worker.schedule().stages_of(layout.pipeline_rank(rank));
        if layout.replicas > 1 {
            format!(
                "the worker of stage(s) {stages:?} of replica {} (rank {rank})",
                layout.replica(rank)
            )
        } else {
            format!("the worker of stage(s) {stages:?} (rank {rank})")
        }
    };
    match error {
        TransportError::PeerLost { rank } => {
            Error::Training(format!("lost {}; stopping", who(rank)))
        }
        TransportError::Timeout { rank, timeout, .. } => Error::Training(format!(
            "{} sent nothing for {timeout:?}; stopping",
            who(rank)
        )),
        other => Error::Training(format!("pipeline transfer failed: {other}")),
    }
}

/// What every rank needs to write its share of a checkpoint.
struct SharedOutput<'a> {
    info: &'a ModelInfo,
    partition: &'a Partition,
    /// The final model's weights are saved in the training dtype.
    final_dtype: DType,
    /// A checkpoint's in the master weights' dtype, so that resuming is exact.
    checkpoint_dtype: DType,
    run_id: &'a str,
    /// The run's output directory (node 0's, for uploads).
    out_dir: &'a Path,
    /// Where this rank's files go when its node is not node 0.
    gather: Option<Gather>,
    /// `--keep`, for the checkpoints a node keeps of its own.
    keep: Option<usize>,
    /// The optimizer: under FSDP, element-wise rules keep their state in shards.
    optimizer: Optimizer,
}

impl SharedOutput<'_> {
    /// Every rank writes its stage files (and with `state`, a training checkpoint's optimizer
    /// files) into one staging directory beside `target`; after a barrier, rank 0 writes the
    /// manifest from their entries (and `trainer.json`) and renames the directory into place.
    /// A rank on another node than node 0 writes into its node's own staging directory and
    /// sends its files to node 0's; with `--save-on-each-node` a checkpoint's stay on its node
    /// (only their entries go to node 0), and the node's first rank completes the node's share
    /// with node 0's manifest once it is written.
    fn write<B: TrainBackend>(
        &self,
        worker: &RankWorker<B>,
        target: &Path,
        step: u64,
        state: Option<&TrainerState>,
    ) -> Result<()> {
        let parent = target.parent().unwrap_or(Path::new("."));
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let shared = parent.join(format!(".{name}.pp-pipeline-{}", self.run_id));
        let staging = match &self.gather {
            None => shared.clone(),
            Some(gather) => parent.join(format!(".{name}.pp-node{}-{}", gather.node, self.run_id)),
        };
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        let dtype = match state {
            Some(_) => self.checkpoint_dtype,
            None => self.final_dtype,
        };
        let layout = worker.layout();
        // Under FSDP every replica takes part in gathering the weights and writes its own
        // shard of the optimizer state.
        let writes = layout.replica(worker.rank()) == 0;
        let relative = |path: &Path| {
            path.strip_prefix(self.out_dir)
                .unwrap_or(path)
                .to_path_buf()
        };
        // What this rank writes: other ranks of its node write beside it.
        let mut written = Vec::new();
        let mut weights = OwnedWeights::default();
        for (&stage, runner) in worker.runners() {
            let stage_weights = runner.weights(dtype, writes);
            weights.extend(stage_weights.map_err(|e| peer_error(e, worker))?);
            if state.is_some() && runner.is_sharded() && steps_shards(&self.optimizer) {
                written.push(checkpoint::write_optimizer_shard(
                    &staging,
                    stage,
                    (layout.replica(worker.rank()), layout.replicas),
                    runner.optimizer_state(),
                )?);
            }
        }
        // The first replica holds the same weights as the others and alone writes them (and
        // whole optimizer state); the others write at most their optimizer shards.
        let stages: Vec<usize> = worker.runners().keys().copied().collect();
        let mut entries = Vec::new();
        let stage_entries = if writes {
            write_native_stages(&weights, self.info, self.partition, &stages, &staging)?
        } else {
            Vec::new()
        };
        for entry in stage_entries {
            let path = staging.join(entry_file(&entry.file));
            crate::checkpoint::write_json(&path, &entry)?;
            written.push(staging.join(&entry.file));
            entries.push(path);
        }
        if writes && state.is_some() && !(layout.fsdp && steps_shards(&self.optimizer)) {
            for (&stage, runner) in worker.runners() {
                checkpoint::write_stage_optimizer_state(
                    &staging,
                    stage,
                    runner.optimizer_state(),
                    self.partition,
                    self.info.config.tie_word_embeddings,
                )?;
                written.push(staging.join(checkpoint::optimizer_file(stage)));
            }
        }
        // Whether this node keeps its share of this checkpoint: then only the entries travel.
        let stays = state.is_some() && self.gather.as_ref().is_some_and(|g| g.checkpoints_stay);
        if let Some(gather) = &self.gather {
            let remote = relative(&shared);
            if stays {
                gather.upload(&entries, &remote)?;
            } else {
                written.extend(entries);
                gather.upload(&written, &remote)?;
                for path in &written {
                    std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
                }
            }
        }
        // Round 1 of the step: every rank's files are in place.
        worker.barrier(step, 1).map_err(|e| peer_error(e, worker))?;
        if worker.rank() == 0 {
            let mut entries = Vec::with_capacity(self.partition.len());
            for index in 0..self.partition.len() {
                let path = staging.join(entry_file(&stage_file_name(index)));
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
            self.put_in_place(&staging, target)?;
        }
        // Round 2: the checkpoint is in place before any rank goes on.
        worker.barrier(step, 2).map_err(|e| peer_error(e, worker))?;
        match (&self.gather, state) {
            (Some(gather), _) if !stays && gather.leads_node => {
                // Every rank of the node has sent its files and removed them.
                std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))
            }
            (Some(gather), Some(state)) if stays && gather.leads_node => {
                gather.complete_share(&staging, &relative(target).join(MANIFEST_FILE), state)?;
                if same_checkpoint(&staging, target) {
                    // Node 0 wrote this very checkpoint here: the nodes share a filesystem.
                    move_files(&staging, target)?;
                } else {
                    self.put_in_place(&staging, target)?;
                }
                if let Some(keep) = self.keep {
                    checkpoint::prune(parent, keep, target)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Renames `staging` to `target`, moving an older copy aside first so that the target is
    /// never missing.
    fn put_in_place(&self, staging: &Path, target: &Path) -> Result<()> {
        let parent = target.parent().unwrap_or(Path::new("."));
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let old = parent.join(format!(".{name}.pp-old-{}", self.run_id));
        if target.exists() {
            std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
        }
        std::fs::rename(staging, target).map_err(|e| Error::io(target, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }
}

/// Whether `a` and `b` hold the same manifest: they are shares of one checkpoint write (the
/// manifest records every stage file's checksum).
fn same_checkpoint(a: &Path, b: &Path) -> bool {
    let manifest = |dir: &Path| std::fs::read(dir.join(MANIFEST_FILE)).ok();
    manifest(a).is_some_and(|m| Some(m) == manifest(b))
}

/// Moves every file of `from` into `to`, then removes `from`.
fn move_files(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        let target = to.join(path.file_name().unwrap_or_default());
        std::fs::rename(&path, &target).map_err(|e| Error::io(&target, e))?;
    }
    std::fs::remove_dir(from).map_err(|e| Error::io(from, e))
}

/// Where a rank leaves the description of a stage file it wrote, for rank 0's manifest.
fn entry_file(stage_file: &str) -> String {
    format!("{stage_file}.entry.json")
}

impl Gather {
    /// Uploads `files` into the directory `name` (relative to node 0's output directory).
    fn upload(&self, files: &[std::path::PathBuf], name: &Path) -> Result<()> {
        let client = self.connect()?;
        for path in files {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            let remote = format!("{}/{file}", name.display());
            client.upload(path, &remote).map_err(|e| self.failed(e))?;
        }
        Ok(())
    }

    /// Makes this node's share in `dir` a checkpoint of its own: node 0's `manifest` (the
    /// whole model's), the trainer state, and no stage entries.
    fn complete_share(&self, dir: &Path, manifest: &Path, state: &TrainerState) -> Result<()> {
        self.connect()?
            .fetch_uploaded(&manifest.to_string_lossy(), &dir.join(MANIFEST_FILE))
            .map_err(|e| self.failed(e))?;
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.to_string_lossy().ends_with(".entry.json") {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        crate::checkpoint::write_json(&dir.join(checkpoint::TRAINER_FILE), state)
    }

    fn connect(&self) -> Result<FileClient> {
        FileClient::connect(
            self.rendezvous,
            &self.token,
            Duration::from_secs(60),
            &mut |_| {},
        )
        .map_err(|e| self.failed(e))
    }

    fn failed(&self, error: pp_transport::rendezvous::RendezvousError) -> Error {
        Error::Training(format!(
            "checkpoint files with node 0 (at {}): {error}",
            self.rendezvous
        ))
    }
}
