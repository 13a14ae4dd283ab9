//! CUDA code of the cross-entropies: `kernels/cuda/cross_entropy.cu`.

use crate::cuda::kernel_prelude::*;
use crate::ops::cross_entropy;

impl CudaBackend {
    pub(crate) fn cross_entropy_fused_cuda(&self, a: cross_entropy::Fused<'_, CudaBuf, CudaIds>) -> Result<()> {
        let cross_entropy::Fused { logits, losses, targets, classes, grad_scale } = a;
        let op = "cross_entropy_fused";
        let rows = logits.len / classes;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, classes))?;
        let c = Arg::I(int(op, "classes", classes)?);
        let args = [
            mut_ptr(logits),
            mut_ptr(losses),
            Arg::P(targets.device_ptr()),
            Arg::I(int(op, "rows", rows)?),
            c,
            c,
            Arg::F(grad_scale),
        ];
        // SAFETY: cross_entropy_fused_f32(logits, losses, targets, rows, valid_cols, ld, grad_scale)
        // with ld = valid_cols = classes: logits rows·classes, losses and targets rows (checked).
        unsafe { self.launch("cross_entropy", "cross_entropy_fused_f32", l, &args) }
    }

    pub(crate) fn vocab_parallel_max_cuda(&self, a: cross_entropy::VocabMax<'_, CudaBuf>) -> Result<()> {
        let cross_entropy::VocabMax { row_max, logits, cols, valid_cols } = a;
        let op = "vocab_parallel_max";
        let rows = logits.len / cols;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, valid_cols))?;
        let args = [
            ptr(logits),
            mut_ptr(row_max),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "valid_cols", valid_cols)?),
            Arg::I(int(op, "cols", cols)?),
        ];
        // SAFETY: vocab_parallel_max_f32(logits, row_max, rows, valid_cols, ld): logits rows·cols,
        // row_max rows floats.
        unsafe { self.launch("cross_entropy", "vocab_parallel_max_f32", l, &args) }
    }

    pub(crate) fn vocab_parallel_sums_cuda(&self, a: cross_entropy::VocabSums<'_, CudaBuf, CudaIds>) -> Result<()> {
        let cross_entropy::VocabSums { stats, logits, row_max, targets, cols, valid_cols, vocab_start } = a;
        let op = "vocab_parallel_sums";
        let rows = logits.len / cols;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, valid_cols))?;
        let s = stats.device_ptr();
        let args = [
            ptr(logits),
            ptr(row_max),
            Arg::P(s),
            offset_f32(s, rows),
            Arg::P(targets.device_ptr()),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "valid_cols", valid_cols)?),
            Arg::I(int(op, "cols", cols)?),
            Arg::I(int(op, "vocab_start", vocab_start)?),
        ];
        // SAFETY: vocab_parallel_sumexp_f32(logits, global_max, sum_exp, target_logit, targets, rows,
        // valid_cols, ld, vocab_start): sum_exp = stats[0..rows), target_logit = stats[rows..2·rows).
        unsafe { self.launch("cross_entropy", "vocab_parallel_sumexp_f32", l, &args) }
    }

    pub(crate) fn vocab_parallel_grad_cuda(&self, a: cross_entropy::VocabGrad<'_, CudaBuf, CudaIds>) -> Result<()> {
        let cross_entropy::VocabGrad {
            logits,
            losses,
            row_max,
            stats,
            targets,
            cols,
            valid_cols,
            vocab_start,
            grad_scale,
        } = a;
        let op = "vocab_parallel_grad";
        let rows = logits.len / cols;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, cols))?;
        let s = stats.device_ptr();
        let args = [
            mut_ptr(logits),
            mut_ptr(losses),
            ptr(row_max),
            Arg::P(s),
            offset_f32(s, rows),
            Arg::P(targets.device_ptr()),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "valid_cols", valid_cols)?),
            Arg::I(int(op, "cols", cols)?),
            Arg::I(int(op, "vocab_start", vocab_start)?),
            Arg::F(grad_scale),
        ];
        // SAFETY: vocab_parallel_grad_f32(logits, losses, global_max, global_sum, global_target_logit,
        // targets, rows, valid_cols, ld, vocab_start, grad_scale): logits rows·cols rewritten, losses
        // rows, sum = stats[0..rows), target logit = stats[rows..2·rows).
        unsafe { self.launch("cross_entropy", "vocab_parallel_grad_f32", l, &args) }
    }
}
