//! [`HostStagedComm`]: a communicator for any backend over an in-process [`ThreadComm`]. Each
//! collective downloads the device buffers, combines them on host slices through the thread
//! rendezvous (the same all-reduce / all-gather / reduce-scatter / broadcast as `ThreadComm`'s),
//! and writes the result back. Slow (every collective synchronises the device), exact, and
//! enough to run tensor parallelism with several ranks on one GPU, where NCCL (before 2.30)
//! refuses two ranks of one communicator.

use dm_runtime::Backend;

use super::{CommError, CommStats, Communicator, ReduceOp, Result, ThreadComm};

/// One rank of a host-staged group: its [`ThreadComm`] handle and the backend its buffers live on.
pub struct HostStagedComm<B: Backend> {
    comm: ThreadComm,
    be: B,
}

impl<B: Backend> HostStagedComm<B> {
    /// The rank of `comm`, staging its collectives through buffers of `be`.
    pub fn new(comm: ThreadComm, be: B) -> Self {
        Self { comm, be }
    }
}

fn staged_err(op: &'static str, e: dm_runtime::RuntimeError) -> CommError {
    CommError::Device { op, detail: e.to_string() }
}

impl<B: Backend> Communicator<B> for HostStagedComm<B> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn size(&self) -> usize {
        self.comm.size()
    }
    fn all_reduce(&self, buf: &mut B::Buf, op: ReduceOp) -> Result<()> {
        let mut h = self.be.download(buf).map_err(|e| staged_err("all_reduce", e))?;
        self.comm.all_reduce_slice(&mut h, op)?;
        self.be.write(buf, 0, &h).map_err(|e| staged_err("all_reduce", e))
    }
    fn all_gather(&self, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        let s = self.be.download(send).map_err(|e| staged_err("all_gather", e))?;
        let mut r = vec![0.0; self.be.buf_len(recv)];
        self.comm.all_gather_slice(&s, &mut r)?;
        self.be.write(recv, 0, &r).map_err(|e| staged_err("all_gather", e))
    }
    fn reduce_scatter(&self, send: &B::Buf, recv: &mut B::Buf, op: ReduceOp) -> Result<()> {
        let s = self.be.download(send).map_err(|e| staged_err("reduce_scatter", e))?;
        let mut r = vec![0.0; self.be.buf_len(recv)];
        self.comm.reduce_scatter_slice(&s, &mut r, op)?;
        self.be.write(recv, 0, &r).map_err(|e| staged_err("reduce_scatter", e))
    }
    fn broadcast(&self, buf: &mut B::Buf, root: usize) -> Result<()> {
        let mut h = self.be.download(buf).map_err(|e| staged_err("broadcast", e))?;
        self.comm.broadcast_slice(&mut h, root)?;
        self.be.write(buf, 0, &h).map_err(|e| staged_err("broadcast", e))
    }
    fn barrier(&self) -> Result<()> {
        self.comm.barrier()
    }
    fn stats(&self) -> CommStats {
        self.comm.stats()
    }
    fn abort(&self, reason: &str) {
        self.comm.abort(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dm_runtime::cpu::CpuBackend;

    /// Two ranks on CPU backends: the all-reduced sum, the gathered halves and the scattered
    /// sums come back through the backends' buffers.
    #[test]
    fn collectives_round_trip_through_the_backend() {
        let handles: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let be = CpuBackend::new();
                    let rank = comm.rank() as f32;
                    let c = HostStagedComm::new(comm, be.clone());
                    let mut x = be.upload("x", &[rank + 1.0, 10.0 * (rank + 1.0)]).unwrap();
                    c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                    let mut all = be.zeros("all", 4).unwrap();
                    c.all_gather(&x, &mut all).unwrap();
                    let mut part = be.zeros("part", 1).unwrap();
                    c.reduce_scatter(&x, &mut part, ReduceOp::Sum).unwrap();
                    (be.download(&x).unwrap(), be.download(&all).unwrap(), be.download(&part).unwrap())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (rank, (x, all, part)) in results.iter().enumerate() {
            assert_eq!(x, &[3.0, 30.0]);
            assert_eq!(all, &[3.0, 30.0, 3.0, 30.0]);
            assert_eq!(part, &[if rank == 0 { 6.0 } else { 60.0 }]);
        }
    }
}
