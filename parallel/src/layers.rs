//! Tensor-parallel building blocks (Megatron-style) over the runtime's ops. Each takes the
//! rank's [`TpGroup`] (or `None` on one device, where it degenerates to the plain layer) and
//! says which collectives it issues. The model (`dm-model`) composes DalleBart from them.
//!
//! A tensor-parallel region (the attention heads, or the GLU's ffn columns, of this rank) is
//! opened by [`region_entry_forward`] and closed by [`region_exit_forward`]; the backward calls
//! [`region_exit_backward`] and [`region_entry_backward`] at the mirror-image points. The two
//! operators are conjugate (Megatron's `f` and `g`): the entry is the identity forward and an
//! all-reduce backward, the exit an all-reduce forward and the identity backward.
//!
//! | block | forward | backward |
//! |---|---|---|
//! | region entry (before q/k/v, GLU Dense_0/1, lm_head) | identity | all-reduce (sum) of the input gradient |
//! | [`ColumnParallelLinear`] (q/k/v, GLU Dense_0/1, lm_head) | local | local (input gradient partial: summed by the entry) |
//! | [`RowParallelLinear`] (out_proj, GLU Dense_2) | local, then the region exit: all-reduce (sum) of the output | region exit (identity), then local |
//! | vocab-parallel embedding | all-reduce of the gathered rows ([`vocab_parallel_embedding`]) | — (local scatter-add) |
//! | sharded LayerNorm (GLU middle LN over ffn) | 2 all-reduces of `[rows]` ([`sharded_layernorm_forward`]) | 1 all-reduce of `[2, rows]` ([`sharded_layernorm_backward`]) |
//! | vocab-parallel cross-entropy | max all-reduce of `[rows]`, sum all-reduce of `[2, rows]` ([`vocab_parallel_cross_entropy`]); the logits are never gathered | (fused: the gradient is written in the forward) |

use crate::comm::{CommError, Communicator, ReduceOp};
use dm_runtime::{Backend, MatmulSpec, RuntimeError, VocabRange};
use std::sync::Arc;
use thiserror::Error;

/// A tensor-parallel block failed in a collective or on the device.
#[derive(Debug, Error)]
pub enum LayerError {
    /// A collective failed (another rank aborted, timed out, …).
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    /// A device op failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

type Result<T> = std::result::Result<T, LayerError>;

/// This rank's place in its tensor-parallel group and the group's communicator.
#[derive(Clone)]
pub struct TpGroup<B: Backend> {
    /// Index of this rank in the group (its shard).
    pub rank: usize,
    /// Number of ranks the model is split over.
    pub size: usize,
    /// The group's communicator.
    pub comm: Arc<dyn Communicator<B>>,
}

/// Whether `tp` actually splits the model (a group of one does not).
pub fn is_split<B: Backend>(tp: Option<&TpGroup<B>>) -> bool {
    tp.is_some_and(|g| g.size > 1)
}

/// All-reduces `buf` over the group (nothing on one device).
pub fn all_reduce<B: Backend>(tp: Option<&TpGroup<B>>, buf: &mut B::Buf, op: ReduceOp) -> Result<()> {
    if let Some(g) = tp.filter(|g| g.size > 1) {
        g.comm.all_reduce(buf, op)?;
    }
    Ok(())
}

/// Megatron's `f`, forward: entering a tensor-parallel region is the identity (every rank
/// already holds the full input `x`). No collective.
pub fn region_entry_forward<B: Backend>(x: &B::Buf) -> &B::Buf {
    x
}

/// Megatron's `f`, backward: `dx` holds this rank's partial input gradient (summed over every
/// column-parallel linear of the region that reads `x`); **all-reduce (sum)** makes it the full
/// gradient.
pub fn region_entry_backward<B: Backend>(tp: Option<&TpGroup<B>>, dx: &mut B::Buf) -> Result<()> {
    all_reduce(tp, dx, ReduceOp::Sum)
}

/// Megatron's `g`, forward: leaving a tensor-parallel region sums the ranks' partial outputs,
/// **all-reduce (sum)** of `y`.
pub fn region_exit_forward<B: Backend>(tp: Option<&TpGroup<B>>, y: &mut B::Buf) -> Result<()> {
    all_reduce(tp, y, ReduceOp::Sum)
}

/// Megatron's `g`, backward: the identity (the output gradient `dy` is already replicated on
/// every rank). No collective.
pub fn region_exit_backward<B: Backend>(dy: &B::Buf) -> &B::Buf {
    dy
}

/// Whether an input gradient overwrites its buffer or adds into it (several linears reading the
/// same input sum their contributions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradMode {
    /// `dx = …`
    Overwrite,
    /// `dx += …`
    Accumulate,
}

/// A linear layer `y = x · w` without bias, `x: [rows, inputs]`, `w: [inputs, outputs]`, on one
/// device: its forward and the two GEMMs of its backward. No collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    /// Rows of `x` (tokens).
    pub rows: usize,
    /// Columns of `x` = rows of `w`.
    pub inputs: usize,
    /// Columns of `w` and `y`.
    pub outputs: usize,
}

