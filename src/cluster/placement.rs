//! Which layers each worker of a group runs. Every node measures its devices before joining
//! (in a child process per device, `pp train ... --probe-local-rank K`, so that what the
//! measurement allocates is given back before training) and the rendezvous passes the numbers
//! to every node. Each node then makes the same plan from the same numbers: on devices of one
//! kind, the split a single machine would use; on unequal devices, the contiguous split that
//! makes the slowest stage fastest within every device's memory. The plan comes with the step
//! time and bubble the schedule gives at the measured speeds.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use pp_stages::schedule::{simulate, Costs};
use pp_stages::{Partition, PartitionError, Schedule, StageSlice};
use pp_transport::rendezvous::Group;
use pp_transport::WireDType;
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::plan::{human_bytes, in_flight, per_device, plan_training, stage_plan, TrainingSetup};
use crate::train::probe::StageSpeed;
use crate::train::worker::{partition_for, pipeline_schedule, PipelineOptions};
use crate::train::TrainOptions;

/// How long one device's measurement may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(600);

/// What a node reports of one worker's device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// The hardware's name: workers whose names match count as equally fast.
    pub device: String,
    /// Its speed at the run's shapes.
    pub speed: StageSpeed,
}

/// One worker of the group, as the plan sees it.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Where it runs, for the plan and error messages: `node 1 (b at 10.0.0.2), cuda:0 (...)`.
    pub label: String,
    /// Bytes of memory it may use, where known.
    pub memory: Option<u64>,
    /// What its node measured.
    pub measured: Measured,
    /// Its node.
    pub node: usize,
    /// Its node's link to node 0, in bytes per second, as that node measured it (none on
    /// node 0).
    pub link: Option<f64>,
}

/// Measures each of this machine's worker devices; devices of one kind (the same name) are
/// measured once, since on a GPU each measurement compiles its kernels from cold. CPU workers
/// share the cores, so their speed is slowed by their number, and their memory is the
/// machine's available memory shared among them.
/// `extra_args` are added to this process's command line for each probe.
pub fn measure_local(
    devices: &[Device],
    extra_args: &[String],
) -> Result<Vec<(Option<u64>, Measured)>> {
    let cpu_workers = devices.iter().filter(|d| !d.is_gpu()).count();
    let mut speeds: HashMap<&str, StageSpeed> = HashMap::new();
    devices
        .iter()
        .enumerate()
        .map(|(local, device)| {
            let speed = match speeds.get(device.name.as_str()) {
                Some(&speed) => speed,
                None => {
                    let speed = probe(local, device, extra_args)?;
                    speeds.insert(&device.name, speed);
                    speed
                }
            };
            let (speed, memory) = if device.is_gpu() {
                (speed, device.memory)
            } else {
                (
                    slowed(speed, cpu_workers as f64),
                    available_memory().map(|bytes| bytes / cpu_workers as u64),
                )
            };
            let measured = Measured {
                device: device.name.clone(),
                speed,
            };
            Ok((memory, measured))
        })
        .collect()
}

/// Runs this command again as a probe of local worker `local` and reads its JSON.
fn probe(local: usize, device: &Device, extra_args: &[String]) -> Result<StageSpeed> {
    let fail = |what: String| Error::Cluster(format!("measuring {device}: {what}"));
    let exe = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
    let child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .args(extra_args)
        .args(["--probe-local-rank", &local.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let pid = child.id();
    // Read both pipes to the end while waiting (a full pipe would stall the child), on a
    // thread, so that a probe that hangs can be given up on.
    let (done, output) = mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let output = match output.recv_timeout(PROBE_TIMEOUT) {
        Ok(output) => output.map_err(|e| fail(e.to_string()))?,
        Err(_) => {
            // SAFETY: killing the child process started above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(fail(format!(
                "no result after {} s",
                PROBE_TIMEOUT.as_secs()
            )));
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .last()
            .unwrap_or("it failed without a message");
        return Err(fail(last.trim_start_matches("error: ").to_string()));
    }
    serde_json::from_slice(output.stdout.trim_ascii())
        .map_err(|e| fail(format!("unreadable result: {e}")))
}

/// `speed` when `workers` share the device.
fn slowed(speed: StageSpeed, workers: f64) -> StageSpeed {
    StageSpeed {
        layer_forward: speed.layer_forward * workers,
        layer_backward: speed.layer_backward * workers,
        head_forward: speed.head_forward * workers,
        head_backward: speed.head_backward * workers,
    }
}

