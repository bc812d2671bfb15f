//! The flags that spread `pp train` over worker processes and machines, and the worker side of
//! a pipeline: join the group, train this rank. Launching lives in `pp::cluster`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use burn::backend::Autodiff;
use pp::cluster::files::NodeCopies;
use pp::cluster::node::{NodeOptions, PipelineLayout};
use pp::cluster::{RUN_VARIABLE, TOKEN_VARIABLE};
use pp::device::{Device, DeviceSpec};
use pp::train::data_parallel::CollectiveBackend;
use pp::train::worker::{train_rank, Gather, PipelineOptions};
use pp::train::{Observer, StepReport, TrainOptions, TrainReport};
use pp_stages::ScheduleKind;
use pp_transport::{QuicConfig, QuicTransport, WireDType};

/// Pipeline and multi-node flags of `pp train`.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineFlags {
    /// Train as a pipeline of this many worker processes (on this machine, or with --nnodes
    /// across all nodes [default there: every node's workers]).
    #[arg(long)]
    stages: Option<usize>,
    /// Train this many copies of the model (of the pipeline, with --stages), each on its share
    /// of every step's rows, their gradients summed while backward runs (DDP): --stages S
    /// --data-parallel N runs S×N workers.
    #[arg(long, default_value_t = 1)]
    data_parallel: usize,
    /// With --data-parallel: the replicas of each stage shard its parameters, gradients and
    /// optimizer state among them, each layer's weights gathered only while it runs (FSDP;
    /// implies --checkpoint-activations).
    #[arg(long)]
    fsdp: bool,
    /// What the replicas of a stage sum gradients and gather shards over: ring (over the
    /// workers' QUIC links, any devices) or nccl (NVIDIA's NCCL: every worker on its own CUDA
    /// GPU, libnccl.so on LD_LIBRARY_PATH) [default: ring]. Given, even one replica runs the
    /// all-reduce (world size 1), to measure what it costs.
    #[arg(long)]
    collectives: Option<CollectiveBackend>,
    /// The pipeline schedule: gpipe, 1f1b, interleaved, zbh1 or zbv.
    #[arg(long, default_value = "1f1b")]
    schedule: ScheduleKind,
    /// Micro-batches per step of each pipeline [default: twice its workers; one without
    /// --stages].
    #[arg(long)]
    microbatches: Option<usize>,
    /// Stage slices per worker for interleaved.
    #[arg(long = "virtual", default_value_t = 2)]
    virtual_stages: usize,
    /// Stages starting at these layers: `--split 10,20` [default: a native checkpoint's stages,
    /// else balanced by memory; across nodes of unequal speed, by measured speed].
    #[arg(long, value_delimiter = ',')]
    split: Option<Vec<usize>>,
    /// Each worker's device, by local rank (cuda:0,cuda:1), or one for all; kinds may differ
    /// (a wgpu stage beside a cpu stage) since activations cross as host tensors
    /// [default: --device; with auto, worker R takes CUDA device R mod the count].
    #[arg(long, value_delimiter = ',')]
    devices: Vec<DeviceSpec>,
    /// The number type activations and gradients cross between workers in: f32, bf16, f16 or
    /// fp8 (E4M3, scaled per row) [default: the training dtype's, so bf16 training is exact].
    #[arg(long)]
    wire_dtype: Option<WireDType>,
    /// Train across this many machines: run the same command on each, with --rdzv.
    #[arg(long, requires = "rdzv")]
    nnodes: Option<usize>,
    /// The rendezvous, HOST[:PORT] (port 29400 when not given): the node whose address is HOST
    /// hosts it and is node 0.
    #[arg(long, requires = "nnodes")]
    rdzv: Option<String>,
    /// This node's rank [default: 0 on the rendezvous host, the others in join order].
    #[arg(long, requires = "nnodes")]
    node_rank: Option<usize>,
    /// Host the rendezvous on this node (node 0) even if HOST is not one of its addresses.
    #[arg(long, requires = "nnodes")]
    rdzv_host: bool,
    /// Workers on this node: auto (one per GPU, else one) or a count.
    #[arg(long, default_value = "auto", requires = "nnodes")]
    nproc_per_node: WorkerCount,
    /// Seconds to wait for every node to join.
    #[arg(long, default_value_t = 300, requires = "nnodes")]
    join_timeout: u64,
    /// The cluster token every node must hold [default: $PP_TOKEN; node 0 generates one when
    /// neither is set]. Prefer PP_TOKEN: other users can read command lines.
    #[arg(long, requires = "nnodes")]
    token: Option<String>,
    /// After a lost node or a failed worker, form the group again (waiting --join-timeout for
    /// the lost node to come back) and resume from the newest checkpoint, this many times.
    #[arg(long, default_value_t = 0, requires = "nnodes")]
    max_restarts: u32,
    /// Form the group, print the plan on every node and exit.
    #[arg(long, requires = "nnodes")]
    plan_only: bool,
    /// Where a node keeps the files it receives from node 0 (the model, data) for later runs
    /// [default: $PP_CACHE_DIR, else $XDG_CACHE_HOME/pp, else ~/.cache/pp].
    #[arg(long, requires = "nnodes")]
    cache_dir: Option<PathBuf>,
    /// Each node keeps its own share of every training checkpoint (its workers' stages)
    /// instead of sending it to node 0; resuming takes the newest checkpoint every node holds.
    /// The final model is still gathered on node 0.
    #[arg(long, requires = "nnodes")]
    save_on_each_node: bool,
    /// Internal: this worker's node (of a group of nodes).
    #[arg(long, hide = true, requires = "worker_rank")]
    worker_node: Option<usize>,
    /// Internal: node 0's model, received by this node.
    #[arg(long, hide = true)]
    node_model: Option<PathBuf>,
    /// Internal: node 0's training data, received by this node.
    #[arg(long, hide = true)]
    node_data: Option<PathBuf>,
    /// Internal: node 0's validation data, received by this node.
    #[arg(long, hide = true)]
    node_val_data: Option<PathBuf>,
    /// Internal: the checkpoint the group resumes from, on this node.
    #[arg(long, hide = true)]
    node_resume: Option<PathBuf>,
    /// Internal: this process is the worker of this global rank.
    #[arg(long, hide = true, requires = "worker_addresses")]
    pub(super) worker_rank: Option<usize>,
    /// Internal: this worker's rank on its machine.
    #[arg(long, hide = true, requires = "worker_rank")]
    worker_local_rank: Option<usize>,
    /// Internal: every worker's address, by rank.
    #[arg(long, hide = true, value_delimiter = ',')]
    worker_addresses: Vec<SocketAddr>,
    /// Internal: measure the device of this local worker, print the result as JSON and exit.
    #[arg(long, hide = true, conflicts_with = "worker_rank")]
    pub(super) probe_local_rank: Option<usize>,
}

