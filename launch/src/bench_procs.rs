//! `bench step` and `bench comm` when a launcher (`srun`, `mpirun`, `dalle-mesh launch`) started
//! one process per rank: the rank comes from the environment as `train` reads it
//! ([`crate::world`]), the processes meet at the rendezvous store and check they run the same
//! binary and arguments ([`crate::process_ranks`]), talk over MPI, and only world rank 0 reports
//! (the others send it what they measured through the store and print nothing).

use anyhow::{bail, Context, Result};
use dm_parallel::Mesh;
use dm_runtime::OpProfile;
use serde::{Deserialize, Serialize};

use crate::process_ranks::{ProcessGroups, ProcessRank};
use crate::run_config::RunConfig;
use crate::world::World;

/// The benchmark's processes, joined and agreed, with their MPI communicators.
pub struct BenchProcesses {
    pub rank: ProcessRank,
    pub groups: ProcessGroups,
}

/// Joins a multi-process benchmark on `mesh` (`what` names the command in the handshake, so two
/// ranks started with different arguments refuse to run together). `None` when no launcher
/// started this process (the ranks are then threads of this one).
pub fn join(mesh: Mesh, what: &str) -> Result<Option<BenchProcesses>> {
    let world = crate::world::detect()?;
    if !world.is_multi_process() {
        return Ok(None);
    }
    Ok(Some(join_world(world, mesh, what)?))
}

/// [`join`] for a command whose `--ranks` must be the launcher's world.
pub fn join_checked(mesh: Mesh, ranks: usize, what: &str) -> Result<Option<BenchProcesses>> {
    let world = crate::world::detect()?;
    if !world.is_multi_process() {
        return Ok(None);
    }
    check_ranks(ranks, world.size)?;
    Ok(Some(join_world(world, mesh, what)?))
}

fn join_world(world: World, mesh: Mesh, what: &str) -> Result<BenchProcesses> {
    let rank = join_agreed(world, mesh, what, crate::device::Device::Cpu)?;
    match crate::process_ranks::mpi_groups(&mesh) {
        Ok(groups) => Ok(BenchProcesses { rank, groups }),
        Err(e) => Err(rank.fail(e)),
    }
}

/// Joins the store and agrees with the other ranks (`what` stands in for the run config in the
/// handshake, so ranks started with different arguments refuse to run together).
fn join_agreed(world: World, mesh: Mesh, what: &str, device: crate::device::Device) -> Result<ProcessRank> {
    let mut cfg = RunConfig::default();
    (cfg.mesh.tp, cfg.mesh.dp, cfg.device) = (mesh.tp(), mesh.dp(), device);
    let mut rank = crate::process_ranks::join(&cfg, world, mesh)?;
    cfg.model.preset = Some(what.to_string());
    match rank.handshake(&cfg, 0) {
        Ok(()) => Ok(rank),
        Err(e) => Err(rank.fail(e)),
    }
}

/// [`join`] for CUDA ranks (one process per GPU): joined and agreed, without MPI; the caller
/// makes its NCCL communicators through the rank's store. `None` without a launcher.
pub fn join_cuda(mesh: Mesh, what: &str) -> Result<Option<ProcessRank>> {
    let world = crate::world::detect()?;
    if !world.is_multi_process() {
        return Ok(None);
    }
    Ok(Some(join_agreed(world, mesh, what, crate::device::Device::Cuda)?))
}

/// Runs `body` on a joined CUDA process rank: the store says goodbye on success; a failure is
/// reported to the other ranks.
pub fn run_cuda<T>(rank: ProcessRank, body: impl FnOnce(&ProcessRank) -> Result<T>) -> Result<T> {
    match body(&rank) {
        Err(e) => Err(rank.fail(e)),
        ok => {
            rank.finish();
            ok
        }
    }
}

