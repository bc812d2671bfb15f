//! Starts this machine's worker processes (the same command line with `--worker-rank R`) and
//! watches them: a failed worker gives the others time to notice and stop on their own before
//! they are stopped; Ctrl-C is passed on once; in a group of nodes, what happens here is told
//! to the group and what the group says is acted on.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pp_transport::rendezvous::{GroupEvent, NodeEvent, RendezvousNode};

use super::{ERROR_FILE_VARIABLE, RUN_VARIABLE, TOKEN_VARIABLE};
use crate::error::{Error, Result};

/// How long the other workers get to stop by themselves after one fails: they notice a lost
/// peer within the transport's idle timeout.
const GRACE: Duration = Duration::from_secs(30);
/// After the group says stop, how long workers get to exit before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What this machine's workers need to join the rest.
#[derive(Debug, Clone)]
pub struct WorkerLaunch {
    /// Every worker's address, by global rank.
    pub addresses: Vec<SocketAddr>,
    /// The global rank of this machine's first worker.
    pub first_rank: usize,
    /// How many workers run here.
    pub local_workers: usize,
    /// The cluster token (passed through the environment, which other users cannot read).
    pub token: String,
    /// Names the run's shared staging directories; the same on every node.
    pub run_id: String,
    /// Flags added to this process's own command line.
    pub extra_args: Vec<String>,
}

/// This machine's worker processes, by local rank.
pub struct Workers {
    children: Vec<Child>,
    /// Where each writes its error if it fails.
    error_files: Vec<PathBuf>,
    first_rank: usize,
}

