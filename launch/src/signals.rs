//! Graceful stop on SIGTERM, SIGINT, SIGUSR1 and SIGHUP: the handler only records the signal in a
//! process-wide atomic; the trainer polls it at every step boundary, agrees on it with the other
//! ranks ([`crate::stop::agree`]), finishes the step, saves a checkpoint and exits with
//! [`crate::exit_code::STOPPED_REQUEUE`]. A second SIGINT or SIGTERM exits at once with 130 or 143
//! (checkpoints are published atomically, so this loses only the unsaved steps).
//!
//! SLURM sends SIGTERM at a time limit or on preemption (`sbatch --signal=USR1@90` sends SIGUSR1
//! first); a closed terminal sends SIGHUP; Ctrl-C sends SIGINT.
//!
//! The handlers are installed only by the binary's `train` command ([`install`]), so library users
//! and tests keep the default dispositions. Uses `signal-hook`: its `flag` handlers are
//! async-signal-safe atomic stores and exits, registered without any `unsafe` here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

pub use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

/// The signals that request a graceful stop.
pub const STOP_SIGNALS: [i32; 4] = [SIGTERM, SIGINT, SIGUSR1, SIGHUP];

struct Flags {
    /// The last stop signal received (0 = none).
    signal: Arc<AtomicUsize>,
    /// Set by the first stop signal; arms the immediate exit on a second SIGINT/SIGTERM.
    stopping: Arc<AtomicBool>,
}

fn flags() -> &'static Flags {
    static FLAGS: OnceLock<Flags> = OnceLock::new();
    FLAGS.get_or_init(|| Flags { signal: Arc::new(AtomicUsize::new(0)), stopping: Arc::new(AtomicBool::new(false)) })
}

/// Installs the handlers (idempotent in effect; call once per process).
pub fn install() -> std::io::Result<()> {
    use signal_hook::flag;
    let f = flags();
    for sig in STOP_SIGNALS {
        // Registered first, so the first signal finds `stopping` false and only the second exits.
        match sig {
            SIGINT => {
                let _ = flag::register_conditional_shutdown(sig, crate::exit_code::SECOND_SIGINT, f.stopping.clone())?;
            }
            SIGTERM => {
                let _ = flag::register_conditional_shutdown(sig, crate::exit_code::SECOND_SIGTERM, f.stopping.clone())?;
            }
            _ => {}
        }
        flag::register_usize(sig, f.signal.clone(), sig as usize)?;
        flag::register(sig, f.stopping.clone())?;
    }
    Ok(())
}

/// The stop signal this process received, if any.
pub fn received() -> Option<i32> {
    match flags().signal.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    }
}

/// Clears a received signal (a library caller that handled it and goes on).
pub fn clear() {
    let f = flags();
    f.signal.store(0, Ordering::SeqCst);
    f.stopping.store(false, Ordering::SeqCst);
}

/// `SIGTERM`, `SIGINT`, ... for a signal number.
pub fn name(sig: i32) -> String {
    match sig {
        SIGTERM => "SIGTERM".into(),
        SIGINT => "SIGINT".into(),
        SIGUSR1 => "SIGUSR1".into(),
        SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}
