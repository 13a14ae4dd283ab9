//! CUDA code of the cross-entropies: `cross_entropy.cu` beside this file (descriptors in
//! `kernels.rs`).

use super::kernels as k;
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
        let l = cfg(op, k::cross_entropy(rows, classes))?;
        let c = int(op, "classes", classes)?;
        let targets = DevicePtr(targets.device_ptr());
        let args = (mut_ptr(logits), mut_ptr(losses), targets, int(op, "rows", rows)?, c, c, grad_scale);
        // SAFETY: cross_entropy_fused_f32(logits, losses, targets, rows, valid_cols, ld, grad_scale)
        // with ld = valid_cols = classes: logits rows·classes, losses and targets rows (checked).
        unsafe { self.call_kernel(k::FUSED, l, args) }
    }

    pub(crate) fn vocab_parallel_max_cuda(&self, a: cross_entropy::VocabMax<'_, CudaBuf>) -> Result<()> {
        let cross_entropy::VocabMax { row_max, logits, cols, valid_cols } = a;
        let op = "vocab_parallel_max";
        let rows = logits.len / cols;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, k::cross_entropy(rows, valid_cols))?;
        let args = (
            ptr(logits),
            mut_ptr(row_max),
            int(op, "rows", rows)?,
            int(op, "valid_cols", valid_cols)?,
            int(op, "cols", cols)?,
        );
        // SAFETY: vocab_parallel_max_f32(logits, row_max, rows, valid_cols, ld): logits rows·cols,
        // row_max rows floats.
        unsafe { self.call_kernel(k::VOCAB_MAX, l, args) }
    }

    /// The arguments both later vocab-parallel kernels take after their logits and maxima:
    /// (sum_exp = stats[0..rows), target_logit = stats[rows..2·rows), targets, rows, valid_cols,
    /// ld = cols, vocab_start).
    fn vocab_stats_args(
        op: &'static str,
        stats: u64,
        targets: &CudaIds,
        rows: usize,
        (cols, valid_cols, vocab_start): (usize, usize, usize),
    ) -> Result<VocabStats> {
        let stats = DevicePtr(stats);
        Ok(VocabStats {
            sums: (stats, stats.offset_f32(rows), DevicePtr(targets.device_ptr())),
            dims: (
                int(op, "rows", rows)?,
                int(op, "valid_cols", valid_cols)?,
                int(op, "cols", cols)?,
                int(op, "vocab_start", vocab_start)?,
            ),
        })
    }

    pub(crate) fn vocab_parallel_sums_cuda(&self, a: cross_entropy::VocabSums<'_, CudaBuf, CudaIds>) -> Result<()> {
        let op = "vocab_parallel_sums";
        let rows = a.logits.len / a.cols;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, k::cross_entropy(rows, a.valid_cols))?;
        let cols = (a.cols, a.valid_cols, a.vocab_start);
        let stats = Self::vocab_stats_args(op, a.stats.device_ptr(), a.targets, rows, cols)?;
        let VocabStats { sums: (sum, target_logit, targets), dims: (r, v, ld, start) } = stats;
        let args = (ptr(a.logits), ptr(a.row_max), sum, target_logit, targets, r, v, ld, start);
        // SAFETY: vocab_parallel_sumexp_f32(logits, global_max, sum_exp, target_logit, targets, rows,
        // valid_cols, ld, vocab_start): sum_exp = stats[0..rows), target_logit = stats[rows..2·rows).
        unsafe { self.call_kernel(k::VOCAB_SUMEXP, l, args) }
    }

    pub(crate) fn vocab_parallel_grad_cuda(&self, a: cross_entropy::VocabGrad<'_, CudaBuf, CudaIds>) -> Result<()> {
        let op = "vocab_parallel_grad";
        let rows = a.logits.len / a.cols;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, k::cross_entropy(rows, a.cols))?;
        let cols = (a.cols, a.valid_cols, a.vocab_start);
        let stats = Self::vocab_stats_args(op, a.stats.device_ptr(), a.targets, rows, cols)?;
        let VocabStats { sums: (sum, target_logit, targets), dims: (r, v, ld, start) } = stats;
        let (logits, losses, max) = (mut_ptr(a.logits), mut_ptr(a.losses), ptr(a.row_max));
        let args = (logits, losses, max, sum, target_logit, targets, r, v, ld, start, a.grad_scale);
        // SAFETY: vocab_parallel_grad_f32(logits, losses, global_max, global_sum, global_target_logit,
        // targets, rows, valid_cols, ld, vocab_start, grad_scale): logits rows·cols rewritten, losses
        // rows, sum = stats[0..rows), target logit = stats[rows..2·rows).
        unsafe { self.call_kernel(k::VOCAB_GRAD, l, args) }
    }
}

/// What both later vocab-parallel kernels take after their logits and maxima: the statistics
/// pointers (sum_exp, target_logit, targets) and the dimensions (rows, valid_cols, ld, vocab_start).
struct VocabStats {
    sums: (DevicePtr, DevicePtr, DevicePtr),
    dims: (i32, i32, i32, i32),
}
