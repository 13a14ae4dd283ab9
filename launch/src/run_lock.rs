//! One run per output folder: `train` holds an exclusive OS lock (`flock`, through
//! `std::fs::File::try_lock`) on `OUT/.lock` for its whole life. The kernel drops the lock when
//! the process ends in any way (SIGKILL included), so a stale lock can't block a folder. The file
//! also records the holder's pid, host and start time, which a refused second run reports.
//! While the lock is held, leftovers of dead runs in the folder are safe to clean up.

use crate::bad_input;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lock";

/// Who holds a run folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// Seconds since the Unix epoch.
    pub since: u64,
}

/// The held lock of one run folder; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// This machine's host name (Linux: /proc; else `$HOSTNAME`; else `unknown host`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown host".into())
}

/// Takes the lock of `out` (created if needed), or refuses naming the live holder.
pub fn acquire(out: &Path) -> Result<RunLock> {
    let path = out.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| bad_input!("cannot open the run lock {}: {e} (is --out writable?)", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let who = serde_json::from_str::<Holder>(&text)
                .map(|h| format!("pid {} on host {}, started at Unix time {}", h.pid, h.host, h.since))
                .unwrap_or_else(|_| "a process that has not written its pid yet".into());
            return Err(bad_input!(
                "{} is in use by another run ({who}); nothing was changed. Wait for it to finish or stop it, or \
                 choose another --out",
                out.display()
            ));
        }
        Err(TryLockError::Error(e)) => {
            return Err(bad_input!(
                "cannot lock {}: {e} (the file system may not support locks; choose another --out)",
                path.display()
            ))
        }
    }
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let holder = Holder { pid: std::process::id(), host: host_name(), since };
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(serde_json::to_string(&holder)?.as_bytes())?;
    file.flush()?;
    Ok(RunLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("dm-lock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = acquire(&dir).unwrap();
        let err = acquire(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains(&host_name()), "{msg}");
        assert_eq!(crate::exit_code::for_error(&err), crate::exit_code::BAD_INPUT);
        drop(first);
        let again = acquire(&dir).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
