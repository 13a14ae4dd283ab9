//! [`NcclComm`]: the [`Communicator`] of ranks that are GPUs, one process (or thread) per GPU,
//! over NCCL (cudarc's bindings, loaded at run time: libnccl is probed before any call, so a
//! machine without it gets [`CommError::Device`] naming the library, never a panic).
//!
//! # Streams and ordering
//!
//! Each communicator owns a **side stream** on its backend's GPU. A collective is ordered after
//! everything already enqueued on the backend's compute stream (event record → side stream
//! waits), runs on the side stream, and the compute stream then waits for it (second event), so
//! every later op sees the result — exactly the single-stream semantics of the other
//! communicators, with the host never blocked by the GPU. By default each trait call also waits
//! (on the host, polling, with the communicator's timeout) until the collective has finished, so a
//! dead peer becomes [`CommError::Timeout`] instead of a hang; [`NcclOptions::wait_for_completion`]
//! `= false` drops that wait for speed (a hang then surfaces at the next synchronising call).
//!
//! # Overlapping the gradient all-reduce with the backward
//!
//! [`NcclComm::all_reduce_async`] enqueues an all-reduce on the side stream and returns a
//! [`PendingAllReduce`] that mutably borrows the buffer. The backward pass calls it for each
//! gradient (or bucket) as soon as that gradient is final and keeps computing the earlier layers
//! on the compute stream while NCCL reduces on the side stream; before the optimizer it
//! [`PendingAllReduce::join`]s them (the compute stream waits on each collective's completion
//! event; the host does not block). Sketch:
//!
//! ```ignore
//! let mut pending = Vec::new();
//! for (layer, grad) in layers.iter().rev().zip(grads.iter_mut().rev()) {
//!     layer.backward(&be, grad)?;                          // compute stream
//!     pending.push(dp.all_reduce_async(grad, ReduceOp::Avg)?); // side stream, overlaps
//! }
//! for p in pending { p.join()?; }                          // compute waits, host does not
//! optimizer.update(&be, &mut params, &grads, lr, 1.0)?;
//! ```
//!
//! # The dp gradient reduction during the backward ([`DeferredCollectives`])
//!
//! The trainer issues each layer's gradient all-reduce (or ZeRO-1 reduce-scatter) through
//! [`Communicator::deferred`] as soon as the backward has written those gradients: the compute
//! stream records an event, the side stream waits on it and runs the collective (between two
//! timing events), and the compute stream goes on with the earlier layers. Before the gradient
//! norm and the optimizer, [`DeferredCollectives::join_deferred`] makes the compute stream wait on
//! the side stream's last event (the side stream runs in issue order, so that one event covers
//! them all). The tensor-parallel collectives are other communicators, called blocking in the
//! compute order. [`DeferredCollectives::overlap_times`] reads the events: the side stream's busy
//! time of the deferred collectives and the time the compute stream stood at the joins; `1 −
//! wait / busy` is the hidden share `bench step --device cuda` reports. A bf16 buffer is widened
//! into an f32 scratch, reduced and rounded back with the backend's `copy`, blocking (gradients
//! are fp32 in every precision, so this is not the trainer's case). **Untested on GPUs.**
//!
//! # Rendezvous
//!
//! Every group needs an `ncclUniqueId` made by one member and handed to the others
//! ([`super::nccl_rendezvous`]): they travel through the run's rendezvous store
//! ([`crate::rendezvous::Store`], served by world rank 0 on `MASTER_ADDR:MASTER_PORT`) under
//! `nccl/<group>`. [`NcclComm::mesh`] makes a rank's world, tp
//! and dp communicators. **Untested on GPUs since the move to the store** (no GPU where it was
//! written); the store itself is tested across threads and processes.
//!
//! # Differences from [`super::ThreadComm`]
//!
//! - `ReduceOp::Max` uses NCCL's max, which follows `fmaxf` and so does **not** propagate NaN;
//!   `ReduceOp::Avg` is `ncclAvg` (NCCL scales in its own order, within an ulp of sum/n).
//! - [`Communicator::abort`] calls `ncclCommAbort` on this rank only; peers see their collectives
//!   fail (NCCL remote error) or time out. Cross-rank abort needs the launcher's side channel.
//! - NCCL refuses two ranks of one communicator on the same GPU (before NCCL 2.30): multi-rank
//!   tests on one GPU use the in-process communicators; NCCL runs one rank per GPU.

