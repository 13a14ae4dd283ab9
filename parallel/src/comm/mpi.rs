//! [`MpiComm`]: the communicator for CPU ranks that are processes (on one host or many), over
//! Open MPI through the `mpi` crate (cargo feature `mpi`).
//!
//! The processes are started by an MPI-aware launcher (`srun --mpi=pmix`, `mpirun`, or
//! `dalle-mesh launch`, which runs `mpirun`). [`init`] initialises MPI once per process;
//! [`MpiComm::mesh`] splits `MPI_COMM_WORLD` into this rank's tp group (ranks sharing its
//! dp_index, ordered by tp_index) and dp group (sharing its tp_index, ordered by dp_index).
//!
//! **Deterministic, and equal to [`super::ThreadComm`] bit for bit**: reductions never use
//! `MPI_Allreduce` (whose summation order depends on the algorithm MPI picks). Instead
//! - `all_reduce` = `MPI_Allgather` of every rank's buffer, then every rank sums the copies in
//!   rank order, exactly as `ThreadComm` does;
//! - `reduce_scatter` = `MPI_Alltoall` (rank `r` receives chunk `r` of every rank), then a
//!   rank-order sum of those chunks;
//! - `all_gather` = `MPI_Allgather`, `broadcast` = `MPI_Bcast`, `barrier` = `MPI_Barrier`.
//!
//! This moves `size` times the data of a ring all-reduce; it is the price of identical numbers
//! across transports (CPU ranks are for testing job scripts and small models).
//!
//! Every collective first all-gathers a four-word header (collective, length, op, root) so that
//! ranks calling different collectives get [`CommError::Mismatch`] instead of MPI truncation
//! errors. MPI calls cannot be interrupted: a dead or stuck peer is handled outside (the
//! rendezvous store announces deaths; [`super::inflight`] names the collective for the
//! watchdog). [`Communicator::abort`] calls `MPI_Abort`, which ends every process of the job.

use std::sync::{Mutex, PoisonError};

use ::mpi::collective::{CommunicatorCollectives as _, Root as _};
use ::mpi::environment::Universe;
use ::mpi::topology::Communicator as _;
use ::mpi::topology::{Color, SimpleCommunicator};
use ::mpi::Threading;
use dm_runtime::cpu::CpuBackend;

use super::{
    inflight, reduce_in_rank_order, CollectiveKind, CommError, CommStats, Communicator, ReduceOp, Result, StatsRecorder,
};
use crate::mesh::Mesh;

/// The MPI environment of this process (finalised by [`finalize`]).
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

/// This process's place in `MPI_COMM_WORLD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpiWorld {
    /// World rank.
    pub rank: usize,
    /// World size.
    pub size: usize,
}

/// Initialises MPI (once; later calls return the same world). Needs `MPI_THREAD_SERIALIZED`:
/// the rank's collectives come from its training thread, the watchdog never calls MPI.
pub fn init() -> Result<MpiWorld> {
    let mut u = UNIVERSE.lock().unwrap_or_else(PoisonError::into_inner);
    if u.is_none() {
        let (universe, provided) = ::mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| {
            dev_err("MPI_Init_thread", "MPI was already initialised or finalised in this process".into())
        })?;
        if !matches!(provided, Threading::Serialized | Threading::Multiple) {
            return Err(dev_err(
                "MPI_Init_thread",
                format!("the MPI library offers only {provided:?} threading; MPI_THREAD_SERIALIZED is needed"),
            ));
        }
        *u = Some(universe);
    }
    let world = SimpleCommunicator::world();
    Ok(MpiWorld { rank: world.rank() as usize, size: world.size() as usize })
}

/// Finalises MPI (`MPI_Finalize`); every [`MpiComm`] must have been dropped. Idempotent.
pub fn finalize() {
    drop(UNIVERSE.lock().unwrap_or_else(PoisonError::into_inner).take());
}

fn dev_err(op: &'static str, detail: String) -> CommError {
    CommError::Device { op, detail }
}

/// A communicator handle that may move between threads.
struct Handle(SimpleCommunicator);

// SAFETY: MPI was initialised with MPI_THREAD_SERIALIZED (checked in `init`), which allows MPI
// calls from any thread as long as they are not concurrent; every use of the handle goes through
// the `Mutex` in `MpiComm` and all handles of a process are used by its one training thread.
unsafe impl Send for Handle {}
// SAFETY: as above: shared references only reach MPI through `MpiComm`'s `Mutex`.
unsafe impl Sync for Handle {}

