//! Kernel descriptors of `cross_entropy.cu`: the fused softmax cross-entropy and the three passes
//! of the vocab-parallel one, one block per row. Grid: `crate::cuda::grid::cross_entropy`.

use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::KernelFamily;

const NAME: &str = "cross_entropy";

/// `cross_entropy_fused_f32(logits, losses, targets, rows, valid_cols, ld, grad_scale)`: per-row
/// loss, logits overwritten by grad_scale · (softmax − onehot).
pub(crate) const FUSED: Kernel<(P, P, P, i32, i32, i32, f32)> = Kernel::new(NAME, "cross_entropy_fused_f32");
/// `vocab_parallel_max_f32(logits, row_max, rows, valid_cols, ld)`: the local row maxima.
pub(crate) const VOCAB_MAX: Kernel<(P, P, i32, i32, i32)> = Kernel::new(NAME, "vocab_parallel_max_f32");
/// `vocab_parallel_sumexp_f32(logits, global_max, sum_exp, target_logit, targets, rows, valid_cols,
/// ld, vocab_start)`: local Σ exp(x − max) and the target's logit when this rank holds it.
pub(crate) const VOCAB_SUMEXP: Kernel<(P, P, P, P, P, i32, i32, i32, i32)> =
    Kernel::new(NAME, "vocab_parallel_sumexp_f32");
/// `vocab_parallel_grad_f32(logits, losses, global_max, global_sum, global_target_logit, targets,
/// rows, valid_cols, ld, vocab_start, grad_scale)`: losses and the local slice of the gradient.
pub(crate) const VOCAB_GRAD: Kernel<(P, P, P, P, P, P, i32, i32, i32, i32, f32)> =
    Kernel::new(NAME, "vocab_parallel_grad_f32");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "cross_entropy.cu",
    source: include_str!("cross_entropy.cu"),
    kernels: &[FUSED.decl(), VOCAB_MAX.decl(), VOCAB_SUMEXP.decl(), VOCAB_GRAD.decl()],
    defines: &[],
};
