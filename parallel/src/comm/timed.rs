//! [`TimedComm`]: a communicator wrapper that measures the wall time each rank spends inside
//! collectives (waiting for the other ranks plus moving the data), per [`CollectiveKind`].
//! `comm_share = wait seconds / step seconds` in scaling studies comes from here. It issues
//! exactly the collectives of the communicator it wraps, so [`Communicator::stats`] is unchanged.
//!
//! Buffers are the wrapped backend's, so the same handle also serves [`Profiled<B>`] ranks. The
//! wrapped communicator's deferred collectives ([`super::deferred`]) pass through.

use super::deferred::{DeferredCollectives, OverlapTimes};
use super::{CollectiveKind, CommError, CommStats, Communicator, ReduceOp, Result};
use dm_runtime::{Backend, Profiled};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Seconds spent in each collective kind (indexed like [`CollectiveKind::ALL`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommTimes {
    /// Seconds per kind, in [`CollectiveKind::ALL`] order.
    pub seconds: [f64; 5],
}

impl CommTimes {
    /// Seconds in one kind.
    pub fn get(&self, kind: CollectiveKind) -> f64 {
        self.seconds[kind.index()]
    }
    /// Seconds in every kind together.
    pub fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }
    /// Element-wise sum.
    pub fn merged(&self, o: &CommTimes) -> CommTimes {
        let mut out = *self;
        for (a, b) in out.seconds.iter_mut().zip(o.seconds) {
            *a += b;
        }
        out
    }
    /// `self − earlier`.
    pub fn since(&self, earlier: &CommTimes) -> CommTimes {
        let mut out = *self;
        for (a, b) in out.seconds.iter_mut().zip(earlier.seconds) {
            *a -= b;
        }
        out
    }
}

/// Wraps a communicator of backend `B` and times every collective.
pub struct TimedComm<B: Backend> {
    inner: Arc<dyn Communicator<B>>,
    nanos: [AtomicU64; 5],
}

impl<B: Backend> TimedComm<B> {
    /// Times the collectives of `inner`.
    pub fn new(inner: Arc<dyn Communicator<B>>) -> Self {
        Self { inner, nanos: Default::default() }
    }

    /// Seconds spent in collectives so far.
    pub fn times(&self) -> CommTimes {
        let mut t = CommTimes::default();
        for (s, n) in t.seconds.iter_mut().zip(&self.nanos) {
            *s = n.load(Ordering::Relaxed) as f64 * 1e-9;
        }
        t
    }

    fn timed<T>(&self, kind: CollectiveKind, f: impl FnOnce(&dyn Communicator<B>) -> T) -> T {
        let t0 = Instant::now();
        let out = f(self.inner.as_ref());
        self.nanos[kind.index()].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl<B: Backend> Communicator<B> for TimedComm<B> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce(&self, buf: &mut B::Buf, op: ReduceOp) -> Result<()> {
        self.timed(CollectiveKind::AllReduce, |c| c.all_reduce(buf, op))
    }
    fn all_gather(&self, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        self.timed(CollectiveKind::AllGather, |c| c.all_gather(send, recv))
    }
    fn reduce_scatter(&self, send: &B::Buf, recv: &mut B::Buf, op: ReduceOp) -> Result<()> {
        self.timed(CollectiveKind::ReduceScatter, |c| c.reduce_scatter(send, recv, op))
    }
    fn broadcast(&self, buf: &mut B::Buf, root: usize) -> Result<()> {
        self.timed(CollectiveKind::Broadcast, |c| c.broadcast(buf, root))
    }
    fn barrier(&self) -> Result<()> {
        self.timed(CollectiveKind::Barrier, |c| c.barrier())
    }
    fn stats(&self) -> CommStats {
        self.inner.stats()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn deferred(&self) -> Option<&dyn DeferredCollectives<B>> {
        self.inner.deferred().map(|_| self as &dyn DeferredCollectives<B>)
    }
}

/// The wrapped communicator's deferred collectives (when it has them); the host's wait at a
/// join counts as all_reduce time.
impl<B: Backend> DeferredCollectives<B> for TimedComm<B> {
    fn all_reduce_deferred(&self, buf: &mut B::Buf, op: ReduceOp) -> Result<()> {
        self.inner_deferred()?.all_reduce_deferred(buf, op)
    }
    fn reduce_scatter_deferred(&self, send: &B::Buf, recv: &mut B::Buf, op: ReduceOp) -> Result<()> {
        self.inner_deferred()?.reduce_scatter_deferred(send, recv, op)
    }
    fn join_deferred(&self) -> Result<()> {
        let d = self.inner_deferred()?;
        self.timed(CollectiveKind::AllReduce, |_| d.join_deferred())
    }
    fn overlap_times(&self) -> Result<OverlapTimes> {
        self.inner_deferred()?.overlap_times()
    }
}

impl<B: Backend> TimedComm<B> {
    fn inner_deferred(&self) -> Result<&dyn DeferredCollectives<B>> {
        self.inner.deferred().ok_or_else(|| CommError::Device {
            op: "deferred collective",
            detail: "internal: the wrapped communicator has no deferred collectives".into(),
        })
    }
}

impl<B: Backend> DeferredCollectives<Profiled<B>> for TimedComm<B> {
    fn all_reduce_deferred(&self, buf: &mut B::Buf, op: ReduceOp) -> Result<()> {
        DeferredCollectives::<B>::all_reduce_deferred(self, buf, op)
    }
    fn reduce_scatter_deferred(&self, send: &B::Buf, recv: &mut B::Buf, op: ReduceOp) -> Result<()> {
        DeferredCollectives::<B>::reduce_scatter_deferred(self, send, recv, op)
    }
    fn join_deferred(&self) -> Result<()> {
        DeferredCollectives::<B>::join_deferred(self)
    }
    fn overlap_times(&self) -> Result<OverlapTimes> {
        DeferredCollectives::<B>::overlap_times(self)
    }
}

impl<B: Backend> Communicator<Profiled<B>> for TimedComm<B> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce(&self, buf: &mut B::Buf, op: ReduceOp) -> Result<()> {
        Communicator::<B>::all_reduce(self, buf, op)
    }
    fn all_gather(&self, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        Communicator::<B>::all_gather(self, send, recv)
    }
    fn reduce_scatter(&self, send: &B::Buf, recv: &mut B::Buf, op: ReduceOp) -> Result<()> {
        Communicator::<B>::reduce_scatter(self, send, recv, op)
    }
    fn broadcast(&self, buf: &mut B::Buf, root: usize) -> Result<()> {
        Communicator::<B>::broadcast(self, buf, root)
    }
    fn barrier(&self) -> Result<()> {
        Communicator::<B>::barrier(self)
    }
    fn stats(&self) -> CommStats {
        self.inner.stats()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn deferred(&self) -> Option<&dyn DeferredCollectives<Profiled<B>>> {
        self.inner.deferred().map(|_| self as &dyn DeferredCollectives<Profiled<B>>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ThreadComm;
    use dm_runtime::cpu::CpuBackend;
    use std::time::Duration;

    #[test]
    fn the_early_rank_waits_for_the_late_one() {
        let comms = ThreadComm::group(2);
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                std::thread::spawn(move || {
                    let inner: Arc<dyn Communicator<CpuBackend>> = Arc::new(c);
                    let t = TimedComm::new(inner);
                    let be = CpuBackend::new();
                    let mut buf = be.upload("x", &[rank as f32 + 1.0; 4]).unwrap();
                    if rank == 1 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Communicator::<CpuBackend>::all_reduce(&t, &mut buf, ReduceOp::Sum).unwrap();
                    assert_eq!(be.download(&buf).unwrap(), vec![3.0; 4]);
                    let stats = Communicator::<CpuBackend>::stats(&t);
                    assert_eq!(stats.all_reduce.calls, 1);
                    assert_eq!(stats.all_reduce.bytes, 16);
                    t.times()
                })
            })
            .collect();
        let times: Vec<CommTimes> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(times[0].get(CollectiveKind::AllReduce) >= 0.19, "{times:?}");
        assert!(times[1].get(CollectiveKind::AllReduce) < 0.15, "{times:?}");
        assert_eq!(times[0].get(CollectiveKind::Barrier), 0.0);
        assert!((times[0].total() - times[0].get(CollectiveKind::AllReduce)).abs() < 1e-12);
    }
}
