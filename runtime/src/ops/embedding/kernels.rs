//! Kernel descriptors of `embedding.cu`: the vocab-range gather and its atomicAdd scatter, and
//! their grid.

use crate::cuda::grid::KernelGrid;
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

// ---- grids (grid, block, shared memory) of the kernels above, as pure functions of the shape ----

/// embedding.cu gather/scatter: grid (n_ids), block = dim rounded up to a warp, 32..=256.
pub fn embedding(n_ids: usize, dim: usize) -> Result<KernelGrid, String> {
    KernelGrid::new((n_ids, 1, 1), dim.next_multiple_of(32).clamp(32, 256), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_blocks_cover_dim_up_to_256() {
        assert_eq!(embedding(512, 1024).unwrap().block.0, 256);
        assert_eq!(embedding(512, 24).unwrap().block.0, 32);
    }
}