impl Workers {
    /// Starts the workers. Only the first local worker writes to stdout (it reports progress);
    /// the others speak only on stderr, to say why they failed.
    pub fn spawn(launch: &WorkerLaunch) -> Result<Self> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Cluster(format!("cannot find the pp executable: {e}")))?;
        let list: Vec<String> = launch.addresses.iter().map(ToString::to_string).collect();
        let own_args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let mut children = Vec::with_capacity(launch.local_workers);
        let mut error_files = Vec::with_capacity(launch.local_workers);
        for local in 0..launch.local_workers {
            let rank = launch.first_rank + local;
            let error_file =
                std::env::temp_dir().join(format!("pp-{}-rank{rank}.error", std::process::id()));
            let _ = std::fs::remove_file(&error_file);
            let mut command = Command::new(&exe);
            stop_with_launcher(&mut command);
            let child = command
                // Their own process group: a terminal's Ctrl-C reaches only the launcher, which
                // passes it on once (a second SIGINT would make a worker quit without saving).
                .process_group(0)
                .args(&own_args)
                .args(&launch.extra_args)
                .args(["--worker-rank", &rank.to_string()])
                .args(["--worker-local-rank", &local.to_string()])
                .args(["--worker-addresses", &list.join(",")])
                .env(TOKEN_VARIABLE, &launch.token)
                .env(RUN_VARIABLE, &launch.run_id)
                .env(ERROR_FILE_VARIABLE, &error_file)
                .stdout(if local == 0 {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .spawn()
                .map_err(|e| {
                    Error::Cluster(format!("cannot start the worker of rank {rank}: {e}"))
                })?;
            children.push(child);
            error_files.push(error_file);
        }
        Ok(Self {
            children,
            error_files,
            first_rank: launch.first_rank,
        })
    }

    /// Waits for every worker; passes Ctrl-C on (to the group too); once one fails, stops the
    /// rest after [`GRACE`]. With a `group`, tells it how this machine's workers ended, and
    /// acts on what it says: save (SIGUSR1), stop after a step (SIGINT), abort (kill).
    pub fn watch(mut self, group: Option<&RendezvousNode>) -> Result<()> {
        let mut status: Vec<Option<ExitStatus>> = vec![None; self.children.len()];
        let mut first_failure: Option<(usize, Instant)> = None;
        let mut interrupted = false;
        let mut aborted: Option<(Error, Instant)> = None;
        let mut stop_requested: Option<String> = None;
        while status.iter().any(Option::is_none) {
            for (local, child) in self.children.iter_mut().enumerate() {
                if status[local].is_none() {
                    if let Some(exit) = child
                        .try_wait()
                        .map_err(|e| Error::Cluster(e.to_string()))?
                    {
                        if failed(exit) && first_failure.is_none() {
                            first_failure = Some((local, Instant::now()));
                            if let Some(group) = group {
                                let _ = group.report(NodeEvent::Failed(failure(
                                    self.first_rank + local,
                                    exit,
                                    &self.error_files[local],
                                )));
                            }
                        }
                        status[local] = Some(exit);
                    }
                }
            }
            if !interrupted && crate::interrupt::check().is_err() {
                interrupted = true;
                self.signal(libc::SIGINT);
                if let Some(group) = group {
                    let _ = group.report(NodeEvent::Interrupt);
                }
            }
            match group.and_then(RendezvousNode::poll) {
                Some(GroupEvent::Interrupt { .. }) if !interrupted => {
                    interrupted = true;
                    self.signal(libc::SIGINT);
                }
                // One worker is enough: the step's all-reduce tells every rank to save at
                // that step (signalling all could make two steps save, as signals arrive
                // between steps).
                Some(GroupEvent::Save) if self.first_rank == 0 => {
                    if let Some(rank0) = self.children.first() {
                        // SAFETY: signalling our own child process.
                        unsafe { libc::kill(rank0.id() as libc::pid_t, libc::SIGUSR1) };
                    }
                }
                Some(GroupEvent::Stop { by }) if !interrupted => {
                    interrupted = true;
                    stop_requested = Some(by);
                    self.signal(libc::SIGINT);
                }
                Some(GroupEvent::Broken(reason)) if aborted.is_none() => {
                    aborted = Some((
                        Error::GroupBroken(format!("{reason}; stopping")),
                        Instant::now(),
                    ));
                }
                Some(GroupEvent::Abort(reason)) if aborted.is_none() => {
                    aborted = Some((Error::Cluster(reason), Instant::now()));
                }
                _ => {}
            }
            let give_up = first_failure.is_some_and(|(_, since)| since.elapsed() > GRACE)
                || aborted
                    .as_ref()
                    .is_some_and(|(_, since)| since.elapsed() > STOP_GRACE);
            if give_up {
                for (local, child) in self.children.iter_mut().enumerate() {
                    if status[local].is_none() {
                        let _ = child.kill();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some((error, _)) = aborted {
            return Err(error);
        }
        if let Some((local, _)) = first_failure {
            let exit = status[local].expect("the failed worker has exited");
            return Err(Error::GroupBroken(format!(
                "{}; the pipeline stopped",
                failure(self.first_rank + local, exit, &self.error_files[local])
            )));
        }
        if let Some(group) = group {
            wait_for_the_group(group)?;
        }
        // Workers that stop on Ctrl-C, pressed here or on another node, save and exit with 130.
        let saved_on_interrupt = status
            .iter()
            .any(|exit| exit.is_some_and(|e| e.code() == Some(crate::interrupt::EXIT_CODE)));
        if let Some(by) = stop_requested {
            eprintln!("stopped by {by}; continue with --resume");
            return Ok(());
        }
        if interrupted || saved_on_interrupt {
            return Err(Error::Interrupted);
        }
        Ok(())
    }

    fn signal(&self, signal: libc::c_int) {
        for child in &self.children {
            // SAFETY: signalling our own child processes.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }
}

/// How the worker of `rank` failed, with its own error when it wrote one to `error_file`.
fn failure(rank: usize, exit: ExitStatus, error_file: &Path) -> String {
    match std::fs::read_to_string(error_file) {
        Ok(error) if !error.is_empty() => {
            format!("the worker of rank {rank} failed ({exit}): {error}")
        }
        _ => format!("the worker of rank {rank} failed ({exit})"),
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for file in &self.error_files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Whether a worker failed: it neither finished nor stopped on Ctrl-C.
fn failed(exit: ExitStatus) -> bool {
    !exit.success() && exit.code() != Some(crate::interrupt::EXIT_CODE)
}

/// This node's workers are done: waits until every node's are (node 0 keeps the rendezvous
/// until then), or the group stops (a lost node is noticed by heartbeat, so this ends).
fn wait_for_the_group(group: &RendezvousNode) -> Result<()> {
    group
        .report(NodeEvent::Finished)
        .map_err(|e| Error::Cluster(e.to_string()))?;
    loop {
        match group.wait(Duration::from_secs(1)) {
            Some(GroupEvent::Finished) => return Ok(()),
            Some(GroupEvent::Broken(reason)) => return Err(Error::GroupBroken(reason)),
            Some(GroupEvent::Abort(reason)) => return Err(Error::Cluster(reason)),
            _ => {}
        }
    }
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
