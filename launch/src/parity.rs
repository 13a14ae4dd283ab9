//! `dalle-mesh parity`: the comparison itself is the library's ([`dm_model::parity`]); this
//! module adds where the ranks come from. Without a launcher the mesh ranks are threads; under
//! srun / mpirun / `dalle-mesh launch` each process is one rank over MPI (`--transport auto|mpi`),
//! and only world rank 0 returns the report.

use std::path::Path;

use anyhow::{Context, Result};
pub use dm_model::parity::*;

use crate::run_config::{RunConfig, Transport};

/// Parity on a tp × dp mesh: threads in this process, or this process's rank of a
/// multi-process run (then `None` on every rank but world rank 0).
pub fn run_ranks(dir: &Path, tp: usize, dp: usize, transport: Transport) -> Result<Option<ParityReport>> {
    let world = crate::world::detect()?;
    let mut cfg = RunConfig::default();
    (cfg.mesh.tp, cfg.mesh.dp, cfg.mesh.transport) = (tp, dp, transport);
    let mesh = dm_parallel::Mesh::new(tp, dp)?;
    if !world.is_multi_process() {
        crate::process_ranks::check_in_process_transport(&cfg, mesh)?;
        return Ok(Some(run_mesh(dir, tp, dp)?));
    }
    crate::process_ranks::check_transport_early(&cfg, &world, mesh)?;
    let fx = Fixture::load(dir)?;
    check_fixture_mesh(&fx, tp, dp)?;
    let mut procs = crate::process_ranks::join(&cfg, world, mesh)?;
    let result = (|| {
        procs.handshake(&cfg, 0)?;
        let (tp_comm, dp_comm, world_comm) = crate::process_ranks::mpi_groups(&mesh)?;
        let groups = RankGroups { tp: tp_comm, dp: dp_comm, world: world_comm };
        let report = rank_report(&fx, &mesh, procs.world.rank, groups).context("parity on this rank")?;
        crate::process_ranks::mpi_finalize();
        Ok(report)
    })();
    match result {
        Ok(report) => {
            procs.finish();
            Ok(report)
        }
        Err(e) => Err(procs.fail(e)),
    }
}

/// `parity --device/--precision`: the mesh parity runs CPU ranks in fp32. A precision the model
/// does not implement is refused, and so is `--device cuda` — without a usable GPU with the
/// driver's reason, with one as not implemented (`gpu-check` checks the fixtures on the GPU).
pub fn check_device(device: crate::device::Device, precision: dm_model::plan::Precision) -> Result<()> {
    crate::device::check(device, precision, 1, 1)?;
    if device == crate::device::Device::Cuda {
        return Err(crate::bad_input!(
            "not implemented: parity --device cuda (the mesh parity runs CPU ranks); `dalle-mesh gpu-check` checks \
             the parity fixtures on the GPU, or use --device cpu"
        ));
    }
    if precision != dm_model::plan::Precision::Fp32 {
        return Err(crate::bad_input!(
            "not implemented: parity --precision {} against the fp32 fixtures; use --precision fp32",
            precision.name()
        ));
    }
    Ok(())
}

/// `--transport` of `parity`: `auto` (threads without a launcher, MPI between processes),
/// `threads`, `mpi`, or `nccl` (refused: parity runs on CPU ranks).
pub fn parse_transport(s: &str) -> std::result::Result<Transport, String> {
    match s {
        "auto" => Ok(Transport::Auto),
        "threads" => Ok(Transport::Threads),
        "mpi" => Ok(Transport::Mpi),
        "nccl" => Ok(Transport::Nccl),
        _ => Err(format!("{s:?} is not a transport: use auto, threads, mpi or nccl")),
    }
}
