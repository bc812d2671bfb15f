//! One machine of a multi-node run (`pp train --nnodes N --rdzv HOST:PORT`): the same command
//! on every node. The node whose address is HOST (or that passes `--rdzv-host`, or is
//! `--node-rank 0`) hosts the rendezvous and is node 0; the others get ranks in join order.
//! Once all have joined, every node prints the plan and starts its workers, whose global ranks
//! follow the node ranks.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pp_stages::ScheduleKind;
use pp_transport::rendezvous::{
    Group, HeldCheckpoint, Node, NodeJoin, RendezvousError, RendezvousHost, RendezvousNode,
    WorkerInfo,
};

use super::files::{NodeCopies, Receiver, Share};
use super::launcher::{WorkerLaunch, Workers};
use super::placement::{self, Basis, Measured, Placement, Worker};
use crate::checkpoint::native::stage_file_name;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::plan::human_bytes;
use crate::train::worker::{check_pipeline_options, pipeline_schedule, PipelineOptions};
use crate::train::{Resume, TrainOptions};

/// The rendezvous port when `--rdzv` names none (torchrun's).
pub const DEFAULT_PORT: u16 = 29400;

/// How this node joins the group.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// How many nodes the group has.
    pub nodes: usize,
    /// The rendezvous, `HOST[:PORT]`.
    pub rendezvous: String,
    /// This node's rank, when the user gives it.
    pub node_rank: Option<usize>,
    /// Host the rendezvous here even if HOST does not look local (behind NAT).
    pub host: bool,
    /// How long to wait for every node.
    pub join_timeout: Duration,
    /// The cluster token (`--token` or `PP_TOKEN`).
    pub token: Option<String>,
    /// Print the plan and exit.
    pub plan_only: bool,
    /// How many times to form the group again after a lost node or a failed worker.
    pub max_restarts: u32,
    /// Where files received from node 0 are kept.
    pub cache_dir: PathBuf,
    /// Each node keeps its own share of the training checkpoints; none are gathered on node 0.
    pub save_on_each_node: bool,
}

/// The pipeline as the flags give it; the worker count is the group's.
#[derive(Debug, Clone)]
pub struct PipelineLayout {
    /// The schedule.
    pub schedule: ScheduleKind,
    /// `--stages`, when given: it must equal the group's worker count over `data_parallel`.
    pub stages: Option<usize>,
    /// `--microbatches` [default: twice the workers].
    pub microbatches: Option<usize>,
    /// Stage slices per worker for interleaved.
    pub virtual_stages: usize,
    /// `--split`, when given [default: placed by the workers' measured speed].
    pub split: Option<Vec<usize>>,
    /// `--wire-dtype`, when given.
    pub wire_dtype: Option<pp_transport::WireDType>,
    /// `--data-parallel`: the group's workers are this many replicas of one pipeline.
    pub data_parallel: usize,
    /// `--fsdp`: the replicas shard each stage's training state.
    pub fsdp: bool,
    /// `--collectives`, when given: what the replicas' sums travel over.
    pub collectives: Option<crate::train::data_parallel::CollectiveBackend>,
}

