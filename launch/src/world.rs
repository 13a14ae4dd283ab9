//! Where am I: this process's rank, the world size and the rendezvous address, read from the
//! environment the launcher set.
//!
//! Launchers are tried in this order:
//! 1. SLURM (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_JOB_NODELIST`,
//!    `SLURM_JOB_ID`. When `mpirun` runs inside an allocation its processes inherit the batch
//!    step's SLURM variables but carry Open MPI's own; the Open MPI numbers then win.
//! 2. Open MPI (`mpirun`): `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_RANK`.
//! 3. torchrun style (also `dalle-mesh launch`): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!    `MASTER_PORT`.
//!
//! None set: one process whose ranks are threads (today's behaviour).
//!
//! The rendezvous address is `MASTER_ADDR:MASTER_PORT` when set. Under SLURM the defaults are the
//! first host of the job's node list and `15000 + (job id mod 10000)` (the convention Lightning
//! users know); elsewhere `127.0.0.1` and 29500 (torchrun's default port).

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The port used when neither `MASTER_PORT` nor a SLURM job id gives one.
pub const DEFAULT_PORT: u16 = 29500;

/// Who started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Launcher {
    /// No launcher variables: one process, ranks are threads.
    None,
    /// `srun` (or an sbatch step).
    Slurm,
    /// `mpirun` / `mpiexec` of Open MPI.
    OpenMpi,
    /// torchrun-style variables (`dalle-mesh launch` sets these).
    Torchrun,
}

/// This process's place in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct World {
    /// Who started us.
    pub launcher: Launcher,
    /// World rank of this process.
    pub rank: usize,
    /// Number of processes.
    pub size: usize,
    /// Rank among the processes of this host (picks the GPU).
    pub local_rank: usize,
    /// Host of the rendezvous store (world rank 0's host).
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// SLURM job id, when under SLURM.
    pub job_id: Option<String>,
}

impl World {
    /// The one-process world (no launcher).
    pub fn single() -> Self {
        World {
            launcher: Launcher::None,
            rank: 0,
            size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
            job_id: None,
        }
    }

    /// True when this process is one of several (each runs one rank).
    pub fn is_multi_process(&self) -> bool {
        self.launcher != Launcher::None
    }