/// One rank's handle on one MPI group.
pub struct MpiComm {
    comm: Mutex<Handle>,
    rank: usize,
    size: usize,
    world_rank: usize,
    label: String,
    stats: StatsRecorder,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("label", &self.label)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("world_rank", &self.world_rank)
            .finish()
    }
}

/// The three communicators of one process rank.
#[derive(Debug)]
pub struct MpiRankComms {
    /// All ranks; group rank = world rank.
    pub world: MpiComm,
    /// This rank's tp group; group rank = tp_index.
    pub tp: MpiComm,
    /// This rank's dp group; group rank = dp_index.
    pub dp: MpiComm,
}

/// Header words of a call, compared across the group before the data moves.
const HEADER: usize = 4;

fn kind_code(k: CollectiveKind) -> u64 {
    CollectiveKind::ALL.iter().position(|&x| x == k).unwrap_or(0) as u64
}

fn op_code(op: Option<ReduceOp>) -> u64 {
    match op {
        None => 0,
        Some(ReduceOp::Sum) => 1,
        Some(ReduceOp::Avg) => 2,
        Some(ReduceOp::Max) => 3,
    }
}

impl MpiComm {
    /// The world, tp and dp communicators of this process in `mesh`; [`init`] first. Refuses a
    /// world whose size is not the mesh's.
    pub fn mesh(mesh: &Mesh) -> Result<MpiRankComms> {
        let w = init()?;
        if w.size != mesh.world() {
            return Err(dev_err(
                "MPI_Comm_split",
                format!(
                    "MPI_COMM_WORLD has {} processes but the mesh {mesh} needs {}: launch {} processes",
                    w.size,
                    mesh.world(),
                    mesh.world()
                ),
            ));
        }
        let world = SimpleCommunicator::world();
        let (d, t) = mesh.coords(w.rank);
        let split = |color: usize, key: usize, label: &str| -> Result<SimpleCommunicator> {
            world
                .split_by_color_with_key(Color::with_value(color as i32), key as i32)
                .ok_or_else(|| dev_err("MPI_Comm_split", format!("no communicator for the {label}")))
        };
        let tp_label = format!("tp group of dp_index {d}");
        let dp_label = format!("dp group of tp_index {t}");
        let tp = split(d, t, &tp_label)?;
        let dp = split(t, d, &dp_label)?;
        let make = |c: SimpleCommunicator, label: String| MpiComm {
            rank: c.rank() as usize,
            size: c.size() as usize,
            comm: Mutex::new(Handle(c)),
            world_rank: w.rank,
            label,
            stats: StatsRecorder::new(),
        };
        Ok(MpiRankComms {
            world: make(SimpleCommunicator::world(), format!("world ({mesh})")),
            tp: make(tp, tp_label),
            dp: make(dp, dp_label),
        })
    }

    /// The group's name in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// This rank in the whole world.
    pub fn world_rank(&self) -> usize {
        self.world_rank
    }

    /// Runs `f` on the communicator with the call marked in flight.
    fn with<T>(&self, kind: CollectiveKind, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let c = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        inflight::enter(|| format!("{} of the {}", kind.name(), self.label));
        let out = f(&c.0);
        inflight::leave();
        out
    }

    /// All-gathers the call's header and checks that every rank made the same call.
    fn agree(&self, kind: CollectiveKind, len: usize, op: Option<ReduceOp>, root: usize) -> Result<()> {
        if len.checked_mul(self.size).is_none_or(|n| n > i32::MAX as usize) {
            return Err(CommError::Shape {
                op: kind.name(),
                rank: self.world_rank,
                detail: format!("{len} elements × {} ranks exceed MPI's 2^31 element count", self.size),
            });
        }
        let mine = [kind_code(kind), len as u64, op_code(op), root as u64];
        let mut all = vec![0u64; HEADER * self.size];
        self.with(kind, |c| c.all_gather_into(&mine[..], &mut all[..]));
        let name = |code: u64| CollectiveKind::ALL.get(code as usize).map_or("?", |k| k.name());
        for (r, h) in all.chunks(HEADER).enumerate() {
            if h == mine {
                continue;
            }
            let detail = if h[0] != mine[0] {
                format!("this rank called {} but rank {r} of the group called {}", kind.name(), name(h[0]))
            } else if h[1] != mine[1] {
                format!("this rank passed {len} elements but rank {r} of the group passed {}", h[1])
            } else if h[2] != mine[2] {
                "the ranks reduce with different ops".to_string()
            } else {
                format!("this rank broadcasts from root {root} but rank {r} of the group from root {}", h[3])
            };
            return Err(CommError::Mismatch { op: kind.name(), detail: format!("in {}: {detail}", self.label) });
        }
        Ok(())
    }