/// The machine's available memory (`MemAvailable`), where Linux reports it.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Every worker of `group`, by global rank.
pub fn workers_of(group: &Group) -> Result<Vec<Worker>> {
    group
        .nodes
        .iter()
        .flat_map(|node| {
            node.workers.iter().map(move |worker| {
                let measured = serde_json::from_str(&worker.measured).map_err(|e| {
                    Error::Cluster(format!(
                        "node {} ({} at {}) sent an unreadable measurement ({e}): is it running \
                         the same pp?",
                        node.rank, node.name, node.address
                    ))
                })?;
                Ok(Worker {
                    label: format!(
                        "node {} ({} at {}), {}",
                        node.rank, node.name, node.address, worker.device
                    ),
                    memory: worker.memory,
                    measured,
                    node: node.rank,
                    link: node.link,
                })
            })
        })
        .collect()
}

/// The rate between two workers' nodes, in bytes per second: none on one node (loopback, not
/// counted); across nodes the slower of their links to node 0, as each measured it.
fn link_between(a: &Worker, b: &Worker) -> Option<f64> {
    if a.node == b.node {
        return None;
    }
    [a.link, b.link]
        .into_iter()
        .flatten()
        .min_by(f64::total_cmp)
}

/// Why the layers sit where they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// `--split` gave them.
    Given,
    /// The devices are alike: as on one machine (a native checkpoint's stages, else balanced
    /// by memory).
    Alike,
    /// By measured speed within each device's memory.
    Measured,
}

/// One worker's share of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RankLoad {
    /// The stages it runs.
    pub stages: Vec<usize>,
    /// Seconds of compute per step at the measured speed.
    pub busy: f64,
    /// Estimated peak memory.
    pub memory: u64,
}

/// Which layers run where, and what that should give.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The stages.
    pub partition: Partition,
    /// Why.
    pub basis: Basis,
    /// Each worker's share, by global rank.
    pub ranks: Vec<RankLoad>,
    /// Expected seconds per step, transfers between nodes at their measured rates included.
    pub step: f64,
    /// Expected share of idle time.
    pub bubble: f64,
}

/// The workers one replica's plan must assume when every replica runs it (`--data-parallel`;
/// `workers` by global rank, `ranks` to a pipeline): at each pipeline rank, the slowest of the
/// replicas' workers there, with the least memory and the slowest link among them. A step
/// waits for its slowest replica, and each stage must fit every worker that runs it.
pub fn weakest_replica(workers: &[Worker], ranks: usize) -> Vec<Worker> {
    let layer_time = |w: &&Worker| w.measured.speed.layer_forward + w.measured.speed.layer_backward;
    (0..ranks)
        .map(|rank| {
            let replicas: Vec<&Worker> = workers.iter().skip(rank).step_by(ranks).collect();
            let slowest = replicas
                .iter()
                .max_by(|a, b| layer_time(a).total_cmp(&layer_time(b)))
                .expect("every replica has a worker at each pipeline rank");
            Worker {
                memory: replicas.iter().filter_map(|w| w.memory).min(),
                link: replicas
                    .iter()
                    .filter_map(|w| w.link)
                    .min_by(f64::total_cmp),
                ..(*slowest).clone()
            }
        })
        .collect()
}

/// Places the model's layers on `workers` (by global rank) for `pipeline`, whose activations
/// cross between workers as `wire`.
pub fn place(
    train: &TrainOptions,
    pipeline: &PipelineOptions,
    workers: &[Worker],
    wire: WireDType,
) -> Result<Placement> {
    let info = crate::checkpoint::describe(&train.model_dir)?;
    let schedule = pipeline_schedule(pipeline)?;
    let setup = TrainingSetup {
        dtype: train.dtype,
        seq_len: train.sequences.max_len,
        micro_batch_size: train.batch_size.div_ceil(pipeline.microbatches),
        optimizer: train.optimizer.clone(),
        savers: train.savers,
        in_flight: in_flight(&schedule).map_err(|e| Error::Usage(e.to_string()))?,
    };
    let alike = workers
        .iter()
        .all(|w| w.measured.device == workers[0].measured.device);
    // Given or alike devices: the split one machine would use; else by measured speed.
    let fixed = match (&pipeline.split, alike) {
        (Some(_), _) => Some(Basis::Given),
        (None, true) => Some(Basis::Alike),
        (None, false) => None,
    }
    .map(|basis| Ok((partition_for(&info, train, pipeline, &schedule)?, basis)))
    .transpose()?;
    plan_layers(&info.config, &schedule, &setup, workers, fixed, wire)
}

