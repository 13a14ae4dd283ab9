//! The dp gradient reduction issued during the backward, layer by layer.
//!
//! [`DpReduceSink`] is the model's [`GradSink`] for the last micro-batch of a step: each time the
//! backward announces a group of final gradients it issues their data-parallel collective over
//! the dp group — the in-place all-reduce (sum) of each gradient, or with ZeRO-1 the
//! reduce-scatter of each gradient into this rank's chunk ([`Zero1::reduce_scatter_grad`]).
//! Where the communicator can leave collectives in flight ([`Communicator::deferred`]: NCCL's
//! side stream) they overlap the rest of the backward and [`InFlight::finish`] joins them before
//! the gradient norm; elsewhere (threads, MPI) they are the same blocking calls at the same
//! places, so every rank of the group makes the same calls in the same order and the numbers
//! equal those of the reduction after the backward bit for bit (each tensor's reduction is the
//! same collective on the same values either way).

use anyhow::{Context, Result};
use dm_model::dallebart::GradSink;
use dm_model::ModelError;
use dm_parallel::zero::Zero1;
use dm_parallel::{Communicator, ReduceOp};
use dm_runtime::Backend;

/// What the sink issued during one backward, until [`InFlight::finish`].
pub(super) struct InFlight<B: Backend> {
    /// ZeRO-1: this rank's summed chunk of each tensor, once its group was announced.
    chunks: Vec<Option<B::Buf>>,
    /// The send buffers of deferred reduce-scatters, alive until the join.
    staging: Vec<B::Buf>,
    /// A deferred collective was issued: the join is due.
    deferred: bool,
}

impl<B: Backend> InFlight<B> {
    pub(super) fn new(tensors: usize) -> Self {
        Self { chunks: (0..tensors).map(|_| None).collect(), staging: Vec::new(), deferred: false }
    }

    /// After a failed backward: joins what was left in flight (so no collective still reads a
    /// staging buffer when it is freed; a failure to join is logged) and returns `error`.
    pub(super) fn abandon(self, comm: &dyn Communicator<B>, error: anyhow::Error) -> anyhow::Error {
        if let (true, Some(d)) = (self.deferred, comm.deferred()) {
            if let Err(e) = d.join_deferred() {
                tracing::warn!("joining the dp collectives left in flight by a failed backward: {e}");
            }
        }
        error
    }

    /// Joins the deferred collectives (the compute order waits for them) and returns the ZeRO-1
    /// chunks of every tensor (`None` without ZeRO-1). `names` name a tensor never announced.
    pub(super) fn finish(self, comm: &dyn Communicator<B>, names: &[String]) -> Result<Option<Vec<B::Buf>>> {
        if self.deferred {
            comm.deferred()
                .context("internal: deferred collectives on a communicator without them")?
                .join_deferred()?;
        }
        drop(self.staging);
        if self.chunks.iter().all(Option::is_none) {
            return Ok(None);
        }
        let chunks = self.chunks.into_iter().enumerate().map(|(i, c)| {
            c.with_context(|| format!("internal: the backward never announced the gradient of `{}`", names[i]))
        });
        Ok(Some(chunks.collect::<Result<_>>()?))
    }
}

/// The sink of the last micro-batch's backward (see the module docs).
pub(super) struct DpReduceSink<'a, B: Backend> {
    pub be: &'a B,
    pub comm: &'a dyn Communicator<B>,
    /// ZeRO-1's shards and the tensor names; `None`: all-reduce.
    pub zero1: Option<&'a Zero1<B>>,
    pub names: &'a [String],
    pub state: &'a mut InFlight<B>,
    /// The first failure, as the collective reported it (the backward stops at it).
    pub failure: Option<anyhow::Error>,
}

impl<B: Backend> DpReduceSink<'_, B> {
    /// Issues the collective of each gradient in `params`.
    fn issue(&mut self, grads: &mut [B::Buf], params: &[usize]) -> Result<()> {
        let deferred = self.comm.deferred();
        for &i in params {
            let (g, name) = (&mut grads[i], &self.names[i]);
            match (self.zero1, deferred) {
                (None, Some(d)) => d.all_reduce_deferred(g, ReduceOp::Sum)?,
                (None, None) => self.comm.all_reduce(g, ReduceOp::Sum)?,
                (Some(z), Some(d)) => {
                    let (send, mine) = z.reduce_scatter_grad_deferred(self.be, d, i, g, name)?;
                    self.state.staging.push(send);
                    self.state.chunks[i] = Some(mine);
                }
                (Some(z), None) => self.state.chunks[i] = Some(z.reduce_scatter_grad(self.be, self.comm, i, g, name)?),
            }
            self.state.deferred |= deferred.is_some();
        }
        Ok(())
    }
}

impl<B: Backend> GradSink<B> for DpReduceSink<'_, B> {
    fn grads_ready(&mut self, grads: &mut [B::Buf], params: &[usize]) -> dm_model::Result<()> {
        self.issue(grads, params).map_err(|e| {
            let message = format!("{e:#}");
            self.failure = Some(e);
            ModelError::Comm(message)
        })
    }
}
