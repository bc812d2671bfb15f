//! One rank of a pipeline: the stage slices it runs, each in its own [`StageRunner`], driven
//! through an optimizer step by the rank's list of a [`Schedule`]. Activations and gradients
//! cross between the ranks of its pipeline over a [`Transport`]; with data parallelism the
//! gradients are also summed over the replicas of its stages ([`GradientReducer`]). After the
//! last pass, the tied embedding's gradients are summed between the first and last stage and
//! the squared gradient norm and loss are summed over all ranks, so every rank clips with the
//! global norm and steps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use pp_stages::schedule::{simulate, Action, Costs, Pass, Transfer};
use pp_stages::Schedule;
use pp_transport::{GroupView, Kind, LinkTraffic, Tag, TensorMessage, Transport, TransportError};

use super::data_parallel::{GradientReducer, Layout, WorkerLinks};
use super::runtime::{StageOutput, StageRunner, TrainingMemory};
use super::sharding::Sharding;
use super::trainer::clip_scale;
use crate::data::MicroBatch;
use crate::kernels::TrainBackend;
use crate::model::layers::in_dtype;
use crate::model::names::EMBED;

/// What one rank reports after a step; the sums are over the whole pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineStep {
    /// Summed loss of the step's micro-batches (divide by the scored tokens for the mean).
    pub loss_sum: f64,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Some rank was asked to stop (Ctrl-C); every rank sees the same answer.
    pub interrupted: bool,
    /// Some rank was asked for a checkpoint (SIGUSR1); every rank sees the same answer.
    pub save_requested: bool,
    /// Where each rank's time went, by rank.
    pub timings: Vec<RankTiming>,
    /// What crossed each link since the last step, by sending rank, then receiving rank
    /// (empty where the transport has no wire).
    pub links: Vec<Vec<LinkTraffic>>,
    /// Bytes of parameters, gradients and optimizer state each rank held before the update,
    /// by rank.
    pub state_bytes: Vec<usize>,
    /// Seconds this rank waited, after its last pass, for its gradients' all-reduce to end
    /// (data parallelism): what backward did not hide.
    pub reduce_wait: f64,
}

/// One rank's stages and its connections to the others.
pub struct RankWorker<B: TrainBackend> {
    schedule: Schedule,
    runners: BTreeMap<usize, StageRunner<B>>,
    tied: bool,
    /// Every worker of the run, by global rank.
    world: Arc<dyn Transport>,
    /// This rank's pipeline (its replica), by pipeline rank.
    transport: GroupView,
    layout: Layout,
    /// With several replicas: sums this rank's gradients over its stage group.
    reducer: Option<GradientReducer>,
    /// For each of this rank's stages, the micro-batch of its last backward pass in a step.
    last_backward: HashMap<usize, usize>,
    timeout: Duration,
    device: B::Device,
    /// The transport's link counters at the end of the last step.
    links_before: Vec<LinkTraffic>,
}