impl Linear {
    /// `y = x · w`.
    pub fn forward<B: Backend>(&self, be: &B, y: &mut B::Buf, x: &B::Buf, w: &B::Buf) -> Result<()> {
        Ok(be.matmul(y, x, w, MatmulSpec::nn(self.rows, self.outputs, self.inputs))?)
    }

    /// `dw += xᵀ · dy` (weight gradients always accumulate, over micro-batches and uses).
    pub fn backward_weight<B: Backend>(&self, be: &B, dw: &mut B::Buf, x: &B::Buf, dy: &B::Buf) -> Result<()> {
        let spec = MatmulSpec {
            m: self.inputs,
            n: self.outputs,
            k: self.rows,
            trans_a: true,
            trans_b: false,
            accumulate: true,
        };
        Ok(be.matmul(dw, x, dy, spec)?)
    }

    /// `dx = dy · wᵀ` (or `dx += …`).
    pub fn backward_input<B: Backend>(
        &self,
        be: &B,
        dx: &mut B::Buf,
        dy: &B::Buf,
        w: &B::Buf,
        mode: GradMode,
    ) -> Result<()> {
        let spec = MatmulSpec {
            m: self.rows,
            n: self.inputs,
            k: self.outputs,
            trans_a: false,
            trans_b: true,
            accumulate: mode == GradMode::Accumulate,
        };
        Ok(be.matmul(dx, dy, w, spec)?)
    }

    /// Both gradients: `dw += xᵀ · dy`, `dx (+)= dy · wᵀ`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        dw: &mut B::Buf,
        dx: &mut B::Buf,
        x: &B::Buf,
        dy: &B::Buf,
        w: &B::Buf,
        mode: GradMode,
    ) -> Result<()> {
        self.backward_weight(be, dw, x, dy)?;
        self.backward_input(be, dx, dy, w, mode)
    }
}

/// Column-parallel linear: `w` is split by output columns, `w_local: [inputs, outputs_local]`,
/// so `y_local = x · w_local` is this rank's slice of the output (its heads, ffn columns or
/// vocabulary columns). Forward and backward are local; the input gradient `dy_local · w_localᵀ`
/// is a partial sum that the region's [`region_entry_backward`] all-reduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnParallelLinear {
    /// Rows of `x` (tokens).
    pub rows: usize,
    /// Columns of the (replicated) input `x`.
    pub inputs: usize,
    /// This rank's output columns.
    pub outputs_local: usize,
}

impl ColumnParallelLinear {
    fn local(&self) -> Linear {
        Linear { rows: self.rows, inputs: self.inputs, outputs: self.outputs_local }
    }
    /// `y_local = x · w_local`. No collective.
    pub fn forward<B: Backend>(&self, be: &B, y_local: &mut B::Buf, x: &B::Buf, w_local: &B::Buf) -> Result<()> {
        self.local().forward(be, y_local, x, w_local)
    }
    /// `dw_local += xᵀ · dy_local`, `dx (+)= dy_local · w_localᵀ` (partial over the group). No
    /// collective.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        dw_local: &mut B::Buf,
        dx_partial: &mut B::Buf,
        x: &B::Buf,
        dy_local: &B::Buf,
        w_local: &B::Buf,
        mode: GradMode,
    ) -> Result<()> {
        self.local().backward(be, dw_local, dx_partial, x, dy_local, w_local, mode)
    }
}

/// Row-parallel linear: `w` is split by input rows, `w_local: [inputs_local, outputs]`, reading
/// this rank's slice `x_local: [rows, inputs_local]` (the output of a column-parallel linear);
/// `x_local · w_local` is a partial sum, and the forward closes the region: **all-reduce (sum)**
/// of the output ([`region_exit_forward`]). The backward opens it again with the identity
/// ([`region_exit_backward`]) and is local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowParallelLinear {
    /// Rows of `x_local` (tokens).
    pub rows: usize,
    /// This rank's input columns (its slice of the region's width).
    pub inputs_local: usize,
    /// Columns of the (replicated) output `y`.
    pub outputs: usize,
}

impl RowParallelLinear {
    fn local(&self) -> Linear {
        Linear { rows: self.rows, inputs: self.inputs_local, outputs: self.outputs }
    }
    /// `y = Σ_ranks x_local · w_local`: one all-reduce (sum) of `y`.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        tp: Option<&TpGroup<B>>,
        y: &mut B::Buf,
        x_local: &B::Buf,
        w_local: &B::Buf,
    ) -> Result<()> {
        self.local().forward(be, y, x_local, w_local)?;
        region_exit_forward(tp, y)
    }
    /// `dw_local += x_localᵀ · dy`, `dx_local = dy · w_localᵀ`. No collective.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        dw_local: &mut B::Buf,
        dx_local: &mut B::Buf,
        x_local: &B::Buf,
        dy: &B::Buf,
        w_local: &B::Buf,
    ) -> Result<()> {
        let dy = region_exit_backward::<B>(dy);
        self.local().backward(be, dw_local, dx_local, x_local, dy, w_local, GradMode::Overwrite)
    }
}

