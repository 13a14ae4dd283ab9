//! Kernel descriptors of `layernorm.cu`: single-device and tensor-parallel (sharded) LayerNorm,
//! forward and backward, and the constant the backward's block size depends on. Their grids
//! follow (with `crate::cuda::grid::one_thread_each`).

use crate::cuda::grid::KernelGrid;
use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::{Define, KernelFamily};

const NAME: &str = "layernorm";

/// Columns each thread of `layernorm_backward_f32` keeps in registers (`LN_CPT` in the source):
/// dim <= block · 16.
pub const BWD_COLS_PER_THREAD: usize = 16;

/// The block size for `layernorm_backward_f32` on rows of `dim`.
pub fn backward_threads(dim: usize) -> usize {
    dim.div_ceil(BWD_COLS_PER_THREAD).next_multiple_of(32).clamp(64, 1024)
}

/// The warp-per-row kernels: six pointers, then (rows, dim).
pub(crate) type PerRowArgs = (P, P, P, P, P, P, i32, i32);
/// (dx, partials, dout, x, mean, rstd, scale, row_sums, rows, dim, dim_global, accumulate_dx).
pub(crate) type BackwardArgs = (P, P, P, P, P, P, P, P, i32, i32, i32, i32);

/// `layernorm_forward_f32(out, mean, rstd, x, scale, bias, rows, dim)`: normalise each row, scale
/// (optional) and shift; saves mean and 1/std.
pub(crate) const FORWARD: Kernel<PerRowArgs> = Kernel::new(NAME, "layernorm_forward_f32");
/// `layernorm_backward_f32(dx, partials, dout, x, mean, rstd, scale, row_sums, rows, dim,
/// dim_global, accumulate_dx)`: dx (from row sums, local or all-reduced) and per-block partial
/// dscale/dbias.
pub(crate) const BACKWARD: Kernel<BackwardArgs> = Kernel::new(NAME, "layernorm_backward_f32");
/// `layernorm_param_grads_f32(dscale, dbias, partials, n_parts, dim)`: fixed-order sum of the partials.
pub(crate) const PARAM_GRADS: Kernel<(P, P, P, i32, i32)> = Kernel::new(NAME, "layernorm_param_grads_f32");
/// `layernorm_sharded_sums_f32(x, center, sums, rows, dim)`: per-row (Σx, Σx²) of a column shard.
pub(crate) const SHARDED_SUMS: Kernel<(P, P, P, i32, i32)> = Kernel::new(NAME, "layernorm_sharded_sums_f32");
/// `layernorm_sharded_stats_f32(sums, center, mean, rstd, rows, dim_global)`: mean and 1/std from
/// all-reduced sums.
pub(crate) const SHARDED_STATS: Kernel<(P, P, P, P, i32, i32)> = Kernel::new(NAME, "layernorm_sharded_stats_f32");
/// `layernorm_apply_f32(out, x, mean, rstd, scale, bias, rows, dim)`: the normalisation with given
/// statistics.
pub(crate) const APPLY: Kernel<PerRowArgs> = Kernel::new(NAME, "layernorm_apply_f32");
/// `layernorm_backward_sums_f32(dout, x, mean, rstd, scale, sums, rows, dim)`: per-row (Σg, Σg·x̂)
/// of a shard, for the sharded backward's all-reduce.
pub(crate) const BACKWARD_SUMS: Kernel<PerRowArgs> = Kernel::new(NAME, "layernorm_backward_sums_f32");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "layernorm.cu",
    source: include_str!("layernorm.cu"),
    kernels: &[
        FORWARD.decl(),
        BACKWARD.decl(),
        PARAM_GRADS.decl(),
        SHARDED_SUMS.decl(),
        SHARDED_STATS.decl(),
        APPLY.decl(),
        BACKWARD_SUMS.decl(),
    ],
    defines: &[Define::new("LN_CPT", BWD_COLS_PER_THREAD)],
};

// ---- grids (grid, block, shared memory) of the kernels above, as pure functions of the shape ----

/// Rows per block of the warp-per-row LayerNorm kernels (`layernorm_forward_f32` and friends):
/// block 256 = 8 warps, grid ceil(rows/8).
pub fn layernorm_rows(rows: usize) -> Result<KernelGrid, String> {
    KernelGrid::new((rows.div_ceil(8).max(1), 1, 1), 256, 0)
}

/// `layernorm_backward_f32`: block `backward_threads(dim)` (dim <= 16 columns a
/// thread, at most 1024 threads), grid `min(rows, 2·SMs)` (>= 1); the partials hold
/// `grid · 2 · dim` floats.
pub fn layernorm_backward(rows: usize, dim: usize, sms: usize) -> Result<KernelGrid, String> {
    let max_dim = 1024 * BWD_COLS_PER_THREAD;
    if dim == 0 || dim > max_dim {
        return Err(format!("layernorm dim {dim} is outside 1..={max_dim}, what layernorm_backward_f32 handles"));
    }
    let threads = backward_threads(dim);
    KernelGrid::new((rows.clamp(1, 2 * sms.max(1)), 1, 1), threads, 0)
}

/// `layernorm_param_grads_f32`: grid ceil(dim/256), block 256.
pub fn layernorm_param_grads(dim: usize) -> Result<KernelGrid, String> {
    crate::cuda::grid::one_thread_each(dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::grid::one_thread_each;

    #[test]
    fn layernorm_grids() {
        assert_eq!(layernorm_rows(2048).unwrap().grid.0, 256);
        assert_eq!(layernorm_rows(3).unwrap().grid.0, 1);
        let l = layernorm_backward(2048, 2730, 132).unwrap();
        assert_eq!((l.grid.0, l.block.0), (264, 192));
        assert!(l.block.0 as usize * BWD_COLS_PER_THREAD >= 2730);
        assert_eq!(layernorm_backward(5, 64, 132).unwrap().grid.0, 5);
        assert!(layernorm_backward(8, 16_385, 132).is_err());
        assert_eq!(layernorm_param_grads(2730).unwrap().grid.0, 11);
        assert_eq!(one_thread_each(100_000).unwrap().grid.0, 391);
    }

    #[test]
    fn backward_block_covers_dim() {
        for dim in [16, 64, 1024, 2730, 4096, 16384] {
            let t = backward_threads(dim);
            assert!(t * BWD_COLS_PER_THREAD >= dim && t.is_multiple_of(32) && t <= 1024, "{dim}");
        }
    }
}