use std::ffi::CStr;
use std::marker::PhantomData;
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::sys;
use dm_runtime::cuda::{CudaBackend, CudaBuf};
use dm_runtime::Backend;

use super::deferred::{DeferredCollectives, OverlapTimes};
use super::threads::default_timeout;
use super::{AbortSlot, CollectiveKind, CommError, CommStats, Communicator, ReduceOp, Result, StatsRecorder};
use crate::mesh::Mesh;
use crate::rendezvous::Store;

pub use super::nccl_rendezvous::{exchange_id, NcclId};

/// How often waits poll for completion, errors and aborts.
const POLL: Duration = Duration::from_millis(1);

pub(super) fn dev_err(op: &'static str, detail: impl Into<String>) -> CommError {
    CommError::Device { op, detail: detail.into() }
}

/// The collectives here move f32 (`ncclFloat32`, `len` elements); a bf16 buffer (half the bytes)
/// is refused before NCCL could read past it (the all-reduces widen bf16 buffers instead).
fn require_f32(op: &'static str, bufs: &[&CudaBuf]) -> Result<()> {
    match bufs.iter().find(|b| b.dtype() != dm_runtime::DType::F32) {
        Some(b) => {
            Err(dev_err(op, format!("not implemented yet: NCCL collectives of {} buffers (only f32)", b.dtype())))
        }
        None => Ok(()),
    }
}

/// Whether libnccl can be loaded (memoised). Loading it calls nothing.
pub fn nccl_library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries `libloading::Library::new` on cudarc's candidate
    // file names and drops what it opened.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// `Ok` when NCCL can be used, else the error every NCCL entry point returns.
pub fn nccl_available() -> Result<()> {
    if nccl_library_present() {
        return Ok(());
    }
    let mut names = cudarc::get_lib_name_candidates("nccl");
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Err(dev_err(
        "nccl",
        format!(
            "NCCL is unavailable: libnccl was not found (looked for {}); the pip package nvidia-nccl ships \
             libnccl.so.2 — put its lib folder on LD_LIBRARY_PATH with a libnccl.so symlink next to it",
            names.join(", ")
        ),
    ))
}

/// libnccl's version code, e.g. 22704 for 2.27.4.
pub fn nccl_version() -> Result<i32> {
    nccl_available()?;
    cudarc::nccl::result::get_nccl_version().map_err(|e| dev_err("ncclGetVersion", nccl_msg(e.0)))
}

pub(super) fn nccl_msg(r: sys::ncclResult_t) -> String {
    // SAFETY: libnccl is loaded (every caller passed nccl_available); ncclGetErrorString returns
    // a static NUL-terminated string (or null).
    let p = unsafe { sys::ncclGetErrorString(r) };
    if p.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        format!("{r:?}: {}", unsafe { CStr::from_ptr(p) }.to_string_lossy())
    }
}

fn check(op: &'static str, r: sys::ncclResult_t) -> Result<()> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        other => Err(dev_err(op, nccl_msg(other))),
    }
}

/// The NCCL form of a [`ReduceOp`].
pub fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

/// `ncclAllReduce` in place over the `n` f32 at device address `p`, on `stream`.
///
/// # Safety
/// `p` must address a live allocation of at least `n` floats on the communicator's GPU, not used
/// by other work until the collective completes on `stream`.
unsafe fn all_reduce_in_place(
    p: u64,
    n: usize,
    op: sys::ncclRedOp_t,
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
) -> sys::ncclResult_t {
    // SAFETY: the caller's contract above.
    unsafe { sys::ncclAllReduce(p as *const _, p as *mut _, n, sys::ncclDataType_t::ncclFloat32, op, comm, stream) }
}

// ---- the communicator -------------------------------------------------------------------------

/// Options of an [`NcclComm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NcclOptions {
    /// How long a wait (initialisation, a collective's completion, a barrier) may take.
    pub timeout: Duration,
    /// Whether trait collectives wait on the host for completion (see the module docs).
    pub wait_for_completion: bool,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self { timeout: default_timeout(), wait_for_completion: true }
    }
}