    /// [`Communicator::all_reduce`] on a host slice: all-gather, then a rank-order reduction.
    pub fn all_reduce_slice(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let kind = CollectiveKind::AllReduce;
        self.agree(kind, buf.len(), Some(op), 0)?;
        let n = buf.len();
        let mut all = vec![0f32; n * self.size];
        self.with(kind, |c| c.all_gather_into(&buf[..], &mut all[..]));
        let (first, rest) = all.split_at_mut(n);
        let rest: Vec<&[f32]> = rest.chunks(n.max(1)).take(self.size - 1).collect();
        reduce_in_rank_order(first, &rest, op);
        buf.copy_from_slice(first);
        self.stats.record(kind, n);
        Ok(())
    }

    /// [`Communicator::all_gather`] on host slices.
    pub fn all_gather_slice(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::AllGather;
        self.agree(kind, send.len(), None, 0)?;
        if recv.len() != self.size * send.len() {
            return Err(CommError::Shape {
                op: kind.name(),
                rank: self.world_rank,
                detail: format!(
                    "recv has {} elements but must hold {} ranks × {} = {} in {}",
                    recv.len(),
                    self.size,
                    send.len(),
                    self.size * send.len(),
                    self.label
                ),
            });
        }
        self.with(kind, |c| c.all_gather_into(send, recv));
        self.stats.record(kind, send.len());
        Ok(())
    }

    /// [`Communicator::reduce_scatter`] on host slices: all-to-all, then a rank-order reduction.
    pub fn reduce_scatter_slice(&self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        let kind = CollectiveKind::ReduceScatter;
        self.agree(kind, send.len(), Some(op), 0)?;
        let n = send.len();
        if !n.is_multiple_of(self.size) || recv.len() != n / self.size {
            return Err(CommError::Shape {
                op: kind.name(),
                rank: self.world_rank,
                detail: format!(
                    "send has {n} elements and recv {}: send must be {} ranks × recv in {}",
                    recv.len(),
                    self.size,
                    self.label
                ),
            });
        }
        let m = recv.len();
        let mut mine = vec![0f32; n];
        self.with(kind, |c| c.all_to_all_into(send, &mut mine[..]));
        let (first, rest) = mine.split_at_mut(m);
        let rest: Vec<&[f32]> = rest.chunks(m.max(1)).take(self.size - 1).collect();
        reduce_in_rank_order(first, &rest, op);
        recv.copy_from_slice(first);
        self.stats.record(kind, n);
        Ok(())
    }

    /// [`Communicator::broadcast`] on a host slice (`root` is a group rank).
    pub fn broadcast_slice(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let kind = CollectiveKind::Broadcast;
        if root >= self.size {
            return Err(CommError::InvalidRoot { root, size: self.size });
        }
        self.agree(kind, buf.len(), None, root)?;
        self.with(kind, |c| c.process_at_rank(root as i32).broadcast_into(buf));
        self.stats.record(kind, buf.len());
        Ok(())
    }

    /// [`Communicator::barrier`].
    pub fn barrier(&self) -> Result<()> {
        let kind = CollectiveKind::Barrier;
        self.agree(kind, 0, None, 0)?;
        self.with(kind, |c| c.barrier());
        self.stats.record(kind, 0);
        Ok(())
    }
}

impl Communicator<CpuBackend> for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    host_slice_collectives!();
    fn barrier(&self) -> Result<()> {
        MpiComm::barrier(self)
    }
    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }
    fn abort(&self, reason: &str) {
        tracing::error!(rank = self.world_rank, reason, group = %self.label, "aborting every MPI process of the job");
        let c = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        c.0.abort(1)
    }
}