/// `--nproc-per-node`.
#[derive(Debug, Clone, Copy)]
pub enum WorkerCount {
    /// One per CUDA device, else one.
    Auto,
    /// This many.
    Count(usize),
}

impl std::str::FromStr for WorkerCount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            count => match count.parse() {
                Ok(0) | Err(_) => Err(format!("`{text}` is not auto or a positive count")),
                Ok(n) => Ok(Self::Count(n)),
            },
        }
    }
}

impl PipelineFlags {
    /// Whether this process launches workers (rather than being one, or a probe).
    pub fn is_launcher(&self) -> bool {
        self.worker_rank.is_none() && self.probe_local_rank.is_none()
    }

    /// How many workers run on this machine.
    fn local_workers(&self) -> usize {
        match (self.nnodes, self.nproc_per_node) {
            (Some(_), WorkerCount::Count(n)) => n,
            (Some(_), WorkerCount::Auto) if self.devices.len() > 1 => self.devices.len(),
            (Some(_), WorkerCount::Auto) => Device::cuda_count().max(1),
            (None, _) => self.stages.unwrap_or(1) * self.data_parallel,
        }
    }

    /// The device of the worker with this local rank: its entry of `--devices`, else `device`
    /// (`--device`), spread over the CUDA devices by local rank when it is `auto`.
    fn worker_device(&self, device: DeviceSpec, local: usize) -> anyhow::Result<DeviceSpec> {
        let workers = self.local_workers();
        if self.devices.len() > 1 && self.devices.len() != workers {
            bail!(
                "--devices lists {} devices for {workers} workers on this machine: give one per \
                 worker, or one for all",
                self.devices.len()
            );
        }
        let spec = match self.devices.as_slice() {
            [] => device,
            [one] => *one,
            many => many[local],
        };
        Ok(match spec {
            DeviceSpec::Auto => Device::auto_for_rank(local),
            other => other,
        })
    }

    /// The device this process computes on (a launcher: its first worker's).
    pub fn device_spec(&self, device: DeviceSpec) -> anyhow::Result<DeviceSpec> {
        let local = self
            .worker_local_rank
            .or(self.worker_rank)
            .or(self.probe_local_rank)
            .unwrap_or(0);
        self.worker_device(device, local)
    }

    /// Every worker's device on this machine, checked usable before any worker starts, so that
    /// an unusable one is one line from the launcher rather than a failed worker.
    pub fn local_devices(&self, device: DeviceSpec) -> anyhow::Result<Vec<Device>> {
        (0..self.local_workers())
            .map(|local| Ok(Device::resolve(self.worker_device(device, local)?)?))
            .collect()
    }

    /// The pipeline layout, when `--stages` asks for one on this machine, or for a worker.
    pub fn options(&self) -> anyhow::Result<Option<PipelineOptions>> {
        if self.stages == Some(0) {
            bail!("--stages must be at least 1");
        }
        if self.data_parallel == 0 {
            bail!("--data-parallel must be at least 1");
        }
        let ranks = self.stages.unwrap_or(1);
        if self.fsdp && self.data_parallel < 2 {
            bail!("--fsdp shards the training state over replicas: give --data-parallel N (N ≥ 2)");
        }
        if ranks == 1 && self.data_parallel == 1 && self.collectives.is_none() {
            return Ok(None);
        }
        Ok(Some(PipelineOptions {
            schedule: self.schedule,
            ranks,
            replicas: self.data_parallel,
            fsdp: self.fsdp,
            collectives: self.collectives,
            microbatches: self
                .microbatches
                .unwrap_or(if ranks > 1 { 2 * ranks } else { 1 }),
            virtual_stages: self.virtual_stages,
            split: self.split.clone(),
        }))
    }