/// An initialised `ncclComm_t`; aborted when dropped (never blocks on a dead peer).
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread; NcclComm serialises all use of it
// behind a Mutex, so it is never used concurrently.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is released exactly once, here.
        let r = unsafe { sys::ncclCommAbort(self.0) };
        if r != sys::ncclResult_t::ncclSuccess {
            tracing::warn!("ncclCommAbort failed: {}", nccl_msg(r));
        }
    }
}

struct Inner {
    comm: Option<RawComm>,
    /// The deferred collectives in flight and the events measured so far.
    deferred: DeferredState,
    /// Re-recorded around every collective: compute-stream position, then side-stream completion.
    before: CudaEvent,
    after: CudaEvent,
    /// One float for barriers.
    token: CudaBuf,
}

/// One rank's handle of an NCCL communicator group (see the module docs).
pub struct NcclComm {
    backend: CudaBackend,
    stream: Arc<CudaStream>,
    inner: Mutex<Inner>,
    rank: usize,
    size: usize,
    label: String,
    options: NcclOptions,
    stats: StatsRecorder,
    aborted: AbortSlot,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("label", &self.label)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.backend.name())
            .finish()
    }
}

/// A rank's world, tensor-parallel and data-parallel communicators.
#[derive(Debug)]
pub struct NcclRankComms {
    /// All ranks; group rank = world rank.
    pub world: NcclComm,
    /// The ranks sharing this rank's dp_index; group rank = tp_index.
    pub tp: NcclComm,
    /// The ranks sharing this rank's tp_index; group rank = dp_index.
    pub dp: NcclComm,
}

/// An all-reduce running on a communicator's side stream (see [`NcclComm::all_reduce_async`]).
/// The buffer stays mutably borrowed until it is joined; dropping it joins it.
#[must_use = "join the pending all-reduce before using its buffer"]
pub struct PendingAllReduce<'a> {
    comm: &'a NcclComm,
    done: Option<CudaEvent>,
    elems: usize,
    _buf: PhantomData<&'a mut CudaBuf>,
}

impl PendingAllReduce<'_> {
    /// Whether the collective has finished on the GPU (never blocks).
    pub fn is_complete(&self) -> bool {
        self.done.as_ref().is_none_or(|e| e.is_complete())
    }

    /// Makes the compute stream wait for the collective (the host does not block). Every op
    /// enqueued afterwards sees the reduced buffer.
    pub fn join(mut self) -> Result<()> {
        self.join_inner()
    }

    /// Waits on the host (with the communicator's timeout), then joins.
    pub fn wait(mut self) -> Result<()> {
        if let Some(e) = &self.done {
            self.comm.wait_event(e, "all_reduce")?;
        }
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<()> {
        if let Some(e) = self.done.take() {
            self.comm
                .backend
                .stream()
                .wait(&e)
                .map_err(|err| dev_err("all_reduce", format!("joining the compute stream: {err}")))?;
            self.comm.stats.record(CollectiveKind::AllReduce, self.elems);
        }
        Ok(())
    }
}

impl Drop for PendingAllReduce<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.join_inner() {
            tracing::error!("joining a pending all-reduce failed: {e}");
        }
    }
}

