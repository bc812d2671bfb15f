//! The `pp` command line.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::init_logging();
    if let Err(error) = pp::interrupt::install() {
        tracing::warn!("Ctrl-C will stop pp without cleaning up: {error}");
    }
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line a user can act on: the error and its causes, no backtrace.
            eprintln!("error: {error:#}");
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