impl<B: TrainBackend> RankWorker<B> {
    /// The worker of global rank `links.world.rank()` in `layout`, running `runners` (by
    /// stage) as its pipeline rank of `schedule`. `tied` says the model ties its embedding and
    /// output weight. With replicas, opens its stage group's collectives (a collective of the
    /// group itself with NCCL).
    pub fn new(
        schedule: Schedule,
        runners: BTreeMap<usize, StageRunner<B>>,
        tied: bool,
        links: WorkerLinks,
        layout: Layout,
        device: B::Device,
    ) -> Result<Self, TransportError> {
        let (world, timeout) = (links.world.clone(), links.timeout);
        let rank = world.rank();
        let transport =
            GroupView::new(world.clone(), layout.pipeline_members(layout.replica(rank)));
        let stage_group = layout.stage_group(layout.pipeline_rank(rank));
        let reducer = if !layout.fsdp && links.reduces(layout.replicas) {
            Some(GradientReducer::new(links.open(&stage_group, 0)?))
        } else {
            None
        };
        let runners = runners
            .into_iter()
            .enumerate()
            .map(|(slot, (stage, runner))| {
                let runner = if layout.fsdp {
                    let slot = u8::try_from(slot)
                        .ok()
                        .filter(|&slot| slot < 128)
                        .expect("check_pipeline_options allows 127 sharded stages per worker");
                    // Two channels a stage: the compute thread's and the prefetcher's.
                    let sharding = Sharding::new(
                        links.open(&stage_group, 2 * slot)?,
                        links.open(&stage_group, 2 * slot + 1)?,
                    );
                    runner.with_sharding(sharding)
                } else if let Some(reducer) = &reducer {
                    runner.with_gradient_sender(stage, reducer.sender())
                } else {
                    runner
                };
                Ok((stage, runner))
            })
            .collect::<Result<BTreeMap<_, _>, TransportError>>()?;
        let mut last_backward = HashMap::new();
        for action in &schedule.actions[layout.pipeline_rank(rank)] {
            if let Action::Compute {
                pass: Pass::B,
                stage,
                microbatch,
            } = *action
            {
                last_backward.insert(stage, microbatch);
            }
        }
        Ok(Self {
            schedule,
            runners,
            tied,
            world,
            transport,
            layout,
            reducer,
            last_backward,
            timeout,
            device,
            links_before: Vec::new(),
        })
    }

    /// The runners, by stage.
    pub fn runners(&self) -> &BTreeMap<usize, StageRunner<B>> {
        &self.runners
    }

    /// This worker's global rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// Whether this worker all-reduces its gradients after backward (DDP; with
    /// `--collectives`, a lone replica too).
    pub fn all_reduces(&self) -> bool {
        self.reducer.is_some()
    }

    /// How the run's workers are laid out.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The schedule it follows.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Waits until every rank reaches the same point (`round` numbers the points of a step).
    /// Ranks meet here around saving, which may take long (a large stage written to disk, or
    /// sent to node 0 over a slow link), so the wait is bounded by [`BARRIER_TIMEOUT`], not the
    /// pipeline's receive timeout; a rank that dies meanwhile is noticed by the transport.
    pub fn barrier(&self, step: u64, round: u32) -> Result<(), TransportError> {
        self.reduce(step, round, vec![0.0], BARRIER_TIMEOUT)
            .map(|_| ())
    }

