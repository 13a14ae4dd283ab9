//! Kernel descriptors of `cross_entropy.cu`: the fused softmax cross-entropy and the three passes
//! of the vocab-parallel one, one block per row. Its grid is below.

use crate::cuda::grid::KernelGrid;
use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::KernelFamily;

const NAME: &str = "cross_entropy";

/// (logits, global_max, sum_exp, target_logit, targets, rows, valid_cols, ld, vocab_start).
pub(crate) type VocabSumexpArgs = (P, P, P, P, P, i32, i32, i32, i32);
/// (logits, losses, global_max, global_sum, global_target_logit, targets, rows, valid_cols, ld,
/// vocab_start, grad_scale).
pub(crate) type VocabGradArgs = (P, P, P, P, P, P, i32, i32, i32, i32, f32);

/// `cross_entropy_fused_f32(logits, losses, targets, rows, valid_cols, ld, grad_scale)`: per-row
/// loss, logits overwritten by grad_scale · (softmax − onehot).
pub(crate) const FUSED: Kernel<(P, P, P, i32, i32, i32, f32)> = Kernel::new(NAME, "cross_entropy_fused_f32");
/// `vocab_parallel_max_f32(logits, row_max, rows, valid_cols, ld)`: the local row maxima.
pub(crate) const VOCAB_MAX: Kernel<(P, P, i32, i32, i32)> = Kernel::new(NAME, "vocab_parallel_max_f32");
/// `vocab_parallel_sumexp_f32(logits, global_max, sum_exp, target_logit, targets, rows, valid_cols,
/// ld, vocab_start)`: local Σ exp(x − max) and the target's logit when this rank holds it.
pub(crate) const VOCAB_SUMEXP: Kernel<VocabSumexpArgs> = Kernel::new(NAME, "vocab_parallel_sumexp_f32");
/// `vocab_parallel_grad_f32(logits, losses, global_max, global_sum, global_target_logit, targets,
/// rows, valid_cols, ld, vocab_start, grad_scale)`: losses and the local slice of the gradient.
pub(crate) const VOCAB_GRAD: Kernel<VocabGradArgs> = Kernel::new(NAME, "vocab_parallel_grad_f32");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "cross_entropy.cu",
    source: include_str!("cross_entropy.cu"),
    kernels: &[FUSED.decl(), VOCAB_MAX.decl(), VOCAB_SUMEXP.decl(), VOCAB_GRAD.decl()],
    defines: &[],
};

// ---- grids (grid, block, shared memory) of the kernels above, as pure functions of the shape ----

/// cross_entropy.cu: one block per row, block a multiple of 32 giving ~32 columns a thread, at
/// most 512 (the recommended size for ~16k classes).
pub fn cross_entropy(rows: usize, classes: usize) -> Result<KernelGrid, String> {
    let threads = classes.div_ceil(32).next_multiple_of(32).clamp(32, 512);
    KernelGrid::new((rows, 1, 1), threads, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_blocks_are_warp_multiples() {
        assert_eq!(cross_entropy(2048, 16385).unwrap().block.0, 512);
        assert_eq!(cross_entropy(4, 7).unwrap().block.0, 32);
        assert_eq!(cross_entropy(4, 2000).unwrap().block.0, 64);
        assert!(cross_entropy(2048, 16385).unwrap().block.0.is_multiple_of(32));
    }
}