impl NcclComm {
    /// Joins group `id` as `rank` of `size` on `backend`'s GPU (blocks until every member has
    /// joined, at most `options.timeout`).
    pub fn new(
        backend: &CudaBackend,
        id: &NcclId,
        rank: usize,
        size: usize,
        label: &str,
        options: NcclOptions,
    ) -> Result<Self> {
        nccl_available()?;
        if size == 0 || rank >= size {
            return Err(dev_err("ncclCommInitRank", format!("rank {rank} is outside a group of {size}")));
        }
        let ctx = backend.context().clone();
        let stream =
            ctx.new_stream().map_err(|e| dev_err("ncclCommInitRank", format!("creating the side stream: {e}")))?;
        let raw = id.raw();
        let (tx, rx) = mpsc::channel();
        let ctx2 = ctx.clone();
        // ncclCommInitRank blocks until every member joined: run it on a helper thread so a
        // missing peer becomes a timeout (the helper then stays blocked; the process should exit).
        std::thread::Builder::new()
            .name(format!("nccl-init-{label}"))
            .spawn(move || {
                let r = ctx2.bind_to_thread().map_err(|e| format!("binding the CUDA context: {e}")).and_then(|_| {
                    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
                    // SAFETY: `comm` is valid for a write; the id came from ncclGetUniqueId (via the
                    // rendezvous); rank < size was checked; the context is current on this thread.
                    let r = unsafe { sys::ncclCommInitRank(&mut comm, size as i32, raw, rank as i32) };
                    if r == sys::ncclResult_t::ncclSuccess {
                        Ok(RawComm(comm))
                    } else {
                        Err(nccl_msg(r))
                    }
                });
                let _ = tx.send(r);
            })
            .map_err(|e| dev_err("ncclCommInitRank", e.to_string()))?;
        let comm = match rx.recv_timeout(options.timeout) {
            Ok(Ok(c)) => c,
            Ok(Err(msg)) => return Err(dev_err("ncclCommInitRank", format!("{label}, rank {rank} of {size}: {msg}"))),
            Err(_) => {
                return Err(CommError::Timeout {
                    op: "ncclCommInitRank",
                    rank,
                    waited_s: options.timeout.as_secs_f64(),
                    missing: vec![],
                })
            }
        };
        let ev = || ctx.new_event(None).map_err(|e| dev_err("ncclCommInitRank", format!("creating an event: {e}")));
        let token = backend
            .zeros(&format!("nccl.{label}.barrier"), 1)
            .map_err(|e| dev_err("ncclCommInitRank", e.to_string()))?;
        let deferred = DeferredState::default();
        let inner = Inner { comm: Some(comm), deferred, before: ev()?, after: ev()?, token };
        Ok(Self {
            backend: backend.clone(),
            stream,
            inner: Mutex::new(inner),
            rank,
            size,
            label: label.to_string(),
            options,
            stats: StatsRecorder::new(),
            aborted: AbortSlot::default(),
        })
    }

    /// Joins a group through the rendezvous `store`: `members` are the group's world ranks in
    /// group-rank order; the id is exchanged by [`exchange_id`] under `nccl/<key>`.
    pub fn join_group(
        backend: &CudaBackend,
        store: &Store,
        key: &str,
        members: &[usize],
        world_rank: usize,
        label: &str,
        options: NcclOptions,
    ) -> Result<Self> {
        let (rank, id) = exchange_id(store, key, members, world_rank)?;
        Self::new(backend, &id, rank, members.len(), label, options)
    }

    /// The world, tp and dp communicators of `world_rank` in `mesh` (initialised in that order on
    /// every rank, which cannot deadlock), their ids exchanged through `store`.
    pub fn mesh(
        backend: &CudaBackend,
        mesh: &Mesh,
        world_rank: usize,
        store: &Store,
        options: NcclOptions,
    ) -> Result<NcclRankComms> {
        let (d, t) = mesh.coords(world_rank);
        let world: Vec<usize> = (0..mesh.world()).collect();
        let world = Self::join_group(backend, store, "world", &world, world_rank, "world", options)?;
        let tp = Self::join_group(
            backend,
            store,
            &format!("tp{d}"),
            &mesh.tp_group(world_rank),
            world_rank,
            &format!("tp group of dp_index {d}"),
            options,
        )?;
        let dp = Self::join_group(
            backend,
            store,
            &format!("dp{t}"),
            &mesh.dp_group(world_rank),
            world_rank,
            &format!("dp group of tp_index {t}"),
            options,
        )?;
        Ok(NcclRankComms { world, tp, dp })
    }

    /// The group's name in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The side stream the collectives run on.
    pub fn side_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn check_aborted(&self) -> Result<()> {
        self.aborted.check(self.rank)
    }

