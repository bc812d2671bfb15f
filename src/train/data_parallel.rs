//! Data parallelism: `--stages S --data-parallel N` runs S×N workers, N replicas of one
//! S-stage pipeline. Each replica trains on its share of every step's rows; the workers that
//! run the same stages (one per replica) form a *stage group*, whose gradients are summed by a
//! ring all-reduce while backward still runs, so each replica steps with the gradient of the
//! whole batch, as one device would.
//!
//! Gradients leave the stage runner as soon as the step's last backward pass is done with them
//! (each part's parameters when backward leaves the first part that uses them), into a
//! [`GradientReducer`]: a thread of its own that packs them into buckets of about
//! [`BUCKET_VALUES`] and all-reduces each bucket as it fills, while the compute thread goes on
//! down the model. The loss scale is one over the whole step's scored tokens on every replica,
//! so the summed gradients are the token-weighted mean's, exactly.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use pp_transport::{Collectives, GroupView, RingCollectives, Transport, TransportError};

/// How the workers of a run are laid out: `replicas` copies of a pipeline of `stages` ranks.
/// Global rank `g` is pipeline rank `g % stages` of replica `g / stages`, so each replica's
/// pipeline is a run of neighbouring ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Ranks of one pipeline.
    pub stages: usize,
    /// Copies of the pipeline.
    pub replicas: usize,
    /// The replicas of a stage shard its parameters, gradients and optimizer state among them
    /// (FSDP, [`super::sharding`]) instead of each holding all of them (DDP).
    pub fsdp: bool,
}

impl Layout {
    /// A lone pipeline.
    pub fn pipeline(stages: usize) -> Self {
        Self::replicated(stages, 1)
    }

    /// `replicas` copies of a pipeline of `stages` ranks, each holding all of its stages'
    /// training state (DDP).
    pub fn replicated(stages: usize, replicas: usize) -> Self {
        Self {
            stages,
            replicas,
            fsdp: false,
        }
    }

    /// The same layout with each stage's training state sharded over its replicas (FSDP).
    pub fn sharded(self) -> Self {
        Self { fsdp: true, ..self }
    }

    /// Every worker of the run.
    pub fn world_size(&self) -> usize {
        self.stages * self.replicas
    }

    /// The replica global rank `rank` belongs to.
    pub fn replica(&self, rank: usize) -> usize {
        rank / self.stages
    }

    /// Global rank `rank`'s rank within its pipeline.
    pub fn pipeline_rank(&self, rank: usize) -> usize {
        rank % self.stages
    }

    /// The global ranks of `replica`'s pipeline, by pipeline rank.
    pub fn pipeline_members(&self, replica: usize) -> Vec<usize> {
        (replica * self.stages..(replica + 1) * self.stages).collect()
    }

    /// The global ranks that run pipeline rank `pipeline_rank`'s stages, by replica.
    pub fn stage_group(&self, pipeline_rank: usize) -> Vec<usize> {
        (0..self.replicas)
            .map(|replica| replica * self.stages + pipeline_rank)
            .collect()
    }

    /// Which of a step's `rows` rows replica `replica` trains on: contiguous, nearly equal.
    pub fn rows_of(&self, rows: usize, replica: usize) -> Range<usize> {
        pp_transport::shard_range(rows, self.replicas, replica)
    }
}

/// What carries a stage group's collectives (`--collectives`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CollectiveBackend {
    /// Ring algorithms over the workers' transport (QUIC between processes): any devices.
    #[default]
    Ring,
    /// NVIDIA's NCCL: every member of each stage group on a CUDA device, with libnccl.
    Nccl,
}

impl FromStr for CollectiveBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ring" => Ok(Self::Ring),
            "nccl" => Ok(Self::Nccl),
            other => Err(format!("unknown collectives {other:?}: ring or nccl")),
        }
    }
}

impl fmt::Display for CollectiveBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ring => "ring",
            Self::Nccl => "nccl",
        })
    }
}

/// A worker's way to the others: the transport to every worker of the run, and what its
/// groups run collectives over.
pub struct WorkerLinks {
    /// Every worker of the run, by global rank.
    pub world: Arc<dyn Transport>,
    /// How long a silent peer is waited for.
    pub timeout: Duration,
    backend: CollectiveBackend,
    /// `--collectives` was given: a lone replica all-reduces too (over a group of one).
    reduce_alone: bool,
    /// This worker's CUDA device, for NCCL.
    cuda_device: Option<usize>,
}

impl WorkerLinks {
    /// Links whose collectives run as rings over `world`.
    pub fn new(world: Arc<dyn Transport>, timeout: Duration) -> Self {
        Self {
            world,
            timeout,
            backend: CollectiveBackend::Ring,
            reduce_alone: false,
            cuda_device: None,
        }
    }

