//! ZeRO-1: AdamW with its optimizer state sharded across the data-parallel group.
//!
//! Each tensor (of `n` local elements) is cut into `dp` chunks of `c = ⌈n/dp⌉` (the last
//! padded). Data-parallel rank `r` keeps the moments of chunk `r` only. One step, per tensor:
//! 1. **reduce-scatter** (sum) of the gradient across dp: rank `r` receives the summed chunk `r`;
//! 2. AdamW on chunk `r` of the parameter with its moments;
//! 3. **all-gather** of the updated chunks: every rank has the whole updated parameter again.
//!
//! Collectives per step and tensor: one reduce-scatter of `dp·c` elements and one all-gather of
//! `c` elements (bytes as counted by [`crate::CommStats`]: `4·dp·c` and `4·c`). Staging buffers
//! (padded gradient, gathered parameter, the two chunks) live only while their tensor is updated.
//! Step 1 is also callable per tensor ([`Zero1::reduce_scatter_grad`], and deferred on a
//! communicator's side stream), so the trainer issues it during the backward as each layer's
//! gradients become final.

use crate::comm::deferred::DeferredCollectives;
use crate::comm::{CommError, Communicator, ReduceOp};
use dm_runtime::{AdamWStep, Backend, RuntimeError};
use thiserror::Error;

/// A ZeRO-1 step failed in a collective or on the device.
#[derive(Debug, Error)]
pub enum ZeroError {
    /// A collective failed (another rank aborted, timed out, …).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A device op failed (out of memory budget, …).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// One tensor's shard of the optimizer state.
pub struct ShardState<B: Backend> {
    /// Local elements of the tensor.
    pub len: usize,
    /// Chunk length `⌈len/dp⌉`.
    pub chunk: usize,
    /// First moment of this rank's chunk.
    pub m: B::Buf,
    /// Second moment of this rank's chunk.
    pub v: B::Buf,
}

/// AdamW state for this data-parallel rank's chunk of every tensor.
pub struct Zero1<B: Backend> {
    /// This rank's index in the data-parallel group.
    pub dp_rank: usize,
    /// Size of the data-parallel group.
    pub dp: usize,
    /// One entry per tensor, in parameter-table order.
    pub shards: Vec<ShardState<B>>,
}

impl<B: Backend> Zero1<B> {
    /// Zero moments for chunk `dp_rank` of each tensor of the given lengths.
    pub fn new(be: &B, names: &[String], lens: &[usize], dp_rank: usize, dp: usize) -> Result<Self, ZeroError> {
        let shards = names
            .iter()
            .zip(lens)
            .map(|(name, &len)| {
                let chunk = len.div_ceil(dp);
                Ok(ShardState {
                    len,
                    chunk,
                    m: be.zeros(&format!("zero1.adam_m.{name}"), chunk)?,
                    v: be.zeros(&format!("zero1.adam_v.{name}"), chunk)?,
                })
            })
            .collect::<Result<_, ZeroError>>()?;
        Ok(Self { dp_rank, dp, shards })
    }

    /// The global index range `[start, end)` of this rank's chunk of tensor `i`.
    pub fn chunk_range(&self, i: usize) -> (usize, usize) {
        let s = &self.shards[i];
        let start = (self.dp_rank * s.chunk).min(s.len);
        (start, (start + s.chunk).min(s.len))
    }

    /// Step 1: reduce-scatters each rank's gradient contributions across dp; returns this rank's
    /// summed chunk of every tensor (the caller can compute the global norm from them before
    /// [`Zero1::update`]).
    pub fn reduce_scatter_grads(
        &self,
        be: &B,
        comm: &dyn Communicator<B>,
        grads: &[B::Buf],
        names: &[String],
    ) -> Result<Vec<B::Buf>, ZeroError> {
        (0..grads.len()).map(|i| self.reduce_scatter_grad(be, comm, i, &grads[i], &names[i])).collect()
    }

    /// Step 1 for tensor `i` alone (its gradient `grad`): this rank's summed chunk. Collective:
    /// one reduce-scatter over dp.
    pub fn reduce_scatter_grad(
        &self,
        be: &B,
        comm: &dyn Communicator<B>,
        i: usize,
        grad: &B::Buf,
        name: &str,
    ) -> Result<B::Buf, ZeroError> {
        let (padded, mut mine) = self.stage_grad(be, i, grad, name)?;
        comm.reduce_scatter(&padded, &mut mine, ReduceOp::Sum)?;
        Ok(mine)
    }

    /// [`Zero1::reduce_scatter_grad`] left in flight on `comm`'s side order: returns the padded
    /// send buffer and this rank's chunk, both to be kept untouched until
    /// [`DeferredCollectives::join_deferred`].
    pub fn reduce_scatter_grad_deferred(
        &self,
        be: &B,
        comm: &dyn DeferredCollectives<B>,
        i: usize,
        grad: &B::Buf,
        name: &str,
    ) -> Result<(B::Buf, B::Buf), ZeroError> {
        let (padded, mut mine) = self.stage_grad(be, i, grad, name)?;
        comm.reduce_scatter_deferred(&padded, &mut mine, ReduceOp::Sum)?;
        Ok((padded, mine))
    }

    /// Tensor `i`'s gradient padded to `dp` chunks, and a zeroed chunk to receive into.
    fn stage_grad(&self, be: &B, i: usize, grad: &B::Buf, name: &str) -> Result<(B::Buf, B::Buf), ZeroError> {
        let s = &self.shards[i];
        let mut padded = be.zeros(&format!("zero1.send.{name}"), s.chunk * self.dp)?;
        be.copy(&mut padded, 0, grad, 0, s.len)?;
        let mine = be.zeros(&format!("zero1.grad_chunk.{name}"), s.chunk)?;
        Ok((padded, mine))
    }

    /// AdamW on this rank's chunks (given the summed gradient chunks), then all-gathers every
    /// parameter. `step.step` is the 1-based step count.
    pub fn update(
        &mut self,
        be: &B,
        comm: &dyn Communicator<B>,
        params: &mut [B::Buf],
        grad_chunks: &[B::Buf],
        names: &[String],
        step: &AdamWStep,
    ) -> Result<(), ZeroError> {
        for (i, ((p, g), name)) in params.iter_mut().zip(grad_chunks).zip(names).enumerate() {
            let (start, end) = self.chunk_range(i);
            let s = &mut self.shards[i];
            let mut chunk = be.zeros(&format!("zero1.param_chunk.{name}"), s.chunk)?;
            be.copy(&mut chunk, 0, p, start, end - start)?;
            be.adamw(&mut chunk, g, &mut s.m, &mut s.v, step)?;
            let mut gathered = be.zeros(&format!("zero1.gathered.{name}"), s.chunk * self.dp)?;
            comm.all_gather(&chunk, &mut gathered)?;
            be.copy(p, 0, &gathered, 0, s.len)?;
        }
        Ok(())
    }
}