/// Every rank but 0 publishes `mine` in the store; rank 0 gets them all, in rank order (its own
/// first). `None` on the other ranks.
pub fn gather_on_rank0<T: Serialize + for<'de> Deserialize<'de>>(
    rank: &ProcessRank,
    key: &str,
    mine: T,
) -> Result<Option<Vec<T>>> {
    let store = &rank.store;
    let me = rank.world.rank;
    if me != 0 {
        store.set(&format!("{key}/rank{me}"), &serde_json::to_string(&mine)?)?;
        return Ok(None);
    }
    let mut all = vec![mine];
    for r in 1..rank.world.size {
        let text = store.get(&format!("{key}/rank{r}")).with_context(|| format!("waiting for rank {r}'s {key}"))?;
        all.push(serde_json::from_str(&text).with_context(|| format!("rank {r}'s {key}"))?);
    }
    Ok(Some(all))
}

impl BenchProcesses {
    pub fn world_rank(&self) -> usize {
        self.rank.world.rank
    }

    /// [`gather_on_rank0`] of this process's rank.
    pub fn gather_on_rank0<T: Serialize + for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        mine: T,
    ) -> Result<Option<Vec<T>>> {
        gather_on_rank0(&self.rank, key, mine)
    }

    /// The clean end: the communicators go, MPI is finalised, the store says goodbye.
    pub fn finish(self) {
        drop(self.groups);
        crate::process_ranks::mpi_finalize();
        self.rank.finish();
    }

    /// This rank failed: tell the others, hand the error back.
    pub fn fail(self, e: anyhow::Error) -> anyhow::Error {
        self.rank.fail(e)
    }
}

/// Runs `body` on the joined processes; a failure is reported to the other ranks (they stop at
/// once) and MPI is finalised only on success (as `train` does).
pub fn run<T>(p: BenchProcesses, body: impl FnOnce(&BenchProcesses) -> Result<T>) -> Result<T> {
    match body(&p) {
        Ok(v) => {
            p.finish();
            Ok(v)
        }
        Err(e) => Err(p.fail(e)),
    }
}

/// What a rank of `bench step` sends rank 0: its timings, op profile and memory peak.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RankTotals {
    pub step_s: Vec<f64>,
    pub wait_s: Vec<f64>,
    /// `(calls, units, seconds)` per op class, in [`dm_runtime::OpClass`] order.
    pub profile: Vec<(u64, f64, f64)>,
    pub peak_bytes: u64,
}

impl RankTotals {
    pub fn profile_of(&self) -> Result<OpProfile> {
        let mut p = OpProfile::default();
        if self.profile.len() != p.classes.len() {
            bail!("a rank sent {} op classes, this build has {}", self.profile.len(), p.classes.len());
        }
        for (c, &(calls, units, seconds)) in p.classes.iter_mut().zip(&self.profile) {
            (c.calls, c.units, c.seconds) = (calls, units, seconds);
        }
        Ok(p)
    }

    pub fn profile_from(p: &OpProfile) -> Vec<(u64, f64, f64)> {
        p.classes.iter().map(|c| (c.calls, c.units, c.seconds)).collect()
    }
}

/// Refuses `--ranks` that isn't the world the launcher started.
pub fn check_ranks(ranks: usize, world_size: usize) -> Result<()> {
    if ranks != world_size {
        return Err(crate::bad_input!(
            "--ranks {ranks} but the launcher started {world_size} processes: pass --ranks {world_size}, or start \
             {ranks} (`dalle-mesh launch --nproc {ranks} -- bench comm ...`, `srun --mpi=pmix -n {ranks} ...`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_round_trip_their_profile() {
        let mut p = OpProfile::default();
        (p.classes[0].calls, p.classes[0].units, p.classes[0].seconds) = (3, 1.5e9, 0.25);
        (p.classes[6].calls, p.classes[6].units, p.classes[6].seconds) = (1, 8.0, 1e-6);
        let t =
            RankTotals { step_s: vec![1.0], wait_s: vec![0.1], profile: RankTotals::profile_from(&p), peak_bytes: 7 };
        let back: RankTotals = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.profile_of().unwrap(), p);
        let short = RankTotals { profile: vec![(1, 1.0, 1.0)], ..t };
        assert!(short.profile_of().unwrap_err().to_string().contains("op classes"));
    }

    #[test]
    fn ranks_must_be_the_world() {
        assert!(check_ranks(4, 4).is_ok());
        let e = check_ranks(2, 4).unwrap_err().to_string();
        assert!(e.contains("--ranks 2") && e.contains("started 4") && e.contains("--ranks 4"), "{e}");
    }
}
