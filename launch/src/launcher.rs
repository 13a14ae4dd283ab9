//! `dalle-mesh launch --nproc N -- <command> …`: starts N ranks of a dalle-mesh command on this
//! host, like torchrun.
//!
//! - **How**: `--via mpirun` (the default when built with `--features mpi`: CPU ranks talk over
//!   MPI, so they must be MPI processes) runs `mpirun -np N` with `MASTER_ADDR`/`MASTER_PORT`
//!   exported; `--via direct` (the default otherwise, e.g. for NCCL ranks) starts the N processes
//!   itself with torchrun's variables `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//!   `MASTER_ADDR`, `MASTER_PORT`. The port is a free loopback port unless `--master-port` is given.
//! - **Output**: every stderr line, and the stdout lines of ranks other than 0, are prefixed with
//!   `[rank R] `; rank 0's stdout (the command's JSON line) passes through unchanged.
//! - **Signals**: SIGTERM, SIGINT and SIGUSR1 are forwarded to the ranks (to mpirun, which
//!   forwards them); the ranks then stop together at a step boundary.
//! - **Failure**: the first rank to exit non-zero ends the run: the others get SIGTERM, then
//!   SIGKILL after `--kill-grace-s`; the launcher exits with that rank's code (128 + signal if it
//!   was killed) and names it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// How the ranks are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// mpirun with --features mpi, else direct.
    Auto,
    /// `mpirun -np N` (CPU ranks over MPI).
    Mpirun,
    /// N child processes with torchrun's variables (e.g. NCCL ranks).
    Direct,
}

/// What `launch` was asked to do.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Number of ranks.
    pub nproc: usize,
    /// How to start them.
    pub via: Via,
    /// Store port (None: a free one).
    pub master_port: Option<u16>,
    /// Seconds between SIGTERM and SIGKILL when tearing down after a failure.
    pub kill_grace: Duration,
    /// The dalle-mesh arguments of every rank (e.g. `train --config run.yaml`).
    pub args: Vec<String>,
}

/// The launcher's JSON line.
#[derive(Debug, Serialize)]
pub struct LaunchReport {
    /// Ranks started.
    pub nproc: usize,
    /// `mpirun` or `direct`.
    pub via: &'static str,
    /// Exit code of the run (0, or the first failing rank's).
    pub exit_code: i32,
    /// The first rank that failed, in direct mode.
    pub failed_rank: Option<usize>,
    /// Wall time.
    pub seconds: f64,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Exit code of a status: the code, or 128 + signal.
fn code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of a child we started and still hold (not yet reaped, so the pid
    // cannot have been reused) and a valid signal number; it touches no memory.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Copies `input` line by line to stdout/stderr, prefixed with `[rank R] ` unless `plain`.
fn pump(
    input: impl std::io::Read + Send + 'static,
    rank: Option<usize>,
    to_stdout: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(input).lines().map_while(|l| l.ok()) {
            let text = match rank {
                Some(r) => format!("[rank {r}] {line}\n"),
                None => format!("{line}\n"),
            };
            if to_stdout {
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
            } else {
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
        }
    })
}

/// mpirun's `--tag-output` lines `[1,R]<stdout>:text` → `(R, is_stdout, text)`.
pub fn parse_mpirun_tag(line: &str) -> Option<(usize, bool, &str)> {
    let rest = line.strip_prefix('[')?;
    let (ids, rest) = rest.split_once(']')?;
    let rank = ids.split(',').nth(1)?.parse().ok()?;
    let (stream, text) = rest.strip_prefix('<')?.split_once(">:")?;
    Some((rank, stream == "stdout", text))
}

fn pump_mpirun(input: impl std::io::Read + Send + 'static, to_stdout: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(input).lines().map_while(|l| l.ok()) {
            // mpirun tags every chunk it reads (4 KiB), so a longer line carries its tag again inside.
            let line = match parse_mpirun_tag(&line) {
                Some((_, _, t)) => {
                    format!("{}{}", &line[..line.len() - t.len()], t.replace(&line[..line.len() - t.len()], ""))
                }
                None => line,
            };
            let (text, stdout) = match parse_mpirun_tag(&line) {
                Some((0, true, t)) => (format!("{t}\n"), true),
                Some((r, out, t)) => (format!("[rank {r}] {t}\n"), out),
                None => (format!("[mpirun] {line}\n"), false),
            };
            if stdout && to_stdout {
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
            } else {
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
        }
    })
}

/// Forwards SIGTERM/SIGINT/SIGUSR1 received by the launcher to `pids`.
fn forward_signals(pids: Arc<Mutex<Vec<u32>>>, last: Arc<AtomicI32>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1]).context("installing signal handlers")?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            last.store(sig, Ordering::SeqCst);
            tracing::warn!(signal = sig, "launch: forwarding the signal to every rank");
            for &pid in pids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
                send_signal(pid, sig);
            }
        }
    });
    Ok(())
}