    /// The multi-node settings, when `--nnodes` asks for them.
    pub fn node(&self) -> anyhow::Result<Option<(NodeOptions, PipelineLayout)>> {
        let (Some(nodes), Some(rendezvous)) = (self.nnodes, &self.rdzv) else {
            return Ok(None);
        };
        if nodes == 0 {
            bail!("--nnodes must be at least 1");
        }
        if self.data_parallel > 1 && self.save_on_each_node {
            bail!(
                "--save-on-each-node cannot be used with --data-parallel: the first replica \
                 writes every stage of a checkpoint"
            );
        }
        let token = self
            .token
            .clone()
            .or_else(|| std::env::var("PP_TOKEN").ok())
            .filter(|token| !token.is_empty());
        let node = NodeOptions {
            nodes,
            rendezvous: rendezvous.clone(),
            node_rank: self.node_rank,
            host: self.rdzv_host,
            join_timeout: Duration::from_secs(self.join_timeout),
            token,
            plan_only: self.plan_only,
            max_restarts: self.max_restarts,
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(pp::cluster::files::default_cache_dir),
            save_on_each_node: self.save_on_each_node,
        };
        let layout = PipelineLayout {
            schedule: self.schedule,
            stages: self.stages,
            microbatches: self.microbatches,
            virtual_stages: self.virtual_stages,
            split: self.split.clone(),
            wire_dtype: self.wire_dtype,
            data_parallel: self.data_parallel,
            fsdp: self.fsdp,
            collectives: self.collectives,
        };
        Ok(Some((node, layout)))
    }

    /// The copies of node 0's files this worker or probe was pointed at.
    pub fn copies(&self) -> NodeCopies {
        NodeCopies {
            model: self.node_model.clone(),
            data: self.node_data.clone(),
            validation: self.node_val_data.clone(),
            resume: self.node_resume.clone(),
        }
    }

    /// Whether this worker reports progress: the first of its machine.
    pub fn reports(&self) -> bool {
        self.worker_local_rank.or(self.worker_rank).unwrap_or(0) == 0
    }
}

/// Joins the group and trains this worker's rank.
pub fn run_worker(
    options: &TrainOptions,
    pipeline: &PipelineOptions,
    flags: &PipelineFlags,
    progress: &mut dyn Observer,
) -> anyhow::Result<TrainReport> {
    let rank = flags.worker_rank.expect("only workers come here");
    let workers = pipeline.layout().world_size();
    if rank >= workers {
        bail!("--worker-rank {rank} is not below the {workers} workers");
    }
    if flags.worker_addresses.len() != workers {
        bail!("--worker-addresses must list {workers} addresses");
    }
    let token = std::env::var(TOKEN_VARIABLE)
        .with_context(|| format!("{TOKEN_VARIABLE} is not set (start workers with --stages)"))?;
    let run_id = std::env::var(RUN_VARIABLE).unwrap_or_else(|_| token.chars().take(8).collect());
    // A worker away from node 0 sends its checkpoint files there.
    let gather = match (flags.worker_node, &flags.rdzv) {
        (Some(node), Some(rendezvous)) if node > 0 => Some(Gather {
            node,
            rendezvous: pp::cluster::node::resolve(rendezvous)?,
            token: token.clone(),
            checkpoints_stay: flags.save_on_each_node,
            leads_node: flags.worker_local_rank == Some(0),
        }),
        _ => None,
    };
    let transport = QuicTransport::join(QuicConfig {
        rank,
        addresses: flags.worker_addresses.clone(),
        token,
        // In a group of nodes, another node may still be receiving its weights from node 0;
        // a node lost meanwhile is noticed by the rendezvous, which stops these workers.
        join_timeout: Duration::from_secs(if flags.worker_node.is_some() {
            3600
        } else {
            60
        }),
        wire: pp::cluster::wire_dtype(flags.wire_dtype, options.dtype),
    })?;
    let mut quiet = Quiet;
    let observer: &mut dyn Observer = if flags.reports() {
        progress
    } else {
        &mut quiet
    };
    Ok(pp::with_backend!(options.device, |B, device| {
        train_rank::<Autodiff<B>>(
            options,
            pipeline,
            std::sync::Arc::new(transport),
            &run_id,
            gather,
            device,
            observer,
        )
    })?)
}

/// Workers other than each machine's first report nothing.
struct Quiet;

impl Observer for Quiet {
    fn started(&mut self, _: u64, _: u64) {}
    fn step(&mut self, _: &StepReport) {}
    fn note(&mut self, _: &str) {}
}