    /// Polls `event` until it completes, NCCL reports an asynchronous error, the group is
    /// aborted, or the timeout passes (then the communicator is aborted: NCCL cannot cancel).
    fn wait_event(&self, event: &CudaEvent, op: &'static str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(dev_err(op, format!("waiting for the collective: {e}"))),
            }
            self.check_aborted()?;
            {
                let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(c) = &inner.comm {
                    let mut state = sys::ncclResult_t::ncclSuccess;
                    // SAFETY: `c.0` is a live communicator; `state` is valid for a write.
                    let r = unsafe { sys::ncclCommGetAsyncError(c.0, &mut state) };
                    check(op, r)?;
                    check(op, state)?;
                }
            }
            if t0.elapsed() > self.options.timeout {
                let waited_s = t0.elapsed().as_secs_f64();
                self.abort(&format!("{op} timed out after {waited_s:.1} s"));
                return Err(CommError::Timeout { op, rank: self.rank, waited_s, missing: vec![] });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Enqueues `f(comm, side stream)` between the two events (see the module docs); returns the
    /// completion event's recorded state for waiting, when `fresh_done` asks for a new event.
    fn run(
        &self,
        op: &'static str,
        fresh_done: bool,
        f: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t, &Inner) -> sys::ncclResult_t,
    ) -> Result<Option<CudaEvent>> {
        self.check_aborted()?;
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let comm =
            inner.comm.as_ref().ok_or_else(|| CommError::Aborted { rank: self.rank, reason: "aborted".into() })?.0;
        let compute = self.backend.stream();
        let e = |what: &str, err: cudarc::driver::DriverError| dev_err(op, format!("{what}: {err}"));
        inner.before.record(compute).map_err(|err| e("recording the compute stream", err))?;
        self.stream.wait(&inner.before).map_err(|err| e("ordering the side stream", err))?;
        self.backend.context().bind_to_thread().map_err(|err| e("binding the context", err))?;
        check(op, f(comm, self.stream.cu_stream() as sys::cudaStream_t, &inner))?;
        if fresh_done {
            let done = self.stream.record_event(None).map_err(|err| e("recording completion", err))?;
            return Ok(Some(done));
        }
        inner.after.record(&self.stream).map_err(|err| e("recording completion", err))?;
        compute.wait(&inner.after).map_err(|err| e("joining the compute stream", err))?;
        drop(inner);
        if self.options.wait_for_completion {
            // `after` may be re-recorded by another thread's collective once the lock is released;
            // waiting on a fresh record of the side stream is equivalent (it is later in order).
            let done = self.stream.record_event(None).map_err(|err| e("recording completion", err))?;
            self.wait_event(&done, op)?;
        }
        Ok(None)
    }

    /// Starts an all-reduce of `buf` on the side stream and returns at once; see
    /// [`PendingAllReduce`] and the module docs (this is how the gradient all-reduce overlaps
    /// the backward). Stats are counted when it is joined.
    pub fn all_reduce_async<'a>(&'a self, buf: &'a mut CudaBuf, op: ReduceOp) -> Result<PendingAllReduce<'a>> {
        require_f32("all_reduce", &[buf])?;
        let n = buf.len();
        if n == 0 {
            return Ok(PendingAllReduce { comm: self, done: None, elems: 0, _buf: PhantomData });
        }
        let p = buf.device_ptr();
        let done = self.run("all_reduce", true, |comm, stream, _| {
            // SAFETY: in-place all-reduce of n f32 at p (a live allocation of n floats, mutably
            // borrowed by the returned PendingAllReduce), on this communicator's side stream.
            unsafe { all_reduce_in_place(p, n, nccl_op(op), comm, stream) }
        })?;
        Ok(PendingAllReduce { comm: self, done, elems: n, _buf: PhantomData })
    }

    /// Runs one blocking collective over `n` elements (`f` enqueues it; nothing is enqueued when
    /// `n` is 0) and counts `stats_elems` for it.
    fn collective(
        &self,
        kind: CollectiveKind,
        n: usize,
        stats_elems: usize,
        f: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        if n > 0 {
            self.run(kind.name(), false, |comm, stream, _| f(comm, stream))?;
        } else {
            self.check_aborted()?;
        }
        self.stats.record(kind, stats_elems);
        Ok(())
    }

    /// Waits (with the timeout) until every collective enqueued so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        let done = self.stream.record_event(None).map_err(|e| dev_err("synchronize", e.to_string()))?;
        self.wait_event(&done, "synchronize")
    }
}

