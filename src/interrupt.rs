//! Ctrl-C as a request rather than a kill: long operations poll [`check`] at safe points and stop
//! with [`Error::Interrupted`], so that their cleanup runs (a conversion removes its partial
//! output). A second Ctrl-C exits at once. SIGUSR1 asks a training run for a checkpoint at
//! its next step ([`take_save_request`]; `pp ctl save` sends it to every worker).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static SAVE_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Exit status after an interruption, as shells report SIGINT.
pub const EXIT_CODE: i32 = 130;

/// Routes Ctrl-C (SIGINT, and SIGTERM) to [`check`] and SIGUSR1 to [`take_save_request`].
/// Call once, early in `main`.
pub fn install() -> std::result::Result<(), ctrlc::Error> {
    extern "C" fn on_save_signal(_: libc::c_int) {
        // Async-signal-safe: one atomic store.
        SAVE_REQUESTED.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_save_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_CODE);
        }
    })
}

/// Whether a checkpoint was asked for since the last call.
pub fn take_save_request() -> bool {
    SAVE_REQUESTED.swap(false, Ordering::SeqCst)
}

/// Fails with [`Error::Interrupted`] once Ctrl-C has been pressed.
pub fn check() -> Result<()> {
    if REQUESTED.load(Ordering::Relaxed) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