    /// The same links with collectives over `backend` when given (then a lone replica
    /// all-reduces too), this worker on CUDA device `cuda_device` (if on one).
    pub fn with_collectives(
        self,
        backend: Option<CollectiveBackend>,
        cuda_device: Option<usize>,
    ) -> Self {
        Self {
            backend: backend.unwrap_or_default(),
            reduce_alone: backend.is_some(),
            cuda_device,
            ..self
        }
    }

    /// Whether a run of `replicas` replicas, not sharded, all-reduces its gradients.
    pub fn reduces(&self, replicas: usize) -> bool {
        replicas > 1 || self.reduce_alone
    }

    /// Opens the collectives of the group `members` (global ranks, this one among them) on
    /// `channel`. Every member must open the same groups in the same order: with NCCL, opening
    /// is itself a collective.
    pub fn open(
        &self,
        members: &[usize],
        channel: u8,
    ) -> Result<Box<dyn Collectives>, TransportError> {
        let view = GroupView::new(self.world.clone(), members.to_vec());
        let ring = RingCollectives::new(Arc::new(view), self.timeout).on_channel(channel);
        match self.backend {
            CollectiveBackend::Ring => Ok(Box::new(ring)),
            #[cfg(feature = "cuda")]
            CollectiveBackend::Nccl => Ok(Box::new(pp_transport::NcclCollectives::open(
                &ring,
                self.cuda_device,
                self.timeout,
            )?)),
            #[cfg(not(feature = "cuda"))]
            CollectiveBackend::Nccl => {
                let _ = self.cuda_device;
                Err(TransportError::Device(
                    "--collectives nccl: this pp was built without the cuda feature".into(),
                ))
            }
        }
    }
}

/// How many float32 values a bucket gathers before it is all-reduced: 25 MiB, PyTorch DDP's
/// default bucket.
pub const BUCKET_VALUES: usize = 25 << 18;

/// One parameter's gradient on its way to the all-reduce, or back.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientPiece {
    /// The stage whose parameter it is.
    pub stage: usize,
    /// The parameter's Hugging Face name.
    pub name: String,
    /// Its `[rows, cols]` shape.
    pub shape: [usize; 2],
    /// Its values, row-major.
    pub values: Vec<f32>,
}

/// A finished gradient as handed over: its values are read to the host on the reducer's
/// thread, so the compute thread never waits for a device-to-host copy.
struct PendingGradient {
    stage: usize,
    name: String,
    shape: [usize; 2],
    read: Box<dyn FnOnce() -> Vec<f32> + Send>,
}

enum Job {
    Piece(PendingGradient),
    /// The step's last gradient was sent: reduce what is left and send every piece back.
    Flush,
}

/// Sends a runner's finished gradients to its rank's [`GradientReducer`].
#[derive(Clone)]
pub struct GradientSender {
    jobs: Sender<Job>,
}

impl GradientSender {
    /// Hands over one finished gradient of `stage`: parameter `name`, a `shape` matrix whose
    /// values `read` returns (called on the reducer's thread). If the reducer has stopped (a
    /// peer was lost), the gradient is dropped: the step's flush reports the failure.
    pub fn send(
        &self,
        stage: usize,
        name: String,
        shape: [usize; 2],
        read: impl FnOnce() -> Vec<f32> + Send + 'static,
    ) {
        let _ = self.jobs.send(Job::Piece(PendingGradient {
            stage,
            name,
            shape,
            read: Box::new(read),
        }));
    }
}

/// Sums gradients over a stage group on a thread of its own, bucket by bucket.
pub struct GradientReducer {
    jobs: Sender<Job>,
    results: Receiver<Result<Vec<GradientPiece>, TransportError>>,
    thread: Option<JoinHandle<()>>,
}

