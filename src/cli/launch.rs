//! `pp train --stages N --schedule K --microbatches M`: the launcher starts one worker process
//! per rank (the same command line with `--worker-rank R`), connected over QUIC on loopback
//! with a fresh cluster token, and watches them: if one fails, the others are given time to
//! notice and stop on their own, then stopped; Ctrl-C is passed on to all of them.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use burn::backend::Autodiff;
use pp::device::{Device, DeviceSpec};
use pp::train::worker::{train_rank, PipelineOptions};
use pp::train::{Observer, StepReport, TrainOptions, TrainReport};
use pp_stages::ScheduleKind;
use pp_transport::{QuicConfig, QuicTransport};

use super::train::Progress;

/// The cluster token reaches workers through the environment, not the command line (which
/// other users of the machine can read).
const TOKEN_VARIABLE: &str = "PP_CLUSTER_TOKEN";
/// Names the run's shared staging directory.
const RUN_VARIABLE: &str = "PP_RUN_ID";
/// How long the other workers get to stop by themselves after one fails: they notice a lost
/// peer within the transport's 10-second idle timeout.
const GRACE: Duration = Duration::from_secs(30);

/// Pipeline flags of `pp train`.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineFlags {
    /// Train as a pipeline of this many worker processes on this machine.
    #[arg(long)]
    stages: Option<usize>,
    /// The pipeline schedule: gpipe, 1f1b, interleaved, zbh1 or zbv.
    #[arg(long, default_value = "1f1b")]
    schedule: ScheduleKind,
    /// Micro-batches per step [default: twice --stages].
    #[arg(long)]
    microbatches: Option<usize>,
    /// Stage slices per worker for interleaved.
    #[arg(long = "virtual", default_value_t = 2)]
    virtual_stages: usize,
    /// Each worker's device, by rank (cuda:0,cuda:1), or one for all; kinds may differ
    /// (a wgpu stage beside a cpu stage) since activations cross as host tensors
    /// [default: --device; with auto, worker R takes CUDA device R mod the count].
    #[arg(long, value_delimiter = ',')]
    devices: Vec<DeviceSpec>,
    /// Internal: this process is the worker of this rank.
    #[arg(long, hide = true, requires = "worker_addresses")]
    pub(super) worker_rank: Option<usize>,
    /// Internal: every worker's address, by rank.
    #[arg(long, hide = true, value_delimiter = ',')]
    worker_addresses: Vec<SocketAddr>,
}

impl PipelineFlags {
    /// The device this process computes on: its worker's entry of `--devices`, else `device`
    /// (`--device`), spread over the CUDA devices by rank when it is `auto`.
    pub fn device_spec(&self, device: DeviceSpec) -> anyhow::Result<DeviceSpec> {
        let ranks = self.stages.unwrap_or(1);
        if self.devices.len() > 1 && self.devices.len() != ranks {
            bail!(
                "--devices lists {} devices for {ranks} workers: give one per worker, or one for all",
                self.devices.len()
            );
        }
        let rank = self.worker_rank.unwrap_or(0);
        let spec = match self.devices.as_slice() {
            [] => device,
            [one] => *one,
            many => many[rank],
        };
        Ok(match spec {
            DeviceSpec::Auto => Device::auto_for_rank(rank),
            other => other,
        })
    }

    /// Checks every worker's device before any worker starts, so that an unusable one is one
    /// line from the launcher rather than a failed worker.
    pub fn check_devices(&self) -> anyhow::Result<()> {
        for spec in &self.devices {
            Device::resolve(*spec)?;
        }
        Ok(())
    }

    /// The pipeline layout, when `--stages` asks for one.
    pub fn options(&self) -> anyhow::Result<Option<PipelineOptions>> {
        if self.stages == Some(0) {
            bail!("--stages must be at least 1");
        }
        let Some(ranks) = self.stages.filter(|&n| n > 1) else {
            return Ok(None);
        };
        Ok(Some(PipelineOptions {
            schedule: self.schedule,
            ranks,
            microbatches: self.microbatches.unwrap_or(2 * ranks),
            virtual_stages: self.virtual_stages,
        }))
    }
}

