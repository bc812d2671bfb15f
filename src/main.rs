//! The `pp` command line.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::init_logging();
    if let Err(error) = pp::interrupt::install() {
        tracing::warn!("Ctrl-C will stop pp without cleaning up: {error}");
    }
    match on_thread_pool(cli::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line a user can act on: the error and its causes, no backtrace.
            eprintln!("error: {error:#}");
            // A worker's launcher names the cause when it reports the failure.
            if let Some(path) = std::env::var_os(pp::cluster::ERROR_FILE_VARIABLE) {
                let _ = std::fs::write(path, format!("{error:#}"));
            }
            let interrupted = matches!(
                error.downcast_ref::<pp::Error>(),
                Some(pp::Error::Interrupted)
            );
            if interrupted {
                ExitCode::from(pp::interrupt::EXIT_CODE as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs `command` on a worker of a rayon pool with the threads rayon would use: the CPU
/// kernels' parallel passes then start on the calling thread, where from any other thread each
/// would wake a pool thread and block (two context switches per kernel, with one thread per
/// pipeline stage). Deep call stacks (graph building, backward) get the main thread's room.
fn on_thread_pool(command: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(MAIN_STACK_BYTES)
        .build()?;
    pool.install(command)
}

/// Stack of the thread a command runs on: as Linux gives a main thread.
const MAIN_STACK_BYTES: usize = 8 << 20;
