//! Communicators: the collectives that tie the ranks of a mesh together.
//!
//! [`Communicator<B>`] is the one interface the model sees. It works on device buffers `B::Buf` of
//! a [`Backend`], so the tensor-parallel layers and the data-parallel gradient averaging are written
//! once and run on any transport:
//!
//! - [`SoloComm`]: the one-rank group (tp = 1 or dp = 1); every collective is an identity copy.
//! - [`ThreadComm`] (in [`threads`]): ranks are threads of one process with `B = CpuBackend`; a
//!   Mutex + Condvar rendezvous on host slices. This is what the multi-rank tests and CPU training use.
//! - [`mpi::MpiComm`] (cargo feature `mpi`): ranks are processes, on one host or many, over Open
//!   MPI; reductions gather every rank's buffer and sum in rank order, so the numbers equal
//!   `ThreadComm`'s bit for bit.
//! - [`nccl::NcclComm`]: `B` is the CUDA backend and `B::Buf` a device pointer plus length. Each
//!   communicator owns an `ncclComm_t` and a side stream; a collective enqueues
//!   `ncclAllReduce`/`ncclAllGather`/`ncclReduceScatter`/`ncclBroadcast` there, ordered after the
//!   compute stream by events. `Avg` maps to `ncclAvg`, `abort` to `ncclCommAbort` on this rank,
//!   timeouts to polling `ncclCommGetAsyncError`. Its group ids are exchanged by
//!   [`nccl_rendezvous`].
//!
//! Every implementation keeps the contracts documented on [`Communicator`]: the same calls in the
//! same order on every rank of a group, results identical on every rank, no hang when a rank fails
//! ([`Communicator::abort`] and timeouts), and the byte accounting of [`CommStats`].

/// The four data collectives of a `Communicator<CpuBackend>` whose type has host-slice methods
/// (`all_reduce_slice`, `all_gather_slice`, `reduce_scatter_slice`, `broadcast_slice`): used in
/// the trait impls of [`ThreadComm`] and `MpiComm`, so the adaptation is written once. Buffers are
/// read and written as f32 (`values`/`values_mut`): a bf16 buffer is combined in f32 and rounded
/// once into its bf16 elements.
macro_rules! host_slice_collectives {
    () => {
        fn all_reduce(
            &self,
            buf: &mut dm_runtime::cpu::CpuBuf,
            op: $crate::comm::ReduceOp,
        ) -> $crate::comm::Result<()> {
            self.all_reduce_slice(&mut buf.values_mut(), op)
        }
        fn all_gather(
            &self,
            send: &dm_runtime::cpu::CpuBuf,
            recv: &mut dm_runtime::cpu::CpuBuf,
        ) -> $crate::comm::Result<()> {
            self.all_gather_slice(&send.values(), &mut recv.values_mut())
        }
        fn reduce_scatter(
            &self,
            send: &dm_runtime::cpu::CpuBuf,
            recv: &mut dm_runtime::cpu::CpuBuf,
            op: $crate::comm::ReduceOp,
        ) -> $crate::comm::Result<()> {
            self.reduce_scatter_slice(&send.values(), &mut recv.values_mut(), op)
        }
        fn broadcast(&self, buf: &mut dm_runtime::cpu::CpuBuf, root: usize) -> $crate::comm::Result<()> {
            self.broadcast_slice(&mut buf.values_mut(), root)
        }
    };
}

pub mod bandwidth;
pub mod deferred;
pub mod host_staged;
pub mod inflight;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod nccl;
pub mod nccl_rendezvous;
pub mod solo;
pub mod threads;
pub mod timed;

use std::sync::atomic::{AtomicU64, Ordering};

use dm_runtime::Backend;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use solo::SoloComm;
pub use threads::{run_ranks, run_ranks_on, RankComms, RankFailure, ThreadComm};
pub use timed::{CommTimes, TimedComm};

/// How the elements of the ranks' buffers are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    /// Σ over ranks, added in rank order.
    Sum,
    /// The rank-ordered sum divided by the group size.
    Avg,
    /// Element-wise maximum; NaN if any rank holds NaN there.
    Max,
}

impl ReduceOp {
    /// Lower-case name, as in error messages.
    pub fn name(&self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
        }
    }
}