/// Timing events of the deferred collectives (see the module docs).
#[derive(Default)]
struct DeferredState {
    /// Elements of each deferred collective not yet joined, for the stats.
    in_flight: Vec<(CollectiveKind, usize)>,
    /// The side stream's last timing event (covers every deferred call so far).
    last: Option<CudaEvent>,
    /// (start, end) on the side stream of each joined collective, not yet read.
    busy: Vec<(CudaEvent, CudaEvent)>,
    /// (before, after) on the compute stream around each join's wait, not yet read.
    waits: Vec<(CudaEvent, CudaEvent)>,
    /// Seconds read so far.
    times: OverlapTimes,
}

impl DeferredState {
    /// Adds the joined events' seconds to `times` (waits until they completed) and drops them.
    /// The busy pairs of collectives not joined yet stay.
    fn fold(&mut self) -> Result<()> {
        let secs = |pairs: Vec<(CudaEvent, CudaEvent)>| -> Result<f64> {
            let mut s = 0.0f64;
            for (a, b) in pairs {
                let ms = a.elapsed_ms(&b).map_err(|err| dev_err("overlap_times", format!("reading events: {err}")))?;
                s += ms as f64 / 1e3;
            }
            Ok(s)
        };
        if self.waits.is_empty() {
            return Ok(());
        }
        let joined = self.busy.len() - self.in_flight.len();
        let busy: Vec<_> = self.busy.drain(..joined).collect();
        self.times.joins += self.waits.len() as u64;
        self.times.busy_s += secs(busy)?;
        self.times.waited_s += secs(std::mem::take(&mut self.waits))?;
        Ok(())
    }
}

impl NcclComm {
    /// A reduce-scatter sends `size ×` what each rank receives.
    fn check_reduce_scatter_shape(&self, n: usize, m: usize) -> Result<()> {
        if n != self.size * m {
            return Err(CommError::Shape {
                op: "reduce_scatter",
                rank: self.rank,
                detail: format!("send has {n} elements, which must be {} × recv ({m})", self.size),
            });
        }
        Ok(())
    }

    /// Enqueues `f(comm, side stream)` after the compute stream's current position, between two
    /// timing events, without making the compute stream wait (see the module docs).
    fn run_deferred(
        &self,
        kind: CollectiveKind,
        stats_elems: usize,
        f: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        self.check_aborted()?;
        let op = kind.name();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let comm =
            inner.comm.as_ref().ok_or_else(|| CommError::Aborted { rank: self.rank, reason: "aborted".into() })?.0;
        let e = |what: &str, err: cudarc::driver::DriverError| dev_err(op, format!("{what}: {err}"));
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        inner.before.record(self.backend.stream()).map_err(|err| e("recording the compute stream", err))?;
        self.stream.wait(&inner.before).map_err(|err| e("ordering the side stream", err))?;
        let start = self.stream.record_event(timing).map_err(|err| e("recording the start", err))?;
        self.backend.context().bind_to_thread().map_err(|err| e("binding the context", err))?;
        check(op, f(comm, self.stream.cu_stream() as sys::cudaStream_t))?;
        let end = self.stream.record_event(timing).map_err(|err| e("recording the end", err))?;
        let d = &mut inner.deferred;
        d.in_flight.push((kind, stats_elems));
        d.last = Some(self.stream.record_event(None).map_err(|err| e("recording completion", err))?);
        d.busy.push((start, end));
        Ok(())
    }

    /// A bf16 buffer's all-reduce in f32: widened into a scratch, reduced (blocking), rounded back.
    fn all_reduce_widened(&self, buf: &mut CudaBuf, op: ReduceOp) -> Result<()> {
        let n = buf.len();
        let be = &self.backend;
        let re = |err: dm_runtime::RuntimeError| dev_err("all_reduce", format!("widening a bf16 buffer: {err}"));
        let mut wide = be.zeros(&format!("nccl.{}.f32_scratch", self.label), n).map_err(re)?;
        be.copy(&mut wide, 0, buf, 0, n).map_err(re)?;
        self.all_reduce(&mut wide, op)?;
        be.copy(buf, 0, &wide, 0, n).map_err(re)
    }
}

