//! Section 4: NCCL on one rank.

use super::*;

impl Checker<CudaBackend> {
    // ---- section 4: NCCL -------------------------------------------------------------------------

    pub(super) fn nccl(&mut self) -> Result<()> {
        let g = "nccl";
        if !nccl_library_present() {
            let required = std::env::var("DALLE_MESH_REQUIRE_NCCL").is_ok_and(|v| v == "1");
            let msg = dm_parallel::comm::nccl::nccl_available().err().map(|e| e.to_string()).unwrap_or_default();
            self.row(
                g,
                "1-rank communicator round trip",
                if required { Status::Fail } else { Status::Skipped },
                None,
                None,
                msg,
            );
            return Ok(());
        }
        let be = self.gpu.clone();
        let result = (|| -> Result<String> {
            let id = NcclId::new()?;
            let comm = NcclComm::new(
                &be,
                &id,
                0,
                1,
                "gpu-check",
                NcclOptions { timeout: Duration::from_secs(60), ..Default::default() },
            )?;
            let x = self.randn(1000, 3.0);
            let mut buf = be.upload("nccl.x", &x)?;
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                comm.all_reduce(&mut buf, op)?;
            }
            let after_reduce = be.download(&buf)?;
            let send = be.upload("nccl.send", &x)?;
            let mut recv = be.upload("nccl.recv", &nan(1000))?;
            comm.all_gather(&send, &mut recv)?;
            let gathered = be.download(&recv)?;
            let mut recv2 = be.upload("nccl.recv2", &nan(1000))?;
            comm.reduce_scatter(&send, &mut recv2, ReduceOp::Sum)?;
            let scattered = be.download(&recv2)?;
            comm.broadcast(&mut buf, 0)?;
            comm.barrier()?;
            // The overlapped form: compute keeps going while the side stream reduces.
            let mut grad = be.upload("nccl.grad", &x)?;
            let pending = comm.all_reduce_async(&mut grad, ReduceOp::Avg)?;
            be.scale(&mut buf, 2.0)?;
            pending.join()?;
            let grad_after = be.download(&grad)?;
            let stats = comm.stats();
            let ok = after_reduce == x && gathered == x && scattered == x && grad_after == x;
            let counts = stats.all_reduce.calls == 4
                && stats.all_gather.calls == 1
                && stats.barrier.calls == 1
                && stats.all_reduce.bytes == 4 * 4000;
            if !ok {
                anyhow::bail!("a 1-rank collective changed its data");
            }
            if !counts {
                anyhow::bail!("stats do not count calls as the other communicators do: {stats:?}");
            }
            Ok(format!(
                "NCCL {}; all_reduce sum/avg/max, all_gather, reduce_scatter, broadcast, barrier, async all_reduce",
                nccl_version()?
            ))
        })();
        match result {
            Ok(d) => self.row(g, "1-rank communicator round trip", Status::Pass, None, None, d),
            Err(e) => self.row(g, "1-rank communicator round trip", Status::Fail, None, None, format!("{e:#}")),
        }
        Ok(())
    }
}