/// Joins the group, prints the plan and runs this node's workers (one per entry of
/// `devices`) until the group finishes. When a node is lost or a worker fails, forms the group
/// again, up to `--max-restarts` times, and resumes from the newest checkpoint.
///
/// `model_dir` is the model as this node's command line names it; `options` makes the training
/// options with node 0's copies of the model and data in place, where this node lacks them.
pub fn run(
    model_dir: &Path,
    options: &dyn Fn(&NodeCopies) -> Result<TrainOptions>,
    layout: &PipelineLayout,
    node: &NodeOptions,
    devices: &[Device],
) -> Result<()> {
    let address = resolve(&node.rendezvous)?;
    let host = host_here(address, node)?;
    let token =
        match (&node.token, &host) {
            (Some(token), _) => token.clone(),
            (None, Some(_)) => {
                let token = pp_transport::random_token();
                eprintln!(
                    "no cluster token given: generated one. On the other nodes run\n  \
                 PP_TOKEN={token} {}",
                    command_line()
                );
                token
            }
            (None, None) => return Err(Error::Usage(
                "no cluster token: pass --token or set PP_TOKEN (node 0 prints one when it has \
                 none)"
                    .into(),
            )),
        };
    // Node 0's model is the group's: another node measures and plans with node 0's copy.
    let mut copies = NodeCopies::default();
    let mut link = None;
    if host.is_none() {
        let mut receiver = Receiver::connect(address, &token, node.join_timeout, &node.cache_dir)?;
        let rate = receiver.measure_link()?;
        eprintln!("link to node 0: {:.0} MB/s", rate / 1e6);
        link = Some(rate);
        copies.model = receiver.model(model_dir)?;
    }
    let train = options(&copies)?;
    eprintln!(
        "measuring {} at the run's shapes",
        devices
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let measured = placement::measure_local(devices, &copies.args())?;
    let round = Round {
        train: &train,
        model_dir,
        copies,
        layout,
        node,
        devices,
        measured: &measured,
        link,
        address,
        host,
        token,
    };
    let mut restarts = 0;
    loop {
        match round.run(restarts) {
            Err(Error::GroupBroken(reason)) if restarts < node.max_restarts => {
                restarts += 1;
                eprintln!(
                    "{reason}; forming the group again (restart {restarts} of {}), waiting up to \
                     {} s for every node",
                    node.max_restarts,
                    node.join_timeout.as_secs()
                );
            }
            outcome => return outcome,
        }
    }
}

/// One forming of the group and the training that follows.
struct Round<'a> {
    train: &'a TrainOptions,
    /// The model as this node's command line names it.
    model_dir: &'a Path,
    /// Node 0's model, where this node lacks it.
    copies: NodeCopies,
    layout: &'a PipelineLayout,
    node: &'a NodeOptions,
    devices: &'a [Device],
    /// What each device's measurement gave: its memory and speed.
    measured: &'a [(Option<u64>, Measured)],
    /// This node's link to node 0, in bytes per second (none on node 0).
    link: Option<f64>,
    address: SocketAddr,
    /// Where this node hosts the rendezvous, when it does.
    host: Option<SocketAddr>,
    token: String,
}

