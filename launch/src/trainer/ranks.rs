//! One backend and its communicators per rank, then a [`Trainer`] on each:
//!
//! | device | ranks                      | backend per rank            | tp / dp / world groups      |
//! |--------|----------------------------|-----------------------------|-----------------------------|
//! | cpu    | one                        | `CpuBackend`                | none                        |
//! | cpu    | threads of this process    | `CpuBackend`                | `ThreadComm`                |
//! | cpu    | processes (srun, mpirun…)  | `CpuBackend`                | `MpiComm`                   |
//! | cuda   | one                        | `CudaBackend` on GPU 0      | none                        |
//! | cuda   | threads of this process    | `CudaBackend` on GPU = rank | `NcclComm`, ids in-process  |
//! | cuda   | processes                  | GPU = `LOCAL_RANK`          | `NcclComm`, ids via store   |
//!
//! The CUDA rows are **untested on GPUs** (written without one); without a GPU `train` refuses
//! them before anything is written ([`crate::device::check`]).

use super::{Groups, RankOutcome, Shared, Trainer};
use crate::process_ranks::ProcessRank;
use anyhow::Result;
use dm_parallel::comm::nccl::{NcclComm, NcclId, NcclOptions};
use dm_parallel::{Communicator, Mesh, ThreadComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::cuda::CudaBackend;
use std::sync::Arc;

/// Trains this process's ranks of the run `sh` on `sh.cfg.device`: world rank 0's outcome (the
/// largest peak over the ranks of this process).
pub fn train_here(sh: &Shared, procs: Option<&ProcessRank>) -> Result<RankOutcome> {
    match sh.cfg.device {
        crate::device::Device::Cpu => train_cpu(sh, procs),
        crate::device::Device::Cuda => train_cuda(sh, procs),
    }
}

fn train_cpu(sh: &Shared, procs: Option<&ProcessRank>) -> Result<RankOutcome> {
    let mesh = sh.mesh;
    let backend = |rank: usize| {
        let name = if mesh.world() == 1 { "cpu:0".to_string() } else { format!("cpu:rank{rank}") };
        CpuBackend::with_budget(&name, sh.budget)
    };
    if let Some(p) = procs {
        let (tp, dp, world) = crate::process_ranks::mpi_groups(&mesh)?;
        let rank = p.world.rank;
        // On failure MPI is not finalised (MPI_Finalize would wait for ranks stuck in a collective):
        // the caller reports the failure through the store and the process exits.
        let outcome = Trainer::new(rank, backend(rank), Groups { tp, dp, world: Some(world) }, sh)?.run()?;
        crate::process_ranks::mpi_finalize();
        return Ok(outcome);
    }
    if mesh.world() == 1 {
        return Trainer::new(0, backend(0), Groups::single(), sh)?.run();
    }
    let results = dm_parallel::run_ranks(&mesh, |rank, comms| {
        let arc = |c: ThreadComm| -> Arc<dyn Communicator<CpuBackend>> { Arc::new(c) };
        let groups = Groups {
            tp: (mesh.tp() > 1).then(|| arc(comms.tp)),
            dp: (mesh.dp() > 1).then(|| arc(comms.dp)),
            world: Some(arc(comms.world)),
        };
        Trainer::new(rank, backend(rank), groups, sh)?.run()
    })
    .map_err(|f| anyhow::anyhow!("{f}"))?;
    first_with_peak(results)
}

/// World rank 0's outcome with the largest peak of every rank.
fn first_with_peak(results: Vec<RankOutcome>) -> Result<RankOutcome> {
    let peak = results.iter().map(|r| r.peak_bytes).max().unwrap_or(0);
    let mut first = results.into_iter().next().ok_or_else(|| anyhow::anyhow!("internal: no rank ran"))?;
    first.peak_bytes = peak;
    Ok(first)
}

fn train_cuda(sh: &Shared, procs: Option<&ProcessRank>) -> Result<RankOutcome> {
    let mesh = sh.mesh;
    let backend = |gpu: usize| crate::device::cuda_backend(gpu, sh.cfg.precision, sh.budget);
    if let Some(p) = procs {
        let rank = p.world.rank;
        let be = backend(p.world.local_rank)?;
        let c = NcclComm::mesh(&be, &mesh, rank, &p.store, NcclOptions::default())?;
        let groups = nccl_groups(&mesh, c.tp, c.dp, c.world);
        return Trainer::new(rank, be, groups, sh)?.run();
    }
    if mesh.world() == 1 {
        return Trainer::new(0, backend(0)?, Groups::single(), sh)?.run();
    }
    // One process driving several GPUs: rank r on GPU r; every group's NCCL id is made here and
    // shared in memory.
    let ids = InProcessIds::new(&mesh)?;
    let results = dm_parallel::run_ranks(&mesh, |rank, _thread_comms| {
        let be = backend(rank)?;
        let groups = ids.join(&mesh, rank, &be)?;
        Trainer::new(rank, be, groups, sh)?.run()
    })
    .map_err(|f| anyhow::anyhow!("{f}"))?;
    first_with_peak(results)
}

/// The NCCL ids of every group of a mesh whose ranks are threads of this process.
pub(crate) struct InProcessIds {
    world: NcclId,
    /// By dp_index.
    tp: Vec<NcclId>,
    /// By tp_index.
    dp: Vec<NcclId>,
}

impl InProcessIds {
    pub(crate) fn new(mesh: &Mesh) -> Result<Self> {
        let ids = |n: usize| (0..n).map(|_| NcclId::new()).collect::<Result<Vec<_>, _>>();
        Ok(Self { world: NcclId::new()?, tp: ids(mesh.dp())?, dp: ids(mesh.tp())? })
    }

    /// Thread rank `rank`'s NCCL groups on `be` (every rank of the mesh must call this at once:
    /// each group's initialisation waits for all its members).
    pub(crate) fn join(&self, mesh: &Mesh, rank: usize, be: &CudaBackend) -> Result<Groups<CudaBackend>> {
        let (d, t) = mesh.coords(rank);
        let opts = NcclOptions::default();
        let join = |id: &NcclId, members: &[usize], label: &str| -> Result<NcclComm> {
            let r = members
                .iter()
                .position(|&m| m == rank)
                .ok_or_else(|| anyhow::anyhow!("internal: rank {rank} outside its {label}"))?;
            Ok(NcclComm::new(be, id, r, members.len(), label, opts)?)
        };
        // The same order on every rank (world, tp, dp), which cannot deadlock.
        let world = join(&self.world, &(0..mesh.world()).collect::<Vec<_>>(), "world")?;
        let tp = join(&self.tp[d], &mesh.tp_group(rank), &format!("tp group of dp_index {d}"))?;
        let dp = join(&self.dp[t], &mesh.dp_group(rank), &format!("dp group of tp_index {t}"))?;
        Ok(nccl_groups(mesh, tp, dp, world))
    }
}

/// A rank's groups over NCCL (tp and dp only where the axis is > 1).
pub(crate) fn nccl_groups(mesh: &Mesh, tp: NcclComm, dp: NcclComm, world: NcclComm) -> Groups<CudaBackend> {
    let arc = |c: NcclComm| -> Arc<dyn Communicator<CudaBackend>> { Arc::new(c) };
    Groups { tp: (mesh.tp() > 1).then(|| arc(tp)), dp: (mesh.dp() > 1).then(|| arc(dp)), world: Some(arc(world)) }
}

/// How many GPUs of this host the ranks of this process use (the largest ordinal + 1).
pub fn gpus_needed_here(mesh: &Mesh, local_rank: Option<usize>) -> usize {
    match local_rank {
        Some(l) => l + 1,
        None => mesh.world(),
    }
}
