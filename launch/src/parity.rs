//! `dalle-mesh parity`: the comparison itself is the library's ([`dm_model::parity`]); this
//! module adds where the ranks come from. Without a launcher the mesh ranks are threads; under
//! srun / mpirun / `dalle-mesh launch` each process is one rank over MPI (`--transport auto|mpi`),
//! and only world rank 0 returns the report. With `--device cuda` the ranks are threads of this
//! process, rank r on GPU r, over NCCL groups (as `train` makes them); **untested on GPUs**.

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

/// `parity --device/--precision`: fp32 on CPU ranks, or on CUDA ranks (threads of this process,
/// one GPU each, NCCL). Refused before anything runs: a precision other than fp32 (the fixtures
/// are fp32's; `cargo test -p dm-tests --test precision` checks bf16-mixed against its own
/// fixture), `--device cuda` without `tp × dp` usable GPUs (or NCCL for several ranks), and
/// `--device cuda` with `--transport threads|mpi` or under a launcher.
pub fn check_device(
    device: crate::device::Device,
    precision: dm_model::plan::Precision,
    ranks: usize,
    transport: Transport,
) -> Result<()> {
    crate::device::check(device, precision, ranks, ranks)?;
    if precision != dm_model::plan::Precision::Fp32 {
        return Err(crate::bad_input!(
            "not implemented: parity --precision {} against the fp32 fixtures; use --precision fp32",
            precision.name()
        ));
    }
    if device == crate::device::Device::Cuda {
        if !matches!(transport, Transport::Auto | Transport::Nccl) {
            return Err(crate::bad_input!(
                "parity --device cuda: its ranks talk over NCCL, not --transport {}; use --transport auto or nccl",
                format!("{transport:?}").to_lowercase()
            ));
        }
        if crate::world::detect()?.is_multi_process() {
            return Err(crate::bad_input!(
                "not implemented: parity --device cuda under a launcher (one process per GPU); run it as one \
                 process, whose --tp/--dp ranks are threads on GPUs 0..tp×dp"
            ));
        }
    }
    Ok(())
}

/// Parity of the fixture `dir` on a tp × dp mesh of CUDA ranks: threads of this process, rank r
/// on GPU r, NCCL groups with in-process ids (as `train` makes them), the same comparison and
/// tolerances as on CPU ranks (gpu-check's fixture rows pass them on the f32 path). Call
/// [`check_device`] first. Untested on GPUs.
pub fn run_cuda(dir: &Path, tp: usize, dp: usize) -> Result<ParityReport> {
    let fp32 = dm_model::plan::Precision::Fp32;
    if tp * dp == 1 {
        return Ok(run_on(crate::device::cuda_backend(0, fp32, None)?, dir)?);
    }
    let fx = Fixture::load(dir)?;
    let (mesh, _, _) = check_fixture_mesh(&fx, tp, dp)?;
    let ids = crate::trainer::ranks::InProcessIds::new(&mesh)?;
    let reports = dm_parallel::run_ranks(&mesh, |rank, _thread_comms| -> Result<Option<ParityReport>> {
        let be = crate::device::cuda_backend(rank, fp32, None)?;
        let g = ids.join(&mesh, rank, &be)?;
        let world = g.world.context("internal: a CUDA rank without its world group")?;
        Ok(rank_report_on(be, &fx, &mesh, rank, RankGroups { tp: g.tp, dp: g.dp, world })?)
    })
    .map_err(|f| anyhow::anyhow!("{f}"))?;
    reports.into_iter().next().flatten().context("internal: world rank 0 returned no report")
}

/// `--transport` of `parity`: `auto` (threads without a launcher, MPI between processes; NCCL
/// with `--device cuda`), `threads`, `mpi`, or `nccl` (with `--device cuda` only).
pub fn parse_transport(s: &str) -> std::result::Result<Transport, String> {
    match s {
        "auto" => Ok(Transport::Auto),
        "threads" => Ok(Transport::Threads),
        "mpi" => Ok(Transport::Mpi),
        "nccl" => Ok(Transport::Nccl),
        _ => Err(format!("{s:?} is not a transport: use auto, threads, mpi or nccl")),
    }
}
