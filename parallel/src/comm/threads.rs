//! [`ThreadComm`]: the communicator for ranks that are threads of one process.
//!
//! Each group is a generation-counted rendezvous behind a Mutex + Condvar. A collective runs in
//! three phases: *collecting* (each rank deposits a copy of its contribution and the lengths it
//! passed), *reducing* (the last rank to arrive validates the calls against each other and computes
//! the one result, combining ranks in rank order) and *distributing* (every rank copies its part of
//! the shared result out; the last to leave opens the next generation). Because the result is
//! computed once and rank-ordered, every rank gets bit-identical data whatever the arrival order.
//!
//! Every wait wakes at least every 50 ms to check the mesh's shared abort flag, and gives up after the
//! communicator's timeout (default 300 s; `DALLE_MESH_COMM_TIMEOUT_S` overrides), aborting the mesh so
//! that the other ranks stop too. [`run_ranks`] runs one scoped thread per rank and turns a failing
//! or panicking rank into an abort of the whole mesh and a [`RankFailure`] that names it.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dm_runtime::cpu::CpuBackend;
use thiserror::Error;

use super::{
    reduce_in_rank_order, CollectiveKind, CommError, CommStats, Communicator, ReduceOp, Result, StatsRecorder,
};
use crate::mesh::Mesh;

/// The wait limit when `DALLE_MESH_COMM_TIMEOUT_S` is unset.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Environment variable overriding [`DEFAULT_TIMEOUT`], in (possibly fractional) seconds.
pub const TIMEOUT_ENV: &str = "DALLE_MESH_COMM_TIMEOUT_S";
/// How often a waiting rank re-checks the abort flag at the latest.
const POLL: Duration = Duration::from_millis(50);

/// Parses a timeout in seconds (`"300"`, `"0.5"`); `None` unless finite and positive.
pub fn parse_timeout_s(value: &str) -> Option<Duration> {
    let s: f64 = value.trim().parse().ok()?;
    (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s))
}