    /// Runs optimizer step `step` on `micro_batches` (every rank is given the same ones; only
    /// the parts each stage needs are used) with `scored_tokens` scored tokens in all, at
    /// learning rate `lr`, clipping to `max_grad_norm`.
    pub fn step(
        &mut self,
        step: u64,
        micro_batches: &[MicroBatch],
        scored_tokens: usize,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<PipelineStep, TransportError> {
        let rank = self.transport.rank();
        let last_stage = self.schedule.stages() - 1;
        let loss_scale = 1.0 / scored_tokens.max(1) as f64;
        for runner in self.runners.values_mut() {
            runner.set_lr(lr);
        }
        // Tensors waiting to be consumed: received, or handed from one of this rank's stages
        // to the next, by (transfer, consuming stage, micro-batch).
        let mut waiting: HashMap<(Transfer, usize, usize), Tensor<B::InnerBackend, 3>> =
            HashMap::new();
        let mut loss_sum = 0.0;
        let mut timing = RankTiming::default();
        let started = Instant::now();
        for &action in &self.schedule.actions[rank] {
            match action {
                Action::Recv {
                    transfer,
                    stage,
                    microbatch,
                    from,
                } => {
                    let tag = tag(step, microbatch, stage, transfer);
                    let message = self.transport.recv(from, tag, self.timeout)?;
                    waiting.insert(
                        (transfer, stage, microbatch),
                        from_message(message, &self.device),
                    );
                }
                Action::Send {
                    transfer,
                    stage,
                    microbatch,
                    to,
                } => {
                    let tensor = waiting
                        .remove(&(transfer, stage, microbatch))
                        .expect("a send follows the pass that produced its tensor");
                    let message = to_message(tag(step, microbatch, stage, transfer), tensor);
                    self.transport.send(to, message)?;
                }
                Action::Compute {
                    pass,
                    stage,
                    microbatch,
                } => {
                    let pass_started = Instant::now();
                    let runner = self
                        .runners
                        .get_mut(&stage)
                        .expect("the rank runs its stages");
                    match pass {
                        Pass::F => {
                            let input = (stage > 0).then(|| {
                                waiting
                                    .remove(&(Transfer::Activation, stage, microbatch))
                                    .expect("the previous stage's output is here")
                            });
                            match runner.forward(microbatch, &micro_batches[microbatch], input) {
                                StageOutput::Hidden(h) => {
                                    waiting
                                        .insert((Transfer::Activation, stage + 1, microbatch), h);
                                }
                                StageOutput::Loss { sum, .. } => loss_sum += sum,
                            }
                        }
                        Pass::B | Pass::I => {
                            let grad = (stage < last_stage).then(|| {
                                waiting
                                    .remove(&(Transfer::Gradient, stage, microbatch))
                                    .expect("the next stage's input gradient is here")
                            });
                            let input_grad = if pass == Pass::B {
                                let last = self.last_backward.get(&stage) == Some(&microbatch);
                                runner.backward(microbatch, grad, loss_scale, last)
                            } else {
                                runner.backward_input(microbatch, grad, loss_scale)
                            };
                            if let Some(g) = input_grad {
                                waiting.insert((Transfer::Gradient, stage - 1, microbatch), g);
                            }
                        }
                        Pass::W => runner.backward_weight(microbatch),
                    }
                    if let Some(failure) = runner.take_sharding_failure() {
                        return Err(failure);
                    }
                    // A GPU backend returns once the pass is queued: wait for it, so that busy
                    // time (and the measured bubble) is compute, not the time to issue it.
                    let _ = B::sync(&self.device);
                    timing.record(pass, pass_started.elapsed().as_secs_f64());
                }
            }
        }
        let waiting = Instant::now();
        if let Some(reducer) = &self.reducer {
            for runner in self.runners.values_mut() {
                runner.send_remaining_gradients();
            }
            for piece in reducer.finish()? {
                self.runners
                    .get_mut(&piece.stage)
                    .expect("a reduced gradient of this rank's stage")
                    .receive_gradient(piece);
            }
        }
        let reduce_wait = waiting.elapsed().as_secs_f64();
        timing.wall = started.elapsed().as_secs_f64();
        if self.tied && last_stage > 0 {
            self.sum_tied_gradients(step)?;
        }
        // The tied embedding's (now identical) gradient counts once: at the first stage; and
        // every replica holds the same sums, so only the first one's count (under FSDP each
        // holds its own shard of them: all count).
        let counts = self.layout.fsdp || self.layout.replica(self.world.rank()) == 0;
        let memory = self.training_memory();
        let sum_squares: f64 = if counts {
            self.runners
                .iter()
                .map(|(&stage, runner)| {
                    let skip =
                        (self.tied && stage == last_stage && last_stage > 0).then_some(EMBED);
                    runner.grad_sum_squares_excluding(skip)
                })
                .sum()
        } else {
            0.0
        };
        // Ctrl-C and save requests reach the ranks at different moments; they act after the
        // same step.
        let interrupted = f64::from(u8::from(crate::interrupt::check().is_err()));
        let save = f64::from(u8::from(crate::interrupt::take_save_request()));
        let (rank, ranks) = (self.world.rank(), self.world.world_size());
        let mut values = vec![sum_squares, loss_sum, interrupted, save];
        values.extend(timing.to_slot(rank, ranks));
        values.extend(self.link_slot(rank, ranks));
        let mut memory_slot = vec![0.0; ranks];
        memory_slot[rank] = memory.total() as f64;
        values.extend(memory_slot);
        let totals = self.all_reduce(step, 0, values)?;
        let (sum_squares, loss_sum, interrupted, save) =
            (totals[0], totals[1], totals[2], totals[3]);
        let (timings, rest) = totals[4..].split_at(TIMING_FIELDS * ranks);
        let (links, memory) = rest.split_at(2 * ranks * ranks);
        let timings = timings
            .chunks_exact(TIMING_FIELDS)
            .map(RankTiming::from_slot)
            .collect();
        let links = links
            .chunks_exact(2 * ranks)
            .map(|row| {
                row.chunks_exact(2)
                    .map(|pair| LinkTraffic {
                        bytes: pair[0] as u64,
                        seconds: pair[1],
                    })
                    .collect()
            })
            .collect();
        let grad_norm = sum_squares.sqrt();
        let clip = clip_scale(grad_norm, max_grad_norm);
        for runner in self.runners.values_mut() {
            runner.step(clip);
            if let Some(failure) = runner.take_sharding_failure() {
                return Err(failure);
            }
        }
        Ok(PipelineStep {
            loss_sum,
            grad_norm,
            interrupted: interrupted > 0.0,
            save_requested: save > 0.0,
            timings,
            links,
            state_bytes: memory.iter().map(|&b| b as usize).collect(),
            reduce_wait,
        })
    }

    /// Parameters, gradients and optimizer state this rank holds now.
    pub fn training_memory(&self) -> TrainingMemory {
        self.runners
            .values()
            .map(StageRunner::training_memory)
            .fold(TrainingMemory::default(), |a, b| TrainingMemory {
                params: a.params + b.params,
                grads: a.grads + b.grads,
                optimizer: a.optimizer + b.optimizer,
            })
    }

    /// This rank's link traffic since the last step, as reduce values in its row of a
    /// `ranks` × `ranks` gather of (bytes, seconds).
    fn link_slot(&mut self, rank: usize, ranks: usize) -> Vec<f64> {
        let now = self.world.links();
        let mut values = vec![0.0; 2 * ranks * ranks];
        for (peer, link) in now.iter().enumerate() {
            let before = self.links_before.get(peer).copied().unwrap_or_default();
            let at = 2 * (rank * ranks + peer);
            values[at] = (link.bytes - before.bytes) as f64;
            values[at + 1] = link.seconds - before.seconds;
        }
        self.links_before = now;
        values
    }

    /// Validation: the forward pass of every micro-batch through the pipeline, stage after
    /// stage, keeping nothing (each of N replicas takes every N-th); returns the loss summed
    /// over them and their scored tokens, the same on every rank. `step` is the training step
    /// it follows.
    pub fn evaluate(
        &mut self,
        step: u64,
        micro_batches: &[MicroBatch],
    ) -> Result<(f64, usize), TransportError> {
        let rank = self.transport.rank();
        let stages = self.schedule.stages();
        let replica = self.layout.replica(self.world.rank());
        // Tags of validation transfers must not meet a training step's.
        let eval_step = u64::MAX - step;
        let (mut loss_sum, mut tokens) = (0.0, 0usize);
        let (count, replicas) = (micro_batches.len(), self.layout.replicas);
        // Sharded replicas gather each part's weights together, so all run as many passes: a
        // replica short of a micro-batch repeats the last one, uncounted (under a tag of its
        // own, `index` past the end).
        let passes = if self.layout.fsdp {
            count.div_ceil(replicas)
        } else {
            count.saturating_sub(replica).div_ceil(replicas)
        };
        for index in (replica..).step_by(replicas).take(passes) {
            let counts = index < count;
            let batch = &micro_batches[index.min(count - 1)];
            let mut hidden = None;
            for stage in 0..stages {
                let owner = self.schedule.stage_ranks[stage];
                if owner != rank {
                    continue;
                }
                if stage > 0 && self.schedule.stage_ranks[stage - 1] != rank {
                    let tag = tag(eval_step, index, stage, Transfer::Activation);
                    let from = self.schedule.stage_ranks[stage - 1];
                    let message = self.transport.recv(from, tag, self.timeout)?;
                    hidden = Some(from_message(message, &self.device));
                }
                let runner = self
                    .runners
                    .get_mut(&stage)
                    .expect("the rank runs its stages");
                let output = runner.evaluate(batch, hidden.take());
                if let Some(failure) = runner.take_sharding_failure() {
                    return Err(failure);
                }
                match output {
                    StageOutput::Loss { sum, tokens: t } if counts => {
                        loss_sum += sum;
                        tokens += t;
                    }
                    StageOutput::Loss { .. } => {}
                    StageOutput::Hidden(h) => {
                        let next = self.schedule.stage_ranks[stage + 1];
                        if next == rank {
                            hidden = Some(h);
                        } else {
                            let tag = tag(eval_step, index, stage + 1, Transfer::Activation);
                            self.transport.send(next, to_message(tag, h))?;
                        }
                    }
                }
            }
        }
        // Round 3 of the step: the validation totals.
        let totals = self.all_reduce(step, 3, vec![loss_sum, tokens as f64])?;
        Ok((totals[0], totals[1] as usize))
    }

    /// Adds the first stage's and the last stage's gradients of the tied embedding, so both
    /// copies take the same step.
    fn sum_tied_gradients(&mut self, step: u64) -> Result<(), TransportError> {
        let last = self.schedule.stages() - 1;
        let (first_rank, last_rank) = (
            self.schedule.stage_ranks[0],
            self.schedule.stage_ranks[last],
        );
        let rank = self.transport.rank();
        let mine = |stage| self.runners.get(&stage).and_then(|r| r.grad(EMBED));
        if first_rank == last_rank {
            if first_rank == rank {
                let (a, b) = (mine(0), mine(last));
                if let (Some(a), Some(b)) = (a, b) {
                    let sum = a + b;
                    for stage in [0, last] {
                        self.runners
                            .get_mut(&stage)
                            .expect("the rank runs both ends")
                            .set_grad(EMBED, sum.clone());
                    }
                }
            }
            return Ok(());
        }
        let (stage, peer) = if rank == first_rank {
            (0, last_rank)
        } else if rank == last_rank {
            (last, first_rank)
        } else {
            return Ok(());
        };
        let own = mine(stage).expect("the tied embedding has a gradient after backward");
        let tag = Tag {
            step,
            microbatch: 0,
            stage: stage as u32,
            kind: Kind::TiedGradient,
        };
        self.transport.send(peer, to_message(tag, own.clone()))?;
        let peer_tag = Tag {
            stage: (if stage == 0 { last } else { 0 }) as u32,
            ..tag
        };
        let theirs = self.transport.recv(peer, peer_tag, self.timeout)?;
        let theirs = Tensor::<B::InnerBackend, 2>::from_data(
            TensorData::new(theirs.values, [theirs.shape[0], theirs.shape[1]]),
            &self.device,
        );
        self.runners
            .get_mut(&stage)
            .expect("the rank runs its end")
            .set_grad(EMBED, own + theirs);
        Ok(())
    }

    /// Sums `values` over every rank of the run: each sends its values to rank 0, which sends
    /// the totals back. `round` tells apart several reductions within one step.
    pub fn all_reduce(
        &self,
        step: u64,
        round: u32,
        values: Vec<f64>,
    ) -> Result<Vec<f64>, TransportError> {
        self.reduce(step, round, values, self.timeout)
    }

    fn reduce(
        &self,
        step: u64,
        round: u32,
        values: Vec<f64>,
        timeout: Duration,
    ) -> Result<Vec<f64>, TransportError> {
        let (rank, ranks) = (self.world.rank(), self.world.world_size());
        let tag = |from: usize| Tag {
            step,
            microbatch: round,
            stage: from as u32,
            kind: Kind::Reduce,
        };
        let message = |from: usize, values: &[f64]| TensorMessage {
            tag: tag(from),
            shape: vec![2 * values.len()],
            // Sums of squares need more than f32's precision: each value as two f32 halves.
            values: values
                .iter()
                .flat_map(|v| {
                    let high = *v as f32;
                    [high, (*v - f64::from(high)) as f32]
                })
                .collect(),
        };
        let read = |m: TensorMessage| -> Vec<f64> {
            m.values
                .chunks_exact(2)
                .map(|pair| f64::from(pair[0]) + f64::from(pair[1]))
                .collect()
        };
        if rank == 0 {
            let mut total = values;
            for from in 1..ranks {
                let theirs = read(self.world.recv(from, tag(from), timeout)?);
                total.iter_mut().zip(theirs).for_each(|(t, v)| *t += v);
            }
            for to in 1..ranks {
                self.world.send(to, message(0, &total))?;
            }
            Ok(total)
        } else {
            self.world.send(0, message(rank, &values))?;
            Ok(read(self.world.recv(0, tag(0), timeout)?))
        }
    }
}

/// How long a rank waits for the others at a barrier (see [`RankWorker::barrier`]).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(3600);

/// Per rank: wall time of the step's action list, and the time and count of each pass kind.
const TIMING_FIELDS: usize = 10;

/// Where a rank's step time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RankTiming {
    /// Seconds from the first to the last action of the step.
    pub wall: f64,
    /// Seconds of F, B, I and W passes, and how many of each ran.
    pub passes: [(f64, usize); 4],
}