impl Round<'_> {
    /// Forms the group (the `restarts`-th time here) and trains until it ends.
    fn run(&self, restarts: u32) -> Result<()> {
        let (train, node, devices) = (self.train, self.node, self.devices);
        let saved = held_checkpoints(&self.checkpoints());
        // Node 0 shares its files, and the checkpoint the group resumes from when there may be
        // one (its newest after a restart or with --resume latest), unless every node keeps
        // its own. Not otherwise: sharing reads a checkpoint in full once, to checksum it.
        let newest = saved
            .last()
            .map(|held| crate::train::checkpoint::step_dir(&self.checkpoints(), held.step));
        let checkpoint = match (&train.resume, restarts) {
            _ if self.host.is_none() || node.save_on_each_node => None,
            (Some(Resume::Path(path)), 0) => Some(path.clone()),
            (Some(Resume::Path(path)), _) => newest.or_else(|| Some(path.clone())),
            (Some(Resume::Latest), _) => newest,
            (None, 0) => None,
            (None, _) => newest,
        };
        let host = match self.host {
            Some(bind) => {
                let files =
                    super::files::shared_by_node0(train, checkpoint.as_deref(), &node.cache_dir)?;
                Some(
                    RendezvousHost::start(bind, &self.token, node.nodes, node.join_timeout, files)
                        .map_err(rendezvous_error)?,
                )
            }
            None => None,
        };
        let ports = super::free_ports(devices.len(), IpAddr::from([0, 0, 0, 0]))?;
        let join = NodeJoin {
            node_rank: if host.is_some() {
                Some(0)
            } else {
                node.node_rank
            },
            name: hostname(),
            workers: ports
                .iter()
                .zip(devices)
                .zip(self.measured)
                .map(|((&port, device), (memory, measured))| WorkerInfo {
                    port,
                    device: device.to_string(),
                    memory: *memory,
                    measured: serde_json::to_string(measured).expect("a measurement serializes"),
                })
                .collect(),
            settings: shared_settings(train, self.layout, node),
            restarts,
            checkpoints: saved,
            link: self.link,
        };
        eprintln!(
            "joining the rendezvous at {} as {} of {} nodes",
            self.address,
            join.node_rank
                .map_or("a node".to_string(), |rank| format!("node {rank}")),
            node.nodes
        );
        let (member, group) = RendezvousNode::join(
            self.address,
            &self.token,
            join,
            node.join_timeout,
            &mut |line| eprintln!("rendezvous: {line}"),
        )
        .map_err(rendezvous_error)?;
        let pipeline = pipeline_of(self.layout, &group)?;
        check_pipeline_options(train, &pipeline)?;
        // Every replica runs one plan, made for the slowest worker at each pipeline rank.
        let workers = placement::weakest_replica(&placement::workers_of(&group)?, pipeline.ranks);
        let wire = super::wire_dtype(self.layout.wire_dtype, train.dtype);
        let placement = placement::place(train, &pipeline, &workers, wire)?;
        print_plan(&pipeline, &group, &workers, &placement);
        let resume = group.round > 0 || train.resume.is_some();
        let mut copies = if node.plan_only {
            self.copies.clone()
        } else if host.is_some() {
            NodeCopies {
                resume: checkpoint.filter(|_| resume),
                ..self.copies.clone()
            }
        } else {
            self.receive(&pipeline, &placement.partition, &group, resume)?
        };
        if node.save_on_each_node && resume && !node.plan_only {
            copies.resume = self.held_by_every_node(&group, &pipeline)?;
        }
        let mut extra_args = copies.args();
        extra_args.push(format!("--worker-node={}", group.node_rank));
        if self.layout.stages.is_none() {
            extra_args.extend(["--stages".into(), pipeline.ranks.to_string()]);
        }
        if pipeline.split.is_none() && placement.partition.len() > 1 {
            let split: Vec<String> = placement
                .partition
                .split_points()
                .iter()
                .map(ToString::to_string)
                .collect();
            extra_args.extend(["--split".into(), split.join(",")]);
        }
        let launch = WorkerLaunch {
            addresses: group.worker_addresses(),
            first_rank: group.this_node().first_rank,
            local_workers: if node.plan_only { 0 } else { devices.len() },
            run_id: run_id(&self.token, &group),
            token: self.token.clone(),
            extra_args,
        };
        let done = AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            if let Some(host) = &host {
                let metrics = train.out_dir.join("metrics.jsonl");
                scope.spawn(|| super::progress::report(host, metrics, &done));
            }
            let outcome = Workers::spawn(&launch).and_then(|workers| workers.watch(Some(&member)));
            done.store(true, Ordering::Relaxed);
            outcome
        });
        // Node 0 keeps the rendezvous until every node has heard the outcome.
        drop(member);
        drop(host);
        outcome
    }

    /// What this node (not node 0) needs of node 0's files once the plan is known: the weights
    /// its workers load, the data, and with `resume` the checkpoint node 0 resumes from.
    fn receive(
        &self,
        pipeline: &PipelineOptions,
        partition: &pp_stages::Partition,
        group: &Group,
        resume: bool,
    ) -> Result<NodeCopies> {
        let node = self.node;
        let mut receiver = Receiver::connect(
            self.address,
            &self.token,
            node.join_timeout,
            &node.cache_dir,
        )?;
        let schedule = pipeline_schedule(pipeline)?;
        let this = group.this_node();
        let layout = pipeline.layout();
        let mut stages: Vec<usize> = (this.first_rank..this.first_rank + this.workers.len())
            .flat_map(|rank| schedule.stages_of(layout.pipeline_rank(rank)))
            .collect();
        stages.sort_unstable();
        stages.dedup();
        let share = Share {
            partition,
            stages: &stages,
        };
        let mut copies = self.copies.clone();
        if let Some(dir) = &copies.model {
            receiver.model_weights(self.model_dir, dir, &share)?;
        }
        (copies.data, copies.validation) = receiver.data(self.train)?;
        if resume && !node.save_on_each_node {
            copies.resume = receiver.checkpoint(&self.checkpoints(), &share)?;
        }
        Ok(copies)
    }

    /// This node's `OUT/checkpoints`.
    fn checkpoints(&self) -> PathBuf {
        self.train.out_dir.join("checkpoints")
    }

    /// With `--save-on-each-node`: the newest checkpoint every node holds the stages of that
    /// this plan gives it, here (`None`: no node holds any, and the group starts over; an
    /// explicit `--resume PATH` is every node's own the first time the group forms).
    fn held_by_every_node(
        &self,
        group: &Group,
        pipeline: &PipelineOptions,
    ) -> Result<Option<PathBuf>> {
        if let (Some(Resume::Path(_)), 0) = (&self.train.resume, group.round) {
            return Ok(None);
        }
        let schedule = pipeline_schedule(pipeline)?;
        let layout = pipeline.layout();
        let runs = |node: &Node| -> Vec<usize> {
            (node.first_rank..node.first_rank + node.workers.len())
                .flat_map(|rank| schedule.stages_of(layout.pipeline_rank(rank)))
                .collect()
        };
        let holds = |node: &Node, step: u64| {
            node.checkpoints
                .iter()
                .any(|held| held.step == step && runs(node).iter().all(|s| held.stages.contains(s)))
        };
        let usable = group.nodes[0]
            .checkpoints
            .iter()
            .rev()
            .map(|held| held.step)
            .find(|&step| group.nodes.iter().all(|node| holds(node, step)));
        if let Some(step) = usable {
            return Ok(Some(crate::train::checkpoint::step_dir(
                &self.checkpoints(),
                step,
            )));
        }
        if self.train.resume.is_none() && group.nodes.iter().all(|n| n.checkpoints.is_empty()) {
            return Ok(None);
        }
        let held: Vec<String> = group
            .nodes
            .iter()
            .map(|node| {
                let steps: Vec<String> = node
                    .checkpoints
                    .iter()
                    .map(|held| format!("step {} stages {:?}", held.step, held.stages))
                    .collect();
                format!(
                    "{node} runs stages {:?} and holds [{}]",
                    runs(node),
                    steps.join(", ")
                )
            })
            .collect();
        Err(Error::Usage(format!(
            "no checkpoint holds, on every node, the stages this plan gives it ({}); start each \
             node with the --node-rank and --split it was trained with",
            held.join("; ")
        )))
    }
}