impl DeferredCollectives<CudaBackend> for NcclComm {
    fn all_reduce_deferred(&self, buf: &mut CudaBuf, op: ReduceOp) -> Result<()> {
        if dm_runtime::ops::Storage::dtype(buf) != dm_runtime::DType::F32 {
            return self.all_reduce_widened(buf, op);
        }
        let (n, p) = (buf.len(), buf.device_ptr());
        if n == 0 {
            return self.collective(CollectiveKind::AllReduce, 0, 0, |_, _| sys::ncclResult_t::ncclSuccess);
        }
        self.run_deferred(CollectiveKind::AllReduce, n, |comm, stream| {
            // SAFETY: in-place all-reduce of the n floats of `buf`, which the caller keeps alive and
            // untouched until join_deferred (the trait's contract).
            unsafe { all_reduce_in_place(p, n, nccl_op(op), comm, stream) }
        })
    }

    fn reduce_scatter_deferred(&self, send: &CudaBuf, recv: &mut CudaBuf, op: ReduceOp) -> Result<()> {
        let wide = |b: &CudaBuf| dm_runtime::ops::Storage::dtype(b) == dm_runtime::DType::F32;
        if !(wide(send) && wide(recv)) {
            // Not the trainer's case (ZeRO-1 stages its gradients in f32): the blocking path.
            return self.reduce_scatter(send, recv, op);
        }
        let (n, m) = (send.len(), recv.len());
        self.check_reduce_scatter_shape(n, m)?;
        if m == 0 {
            return self.collective(CollectiveKind::ReduceScatter, 0, 0, |_, _| sys::ncclResult_t::ncclSuccess);
        }
        let (s, r) = (send.device_ptr(), recv.device_ptr());
        self.run_deferred(CollectiveKind::ReduceScatter, n, |comm, stream| {
            let f32 = sys::ncclDataType_t::ncclFloat32;
            // SAFETY: send holds size·m floats, recv m (checked), distinct buffers the caller keeps
            // alive and untouched until join_deferred (the trait's contract).
            unsafe { sys::ncclReduceScatter(s as *const _, r as *mut _, m, f32, nccl_op(op), comm, stream) }
        })
    }

    fn join_deferred(&self) -> Result<()> {
        let op = "join_deferred";
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(last) = inner.deferred.last.take() else { return Ok(()) };
        // The previous join's events finished long ago: read them now, so a long run keeps no
        // more than one step of events.
        inner.deferred.fold()?;
        let e = |what: &str, err: cudarc::driver::DriverError| dev_err(op, format!("{what}: {err}"));
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let compute = self.backend.stream();
        let before = compute.record_event(timing).map_err(|err| e("recording the compute stream", err))?;
        compute.wait(&last).map_err(|err| e("joining the compute stream", err))?;
        let after = compute.record_event(timing).map_err(|err| e("recording the compute stream", err))?;
        inner.deferred.waits.push((before, after));
        let joined = std::mem::take(&mut inner.deferred.in_flight);
        drop(inner);
        if self.options.wait_for_completion {
            self.wait_event(&last, op)?;
        }
        for (kind, elems) in joined {
            self.stats.record(kind, elems);
        }
        Ok(())
    }

    fn overlap_times(&self) -> Result<OverlapTimes> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.deferred.fold()?;
        Ok(inner.deferred.times)
    }
}

