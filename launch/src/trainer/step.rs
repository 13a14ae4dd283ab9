//! The optimizer step of one rank, on any backend: forward and backward over the micro-batches
//! (tp collectives inside the model), the dp gradient sync — an all-reduce of every gradient, or
//! with ZeRO-1 a reduce-scatter into this rank's chunks — the global gradient norm (replicated
//! tensors counted once: an all-reduce of one scalar over tp, or over the world with ZeRO-1),
//! clipping, and AdamW (ZeRO-1: the update of this rank's chunks, then an all-gather of the
//! weights over dp). `train` and `bench step` both run exactly this.
//!
//! By default the dp gradient collectives are issued during the last micro-batch's backward,
//! layer by layer as the gradients become final ([`super::overlap`]; overlapped on NCCL's side
//! stream), and `sync` only joins them; [`OptimizerStep::set_overlap_grad_reduce`]`(false)`
//! issues them all after the backward instead (the same numbers bit for bit).

use super::overlap::{DpReduceSink, InFlight};
use super::{reduce_scalar, Groups};
use anyhow::{Context, Result};
use dm_model::params::Shard;
use dm_model::{AdamW, AdamWConfig, Batch, DalleBart, ParamTable};
use dm_parallel::comm::deferred::OverlapTimes;
use dm_parallel::zero::Zero1;
use dm_parallel::ReduceOp;
use dm_runtime::Backend;

/// The optimizer of one rank: the full AdamW state, or this dp rank's ZeRO-1 chunks of it.
pub enum Optimizer<B: Backend> {
    Full(AdamW<B>),
    Zero1(Zero1<B>),
}

/// Full (unsharded over dp) AdamW moments to start from, as a checkpoint holds them for this tp
/// rank's shards.
pub struct Moments<'a> {
    pub m: &'a [Vec<f32>],
    pub v: &'a [Vec<f32>],
}

/// A rank's gradients after the dp sync, with the step's loss and global gradient norm.
pub struct SyncedGrads<B: Backend> {
    /// The step's loss averaged over dp (and the accumulation micro-steps).
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    /// ZeRO-1: this rank's reduced gradient chunks (the full gradients stay in the model).
    chunks: Option<Vec<B::Buf>>,
}

/// The factor that scales gradients of norm `grad_norm` down to `max` (1 when under it or
/// without clipping).
pub fn clip_factor(max: Option<f32>, grad_norm: f32) -> f32 {
    match max {
        Some(max) if grad_norm > max => max / grad_norm,
        _ => 1.0,
    }
}

/// One rank's model, optimizer and communicators, and the step they take together.
pub struct OptimizerStep<B: Backend> {
    pub be: B,
    pub model: DalleBart<B>,
    pub opt: Optimizer<B>,
    pub groups: Groups<B>,
    pub adamw: AdamWConfig,
    table: ParamTable,
    names: Vec<String>,
    tp_index: usize,
    /// Completed updates (AdamW's bias correction counts from here).
    step: u64,
    /// Issue the dp gradient collectives during the backward (default) or after it.
    overlap_grad_reduce: bool,
    /// What the last backward issued, until `sync` finishes it.
    in_flight: Option<InFlight<B>>,
}