impl GradientReducer {
    /// A reducer over a stage group's collectives.
    pub fn new(group: Box<dyn Collectives>) -> Self {
        let (jobs, incoming) = mpsc::channel();
        let (done, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("gradient all-reduce".into())
            .spawn(move || reduce_buckets(group.as_ref(), &incoming, &done))
            .expect("spawning the all-reduce thread");
        Self {
            jobs,
            results,
            thread: Some(thread),
        }
    }

    /// Where runners send their finished gradients.
    pub fn sender(&self) -> GradientSender {
        GradientSender {
            jobs: self.jobs.clone(),
        }
    }

    /// Waits for every gradient sent this step, summed over the group, in the order sent.
    pub fn finish(&self) -> Result<Vec<GradientPiece>, TransportError> {
        const RUNNING: &str = "the all-reduce thread runs while its reducer lives";
        self.jobs.send(Job::Flush).expect(RUNNING);
        self.results.recv().expect(RUNNING)
    }
}

impl Drop for GradientReducer {
    fn drop(&mut self) {
        // Closing the channel ends the thread.
        let (jobs, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, jobs));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The reducer's thread: gathers pieces into buckets, all-reduces each when full, and at a
/// flush reduces the rest and sends the step's pieces back. After a failure it reports the
/// error at the next flush and keeps nothing.
fn reduce_buckets(
    group: &dyn Collectives,
    incoming: &Receiver<Job>,
    done: &Sender<Result<Vec<GradientPiece>, TransportError>>,
) {
    let mut bucket: Vec<GradientPiece> = Vec::new();
    let mut filled = 0;
    let mut reduced: Vec<GradientPiece> = Vec::new();
    let mut failure: Option<TransportError> = None;
    while let Ok(job) = incoming.recv() {
        match job {
            Job::Piece(pending) => {
                if failure.is_some() {
                    continue;
                }
                let piece = GradientPiece {
                    stage: pending.stage,
                    name: pending.name,
                    shape: pending.shape,
                    values: (pending.read)(),
                };
                filled += piece.values.len();
                bucket.push(piece);
                if filled >= BUCKET_VALUES {
                    match all_reduce_bucket(group, std::mem::take(&mut bucket)) {
                        Ok(pieces) => reduced.extend(pieces),
                        Err(e) => failure = Some(e),
                    }
                    filled = 0;
                }
            }
            Job::Flush => {
                let result = match failure.take() {
                    Some(e) => Err(e),
                    None => all_reduce_bucket(group, std::mem::take(&mut bucket)).map(|pieces| {
                        std::mem::take(&mut reduced)
                            .into_iter()
                            .chain(pieces)
                            .collect()
                    }),
                };
                bucket.clear();
                reduced.clear();
                filled = 0;
                if done.send(result).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sums a bucket's pieces over the group as one buffer.
fn all_reduce_bucket(
    group: &dyn Collectives,
    pieces: Vec<GradientPiece>,
) -> Result<Vec<GradientPiece>, TransportError> {
    if pieces.is_empty() {
        return Ok(pieces);
    }
    let mut flat: Vec<f32> = pieces
        .iter()
        .flat_map(|p| p.values.iter().copied())
        .collect();
    group.all_reduce(&mut flat)?;
    let mut at = 0;
    Ok(pieces
        .into_iter()
        .map(|mut piece| {
            let len = piece.values.len();
            piece.values.copy_from_slice(&flat[at..at + len]);
            at += len;
            piece
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pp_transport::InProcessHub;

    #[test]
    fn the_layout_groups_pipelines_and_stages() {
        let layout = Layout::replicated(2, 3);
        assert_eq!(layout.world_size(), 6);
        assert_eq!(layout.pipeline_members(1), vec![2, 3]);
        assert_eq!(layout.stage_group(1), vec![1, 3, 5]);
        assert_eq!((layout.replica(5), layout.pipeline_rank(5)), (2, 1));
        assert_eq!(layout.rows_of(7, 0), 0..3);
        assert_eq!(layout.rows_of(7, 2), 5..7);
    }

    #[test]
    fn gradients_come_back_summed_in_the_order_sent() {
        let world: Vec<Arc<dyn Transport>> = InProcessHub::connect(2)
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn Transport>)
            .collect();
        let handles: Vec<_> = world
            .into_iter()
            .enumerate()
            .map(|(rank, world)| {
                std::thread::spawn(move || {
                    let links = WorkerLinks::new(world, Duration::from_secs(10));
                    let reducer = GradientReducer::new(links.open(&[0, 1], 0).unwrap());
                    let mut steps = Vec::new();
                    for step in 0..2 {
                        let sender = reducer.sender();
                        for (i, name) in ["b", "a"].iter().enumerate() {
                            let values = vec![(rank + i + step) as f32, 1.0];
                            sender.send(0, name.to_string(), [1, 2], move || values);
                        }
                        steps.push(reducer.finish().unwrap());
                    }
                    steps
                })
            })
            .collect();
        for handle in handles {
            let steps = handle.join().unwrap();
            for (step, pieces) in steps.iter().enumerate() {
                let names: Vec<&str> = pieces.iter().map(|p| p.name.as_str()).collect();
                assert_eq!(names, ["b", "a"]);
                let s = step as f32;
                assert_eq!(pieces[0].values, vec![1.0 + 2.0 * s, 2.0]);
                assert_eq!(pieces[1].values, vec![3.0 + 2.0 * s, 2.0]);
            }
        }
    }
}
