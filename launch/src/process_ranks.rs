//! Ranks as processes: what `dalle-mesh train` does differently when a launcher (srun, mpirun,
//! `dalle-mesh launch`) started one process per rank.
//!
//! - [`join`] checks that the world is the mesh (`world size = tp · dp`), picks the transport
//!   (`mesh.transport`), connects to the rendezvous store of world rank 0, installs the failure
//!   handling, and returns a [`ProcessRank`].
//! - [`ProcessRank::handshake`]: every rank checks that all run the same binary, run config and
//!   resume step; a difference names the ranks.
//! - Failure: a rank that fails reports it through the store ([`ProcessRank::fail`]); a rank that
//!   dies is noticed by the store (its connection closes). Either way every other process logs
//!   `rank R failed: …`, names the collective it was waiting in, and exits with code 1 within about
//!   a second. A collective that waits longer than `DALLE_MESH_COMM_TIMEOUT_S` (default 60 s for
//!   processes) ends the process the same way, naming the collective.
//! - Checkpoint shards go through files ([`write_part`], [`read_parts`]): every rank writes its
//!   part next to the checkpoints, rank 0 assembles them after a barrier and publishes the
//!   checkpoint atomically, so the on-disk format is the thread mesh's. The run folder must be on
//!   a file system every node sees.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dm_parallel::rendezvous::Store;
use dm_parallel::{Communicator, Mesh};
use dm_runtime::cpu::CpuBackend;

use crate::run_config::{RunConfig, Transport};
use crate::world::{Launcher, World};

/// Collective timeout of process ranks when `DALLE_MESH_COMM_TIMEOUT_S` is unset.
pub const DEFAULT_PROCESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Exit code of a process that stops because another rank failed.
const PEER_FAILED_EXIT: i32 = 1;

/// The communicators of one process rank: `(tp, dp, world)`, tp/dp only where the axis is > 1.
pub type ProcessGroups = (
    Option<Arc<dyn Communicator<CpuBackend>>>,
    Option<Arc<dyn Communicator<CpuBackend>>>,
    Arc<dyn Communicator<CpuBackend>>,
);

/// This process's rank of a multi-process run.
pub struct ProcessRank {
    /// Where the launcher put us.
    pub world: World,
    /// The run's rendezvous store.
    pub store: Arc<Store>,
    /// Seconds from [`join`]'s start until the store answered every rank's handshake.
    pub rendezvous_s: f64,
    started: Instant,
}

/// The collective timeout of process ranks.
pub fn process_timeout() -> Duration {
    match std::env::var(dm_parallel::comm::threads::TIMEOUT_ENV) {
        Ok(_) => dm_parallel::comm::threads::default_timeout(),
        Err(_) => DEFAULT_PROCESS_TIMEOUT,
    }
}

/// The transport a process run uses: MPI for CPU ranks, NCCL for CUDA ranks.
fn check_transport(cfg: &RunConfig) -> Result<()> {
    if cfg.device == crate::device::Device::Cuda {
        return check_cuda_transport(cfg);
    }
    match cfg.mesh.transport {
        Transport::Auto | Transport::Mpi => {
            if cfg!(feature = "mpi") {
                Ok(())
            } else {
                Err(crate::bad_input!(
                    "this process is one rank of a multi-process run (CPU ranks talk over MPI) but this dalle-mesh was \
                     built without MPI: build it with `cargo build --release --features mpi` (needs Open MPI: \
                     apt-get install openmpi-bin libopenmpi-dev libclang-dev), or run all ranks as threads of one \
                     process (no srun/mpirun/launch)"
                ))
            }
        }
        Transport::Threads => Err(crate::bad_input!(
            "mesh.transport is threads but a launcher started several processes: run one process without \
             srun/mpirun/`dalle-mesh launch` (its ranks are threads), or set mesh.transport: auto"
        )),
        Transport::Nccl => Err(nccl_refused()),
    }
}