    /// `host:port` of the rendezvous store.
    pub fn store_addr(&self) -> String {
        if self.master_addr.contains(':') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// Reads the world from this process's environment.
pub fn detect() -> Result<World> {
    detect_from(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// Reads the world from `env` (a lookup like `std::env::var`; tests pass simulated values).
pub fn detect_from(env: &dyn Fn(&str) -> Option<String>) -> Result<World> {
    let num = |k: &str| -> Result<Option<usize>> {
        env(k)
            .map(|v| v.trim().parse::<usize>().with_context(|| format!("{k}={v:?} is not a whole number")))
            .transpose()
    };
    let slurm = num("SLURM_PROCID")?;
    let ompi = num("OMPI_COMM_WORLD_RANK")?;
    let torch = num("RANK")?;
    let mut world = if let (Some(rank), false) = (slurm, ompi.is_some() && ompi_differs_from_slurm(env)) {
        slurm_world(env, rank)?
    } else if let Some(rank) = ompi {
        let size =
            num("OMPI_COMM_WORLD_SIZE")?.context("OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not")?;
        let local_rank = num("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0);
        let local_size = num("OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(size);
        if local_size < size && env("MASTER_ADDR").is_none() {
            bail!(
                "mpirun started {size} processes on several hosts but MASTER_ADDR is not set: pass the host of rank 0, \
                 e.g. `mpirun -x MASTER_ADDR=<host of rank 0> -x MASTER_PORT=29500 ...`"
            );
        }
        World { launcher: Launcher::OpenMpi, rank, size, local_rank, ..World::single() }
    } else if let Some(rank) = torch {
        let size = num("WORLD_SIZE")?.context("RANK is set but WORLD_SIZE is not (torchrun-style launch)")?;
        let local_rank = num("LOCAL_RANK")?.unwrap_or(0);
        World { launcher: Launcher::Torchrun, rank, size, local_rank, ..World::single() }
    } else {
        return Ok(World::single());
    };
    if let Some(addr) = env("MASTER_ADDR") {
        world.master_addr = addr;
    }
    if let Some(p) = env("MASTER_PORT") {
        world.master_port =
            p.trim().parse().with_context(|| format!("MASTER_PORT={p:?} is not a port number (1-65535)"))?;
    }
    if world.size == 0 {
        bail!("the launcher says the world has 0 processes ({:?})", world.launcher);
    }
    if world.rank >= world.size {
        bail!("rank {} is outside a world of {} processes: the launcher's variables disagree", world.rank, world.size);
    }
    Ok(world)
}

/// `mpirun` inside a SLURM allocation: the processes inherit the batch step's SLURM_* (one task)
/// but Open MPI's numbers describe the real world.
fn ompi_differs_from_slurm(env: &dyn Fn(&str) -> Option<String>) -> bool {
    env("OMPI_COMM_WORLD_SIZE") != env("SLURM_NTASKS") || env("OMPI_COMM_WORLD_RANK") != env("SLURM_PROCID")
}

fn slurm_world(env: &dyn Fn(&str) -> Option<String>, rank: usize) -> Result<World> {
    let num = |k: &str| env(k).and_then(|v| v.trim().parse::<usize>().ok());
    let size =
        num("SLURM_NTASKS").or_else(|| num("SLURM_NPROCS")).context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
    let job_id = env("SLURM_JOB_ID").or_else(|| env("SLURM_JOBID"));
    if size > 1 && env("SLURM_STEP_ID").is_none() && env("SLURM_STEPID").is_none() {
        bail!(
            "this is the batch script of SLURM job {} ({size} tasks) but not a job step: start the command with srun \
             (`srun dalle-mesh train ...`) so that every task runs it, or ask for --ntasks=1",
            job_id.as_deref().unwrap_or("?")
        );
    }
    let nodelist = env("SLURM_JOB_NODELIST").or_else(|| env("SLURM_NODELIST")).or_else(|| env("SLURM_STEP_NODELIST"));
    let master_addr = match nodelist {
        Some(list) => {
            let hosts = parse_nodelist(&list)?;
            hosts.into_iter().next().with_context(|| format!("SLURM_JOB_NODELIST={list:?} names no host"))?
        }
        None => "127.0.0.1".into(),
    };
    let master_port = job_id.as_deref().map_or(Ok(DEFAULT_PORT), port_for_job)?;
    Ok(World {
        launcher: Launcher::Slurm,
        rank,
        size,
        local_rank: num("SLURM_LOCALID").unwrap_or(0),
        master_addr,
        master_port,
        job_id,
    })
}

/// The store port of a SLURM job: `15000 + (job id mod 10000)`.
pub fn port_for_job(job_id: &str) -> Result<u16> {
    // Array jobs look like 1234_5; the leading number is the job.
    let digits: String = job_id.chars().take_while(|c| c.is_ascii_digit()).collect();
    let id: u64 = digits.parse().with_context(|| format!("SLURM_JOB_ID={job_id:?} is not a job number"))?;
    Ok(15000 + (id % 10000) as u16)
}

/// Expands a SLURM host list: `gpu[01-02,07]` → gpu01, gpu02, gpu07; `a1,b[1-2]` → a1, b1, b2;
/// several bracket groups (`r[1-2]n[1-2]`) multiply. Zero padding of a range is kept.
pub fn parse_nodelist(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        hosts.extend(expand_host(item).with_context(|| format!("in the SLURM node list {list:?}"))?);
    }
    Ok(hosts)
}

/// Splits at commas that are not inside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            bail!("unbalanced or nested brackets in the node list {list:?}");
        }
    }
    if depth != 0 {
        bail!("unclosed '[' in the node list {list:?}");
    }
    out.push(&list[start..]);
    Ok(out.into_iter().map(str::trim).filter(|s| !s.is_empty()).collect())
}

fn expand_host(item: &str) -> Result<Vec<String>> {
    let Some(open) = item.find('[') else { return Ok(vec![item.to_string()]) };
    let close = item[open..].find(']').map(|c| open + c).context("'[' without ']'")?;
    let (prefix, ranges, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    let tails = expand_host(rest)?;
    let mut out = Vec::new();
    for part in ranges.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let parse = |s: &str| s.parse::<u64>().with_context(|| format!("{s:?} in [{ranges}] is not a number"));
        let (a, b) = (parse(lo)?, parse(hi)?);
        if b < a {
            bail!("range {part:?} runs backwards");
        }
        for n in a..=b {
            for t in &tails {
                out.push(format!("{prefix}{n:0width$}{t}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn node_lists_expand_like_scontrol_show_hostnames() {
        assert_eq!(parse_nodelist("gpu[01-02,07]").unwrap(), ["gpu01", "gpu02", "gpu07"]);
        assert_eq!(parse_nodelist("localhost").unwrap(), ["localhost"]);
        assert_eq!(parse_nodelist("a1,b[1-2],c").unwrap(), ["a1", "b1", "b2", "c"]);
        assert_eq!(parse_nodelist("n[8-10]-ib").unwrap(), ["n8-ib", "n9-ib", "n10-ib"]);
        assert_eq!(parse_nodelist("r[1-2]n[01-02]").unwrap(), ["r1n01", "r1n02", "r2n01", "r2n02"]);
        for bad in ["gpu[01-02", "gpu[2-1]", "gpu[a-b]", "gpu]1["] {
            let e = format!("{:#}", parse_nodelist(bad).unwrap_err());
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn slurm_world_derives_address_and_port() {
        let env = env_of(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_JOB_NODELIST", "gpu[01-02,07]"),
            ("SLURM_JOB_ID", "123456"),
        ]);
        let w = detect_from(&env).unwrap();
        assert_eq!((w.launcher, w.rank, w.size, w.local_rank), (Launcher::Slurm, 5, 8, 1));
        assert_eq!(w.master_addr, "gpu01");
        assert_eq!(w.master_port, 15000 + 3456);
        assert_eq!(w.store_addr(), "gpu01:18456");
        assert_eq!(w.job_id.as_deref(), Some("123456"));
        assert_eq!(port_for_job("99_3").unwrap(), 15099);
    }

    #[test]
    fn explicit_master_addr_and_port_win() {
        let env = env_of(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_JOB_NODELIST", "gpu[01-02]"),
            ("SLURM_JOB_ID", "7"),
            ("MASTER_ADDR", "10.0.0.9"),
            ("MASTER_PORT", "4000"),
        ]);
        let w = detect_from(&env).unwrap();
        assert_eq!(w.store_addr(), "10.0.0.9:4000");
        let bad = env_of(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "http")]);
        assert!(format!("{:#}", detect_from(&bad).unwrap_err()).contains("MASTER_PORT"));
    }

    #[test]
    fn batch_script_without_srun_is_refused() {
        let env = env_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_JOB_ID", "42")]);
        let e = format!("{:#}", detect_from(&env).unwrap_err());
        assert!(e.contains("srun") && e.contains("42"), "{e}");
    }

    #[test]
    fn open_mpi_and_torchrun_and_none() {
        let w = detect_from(&env_of(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
        ]))
        .unwrap();
        assert_eq!((w.launcher, w.rank, w.size, w.local_rank), (Launcher::OpenMpi, 3, 4, 3));
        assert_eq!(w.store_addr(), "127.0.0.1:29500");
        // mpirun inside an sbatch allocation: the inherited SLURM_* of the batch step lose.
        let w = detect_from(&env_of(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_JOB_ID", "9"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
        ]))
        .unwrap();
        assert_eq!((w.launcher, w.rank, w.size), (Launcher::OpenMpi, 2, 4));
        // mpirun across hosts needs MASTER_ADDR.
        let e = detect_from(&env_of(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
        let w = detect_from(&env_of(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "29555"),
        ]))
        .unwrap();
        assert_eq!(
            (w.launcher, w.rank, w.size, w.store_addr().as_str()),
            (Launcher::Torchrun, 1, 2, "localhost:29555")
        );
        assert_eq!(detect_from(&env_of(&[])).unwrap(), World::single());
        let e = detect_from(&env_of(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("outside a world of 2"), "{e}");
    }
}