/// Everything a collective can fail with. Clone so that one failure seen by a whole group (a
/// mismatch) can be handed to every rank.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CommError {
    /// The group was aborted: `rank` (a world rank) failed with `reason`; this rank stops too.
    #[error("communicator aborted because rank {rank} failed: {reason}")]
    Aborted {
        /// World rank that aborted the group first.
        rank: usize,
        /// Why it did.
        reason: String,
    },
    /// This rank waited longer than the communicator's timeout for the other ranks.
    #[error(
        "rank {rank} timed out after {waited_s:.1} s in {op} waiting for ranks {missing:?}: they are stuck, \
         crashed or skipped a collective; if the work between collectives is legitimately that slow, raise \
         DALLE_MESH_COMM_TIMEOUT_S"
    )]
    Timeout {
        /// The collective.
        op: &'static str,
        /// World rank that timed out.
        rank: usize,
        /// Seconds waited.
        waited_s: f64,
        /// World ranks that had not arrived (empty if they had all arrived but the round did not finish).
        missing: Vec<usize>,
    },
    /// Ranks of one group disagree on the call: different collectives, lengths, ops or roots.
    #[error("collective mismatch in {op}: {detail}; every rank of a group must make the same calls in the same order with the same lengths")]
    Mismatch {
        /// The collective (as called by the group's first rank).
        op: &'static str,
        /// Which ranks passed what.
        detail: String,
    },
    /// A buffer has the wrong length for the collective (e.g. all_gather recv not `size · send`).
    #[error("bad buffer for {op} on rank {rank}: {detail}")]
    Shape {
        /// The collective.
        op: &'static str,
        /// World rank that passed it.
        rank: usize,
        /// Expected and found lengths.
        detail: String,
    },
    /// A broadcast root outside the group.
    #[error("broadcast root {root} is outside the group of {size} ranks")]
    InvalidRoot {
        /// Root as passed (a rank of the group, not a world rank).
        root: usize,
        /// Group size.
        size: usize,
    },
    /// The device failed while moving data.
    #[error("device error in {op}: {detail}")]
    Device {
        /// The collective.
        op: &'static str,
        /// The backend's message.
        detail: String,
    },
}

/// Result of a collective.
pub type Result<T> = std::result::Result<T, CommError>;

/// The collectives, for statistics and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CollectiveKind {
    /// [`Communicator::all_reduce`].
    AllReduce,
    /// [`Communicator::all_gather`].
    AllGather,
    /// [`Communicator::reduce_scatter`].
    ReduceScatter,
    /// [`Communicator::broadcast`].
    Broadcast,
    /// [`Communicator::barrier`].
    Barrier,
}

impl CollectiveKind {
    /// Every kind, in [`CommStats`] field order.
    pub const ALL: [CollectiveKind; 5] = [
        CollectiveKind::AllReduce,
        CollectiveKind::AllGather,
        CollectiveKind::ReduceScatter,
        CollectiveKind::Broadcast,
        CollectiveKind::Barrier,
    ];

    /// snake_case name, as in messages and stats.
    pub fn name(&self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::Barrier => "barrier",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Calls and bytes of one collective kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStats {
    /// Completed calls.
    pub calls: u64,
    /// Payload bytes this rank contributed (see [`CommStats`]).
    pub bytes: u64,
}

/// Per-kind traffic of one communicator handle (one rank of one group).
///
/// **Byte definition**: `bytes` counts the payload this rank *contributes*: `4 · len` of the buffer
/// it passes in, i.e. the buffer for all_reduce and broadcast (on every rank, root or not), the
/// *send* buffer for all_gather (its recv is `size` times larger) and for reduce_scatter (its recv
/// is `size` times smaller); a barrier counts 0 bytes. Only calls that complete successfully are
/// counted. This is transport-independent (it is not wire traffic: a ring all-reduce moves
/// `2·(size-1)/size` times this), so the same numbers come out of every [`Communicator`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommStats {
    /// all_reduce calls and bytes.
    pub all_reduce: OpStats,
    /// all_gather calls and bytes (send length).
    pub all_gather: OpStats,
    /// reduce_scatter calls and bytes (send length).
    pub reduce_scatter: OpStats,
    /// broadcast calls and bytes.
    pub broadcast: OpStats,
    /// barrier calls (bytes always 0).
    pub barrier: OpStats,
}

impl CommStats {
    /// The counters of one kind.
    pub fn get(&self, kind: CollectiveKind) -> OpStats {
        match kind {
            CollectiveKind::AllReduce => self.all_reduce,
            CollectiveKind::AllGather => self.all_gather,
            CollectiveKind::ReduceScatter => self.reduce_scatter,
            CollectiveKind::Broadcast => self.broadcast,
            CollectiveKind::Barrier => self.barrier,
        }
    }

    fn get_mut(&mut self, kind: CollectiveKind) -> &mut OpStats {
        match kind {
            CollectiveKind::AllReduce => &mut self.all_reduce,
            CollectiveKind::AllGather => &mut self.all_gather,
            CollectiveKind::ReduceScatter => &mut self.reduce_scatter,
            CollectiveKind::Broadcast => &mut self.broadcast,
            CollectiveKind::Barrier => &mut self.barrier,
        }
    }

    /// Calls of every kind together.
    pub fn total_calls(&self) -> u64 {
        CollectiveKind::ALL.iter().map(|&k| self.get(k).calls).sum()
    }

    /// Bytes of every kind together.
    pub fn total_bytes(&self) -> u64 {
        CollectiveKind::ALL.iter().map(|&k| self.get(k).bytes).sum()
    }

