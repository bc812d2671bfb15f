//! Ctrl-C as a request rather than a kill: long operations poll [`check`] at safe points and stop
//! with [`Error::Interrupted`], so that their cleanup runs (a conversion removes its partial
//! output). A second Ctrl-C exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Exit status after an interruption, as shells report SIGINT.
pub const EXIT_CODE: i32 = 130;

/// Routes Ctrl-C (SIGINT, and SIGTERM) to [`check`]. Call once, early in `main`.
pub fn install() -> std::result::Result<(), ctrlc::Error> {
    ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_CODE);
        }
    })
}

/// Fails with [`Error::Interrupted`] once Ctrl-C has been pressed.
pub fn check() -> Result<()> {
    if REQUESTED.load(Ordering::Relaxed) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