/// The timeout new communicators get: `DALLE_MESH_COMM_TIMEOUT_S` if set and valid (a warning is
/// logged and the default used if it is not), else [`DEFAULT_TIMEOUT`].
pub fn default_timeout() -> Duration {
    match std::env::var(TIMEOUT_ENV) {
        Ok(v) => parse_timeout_s(&v).unwrap_or_else(|| {
            tracing::warn!(
                "{TIMEOUT_ENV}={v:?} is not a positive number of seconds; using {} s",
                DEFAULT_TIMEOUT.as_secs()
            );
            DEFAULT_TIMEOUT
        }),
        Err(_) => DEFAULT_TIMEOUT,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the state is still consistent
    // enough to report errors, which is all the group can do after a panic anyway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The failure flag shared by every communicator of one mesh (or one `group`).
struct AbortState {
    flag: AtomicBool,
    first: Mutex<Option<(usize, String)>>,
    groups: Mutex<Vec<Arc<Group>>>,
}

impl AbortState {
    fn new() -> Arc<Self> {
        Arc::new(Self { flag: AtomicBool::new(false), first: Mutex::new(None), groups: Mutex::new(Vec::new()) })
    }

    /// Records the failure (the first one wins) and wakes every waiter of every group.
    fn abort(&self, rank: usize, reason: &str) {
        {
            let mut first = lock(&self.first);
            if first.is_some() {
                return;
            }
            tracing::error!(rank, reason, "aborting the communicator mesh");
            *first = Some((rank, reason.to_string()));
            self.flag.store(true, Ordering::SeqCst);
        }
        let groups = lock(&self.groups).clone();
        for g in groups {
            // Taking the state lock orders this notify after any waiter's flag check.
            let _state = lock(&g.state);
            g.cv.notify_all();
        }
    }

    fn failure(&self) -> Option<(usize, String)> {
        if !self.flag.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.first).clone()
    }

    fn check(&self) -> Result<()> {
        match self.failure() {
            Some((rank, reason)) => Err(CommError::Aborted { rank, reason }),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Collecting,
    Reducing,
    Distributing,
}

/// What one rank brought to a collective.
struct Arrival {
    kind: CollectiveKind,
    op: Option<ReduceOp>,
    root: usize,
    send_len: usize,
    recv_len: usize,
    data: Vec<f32>,
}

struct State {
    phase: Phase,
    generation: u64,
    arrivals: Vec<Option<Arrival>>,
    n_arrived: usize,
    n_departed: usize,
    outcome: Option<Result<Arc<Vec<f32>>>>,
}

/// One rendezvous, shared by the handles of a group.
struct Group {
    label: String,
    /// World rank of each group rank.
    members: Vec<usize>,
    state: Mutex<State>,
    cv: Condvar,
}

impl Group {
    fn new(label: String, members: Vec<usize>) -> Arc<Self> {
        let size = members.len();
        Arc::new(Self {
            label,
            members,
            state: Mutex::new(State {
                phase: Phase::Collecting,
                generation: 0,
                arrivals: (0..size).map(|_| None).collect(),
                n_arrived: 0,
                n_departed: 0,
                outcome: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn mismatch(&self, kind: CollectiveKind, detail: String) -> CommError {
        CommError::Mismatch { op: kind.name(), detail: format!("in {}: {detail}", self.label) }
    }

    /// Validates the calls against each other and computes the shared result (ranks in order).
    fn combine(&self, mut arrivals: Vec<Arrival>) -> Result<Arc<Vec<f32>>> {
        let size = self.size();
        let m = &self.members;
        let first = &arrivals[0];
        let kind = first.kind;
        for (i, a) in arrivals.iter().enumerate().skip(1) {
            if a.kind != kind {
                let detail = format!("rank {} called {} but rank {} called {}", m[0], kind.name(), m[i], a.kind.name());
                return Err(self.mismatch(kind, detail));
            }
            if a.send_len != first.send_len {
                let detail =
                    format!("rank {} passed {} elements but rank {} passed {}", m[0], first.send_len, m[i], a.send_len);
                return Err(self.mismatch(kind, detail));
            }
            if a.op != first.op {
                let name = |o: Option<ReduceOp>| o.map_or("-", |o| o.name());
                let detail =
                    format!("rank {} reduces with {} but rank {} with {}", m[0], name(first.op), m[i], name(a.op));
                return Err(self.mismatch(kind, detail));
            }
            if a.root != first.root {
                let detail =
                    format!("rank {} broadcasts from root {} but rank {} from root {}", m[0], first.root, m[i], a.root);
                return Err(self.mismatch(kind, detail));
            }
        }
        let n = first.send_len;
        match kind {
            CollectiveKind::Barrier => Ok(Arc::new(Vec::new())),
            CollectiveKind::Broadcast => {
                let root = first.root;
                if root >= size {
                    return Err(CommError::InvalidRoot { root, size });
                }
                Ok(Arc::new(std::mem::take(&mut arrivals[root].data)))
            }
            CollectiveKind::AllGather => {
                for (i, a) in arrivals.iter().enumerate() {
                    if a.recv_len != size * n {
                        return Err(CommError::Shape {
                            op: kind.name(),
                            rank: m[i],
                            detail: format!(
                                "recv has {} elements but must hold {size} ranks × {n} = {} in {}",
                                a.recv_len,
                                size * n,
                                self.label
                            ),
                        });
                    }
                }
                let mut out = Vec::with_capacity(size * n);
                for a in &arrivals {
                    out.extend_from_slice(&a.data);
                }
                Ok(Arc::new(out))
            }
            CollectiveKind::AllReduce | CollectiveKind::ReduceScatter => {
                if kind == CollectiveKind::ReduceScatter {
                    if !n.is_multiple_of(size) {
                        return Err(CommError::Shape {
                            op: kind.name(),
                            rank: m[0],
                            detail: format!(
                                "send has {n} elements, not a multiple of the {size} ranks of {}",
                                self.label
                            ),
                        });
                    }
                    for (i, a) in arrivals.iter().enumerate() {
                        if a.recv_len != n / size {
                            return Err(CommError::Shape {
                                op: kind.name(),
                                rank: m[i],
                                detail: format!(
                                    "recv has {} elements but must hold send {n} / {size} ranks = {} in {}",
                                    a.recv_len,
                                    n / size,
                                    self.label
                                ),
                            });
                        }
                    }
                }
                let op = first.op.unwrap_or(ReduceOp::Sum);
                let mut acc = std::mem::take(&mut arrivals[0].data);
                let rest: Vec<&[f32]> = arrivals[1..].iter().map(|a| a.data.as_slice()).collect();
                reduce_in_rank_order(&mut acc, &rest, op);
                Ok(Arc::new(acc))
            }
        }
    }
}

/// One rank's handle on one group of threads. Not `Clone`: exactly one handle per rank, moved into
/// that rank's thread. Besides the [`Communicator<CpuBackend>`] impl it offers the same collectives
/// on host slices (`*_slice`), usable for host-side scalars on any backend.
pub struct ThreadComm {
    group: Arc<Group>,
    rank: usize,
    abort: Arc<AbortState>,
    timeout: Duration,
    stats: StatsRecorder,
}

impl fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadComm")
            .field("group", &self.group.label)
            .field("rank", &self.rank)
            .field("size", &self.group.size())
            .field("world_rank", &self.world_rank())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The three communicators of one rank of a mesh.
#[derive(Debug)]
pub struct RankComms {
    /// All ranks of the mesh; group rank = world rank.
    pub world: ThreadComm,
    /// The ranks sharing this rank's dp_index; group rank = tp_index.
    pub tp: ThreadComm,
    /// The ranks sharing this rank's tp_index; group rank = dp_index.
    pub dp: ThreadComm,
}

impl ThreadComm {
    /// One handle per rank of a `size`-rank group, in rank order, with [`default_timeout`].
    ///
    /// # Panics
    /// If `size == 0`.
    pub fn group(size: usize) -> Vec<ThreadComm> {
        Self::group_with_timeout(size, default_timeout())
    }

    /// Like [`ThreadComm::group`] with an explicit wait limit.
    pub fn group_with_timeout(size: usize, timeout: Duration) -> Vec<ThreadComm> {
        assert!(size >= 1, "a communicator group needs at least one rank");
        let abort = AbortState::new();
        let group = Group::new(format!("group of {size}"), (0..size).collect());
        lock(&abort.groups).push(group.clone());
        (0..size).map(|rank| Self::handle(&group, rank, &abort, timeout)).collect()
    }

    /// The world, tp and dp communicators of every rank of `mesh`, in world-rank order, with
    /// [`default_timeout`]. All of them share one abort flag: aborting any fails them all.
    pub fn mesh(mesh: &Mesh) -> Vec<RankComms> {
        Self::mesh_with_timeout(mesh, default_timeout())
    }

    /// Like [`ThreadComm::mesh`] with an explicit wait limit.
    pub fn mesh_with_timeout(mesh: &Mesh, timeout: Duration) -> Vec<RankComms> {
        let abort = AbortState::new();
        let world = Group::new(format!("world ({mesh})"), (0..mesh.world()).collect());
        let tp_groups: Vec<_> = (0..mesh.dp())
            .map(|d| Group::new(format!("tp group of dp_index {d}"), mesh.tp_group(mesh.rank_of(d, 0))))
            .collect();
        let dp_groups: Vec<_> = (0..mesh.tp())
            .map(|t| Group::new(format!("dp group of tp_index {t}"), mesh.dp_group(mesh.rank_of(0, t))))
            .collect();
        {
            let mut groups = lock(&abort.groups);
            groups.push(world.clone());
            groups.extend(tp_groups.iter().cloned());
            groups.extend(dp_groups.iter().cloned());
        }
        (0..mesh.world())
            .map(|r| {
                let (d, t) = mesh.coords(r);
                RankComms {
                    world: Self::handle(&world, r, &abort, timeout),
                    tp: Self::handle(&tp_groups[d], t, &abort, timeout),
                    dp: Self::handle(&dp_groups[t], d, &abort, timeout),
                }
            })
            .collect()
    }

    fn handle(group: &Arc<Group>, rank: usize, abort: &Arc<AbortState>, timeout: Duration) -> ThreadComm {
        ThreadComm { group: group.clone(), rank, abort: abort.clone(), timeout, stats: StatsRecorder::new() }
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// This rank's index in the whole mesh (equal to [`ThreadComm::rank`] for `group`).
    pub fn world_rank(&self) -> usize {
        self.group.members[self.rank]
    }

    /// The group's name in messages, e.g. `tp group of dp_index 1`.
    pub fn label(&self) -> &str {
        &self.group.label
    }

    /// How long a collective waits for the other ranks before failing.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The first failure recorded on this mesh: `(world rank, reason)`.
    pub fn failure(&self) -> Option<(usize, String)> {
        self.abort.failure()
    }

    /// This handle's counters (see [`CommStats`]).
    pub fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    /// Fails every communicator of this mesh, naming this rank (its world rank) and `reason`.
    pub fn abort(&self, reason: &str) {
        self.abort.abort(self.world_rank(), reason);
    }

    /// [`Communicator::all_reduce`] on a host slice.
    pub fn all_reduce_slice(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let arrival = Arrival {
            kind: CollectiveKind::AllReduce,
            op: Some(op),
            root: 0,
            send_len: buf.len(),
            recv_len: buf.len(),
            data: buf.to_vec(),
        };
        let result = self.rendezvous(arrival)?;
        buf.copy_from_slice(&result);
        self.stats.record(CollectiveKind::AllReduce, buf.len());
        Ok(())
    }

    /// [`Communicator::all_gather`] on host slices.
    pub fn all_gather_slice(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let arrival = Arrival {
            kind: CollectiveKind::AllGather,
            op: None,
            root: 0,
            send_len: send.len(),
            recv_len: recv.len(),
            data: send.to_vec(),
        };
        let result = self.rendezvous(arrival)?;
        recv.copy_from_slice(&result);
        self.stats.record(CollectiveKind::AllGather, send.len());
        Ok(())
    }

    /// [`Communicator::reduce_scatter`] on host slices.
    pub fn reduce_scatter_slice(&self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        let arrival = Arrival {
            kind: CollectiveKind::ReduceScatter,
            op: Some(op),
            root: 0,
            send_len: send.len(),
            recv_len: recv.len(),
            data: send.to_vec(),
        };
        let result = self.rendezvous(arrival)?;
        let n = recv.len();
        recv.copy_from_slice(&result[self.rank * n..(self.rank + 1) * n]);
        self.stats.record(CollectiveKind::ReduceScatter, send.len());
        Ok(())
    }

    /// [`Communicator::broadcast`] on a host slice (`root` is a group rank).
    pub fn broadcast_slice(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let arrival = Arrival {
            kind: CollectiveKind::Broadcast,
            op: None,
            root,
            send_len: buf.len(),
            recv_len: buf.len(),
            data: if self.rank == root { buf.to_vec() } else { Vec::new() },
        };
        let result = self.rendezvous(arrival)?;
        if self.rank != root {
            buf.copy_from_slice(&result);
        }
        self.stats.record(CollectiveKind::Broadcast, buf.len());
        Ok(())
    }

    /// [`Communicator::barrier`].
    pub fn barrier(&self) -> Result<()> {
        let arrival =
            Arrival { kind: CollectiveKind::Barrier, op: None, root: 0, send_len: 0, recv_len: 0, data: Vec::new() };
        self.rendezvous(arrival)?;
        self.stats.record(CollectiveKind::Barrier, 0);
        Ok(())
    }

    /// One round of the group's rendezvous; returns the shared result (or the group's error).
    fn rendezvous(&self, arrival: Arrival) -> Result<Arc<Vec<f32>>> {
        let kind = arrival.kind;
        let start = Instant::now();
        let size = self.size();
        self.abort.check()?;
        let state = lock(&self.group.state);
        // A previous round may still be handing out its result.
        let mut state = self.wait(state, kind, start, |s| s.phase == Phase::Collecting)?;
        let generation = state.generation;
        debug_assert!(state.arrivals[self.rank].is_none(), "rank arrived twice in one round");
        state.arrivals[self.rank] = Some(arrival);
        state.n_arrived += 1;
        if state.n_arrived == size {
            state.phase = Phase::Reducing;
            let arrivals: Vec<Arrival> =
                state.arrivals.iter_mut().map(|a| a.take().expect("every rank has arrived")).collect();
            drop(state);
            let outcome = self.group.combine(arrivals);
            state = lock(&self.group.state);
            state.outcome = Some(outcome);
            state.phase = Phase::Distributing;
            self.group.cv.notify_all();
        } else {
            state = self.wait(state, kind, start, |s| s.phase == Phase::Distributing && s.generation == generation)?;
        }
        let outcome = state.outcome.clone().expect("a distributing round has an outcome");
        state.n_departed += 1;
        if state.n_departed == size {
            state.phase = Phase::Collecting;
            state.generation += 1;
            state.n_arrived = 0;
            state.n_departed = 0;
            state.outcome = None;
            self.group.cv.notify_all();
        }
        outcome
    }

    /// Waits until `ready`, the mesh is aborted, or the timeout passes (which aborts the mesh).
    fn wait<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        kind: CollectiveKind,
        start: Instant,
        ready: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        loop {
            if ready(&state) {
                return Ok(state);
            }
            self.abort.check()?;
            let waited = start.elapsed();
            if waited >= self.timeout {
                let missing: Vec<usize> = if state.phase == Phase::Collecting {
                    (0..self.size()).filter(|&i| state.arrivals[i].is_none()).map(|i| self.group.members[i]).collect()
                } else {
                    Vec::new()
                };
                drop(state);
                let err = CommError::Timeout {
                    op: kind.name(),
                    rank: self.world_rank(),
                    waited_s: waited.as_secs_f64(),
                    missing: missing.clone(),
                };
                tracing::error!("{err}");
                let reason = format!(
                    "timed out after {:.1} s in {} of the {} waiting for ranks {missing:?}",
                    waited.as_secs_f64(),
                    kind.name(),
                    self.group.label
                );
                self.abort.abort(self.world_rank(), &reason);
                return Err(err);
            }
            let (next, _) = self
                .group
                .cv
                .wait_timeout(state, POLL.min(self.timeout - waited))
                .unwrap_or_else(PoisonError::into_inner);
            state = next;
        }
    }
}

impl Communicator<CpuBackend> for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size()
    }
    host_slice_collectives!();
    fn barrier(&self) -> Result<()> {
        ThreadComm::barrier(self)
    }
    fn stats(&self) -> CommStats {
        ThreadComm::stats(self)
    }
    fn abort(&self, reason: &str) {
        ThreadComm::abort(self, reason)
    }
}

/// A multi-rank run failed: the first rank to fail and why (errors other ranks saw only because of
/// it, such as [`CommError::Aborted`], are in `failures` but not in the message).
#[derive(Debug, Clone, Error)]
#[error("rank {rank} failed: {reason}")]
pub struct RankFailure {
    /// World rank that failed first (aborted the mesh).
    pub rank: usize,
    /// Its error or panic message (panics are prefixed `panicked: `).
    pub reason: String,
    /// `(world rank, message)` of every rank whose closure failed, in rank order.
    pub failures: Vec<(usize, String)>,
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Runs `f(rank, comms)` for every rank of `mesh` on its own scoped thread, with communicators from
/// [`ThreadComm::mesh`]. See [`run_ranks_on`].
pub fn run_ranks<T, E, F>(mesh: &Mesh, f: F) -> std::result::Result<Vec<T>, RankFailure>
where
    T: Send,
    E: fmt::Display,
    F: Fn(usize, RankComms) -> std::result::Result<T, E> + Sync,
{
    run_ranks_on(ThreadComm::mesh(mesh), f)
}

/// Runs `f(rank, comms)` for each entry of `comms` (world-rank order, as [`ThreadComm::mesh`] /
/// [`ThreadComm::mesh_with_timeout`] return them) on its own scoped thread named `rank-{r}`.
///
/// A rank whose closure returns `Err` (formatted with `{:#}`, so `anyhow` chains show) or panics
/// aborts the mesh with that message, so every other rank's pending or next collective fails
/// instead of hanging. Returns every rank's value, or the [`RankFailure`] naming the first failure
/// (also when a rank called `abort` itself and then returned `Ok`).
pub fn run_ranks_on<T, E, F>(comms: Vec<RankComms>, f: F) -> std::result::Result<Vec<T>, RankFailure>
where
    T: Send,
    E: fmt::Display,
    F: Fn(usize, RankComms) -> std::result::Result<T, E> + Sync,
{
    assert!(!comms.is_empty(), "run_ranks_on needs at least one rank");
    for (i, c) in comms.iter().enumerate() {
        assert_eq!(c.world.world_rank(), i, "run_ranks_on: comms must be in world-rank order");
    }
    let abort = comms[0].world.abort.clone();
    let f = &f;
    let outcomes: Vec<std::result::Result<T, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, rc)| {
                let abort = rc.world.abort.clone();
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(s, move || {
                        let reason = match catch_unwind(AssertUnwindSafe(|| f(rank, rc))) {
                            Ok(Ok(v)) => return Ok(v),
                            Ok(Err(e)) => format!("{e:#}"),
                            Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
                        };
                        abort.abort(rank, &reason);
                        Err(reason)
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(p.as_ref())))))
            .collect()
    });
    let failures: Vec<(usize, String)> =
        outcomes.iter().enumerate().filter_map(|(r, o)| o.as_ref().err().map(|e| (r, e.clone()))).collect();
    match abort.failure() {
        None if failures.is_empty() => Ok(outcomes.into_iter().flatten().collect()),
        Some((rank, reason)) => Err(RankFailure { rank, reason, failures }),
        // Unreachable (a failing rank always aborts), but never lose a failure.
        None => {
            let (rank, reason) = failures[0].clone();
            Err(RankFailure { rank, reason, failures })
        }
    }
}