/// Runs the ranks; returns the report (its `exit_code` is what the launcher exits with).
pub fn run(opts: &LaunchOptions) -> Result<LaunchReport> {
    if opts.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if opts.args.is_empty() {
        bail!("nothing to launch: give the command after `--`, e.g. `dalle-mesh launch --nproc 4 -- train --config run.yaml`");
    }
    let via = match opts.via {
        Via::Auto if cfg!(feature = "mpi") => Via::Mpirun,
        Via::Auto => Via::Direct,
        v => v,
    };
    let exe = std::env::current_exe().context("locating the dalle-mesh executable")?;
    let port = match opts.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let started = Instant::now();
    let pids: Arc<Mutex<Vec<u32>>> = Arc::default();
    let last_signal = Arc::new(AtomicI32::new(0));
    forward_signals(pids.clone(), last_signal.clone())?;
    let (exit_code, failed_rank) = match via {
        Via::Mpirun => (run_mpirun(opts, &exe, port, &pids)?, None),
        _ => run_direct(opts, &exe, port, &pids)?,
    };
    Ok(LaunchReport {
        nproc: opts.nproc,
        via: if via == Via::Mpirun { "mpirun" } else { "direct" },
        exit_code,
        failed_rank,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn run_mpirun(opts: &LaunchOptions, exe: &std::path::Path, port: u16, pids: &Mutex<Vec<u32>>) -> Result<i32> {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &opts.nproc.to_string(), "--oversubscribe", "--tag-output"]);
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    cmd.args(["-x", "MASTER_ADDR", "-x", "MASTER_PORT"])
        .arg(exe)
        .args(&opts.args)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        anyhow::anyhow!(
            "could not start mpirun ({e}): install Open MPI (apt-get install openmpi-bin), or pass --via direct for \
             ranks that do not use MPI"
        )
    })?;
    pids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(child.id());
    let out = pump_mpirun(child.stdout.take().context("mpirun stdout")?, true);
    let err = pump_mpirun(child.stderr.take().context("mpirun stderr")?, false);
    let status = child.wait().context("waiting for mpirun")?;
    let _ = (out.join(), err.join());
    let code = code_of(status);
    if code != 0 {
        tracing::error!(code, "launch: mpirun exited with {code} (the failing rank's error is above)");
    }
    Ok(code)
}

fn run_direct(
    opts: &LaunchOptions,
    exe: &std::path::Path,
    port: u16,
    pids: &Mutex<Vec<u32>>,
) -> Result<(i32, Option<usize>)> {
    let n = opts.nproc;
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut pumps = Vec::new();
    for rank in 0..n {
        let spawned = Command::new(exe)
            .args(&opts.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                for c in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("could not start rank {rank} ({}): {e}", exe.display());
            }
        };
        pids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(child.id());
        let out = child.stdout.take().context("child stdout")?;
        let err = child.stderr.take().context("child stderr")?;
        pumps.push(pump(out, (rank != 0).then_some(rank), true));
        pumps.push(pump(err, Some(rank), false));
        children.push(child);
    }
    let mut codes: Vec<Option<i32>> = vec![None; n];
    let mut failed: Option<(usize, i32)> = None;
    let mut teardown_since: Option<Instant> = None;
    while codes.iter().any(Option::is_none) {
        for (r, c) in children.iter_mut().enumerate() {
            if codes[r].is_some() {
                continue;
            }
            if let Some(status) = c.try_wait().context("waiting for a rank")? {
                let code = code_of(status);
                codes[r] = Some(code);
                if code != 0 && failed.is_none() {
                    failed = Some((r, code));
                    tracing::error!(rank = r, code, "launch: rank {r} exited with {code}; stopping the others");
                    teardown_since = Some(Instant::now());
                    for (_, pid) in children_pids(&codes, pids) {
                        send_signal(pid, libc::SIGTERM);
                    }
                }
            }
        }
        if let Some(t) = teardown_since {
            if t.elapsed() >= opts.kill_grace {
                for (r, c) in children.iter_mut().enumerate() {
                    if codes[r].is_none() {
                        tracing::warn!(rank = r, "launch: rank {r} ignored SIGTERM; killing it");
                        let _ = c.kill();
                    }
                }
                teardown_since = None;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pumps {
        let _ = p.join();
    }
    Ok(match failed {
        Some((r, code)) => (code, Some(r)),
        None => (0, None),
    })
}

/// `(rank, pid)` of the ranks still running.
fn children_pids(codes: &[Option<i32>], pids: &Mutex<Vec<u32>>) -> Vec<(usize, u32)> {
    let pids = pids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    codes.iter().enumerate().filter(|(_, c)| c.is_none()).filter_map(|(r, _)| pids.get(r).map(|&p| (r, p))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpirun_tags_parse() {
        assert_eq!(parse_mpirun_tag("[1,3]<stderr>:hello: x"), Some((3, false, "hello: x")));
        assert_eq!(parse_mpirun_tag("[1,0]<stdout>:{\"a\":1}"), Some((0, true, "{\"a\":1}")));
        assert_eq!(parse_mpirun_tag("plain line"), None);
        assert_eq!(parse_mpirun_tag("[x]<stdout>:y"), None);
    }
}