    /// Field-wise sum (e.g. a rank's tp and dp communicators together).
    pub fn merged(&self, other: &CommStats) -> CommStats {
        let mut out = *self;
        for k in CollectiveKind::ALL {
            let o = other.get(k);
            let s = out.get_mut(k);
            s.calls += o.calls;
            s.bytes += o.bytes;
        }
        out
    }
}

/// Lock-free counters behind [`Communicator::stats`], for implementations to share.
#[derive(Debug, Default)]
pub struct StatsRecorder {
    calls: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
}

impl StatsRecorder {
    /// Zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one completed call of `kind` that contributed `elems` f32 (4 bytes each). Every
    /// transport sends f32: the CPU transports (threads, MPI, host-staged) move bf16 buffers widened
    /// to f32 host data and combine them in f32, and NCCL all-reduces a bf16 buffer through an f32
    /// copy (its other collectives take f32 only), so 4 bytes per element is what is actually sent
    /// whatever the buffer's dtype.
    pub fn record(&self, kind: CollectiveKind, elems: usize) {
        self.calls[kind.index()].fetch_add(1, Ordering::Relaxed);
        self.bytes[kind.index()].fetch_add(4 * elems as u64, Ordering::Relaxed);
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> CommStats {
        let mut s = CommStats::default();
        for k in CollectiveKind::ALL {
            let o = s.get_mut(k);
            o.calls = self.calls[k.index()].load(Ordering::Relaxed);
            o.bytes = self.bytes[k.index()].load(Ordering::Relaxed);
        }
        s
    }
}

/// A group of ranks exchanging device buffers of backend `B`.
///
/// Contract for every implementation:
/// - Every rank of the group makes the same collective calls in the same order, with equal lengths
///   (and equal op and root); disagreement is reported as [`CommError::Mismatch`] where detectable.
/// - Results are bit-identical on every rank; reductions combine ranks in rank order, so they do not
///   depend on arrival order.
/// - No call hangs forever: it fails with [`CommError::Aborted`] once any rank of the group (or of
///   the same mesh) calls [`Communicator::abort`], and with [`CommError::Timeout`] after the
///   implementation's timeout.
/// - Ranks are numbered `0..size()` within the group.
pub trait Communicator<B: Backend>: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// `buf = op(buf of every rank)`, in place, on every rank.
    fn all_reduce(&self, buf: &mut B::Buf, op: ReduceOp) -> Result<()>;
    /// `recv = concat(send of rank 0, send of rank 1, …)`; `recv.len() == size · send.len()`.
    fn all_gather(&self, send: &B::Buf, recv: &mut B::Buf) -> Result<()>;
    /// `send.len() == size · n`; rank `r` gets `recv = op over ranks of send[r·n .. (r+1)·n]`.
    fn reduce_scatter(&self, send: &B::Buf, recv: &mut B::Buf, op: ReduceOp) -> Result<()>;
    /// Every rank's `buf` becomes `root`'s (`root` is a rank of this group).
    fn broadcast(&self, buf: &mut B::Buf, root: usize) -> Result<()>;
    /// Returns once every rank of the group has entered it.
    fn barrier(&self) -> Result<()>;
    /// This handle's counters (see [`CommStats`] for the byte definition).
    fn stats(&self) -> CommStats;
    /// Marks the whole group (for [`ThreadComm`]: the whole mesh) failed: every rank blocked in or
    /// entering a collective returns [`CommError::Aborted`] naming this rank and `reason`. The first
    /// abort wins; later ones are ignored.
    fn abort(&self, reason: &str);
    /// The collectives this communicator can leave in flight beside the compute order
    /// ([`deferred`]: NCCL's side stream); `None` (the default): only the blocking ones.
    fn deferred(&self) -> Option<&dyn deferred::DeferredCollectives<B>> {
        None
    }
}

/// The abort state of a communicator that aborts alone (no peers to tell): the first reason wins,
/// and every later collective fails with it.
#[derive(Debug, Default)]
pub(crate) struct AbortSlot(std::sync::Mutex<Option<String>>);

impl AbortSlot {
    /// Records `reason`; true when it is the first (the caller then logs and tears down).
    pub(crate) fn set(&self, reason: &str) -> bool {
        let mut slot = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_some() {
            return false;
        }
        *slot = Some(reason.to_string());
        true
    }
    /// `Err(Aborted)` naming group rank `rank` once a reason was set.
    pub(crate) fn check(&self, rank: usize) -> Result<()> {
        match &*self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(reason) => Err(CommError::Aborted { rank, reason: reason.clone() }),
            None => Ok(()),
        }
    }
}

/// Reduces `contributions` (in rank order) into the first one, in place; all slices have equal length.
pub(crate) fn reduce_in_rank_order(acc: &mut [f32], rest: &[&[f32]], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            for other in rest {
                for (a, &b) in acc.iter_mut().zip(other.iter()) {
                    *a += b;
                }
            }
            if op == ReduceOp::Avg {
                let n = (rest.len() + 1) as f32;
                for a in acc.iter_mut() {
                    *a /= n;
                }
            }
        }
        ReduceOp::Max => {
            for other in rest {
                for (a, &b) in acc.iter_mut().zip(other.iter()) {
                    *a = max_nan(*a, b);
                }
            }
        }
    }
}

/// `max` that propagates NaN (a diverged rank must not be hidden by `f32::max`).
fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}