/// `mesh.transport: nccl` on CPU ranks: refused (bad input, exit 2); NCCL joins GPUs.
fn nccl_refused() -> anyhow::Error {
    crate::bad_input!(
        "mesh.transport nccl needs device: cuda (NCCL connects GPUs; CPU ranks talk over threads or MPI); set \
         device: cuda (or --device cuda), or mesh.transport: auto; nothing was written"
    )
}

/// CUDA ranks talk over NCCL (in one process and between processes): auto or nccl.
fn check_cuda_transport(cfg: &RunConfig) -> Result<()> {
    match cfg.mesh.transport {
        Transport::Auto | Transport::Nccl => Ok(()),
        t => Err(crate::bad_input!(
            "mesh.transport {} with device cuda: CUDA ranks talk over NCCL; set mesh.transport: auto (or nccl), or \
             device: cpu; nothing was written",
            serde_yaml::to_string(&t).unwrap_or_default().trim()
        )),
    }
}

/// The transport checks that need no rendezvous, run before anything is written: a transport
/// that does not fit the device or how this process was started is refused.
pub fn check_transport_early(cfg: &RunConfig, world: &World, mesh: Mesh) -> Result<()> {
    if world.is_multi_process() {
        check_world_size(world, mesh)?;
        check_transport(cfg)
    } else {
        check_in_process_transport(cfg, mesh)
    }
}

/// Refuses a transport that needs several processes when there is only this one.
pub fn check_in_process_transport(cfg: &RunConfig, mesh: Mesh) -> Result<()> {
    if cfg.device == crate::device::Device::Cuda && cfg.mesh.transport != Transport::Mpi {
        return check_cuda_transport(cfg);
    }
    match cfg.mesh.transport {
        Transport::Auto | Transport::Threads => Ok(()),
        Transport::Mpi => Err(crate::bad_input!(
            "mesh.transport is mpi but no launcher started this process: start {} processes with \
             `srun --mpi=pmix -n {}`, `mpirun -np {}` or `dalle-mesh launch --nproc {} -- train ...`, or set \
             mesh.transport: auto (threads in one process)",
            mesh.world(),
            mesh.world(),
            mesh.world(),
            mesh.world()
        )),
        Transport::Nccl => Err(nccl_refused()),
    }
}