/// Starts the workers and waits for them.
pub fn launch(pipeline: &PipelineOptions) -> anyhow::Result<()> {
    let addresses: Vec<SocketAddr> = (0..pipeline.ranks)
        .map(|_| {
            UdpSocket::bind("127.0.0.1:0")
                .and_then(|socket| socket.local_addr())
                .context("cannot find a free loopback port")
        })
        .collect::<anyhow::Result<_>>()?;
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    let token = random_hex();
    let run_id = format!("{}-{}", std::process::id(), &token[..8]);
    let exe = std::env::current_exe().context("cannot find the pp executable")?;
    let mut workers: Vec<Child> = Vec::with_capacity(pipeline.ranks);
    for rank in 0..pipeline.ranks {
        let mut command = Command::new(&exe);
        stop_with_launcher(&mut command);
        let child = command
            // Their own process group: a terminal's Ctrl-C reaches only the launcher, which
            // passes it on once (a second SIGINT would make a worker quit without saving).
            .process_group(0)
            .args(std::env::args_os().skip(1))
            .args(["--worker-rank", &rank.to_string()])
            .args(["--worker-addresses", &list.join(",")])
            .env(TOKEN_VARIABLE, &token)
            .env(RUN_VARIABLE, &run_id)
            // Rank 0 reports; the others speak only to say why they failed.
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .with_context(|| format!("cannot start the worker of rank {rank}"))?;
        workers.push(child);
    }
    watch(workers)
}

/// Makes a worker stop (as on Ctrl-C: save, then exit) when the launcher dies, even by
/// SIGKILL, instead of training on unwatched. Linux ties this to the thread that starts the
/// worker, which lives until the workers end (it watches them).
fn stop_with_launcher(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let launcher = std::process::id();
        // SAFETY: `prctl` and `getppid` are async-signal-safe, as a `pre_exec` hook requires.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher died before the hook ran: nobody would signal this worker.
                if libc::getppid() as u32 != launcher {
                    return Err(std::io::Error::other("the launcher is gone"));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Waits for every worker; passes Ctrl-C on; once one fails, stops the rest after `GRACE`.
fn watch(mut workers: Vec<Child>) -> anyhow::Result<()> {
    let mut status = vec![None; workers.len()];
    let mut first_failure: Option<(usize, Instant)> = None;
    let mut interrupted = false;
    while status.iter().any(Option::is_none) {
        for (rank, worker) in workers.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(exit) = worker.try_wait()? {
                    if !exit.success() && first_failure.is_none() {
                        first_failure = Some((rank, Instant::now()));
                    }
                    status[rank] = Some(exit);
                }
            }
        }
        if !interrupted && pp::interrupt::check().is_err() {
            interrupted = true;
            for worker in &workers {
                // SAFETY: sending SIGINT to our own child processes.
                unsafe { libc::kill(worker.id() as libc::pid_t, libc::SIGINT) };
            }
        }
        if let Some((_, since)) = first_failure {
            if since.elapsed() > GRACE {
                for (rank, worker) in workers.iter_mut().enumerate() {
                    if status[rank].is_none() {
                        let _ = worker.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if interrupted {
        return Err(pp::Error::Interrupted.into());
    }
    match first_failure {
        Some((rank, _)) => bail!(
            "the worker of rank {rank} failed ({}); the pipeline stopped",
            status[rank].map_or("no status".to_string(), |s| s.to_string())
        ),
        None => Ok(()),
    }
}

/// Joins the group and trains this worker's rank.
pub fn run_worker(
    options: &TrainOptions,
    pipeline: &PipelineOptions,
    flags: &PipelineFlags,
    progress: &mut Progress,
) -> anyhow::Result<TrainReport> {
    let rank = flags.worker_rank.expect("only workers come here");
    if rank >= pipeline.ranks {
        bail!(
            "--worker-rank {rank} is not below --stages {}",
            pipeline.ranks
        );
    }
    if flags.worker_addresses.len() != pipeline.ranks {
        bail!("--worker-addresses must list {} addresses", pipeline.ranks);
    }
    let token = std::env::var(TOKEN_VARIABLE)
        .with_context(|| format!("{TOKEN_VARIABLE} is not set (start workers with --stages)"))?;
    let run_id = std::env::var(RUN_VARIABLE).unwrap_or_else(|_| token.chars().take(8).collect());
    let transport = QuicTransport::join(QuicConfig {
        rank,
        addresses: flags.worker_addresses.clone(),
        token,
        join_timeout: Duration::from_secs(60),
    })?;
    let mut quiet = Quiet;
    let observer: &mut dyn Observer = if rank == 0 { progress } else { &mut quiet };
    Ok(pp::with_backend!(options.device, |B, device| {
        train_rank::<Autodiff<B>>(
            options,
            pipeline,
            Box::new(transport),
            &run_id,
            device,
            observer,
        )
    })?)
}

/// Workers other than rank 0 report nothing.
struct Quiet;

impl Observer for Quiet {
    fn started(&mut self, _: u64, _: u64) {}
    fn step(&mut self, _: &StepReport) {}
    fn note(&mut self, _: &str) {}
}

/// 128 random bits as hex, from the standard library's randomly keyed hasher.
fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..2)
        .map(|i| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_usize(i);
            format!("{:016x}", hasher.finish())
        })
        .collect()
}
