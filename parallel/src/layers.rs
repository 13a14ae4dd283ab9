//! Tensor-parallel building blocks (Megatron-style) over the runtime's ops. Each takes the
//! rank's [`TpGroup`] (or `None` on one device, where it degenerates to the plain layer) and
//! says which collectives it issues. The model (`dm-model`) composes DalleBart from them.
//!
//! | block | forward | backward |
//! |---|---|---|
//! | column-parallel linear (q/k/v, GLU Dense_0/1, lm_head) | — | all-reduce of the input gradient ([`reduce_input_grad`]) |
//! | row-parallel linear (out_proj, GLU Dense_2) | all-reduce of the output ([`row_parallel_forward`]) | — |
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

/// Row-parallel linear: `out = x_local · w_local` (`x_local: [m, k_local]`, `w_local:
/// [k_local, n]`), partial sums over this rank's input slice, then **all-reduce (sum)**.
pub fn row_parallel_forward<B: Backend>(
    be: &B,
    tp: Option<&TpGroup<B>>,
    out: &mut B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    spec: MatmulSpec,
) -> Result<()> {
    be.matmul(out, x, w, spec)?;
    all_reduce(tp, out, ReduceOp::Sum)
}

/// Backward of a column-parallel linear's input: `dx` holds this rank's partial gradient
/// `dy_local · w_localᵀ` (summed over every column-parallel projection that reads the same
/// input); **all-reduce (sum)** makes it the full gradient.
pub fn reduce_input_grad<B: Backend>(tp: Option<&TpGroup<B>>, dx: &mut B::Buf) -> Result<()> {
    all_reduce(tp, dx, ReduceOp::Sum)
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