/// The checkpoints under `checkpoints` and the stages whose files each holds.
fn held_checkpoints(checkpoints: &Path) -> Vec<HeldCheckpoint> {
    crate::train::checkpoint::list(checkpoints)
        .into_iter()
        .map(|(step, dir)| {
            let mut stages: Vec<usize> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .filter_map(|entry| {
                    let name = entry.ok()?.file_name().into_string().ok()?;
                    let stage = name
                        .strip_prefix("stage-")?
                        .strip_suffix(".bin")?
                        .parse()
                        .ok()?;
                    (name == stage_file_name(stage)).then_some(stage)
                })
                .collect();
            stages.sort_unstable();
            HeldCheckpoint { step, stages }
        })
        .collect()
}

/// `HOST[:PORT]` as a socket address.
pub fn resolve(rendezvous: &str) -> Result<SocketAddr> {
    let with_port = if rendezvous
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        rendezvous.to_string()
    } else {
        format!("{rendezvous}:{DEFAULT_PORT}")
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.find(SocketAddr::is_ipv4))
        .ok_or_else(|| Error::Usage(format!("--rdzv {rendezvous}: cannot resolve this host")))
}

/// Where to host the rendezvous, when this node hosts it: when told to, or when HOST is one of
/// this machine's addresses and nobody here hosts it yet (several nodes on one machine: the
/// first to bind hosts).
fn host_here(address: SocketAddr, node: &NodeOptions) -> Result<Option<SocketAddr>> {
    let told = node.host || node.node_rank == Some(0);
    if node.node_rank.is_some_and(|rank| rank > 0) {
        if node.host {
            return Err(Error::Usage(
                "--rdzv-host makes this node 0; drop --node-rank".into(),
            ));
        }
        return Ok(None);
    }
    let local = UdpSocket::bind((address.ip(), 0)).is_ok();
    let bind = if local {
        address
    } else {
        SocketAddr::from(([0, 0, 0, 0], address.port()))
    };
    if told {
        return Ok(Some(bind));
    }
    if !local {
        return Ok(None);
    }
    match UdpSocket::bind(bind) {
        Ok(_) => Ok(Some(bind)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(Error::Cluster(format!("cannot listen on {bind}: {e}"))),
    }
}

fn rendezvous_error(error: RendezvousError) -> Error {
    Error::Cluster(error.to_string())
}

/// The pipeline the group makes: one rank per worker of every node.
fn pipeline_of(layout: &PipelineLayout, group: &Group) -> Result<PipelineOptions> {
    let workers = group.worker_addresses().len();
    let brought = || {
        group
            .nodes
            .iter()
            .map(|node| format!("{} on node {}", node.workers.len(), node.rank))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let replicas = layout.data_parallel;
    if !workers.is_multiple_of(replicas) {
        return Err(Error::Usage(format!(
            "--data-parallel {replicas}, but the {} nodes bring {workers} workers ({}): give \
             each replica as many workers",
            group.nodes.len(),
            brought()
        )));
    }
    let ranks = workers / replicas;
    if let Some(stages) = layout.stages.filter(|&stages| stages != ranks) {
        return Err(Error::Usage(format!(
            "--stages {stages}, but the {} nodes bring {workers} workers ({}) for \
             --data-parallel {replicas}; drop --stages or change --nproc-per-node",
            group.nodes.len(),
            brought()
        )));
    }
    Ok(PipelineOptions {
        schedule: layout.schedule,
        ranks,
        replicas,
        fsdp: layout.fsdp,
        collectives: layout.collectives,
        microbatches: layout
            .microbatches
            .unwrap_or(if ranks > 1 { 2 * ranks } else { 1 }),
        virtual_stages: layout.virtual_stages,
        split: layout.split.clone(),
    })
}

/// Which layers run where and what to expect, printed on every node.
fn print_plan(pipeline: &PipelineOptions, group: &Group, workers: &[Worker], plan: &Placement) {
    let basis = match plan.basis {
        Basis::Given => "as --split gives",
        Basis::Alike => "alike devices, balanced by memory",
        Basis::Measured => "placed by measured speed",
    };
    let links: Vec<String> = group
        .nodes
        .iter()
        .filter_map(|node| {
            let rate = node.link?;
            Some(format!("node {} {:.0} MB/s", node.rank, rate / 1e6))
        })
        .collect();
    let replicas = match pipeline.replicas {
        1 => String::new(),
        n => format!(
            " × {n} replicas{}, planned for the slowest worker at each rank",
            if pipeline.fsdp { " (FSDP)" } else { "" }
        ),
    };
    let mut text = format!(
        "plan: {} nodes, {} workers{replicas}, {} with {} micro-batches ({basis}); expected {} \
         per step, bubble {:.0}%\n",
        group.nodes.len(),
        pipeline.ranks,
        pipeline.schedule.name(),
        pipeline.microbatches,
        human_seconds(plan.step),
        100.0 * plan.bubble
    );
    if !links.is_empty() {
        text += &format!(
            "  links to node 0, counted in the step: {}\n",
            links.join(", ")
        );
    }
    for (rank, (worker, load)) in workers.iter().zip(&plan.ranks).enumerate() {
        let stages: Vec<String> = load
            .stages
            .iter()
            .map(|&stage| format!("stage {stage} ({})", plan.partition.stages()[stage]))
            .collect();
        let room = worker
            .memory
            .map_or(String::new(), |m| format!(" of {}", human_bytes(m)));
        text += &format!(
            "  rank {rank}: {}: {}; busy {} per step, ~{}{room}\n",
            worker.label,
            stages.join("; "),
            human_seconds(load.busy),
            human_bytes(load.memory),
        );
    }
    // One write: nodes that share a terminal or a job log do not interleave their plans.
    eprint!("{text}");
}

/// `0.0123` → `12.3 ms`.
fn human_seconds(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{seconds:.2} s")
    }
}

/// What must be the same on every node: everything but where files are and which device.
fn shared_settings(
    train: &TrainOptions,
    layout: &PipelineLayout,
    node: &NodeOptions,
) -> Vec<(String, String)> {
    // The model and data are node 0's on every node (`files`), so only how they are used.
    let validation = match &train.validation {
        crate::train::Validation::File(_) => "a file".to_string(),
        other => format!("{other:?}"),
    };
    [
        ("the validation data", validation),
        ("the pipeline flags", format!("{layout:?}")),
        ("--loss-on", format!("{:?}", train.loss_on)),
        ("--template", format!("{:?}", train.template)),
        ("the sequence options", format!("{:?}", train.sequences)),
        ("the data order", format!("{:?}", train.shuffle_seed)),
        ("--dtype", train.dtype.to_string()),
        ("--master-weights", train.master_weights.to_string()),
        ("the optimizer", format!("{:?}", train.optimizer)),
        (
            "the learning-rate schedule",
            format!("{:?}", train.schedule),
        ),
        ("the length", format!("{:?}", train.length)),
        ("--batch-size", train.batch_size.to_string()),
        ("--micro-batch-size", train.micro_batch_size.to_string()),
        ("--max-grad-norm", format!("{:?}", train.max_grad_norm)),
        ("the memory savers", format!("{:?}", train.savers)),
        ("--save-every", format!("{:?}", train.save_every)),
        ("--save-on-each-node", node.save_on_each_node.to_string()),
        ("--eval-every", format!("{:?}", train.eval_every)),
        ("--resume", format!("{:?}", train.resume.is_some())),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect()
}

/// The same on every node: derived from the token and the group.
fn run_id(token: &str, group: &Group) -> String {
    let addresses: Vec<String> = group
        .worker_addresses()
        .iter()
        .map(ToString::to_string)
        .collect();
    let digest = xxhash_rust::xxh3::xxh3_64(format!("{token}|{}", addresses.join(",")).as_bytes());
    format!("{digest:016x}")
}

/// This process's command line, to repeat on the other nodes.
fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            if arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("'{}'", arg.replace('\'', "'\\''"))
            } else {
                arg
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "unknown".to_string(),
    }
}