/// The plan for `workers` (by global rank): `fixed` when given, else the split that makes the
/// slowest stage fastest within every worker's memory. Where the split falls does not change
/// what crosses between stages (every boundary carries one hidden state per token), so links
/// count only in the expected step time.
pub fn plan_layers(
    cfg: &ModelConfig,
    schedule: &Schedule,
    setup: &TrainingSetup,
    workers: &[Worker],
    fixed: Option<(Partition, Basis)>,
    wire: WireDType,
) -> Result<Placement> {
    let rows = setup.micro_batch_size as f64;
    let rank_of = |stage: usize| schedule.stage_ranks[stage];
    // Per micro-batch: (forward, backward) seconds of `slice` on `rank`.
    let passes = |rank: usize, slice: &StageSlice| {
        let speed = &workers[rank].measured.speed;
        let (layers, head) = (slice.layers.len() as f64, f64::from(u8::from(slice.head)));
        (
            rows * (layers * speed.layer_forward + head * speed.head_forward),
            rows * (layers * speed.layer_backward + head * speed.head_backward),
        )
    };
    let stage_memory = |stage: usize, slice: &StageSlice| {
        stage_plan(cfg, slice, setup.in_flight[stage], setup)
            .memory
            .total
    };
    let cut_error = |e: PartitionError| Error::Usage(format!("cannot cut the model: {e}"));
    let (partition, basis) = match fixed {
        Some(fixed) => fixed,
        None => {
            // A worker with several stages (interleaved, ZB-V) gives each an equal part of its
            // memory.
            let room = |rank: usize| {
                workers[rank]
                    .memory
                    .map(|memory| memory / schedule.stages_of(rank).len() as u64)
            };
            let fastest = Partition::min_max(cfg.num_layers, schedule.stages(), |stage, slice| {
                let rank = rank_of(stage);
                let fits = room(rank).is_none_or(|room| stage_memory(stage, slice) <= room);
                let (forward, backward) = passes(rank, slice);
                fits.then_some(forward + backward)
            })
            .map_err(cut_error)?;
            // When nothing fits, the split that needs the least memory everywhere says who is
            // short (below).
            let partition = match fastest {
                Some(partition) => partition,
                None => Partition::min_max(cfg.num_layers, schedule.stages(), |stage, slice| {
                    let need = stage_memory(stage, slice) as f64;
                    Some(room(rank_of(stage)).map_or(0.0, |room| need / room as f64))
                })
                .map_err(cut_error)?
                .expect("every split is allowed"),
            };
            (partition, Basis::Measured)
        }
    };
    let plans = plan_training(cfg, &partition, setup);
    let devices = per_device(&plans, schedule, &setup.savers);
    for (rank, device) in devices.iter().enumerate() {
        if let Some(memory) = workers[rank].memory.filter(|&m| device.memory.total > m) {
            return Err(Error::Usage(format!(
                "the model does not fit: rank {rank} ({}) would need {} for stage(s) {:?} and \
                 has {}: {} short. Try --checkpoint-activations, fewer --microbatches, a \
                 shorter --max-len, or more workers",
                workers[rank].label,
                human_bytes(device.memory.total),
                device.stages,
                human_bytes(memory),
                human_bytes(device.memory.total - memory)
            )));
        }
    }
    // One micro-batch's activations (or their gradient) between two stages.
    let message = wire.encoded_len(
        setup.micro_batch_size * setup.seq_len * cfg.hidden_size,
        cfg.hidden_size,
    ) as f64;
    let stages = partition.len();
    let costs: Vec<Costs> = partition
        .stages()
        .iter()
        .enumerate()
        .map(|(stage, slice)| {
            let (forward, backward) = passes(rank_of(stage), slice);
            // A stage sends forward to the next stage and backward to the one before: the
            // slower of those links.
            let transfer = [
                stage.checked_sub(1),
                Some(stage + 1).filter(|&s| s < stages),
            ]
            .into_iter()
            .flatten()
            .map(|other| {
                let (a, b) = (&workers[rank_of(stage)], &workers[rank_of(other)]);
                link_between(a, b).map_or(0.0, |rate| message / rate)
            })
            .fold(0.0, f64::max);
            Costs {
                forward,
                backward,
                input_grad: backward / 2.0,
                weight_grad: backward / 2.0,
                transfer,
            }
        })
        .collect();
    let run = simulate(schedule, costs.as_slice()).map_err(|e| Error::Usage(e.to_string()))?;
    let ranks = devices
        .into_iter()
        .enumerate()
        .map(|(rank, device)| RankLoad {
            busy: run.makespan * (1.0 - run.rank_bubbles[rank]),
            memory: device.memory.total,
            stages: device.stages,
        })
        .collect();
    Ok(Placement {
        partition,
        basis,
        ranks,
        step: run.makespan,
        bubble: run.bubble,
    })
}

#[cfg(test)]
mod tests;
