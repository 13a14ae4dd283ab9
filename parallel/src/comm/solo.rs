//! The one-rank communicator: what tp = 1 and dp = 1 groups use on any backend.

use std::sync::Arc;

use dm_runtime::Backend;

use super::{AbortSlot, CollectiveKind, CommError, CommStats, Communicator, ReduceOp, Result, StatsRecorder};

/// A group of one rank. Reductions and broadcasts leave the buffer as it is; all_gather and
/// reduce_scatter copy `send` into `recv` (through the backend, so it works on any device). Calls
/// and bytes are counted like any other communicator's, so stats of a tp = 1 run are comparable.
pub struct SoloComm<B: Backend> {
    backend: Arc<B>,
    stats: StatsRecorder,
    aborted: AbortSlot,
}

impl<B: Backend> SoloComm<B> {
    /// A one-rank group on `backend` (a `B` or an `Arc<B>`), used for the copies.
    pub fn new(backend: impl Into<Arc<B>>) -> Self {
        Self { backend: backend.into(), stats: StatsRecorder::new(), aborted: AbortSlot::default() }
    }

    fn check_aborted(&self) -> Result<()> {
        self.aborted.check(0)
    }

    fn copy_same_len(&self, op: &'static str, send: &B::Buf, recv: &mut B::Buf) -> Result<usize> {
        self.check_aborted()?;
        let (n, m) = (self.backend.buf_len(send), self.backend.buf_len(recv));
        if n != m {
            return Err(CommError::Shape {
                op,
                rank: 0,
                detail: format!("send has {n} elements, so recv must have {n} in a group of 1, but it has {m}"),
            });
        }
        self.backend.copy(recv, 0, send, 0, n).map_err(|e| CommError::Device { op, detail: e.to_string() })?;
        Ok(n)
    }
}

impl<B: Backend> Communicator<B> for SoloComm<B> {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce(&self, buf: &mut B::Buf, _op: ReduceOp) -> Result<()> {
        self.check_aborted()?;
        self.stats.record(CollectiveKind::AllReduce, self.backend.buf_len(buf));
        Ok(())
    }
    fn all_gather(&self, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        let n = self.copy_same_len("all_gather", send, recv)?;
        self.stats.record(CollectiveKind::AllGather, n);
        Ok(())
    }
    fn reduce_scatter(&self, send: &B::Buf, recv: &mut B::Buf, _op: ReduceOp) -> Result<()> {
        let n = self.copy_same_len("reduce_scatter", send, recv)?;
        self.stats.record(CollectiveKind::ReduceScatter, n);
        Ok(())
    }
    fn broadcast(&self, buf: &mut B::Buf, root: usize) -> Result<()> {
        self.check_aborted()?;
        if root != 0 {
            return Err(CommError::InvalidRoot { root, size: 1 });
        }
        self.stats.record(CollectiveKind::Broadcast, self.backend.buf_len(buf));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.check_aborted()?;
        self.stats.record(CollectiveKind::Barrier, 0);
        Ok(())
    }
    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }
    fn abort(&self, reason: &str) {
        if self.aborted.set(reason) {
            tracing::error!(reason, "solo communicator aborted");
        }
    }
}
