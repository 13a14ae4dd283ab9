//! Kernel descriptors of `embedding.cu`: the vocab-range gather and its atomicAdd scatter. Grid:
//! `crate::cuda::grid::embedding`.

use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::KernelFamily;

const NAME: &str = "embedding";

/// (out or dtable, table or dout, ids, n_ids, dim, vocab_start, vocab_end).
pub(crate) type EmbeddingArgs = (P, P, P, i32, i32, i32, i32);

/// `embedding_forward_f32`: out[i] = table[ids[i] − vocab_start] for ids in range, else 0.
pub(crate) const FORWARD: Kernel<EmbeddingArgs> = Kernel::new(NAME, "embedding_forward_f32");
/// `embedding_backward_f32`: dtable[ids[i] − vocab_start] += dout[i] (atomicAdd) for ids in range.
pub(crate) const BACKWARD: Kernel<EmbeddingArgs> = Kernel::new(NAME, "embedding_backward_f32");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "embedding.cu",
    source: include_str!("embedding.cu"),
    kernels: &[FORWARD.decl(), BACKWARD.decl()],
    defines: &[],
};