impl RankTiming {
    /// Seconds spent computing.
    pub fn busy(&self) -> f64 {
        self.passes.iter().map(|(t, _)| t).sum()
    }

    fn record(&mut self, pass: Pass, seconds: f64) {
        let slot = &mut self.passes[pass_index(pass)];
        slot.0 += seconds;
        slot.1 += 1;
    }

    /// As reduce values in this rank's slot of a `ranks`-long gather.
    fn to_slot(self, rank: usize, ranks: usize) -> Vec<f64> {
        let mut values = vec![0.0; TIMING_FIELDS * ranks];
        let at = rank * TIMING_FIELDS;
        values[at] = self.wall;
        for (i, (time, count)) in self.passes.iter().enumerate() {
            values[at + 1 + 2 * i] = *time;
            values[at + 2 + 2 * i] = *count as f64;
        }
        values
    }

    fn from_slot(values: &[f64]) -> Self {
        Self {
            wall: values[0],
            passes: std::array::from_fn(|i| (values[1 + 2 * i], values[2 + 2 * i] as usize)),
        }
    }
}

fn pass_index(pass: Pass) -> usize {
    match pass {
        Pass::F => 0,
        Pass::B => 1,
        Pass::I => 2,
        Pass::W => 3,
    }
}

/// The measured bubble of a step (idle share of all ranks over the slowest rank's wall time)
/// and what the simulator predicts for the schedule with the step's mean pass times and free
/// transfers.
pub fn measured_and_simulated_bubble(schedule: &Schedule, timings: &[RankTiming]) -> (f64, f64) {
    let makespan = timings.iter().map(|t| t.wall).fold(0.0, f64::max);
    let busy: f64 = timings.iter().map(RankTiming::busy).sum();
    let measured = 1.0 - busy / (makespan * timings.len() as f64).max(f64::MIN_POSITIVE);
    let mean = |pass: Pass| {
        let (time, count) = timings.iter().fold((0.0, 0), |(t, n), r| {
            let (time, count) = r.passes[pass_index(pass)];
            (t + time, n + count)
        });
        if count == 0 {
            0.0
        } else {
            time / count as f64
        }
    };
    let costs = Costs {
        forward: mean(Pass::F),
        backward: mean(Pass::B),
        input_grad: mean(Pass::I),
        weight_grad: mean(Pass::W),
        transfer: 0.0,
    };
    let simulated = simulate(schedule, &costs).map_or(f64::NAN, |run| run.bubble);
    (measured, simulated)
}

fn tag(step: u64, microbatch: usize, stage: usize, transfer: Transfer) -> Tag {
    Tag {
        step,
        microbatch: microbatch as u32,
        stage: stage as u32,
        kind: match transfer {
            Transfer::Activation => Kind::Activation,
            Transfer::Gradient => Kind::Gradient,
        },
    }
}

fn to_message<B: Backend, const D: usize>(tag: Tag, tensor: Tensor<B, D>) -> TensorMessage {
    TensorMessage {
        tag,
        shape: tensor.dims().to_vec(),
        // Float32 on the wire whatever the compute dtype.
        values: in_dtype(tensor, burn::tensor::DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("float32 activations and gradients"),
    }
}

fn from_message<B: Backend>(message: TensorMessage, device: &B::Device) -> Tensor<B, 3> {
    let shape = [message.shape[0], message.shape[1], message.shape[2]];
    Tensor::from_data(TensorData::new(message.values, shape), device)
}