impl<B: Backend> OptimizerStep<B> {
    /// The step of a rank at `(dp_index, tp_index)` of a `dp`-wide data axis: ZeRO-1 when `zero1`
    /// and `dp > 1`; moments from `restored` (else zero) and `start_step` completed updates.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: B,
        model: DalleBart<B>,
        groups: Groups<B>,
        adamw: AdamWConfig,
        zero1: bool,
        (dp_index, dp): (usize, usize),
        restored: Option<Moments>,
        start_step: u64,
    ) -> Result<Self> {
        let (tp_index, _) = model.tp_coords();
        let table = model.table.clone();
        let names: Vec<String> = table.specs.iter().map(|s| s.name.clone()).collect();
        let opt = if zero1 && dp > 1 {
            let lens: Vec<usize> = table.specs.iter().map(|s| s.numel()).collect();
            let mut z = Zero1::new(&be, &names, &lens, dp_index, dp)?;
            if let Some(r) = &restored {
                let (m, v) = (table.shard_values(r.m), table.shard_values(r.v));
                for i in 0..names.len() {
                    let (start, end) = z.chunk_range(i);
                    be.write(&mut z.shards[i].m, 0, &m[i][start..end])?;
                    be.write(&mut z.shards[i].v, 0, &v[i][start..end])?;
                }
            }
            Optimizer::Zero1(z)
        } else {
            let mut a = AdamW::new(&be, adamw, &names, &model.params)?;
            if let Some(r) = &restored {
                for (buf, vals) in a.m.iter_mut().zip(table.shard_values(r.m)) {
                    be.write(buf, 0, &vals)?;
                }
                for (buf, vals) in a.v.iter_mut().zip(table.shard_values(r.v)) {
                    be.write(buf, 0, &vals)?;
                }
            }
            a.step = start_step;
            Optimizer::Full(a)
        };
        let (overlap_grad_reduce, in_flight) = (true, None);
        Ok(Self {
            be,
            model,
            opt,
            groups,
            adamw,
            table,
            names,
            tp_index,
            step: start_step,
            overlap_grad_reduce,
            in_flight,
        })
    }

    /// Whether the dp gradient collectives are issued during the backward (`true`, the default)
    /// or all after it (`false`); both give the same numbers.
    pub fn set_overlap_grad_reduce(&mut self, on: bool) {
        self.overlap_grad_reduce = on;
    }

    /// The dp collectives' time left in flight during the backward and the time the compute
    /// order waited for them, summed over the steps so far; `None` where the dp communicator runs
    /// its collectives blocking (threads, MPI: nothing can be hidden) or there is no dp group.
    pub fn dp_overlap_times(&self) -> Result<Option<OverlapTimes>> {
        let Some(d) = self.groups.dp.as_ref().and_then(|c| c.deferred()) else { return Ok(None) };
        Ok(Some(d.overlap_times()?))
    }

    /// Zeroes the gradients and accumulates forward + backward over `micro_steps` micro-batches
    /// from `next_batch`, the loss scaled by `loss_scale` (1 / image tokens of the global batch).
    /// Returns this rank's mean loss of the micro-batches. Collectives: the model's tp ones, and
    /// with the overlap on ([`Self::set_overlap_grad_reduce`]) the dp gradient collectives during
    /// the last micro-batch's backward.
    pub fn backward(
        &mut self,
        micro_steps: usize,
        loss_scale: f32,
        mut next_batch: impl FnMut() -> Result<Batch>,
    ) -> Result<f32> {
        self.in_flight = None;
        self.model.zero_grads()?;
        let mut loss_sum = 0.0f64;
        for micro in 0..micro_steps {
            let b = next_batch()?;
            self.model.forward(&b)?;
            let last = micro + 1 == micro_steps;
            let loss = if last && self.overlap_grad_reduce && self.groups.dp.is_some() {
                self.backward_reducing_over_dp(loss_scale)?
            } else {
                self.model.loss_and_backward(loss_scale)?.loss
            };
            loss_sum += loss as f64;
        }
        Ok((loss_sum / micro_steps as f64) as f32)
    }

    /// The loss and backward of the last micro-batch, issuing each layer's dp gradient
    /// collective as its gradients become final ([`DpReduceSink`]); `sync` finishes them.
    fn backward_reducing_over_dp(&mut self, loss_scale: f32) -> Result<f32> {
        let dp = self.groups.dp.as_ref().context("internal: no dp group to reduce over")?;
        let mut state = InFlight::new(self.names.len());
        let zero1 = match &self.opt {
            Optimizer::Zero1(z) => Some(z),
            Optimizer::Full(_) => None,
        };
        let (be, comm, names) = (&self.be, dp.as_ref(), self.names.as_slice());
        let mut sink = DpReduceSink { be, comm, zero1, names, state: &mut state, failure: None };
        let out = self.model.loss_and_backward_with(loss_scale, &mut sink);
        let failure = sink.failure.take();
        match (out, failure) {
            (Ok(out), None) => {
                self.in_flight = Some(state);
                Ok(out.loss)
            }
            // The collective's own error rather than the model's summary of it.
            (_, Some(e)) => Err(state.abandon(comm, e)),
            (Err(e), None) => Err(state.abandon(comm, e.into())),
        }
    }

    /// Averages `local_loss` over dp, syncs the gradients over dp and computes the global norm.
    pub fn sync(&mut self, local_loss: f32) -> Result<SyncedGrads<B>> {
        let be = &self.be;
        let loss = reduce_scalar(be, self.groups.dp.as_ref(), local_loss, ReduceOp::Avg)?;
        let (tp_index, table) = (self.tp_index, &self.table);
        let counted = |i: usize| tp_index == 0 || table.specs[i].shard != Shard::Replicated;
        // Joins what the backward issued (None: nothing was, reduce now).
        let issued = match (self.in_flight.take(), &self.groups.dp) {
            (Some(state), Some(c)) => Some(state.finish(c.as_ref(), &self.names)?),
            _ => None,
        };
        let (grad_norm, chunks) = match &self.opt {
            Optimizer::Full(_) => {
                if let (Some(c), None) = (&self.groups.dp, &issued) {
                    for g in self.model.grads.iter_mut() {
                        c.all_reduce(g, ReduceOp::Sum)?;
                    }
                }
                let sq = sum_squares(be, &self.model.grads, counted)?;
                let sq = if self.groups.tp.is_some() {
                    reduce_scalar(be, self.groups.tp.as_ref(), sq as f32, ReduceOp::Sum)? as f64
                } else {
                    sq
                };
                (sq.sqrt() as f32, None)
            }
            Optimizer::Zero1(z) => {
                let c = self.groups.dp.as_ref().context("ZeRO-1 needs dp > 1")?;
                let chunks = match issued.flatten() {
                    Some(chunks) => chunks,
                    None => z.reduce_scatter_grads(be, c.as_ref(), &self.model.grads, &self.names)?,
                };
                let sq = sum_squares(be, &chunks, counted)?;
                let sq = reduce_scalar(be, self.groups.world.as_ref(), sq as f32, ReduceOp::Sum)? as f64;
                (sq.sqrt() as f32, Some(chunks))
            }
        };
        Ok(SyncedGrads { loss, grad_norm, chunks })
    }

    /// AdamW at `lr` on the synced gradients scaled by `clip`.
    pub fn apply(&mut self, synced: SyncedGrads<B>, lr: f32, clip: f32) -> Result<()> {
        match (&mut self.opt, synced.chunks) {
            (Optimizer::Full(a), _) => {
                let DalleBart { params, grads, .. } = &mut self.model;
                a.update(&self.be, params, grads, lr, clip)?;
            }
            (Optimizer::Zero1(z), Some(chunks)) => {
                let s = crate::optim_step::adamw_step(&self.adamw, lr, self.step + 1, clip);
                let c = self.groups.dp.as_ref().context("ZeRO-1 needs dp > 1")?;
                z.update(&self.be, c.as_ref(), &mut self.model.params, &chunks, &self.names, &s)?;
            }
            (Optimizer::Zero1(_), None) => anyhow::bail!("internal: a ZeRO-1 step without gradient chunks"),
        }
        self.step += 1;
        Ok(())
    }

    /// Updates completed (the next update is number `step() + 1`).
    pub fn step(&self) -> u64 {
        self.step
    }
}

/// Σ squares of the buffers `counted(i)` selects.
fn sum_squares<B: Backend>(be: &B, bufs: &[B::Buf], counted: impl Fn(usize) -> bool) -> Result<f64> {
    let mut sq = 0.0f64;
    for (i, g) in bufs.iter().enumerate() {
        if counted(i) {
            sq += be.sum_squares(g)?;
        }
    }
    Ok(sq)
}