/// Vocab-parallel embedding: gathers the rows of `range` this rank holds (zeros for other ids),
/// then **all-reduce (sum)**: every rank ends with the full embeddings. The backward is a local
/// scatter-add into this rank's rows (`Backend::embedding_backward`), no collective.
pub fn vocab_parallel_embedding<B: Backend>(
    be: &B,
    tp: Option<&TpGroup<B>>,
    out: &mut B::Buf,
    table: &B::Buf,
    ids: &B::Ids,
    range: VocabRange,
    dim: usize,
) -> Result<()> {
    be.embedding_forward(out, table, ids, range, dim)?;
    all_reduce(tp, out, ReduceOp::Sum)
}

/// LayerNorm over a dimension split across the group (bias only, as the GLU middle norm):
/// mean from all-reduced row sums, then rstd from all-reduced centred squares (**2 all-reduces
/// of `[rows]`**, as exact as the one-device op), then the local normalisation. On one device it
/// is the fused `Backend::layernorm_forward`.
#[allow(clippy::too_many_arguments)]
pub fn sharded_layernorm_forward<B: Backend>(
    be: &B,
    tp: Option<&TpGroup<B>>,
    out: &mut B::Buf,
    mean: &mut B::Buf,
    rstd: &mut B::Buf,
    x: &B::Buf,
    bias: &B::Buf,
    dim: usize,
    dim_global: usize,
) -> Result<()> {
    if !is_split(tp) {
        return Ok(be.layernorm_forward(out, mean, rstd, x, None, bias, dim)?);
    }
    be.layernorm_row_sums(mean, x, None, dim)?;
    all_reduce(tp, mean, ReduceOp::Sum)?;
    be.layernorm_finish_stats(mean, dim_global, false)?;
    be.layernorm_row_sums(rstd, x, Some(mean), dim)?;
    all_reduce(tp, rstd, ReduceOp::Sum)?;
    be.layernorm_finish_stats(rstd, dim_global, true)?;
    Ok(be.layernorm_apply(out, x, mean, rstd, None, bias, dim)?)
}

/// Backward of [`sharded_layernorm_forward`]: local row sums `[Σĝ, Σĝx̂]`, **all-reduce (sum) of
/// `[2, rows]`** (`sums` is the scratch), then the local input gradient (overwritten) and the
/// bias gradient (accumulated).
#[allow(clippy::too_many_arguments)]
pub fn sharded_layernorm_backward<B: Backend>(
    be: &B,
    tp: Option<&TpGroup<B>>,
    sums: &mut B::Buf,
    dx: &mut B::Buf,
    dbias: &mut B::Buf,
    dout: &B::Buf,
    x: &B::Buf,
    mean: &B::Buf,
    rstd: &B::Buf,
    dim: usize,
    dim_global: usize,
) -> Result<()> {
    if !is_split(tp) {
        return Ok(be.layernorm_backward(dx, None, dbias, dout, x, mean, rstd, None, dim, false)?);
    }
    be.layernorm_backward_row_sums(sums, dout, x, mean, rstd, None, dim)?;
    all_reduce(tp, sums, ReduceOp::Sum)?;
    Ok(be.layernorm_backward_apply(dx, None, dbias, dout, x, mean, rstd, None, sums, dim, dim_global, false)?)
}

/// Where this rank's logits sit in the vocabulary: `cols` local columns (padded), the first of
/// them at global column `start`, the first `valid` of them real.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabShard {
    /// Local (padded) columns.
    pub cols: usize,
    /// Global index of local column 0.
    pub start: usize,
    /// Real (non-padding) local columns.
    pub valid: usize,
}

/// Softmax cross-entropy over logits split by columns across the group, forward and backward in
/// one call: local max → **all-reduce (max) of `[rows]`** → local `[Σ e^(x−max), target logit]`
/// → **all-reduce (sum) of `[2, rows]`** → losses and the in-place gradient. The `[rows,
/// vocab]` logits are never gathered; padding columns never win the max and get no gradient.
/// On one device it is the fused `Backend::cross_entropy_fused`.
#[allow(clippy::too_many_arguments)]
pub fn vocab_parallel_cross_entropy<B: Backend>(
    be: &B,
    tp: Option<&TpGroup<B>>,
    logits: &mut B::Buf,
    losses: &mut B::Buf,
    row_max: &mut B::Buf,
    stats: &mut B::Buf,
    targets: &B::Ids,
    shard: VocabShard,
    grad_scale: f32,
) -> Result<()> {
    let VocabShard { cols, start, valid } = shard;
    if !is_split(tp) {
        return Ok(be.cross_entropy_fused(logits, losses, targets, cols, grad_scale)?);
    }
    be.vocab_parallel_max(row_max, logits, cols, valid)?;
    all_reduce(tp, row_max, ReduceOp::Max)?;
    be.vocab_parallel_sums(stats, logits, row_max, targets, cols, valid, start)?;
    all_reduce(tp, stats, ReduceOp::Sum)?;
    Ok(be.vocab_parallel_grad(logits, losses, row_max, stats, targets, cols, valid, start, grad_scale)?)
}