/// Open MPI busy-polls inside collectives unless told it is oversubscribed, which mpirun knows
/// (`--oversubscribe`) but a direct `srun --mpi=pmix` launch does not: with more ranks than cores
/// the waiting ranks then starve the working ones (measured here: ×5 slower steps). Unless the
/// user chose, waiting ranks yield the CPU (`OMPI_MCA_mpi_yield_when_idle=1`; set it to 0 on
/// dedicated cores). Called before any other thread exists.
fn yield_while_waiting() {
    const VAR: &str = "OMPI_MCA_mpi_yield_when_idle";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

/// The world must be the mesh: `world size = tp · dp`.
fn check_world_size(world: &World, mesh: Mesh) -> Result<()> {
    if world.size != mesh.world() {
        let cause = match world.launcher {
            Launcher::Slurm => "check --ntasks (srun -n / #SBATCH --ntasks) against mesh.tp × mesh.dp",
            Launcher::OpenMpi => "check mpirun -np against mesh.tp × mesh.dp",
            _ => "check --nproc against mesh.tp × mesh.dp",
        };
        Err(crate::bad_input!(
            "the launcher started {} processes but the mesh tp={} × dp={} needs {}: {cause} (an sbatch script that \
             runs dalle-mesh without srun starts only one)",
            world.size,
            mesh.tp(),
            mesh.dp(),
            mesh.world()
        ))
    } else {
        Ok(())
    }
}

/// Joins the run as one of several processes (see the module docs).
pub fn join(cfg: &RunConfig, world: World, mesh: Mesh) -> Result<ProcessRank> {
    let started = Instant::now();
    check_world_size(&world, mesh)?;
    check_transport(cfg)?;
    yield_while_waiting();
    let timeout = process_timeout();
    let rank = world.rank;
    let hook: dm_parallel::rendezvous::PeerFailureHook = Arc::new(move |failed, reason: &str| {
        let here = dm_parallel::comm::inflight::describe();
        tracing::error!("rank {rank}: stopping because rank {failed} failed: {reason} (this rank was {here})");
        // Give the main thread a moment to fail on its own (a store call returns the error).
        std::thread::sleep(Duration::from_millis(500));
        std::process::exit(PEER_FAILED_EXIT);
    });
    let addr = world.store_addr();
    let store = Arc::new(
        Store::connect(&addr, rank, world.size, timeout.max(Duration::from_secs(30)), hook)
            .with_context(|| format!("rank {rank} joining the run's rendezvous store"))?,
    );
    let s = store.clone();
    dm_parallel::comm::inflight::start_watchdog(timeout, move |msg| {
        let msg = format!("rank {rank} {msg}");
        tracing::error!("{msg}");
        s.report_failure(&msg);
        std::thread::sleep(Duration::from_millis(300));
        std::process::exit(PEER_FAILED_EXIT);
    });
    tracing::info!(rank, world = world.size, launcher = ?world.launcher, store = %addr, "joined the run");
    Ok(ProcessRank { world, store, rendezvous_s: 0.0, started })
}

/// CRC32 of this executable: two ranks with different builds must not train together.
fn binary_fingerprint() -> String {
    let crc = std::env::current_exe()
        .and_then(std::fs::File::open)
        .and_then(|mut f| {
            let mut h = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(h.finalize())
        })
        .map_or_else(|e| format!("unreadable ({e})"), |c| format!("{c:08x}"));
    format!("dalle-mesh {} (binary crc32 {crc})", env!("CARGO_PKG_VERSION"))
}

impl ProcessRank {
    /// Every rank publishes its binary, run config and resume step and compares them with the others.
    pub fn handshake(&mut self, cfg: &RunConfig, resume_step: u64) -> Result<()> {
        let yaml = serde_yaml::to_string(cfg)?;
        let config_crc = format!("crc32 {:08x}: {}", crc32fast::hash(yaml.as_bytes()), yaml.replace('\n', " "));
        let facts =
            [("binary", binary_fingerprint()), ("run config", config_crc), ("resume step", resume_step.to_string())];
        self.store.handshake(&facts).map_err(|e| anyhow::anyhow!("rank {}: {e}", self.world.rank))?;
        self.rendezvous_s = self.started.elapsed().as_secs_f64();
        tracing::info!(rank = self.world.rank, seconds = self.rendezvous_s, "every rank agrees (handshake done)");
        Ok(())
    }

    /// A barrier over the store (for moments without communicators, e.g. preparing data).
    pub fn barrier(&self, name: &str) -> Result<()> {
        self.store.barrier(name).map_err(|e| anyhow::anyhow!("rank {}: {e}", self.world.rank))
    }

    /// This rank failed with `err`: tell the others (they stop at once) and hand the error back.
    pub fn fail(&self, err: anyhow::Error) -> anyhow::Error {
        self.store.report_failure(&format!("{err:#}"));
        err
    }

    /// A clean end: goodbye to the store; rank 0 waits until every rank has said it.
    pub fn finish(self) {
        self.store.finish();
    }
}

/// The MPI communicators of this process (cargo feature `mpi`).
#[cfg(feature = "mpi")]
pub fn mpi_groups(mesh: &Mesh) -> Result<ProcessGroups> {
    let c = dm_parallel::comm::mpi::MpiComm::mesh(mesh).context("setting up the MPI communicators")?;
    let arc = |c: dm_parallel::comm::mpi::MpiComm| -> Arc<dyn Communicator<CpuBackend>> { Arc::new(c) };
    Ok(((mesh.tp() > 1).then(|| arc(c.tp)), (mesh.dp() > 1).then(|| arc(c.dp)), arc(c.world)))
}

/// Without the `mpi` feature [`join`] has already refused the run.
#[cfg(not(feature = "mpi"))]
pub fn mpi_groups(_mesh: &Mesh) -> Result<ProcessGroups> {
    bail!("this dalle-mesh was built without MPI: build it with `cargo build --release --features mpi`")
}

/// Finalises MPI (after every communicator was dropped).
pub fn mpi_finalize() {
    #[cfg(feature = "mpi")]
    dm_parallel::comm::mpi::finalize();
}

// ---- checkpoint parts -------------------------------------------------------------------------

/// The folder of the parts of the checkpoint being gathered (one at a time: every rank writes
/// after the previous save's closing barrier, rank 0 removes it after reading).
pub fn parts_dir(out: &Path) -> PathBuf {
    out.join("checkpoints").join(".parts")
}

/// One rank's shards: `(dp_index, tp_index, [params, m, v])`.
pub type Part = (usize, usize, [Vec<Vec<f32>>; 3]);

fn put_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

/// Writes this rank's part atomically (`rank<R>.part`).
pub fn write_part(dir: &Path, rank: usize, part: &Part) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"DMPART01");
    put_u64(&mut bytes, part.0 as u64);
    put_u64(&mut bytes, part.1 as u64);
    for group in &part.2 {
        put_u64(&mut bytes, group.len() as u64);
        for t in group {
            put_u64(&mut bytes, t.len() as u64);
            bytes.extend(t.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
    crate::atomic_write(&dir.join(format!("rank{rank}.part")), &bytes)
}

/// Reads the parts of ranks `0..world` from `dir`.
pub fn read_parts(dir: &Path, world: usize) -> Result<Vec<Part>> {
    (0..world).map(|r| read_part(&dir.join(format!("rank{r}.part")))).collect()
}

fn read_part(path: &Path) -> Result<Part> {
    let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint part {}", path.display()))?;
    let mut r = PartReader { bytes: &bytes, at: 0, path };
    if r.take(8)? != b"DMPART01" {
        bail!("{} is not a dalle-mesh checkpoint part", path.display());
    }
    let (dp, tp) = (r.u64()? as usize, r.u64()? as usize);
    let mut groups: [Vec<Vec<f32>>; 3] = Default::default();
    for g in groups.iter_mut() {
        let n = r.u64()? as usize;
        for _ in 0..n {
            let len = r.u64()? as usize;
            let raw = r.take(len.checked_mul(4).context("tensor length overflows")?)?;
            g.push(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        }
    }
    Ok((dp, tp, groups))
}

struct PartReader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> PartReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).context("length overflows")?;
        let s = self.bytes.get(self.at..end).with_context(|| format!("{} is truncated", self.path.display()))?;
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_refuse_damage() {
        let dir = std::env::temp_dir().join(format!("dm-parts-{}", std::process::id()));
        let part: Part = (1, 0, [vec![vec![1.5, -2.0], vec![]], vec![vec![3.0]], vec![vec![f32::MIN_POSITIVE]]]);
        write_part(&dir, 2, &part).unwrap();
        let path = dir.join("rank2.part");
        assert_eq!(read_part(&path).unwrap(), part);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(format!("{:#}", read_part(&path).unwrap_err()).contains("truncated"));
        std::fs::write(&path, b"garbage!garbage!").unwrap();
        assert!(format!("{:#}", read_part(&path).unwrap_err()).contains("not a dalle-mesh checkpoint part"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn wrong_world_and_missing_mpi_are_refused_clearly() {
        let cfg = RunConfig::default();
        let world = World { launcher: Launcher::Slurm, rank: 0, size: 3, ..World::single() };
        let e = format!("{:#}", join(&cfg, world, Mesh::new(2, 2).unwrap()).err().unwrap());
        assert!(e.contains("started 3 processes") && e.contains("needs 4") && e.contains("--ntasks"), "{e}");
        let mut threads = cfg.clone();
        threads.mesh.transport = Transport::Threads;
        assert!(format!("{:#}", check_transport(&threads).unwrap_err()).contains("mesh.transport is threads"));
        if !cfg!(feature = "mpi") {
            let e = format!("{:#}", check_transport(&cfg).unwrap_err());
            assert!(e.contains("cargo build --release --features mpi"), "{e}");
        }
    }
}