impl Communicator<CudaBackend> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, buf: &mut CudaBuf, op: ReduceOp) -> Result<()> {
        if buf.dtype() != dm_runtime::DType::F32 {
            return self.all_reduce_widened(buf, op);
        }
        let (n, p) = (buf.len(), buf.device_ptr());
        self.collective(CollectiveKind::AllReduce, n, n, |comm, stream| {
            // SAFETY: in-place all-reduce of the n floats of `buf` on the side stream.
            unsafe { all_reduce_in_place(p, n, nccl_op(op), comm, stream) }
        })
    }

    fn all_gather(&self, send: &CudaBuf, recv: &mut CudaBuf) -> Result<()> {
        require_f32("all_gather", &[send, recv])?;
        let (n, m) = (send.len(), recv.len());
        if m != self.size * n {
            return Err(CommError::Shape {
                op: "all_gather",
                rank: self.rank,
                detail: format!(
                    "send has {n} elements, so recv must have {} in a group of {}, but it has {m}",
                    self.size * n,
                    self.size
                ),
            });
        }
        let (s, r) = (send.device_ptr(), recv.device_ptr());
        self.collective(CollectiveKind::AllGather, n, n, |comm, stream| {
            // SAFETY: send holds n floats, recv size·n (checked), distinct buffers.
            unsafe { sys::ncclAllGather(s as *const _, r as *mut _, n, sys::ncclDataType_t::ncclFloat32, comm, stream) }
        })
    }

    fn reduce_scatter(&self, send: &CudaBuf, recv: &mut CudaBuf, op: ReduceOp) -> Result<()> {
        require_f32("reduce_scatter", &[send, recv])?;
        let (n, m) = (send.len(), recv.len());
        self.check_reduce_scatter_shape(n, m)?;
        let (s, r) = (send.device_ptr(), recv.device_ptr());
        self.collective(CollectiveKind::ReduceScatter, m, n, |comm, stream| {
            let f32 = sys::ncclDataType_t::ncclFloat32;
            // SAFETY: send holds size·m floats, recv m (checked), distinct buffers.
            unsafe { sys::ncclReduceScatter(s as *const _, r as *mut _, m, f32, nccl_op(op), comm, stream) }
        })
    }

    fn broadcast(&self, buf: &mut CudaBuf, root: usize) -> Result<()> {
        require_f32("broadcast", &[buf])?;
        if root >= self.size {
            return Err(CommError::InvalidRoot { root, size: self.size });
        }
        let (n, p) = (buf.len(), buf.device_ptr());
        self.collective(CollectiveKind::Broadcast, n, n, |comm, stream| {
            let f32 = sys::ncclDataType_t::ncclFloat32;
            // SAFETY: in-place broadcast of the n floats of `buf` from group rank `root`.
            unsafe { sys::ncclBroadcast(p as *const _, p as *mut _, n, f32, root as i32, comm, stream) }
        })
    }

    fn barrier(&self) -> Result<()> {
        self.run("barrier", false, |comm, stream, inner| {
            let p = inner.token.device_ptr();
            // SAFETY: a 1-float all-reduce of the communicator's own token buffer.
            unsafe { all_reduce_in_place(p, 1, sys::ncclRedOp_t::ncclSum, comm, stream) }
        })?;
        // A barrier returns only once every rank entered it, whatever `wait_for_completion` says.
        if !self.options.wait_for_completion {
            self.synchronize()?;
        }
        self.stats.record(CollectiveKind::Barrier, 0);
        Ok(())
    }

    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn deferred(&self) -> Option<&dyn DeferredCollectives<CudaBackend>> {
        Some(self)
    }

    fn abort(&self, reason: &str) {
        if !self.aborted.set(reason) {
            return;
        }
        tracing::error!(group = %self.label, rank = self.rank, reason, "aborting the NCCL communicator");
        // Dropping the RawComm calls ncclCommAbort, which also unblocks kernels stuck on peers.
        let comm = self.inner.lock().unwrap_or_else(PoisonError::into_inner).comm.take();
        drop(comm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_ops_map_to_nccl() {
        assert_eq!(nccl_op(ReduceOp::Sum), sys::ncclRedOp_t::ncclSum);
        assert_eq!(nccl_op(ReduceOp::Avg), sys::ncclRedOp_t::ncclAvg);
        assert_eq!(nccl_op(ReduceOp::Max), sys::ncclRedOp_t::ncclMax);
    }

    #[test]
    fn missing_nccl_is_a_clean_error() {
        let id = std::panic::catch_unwind(NcclId::new).expect("never panics");
        if nccl_library_present() {
            eprintln!("libnccl present: {id:?}");
        } else {
            let err = id.expect_err("no libnccl").to_string();
            assert!(err.contains("NCCL is unavailable") && err.contains("libnccl"), "{err}");
            assert!(nccl_version().is_err());
        }
    }
}
