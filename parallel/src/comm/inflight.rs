//! Which collective this process is blocked in, for the watchdog of process ranks.
//!
//! A process that runs one rank calls its collectives from one thread. Transports whose calls
//! cannot be interrupted (MPI) record the call here on entry and clear it on exit; a watchdog
//! thread ([`start_watchdog`]) notices a call that has waited longer than the timeout, and the
//! failure announcements of the rendezvous store use [`describe`] to say where this rank was when
//! another rank died.

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

struct Call {
    what: String,
    since: Instant,
}

static CURRENT: Mutex<Option<Call>> = Mutex::new(None);
static WATCHDOG: OnceLock<()> = OnceLock::new();

/// Marks the start of a collective (`what`: e.g. `all_reduce of the dp group of tp_index 0`).
pub fn enter(what: impl FnOnce() -> String) {
    *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = Some(Call { what: what(), since: Instant::now() });
}

/// Marks the end of the current collective.
pub fn leave() {
    *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = None;
}

/// `Some((what, seconds waited))` while a collective is in flight.
pub fn current() -> Option<(String, f64)> {
    CURRENT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|c| (c.what.clone(), c.since.elapsed().as_secs_f64()))
}

/// Where this process is, for messages: `in all_reduce of … for 1.2 s` or `between collectives`.
pub fn describe() -> String {
    match current() {
        Some((what, s)) => format!("in {what} for {s:.1} s"),
        None => "between collectives".into(),
    }
}

/// Starts (once per process) a thread that calls `on_timeout(message)` when one collective has
/// been in flight longer than `timeout`. The callback is expected to end the process.
pub fn start_watchdog(timeout: Duration, on_timeout: impl Fn(String) + Send + 'static) {
    WATCHDOG.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("collective-watchdog".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200).min(timeout));
            if let Some((what, s)) = current() {
                if s >= timeout.as_secs_f64() {
                    on_timeout(format!(
                        "timed out after {s:.1} s in {what}: another rank of that group is stuck, crashed or skipped the \
                         collective; if the work between collectives is legitimately that slow, raise \
                         DALLE_MESH_COMM_TIMEOUT_S"
                    ));
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("could not start the collective watchdog: {e}");
        }
    });
}
