//! Kernel descriptors of `elementwise.cu`: flat memory-bound kernels (fill, add, scale, Σx², the
//! f32 ↔ bf16 casts) and the broadcast-row add / sum, and their grids (the plain 1-D grid-stride one,
//! shared with glu.cu and adamw.cu, is `crate::cuda::grid::grid_stride`).

use crate::cuda::grid::KernelGrid;
use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::KernelFamily;

const NAME: &str = "elementwise";

/// `fill_f32(x, value, n)`: x[i] = value.
pub(crate) const FILL: Kernel<(P, f32, u64)> = Kernel::new(NAME, "fill_f32");
/// `add_f32(out, a, b, n)`: out = a + b (out aliases neither input).
pub(crate) const ADD: Kernel<(P, P, P, u64)> = Kernel::new(NAME, "add_f32");
/// `add_assign_f32(acc, x, n)`: acc += x.
pub(crate) const ADD_ASSIGN: Kernel<(P, P, u64)> = Kernel::new(NAME, "add_assign_f32");
/// `scale_f32(x, s, n)`: x *= s.
pub(crate) const SCALE: Kernel<(P, f32, u64)> = Kernel::new(NAME, "scale_f32");
/// `sum_squares_partial_f32(x, n, partials)`: one f64 Σx² partial per block.
pub(crate) const SUM_SQUARES_PARTIAL: Kernel<(P, u64, P)> = Kernel::new(NAME, "sum_squares_partial_f32");
/// `sum_f64_finish(partials, count, out, accumulate)`: out[0] (+)= Σ partials, one block.
pub(crate) const SUM_F64_FINISH: Kernel<(P, i32, P, i32)> = Kernel::new(NAME, "sum_f64_finish");
/// `cast_f32_to_bf16(out, x, n)`: f32 → bf16, rounded as `half::bf16::from_f32` (nearest even).
pub(crate) const CAST_F32_TO_BF16: Kernel<(P, P, u64)> = Kernel::new(NAME, "cast_f32_to_bf16");
/// `cast_bf16_to_f32(out, x, n)`: exact bf16 → f32.
pub(crate) const CAST_BF16_TO_F32: Kernel<(P, P, u64)> = Kernel::new(NAME, "cast_bf16_to_f32");
/// `fill_bf16(x, value, n)`: x[i] = bf16(value) (rounded as the casts).
pub(crate) const FILL_BF16: Kernel<(P, f32, u64)> = Kernel::new(NAME, "fill_bf16");
/// `add_broadcast_rows_f32(out, row, n_blocks, row_len)`: out[b·row_len + j] += row[j].
pub(crate) const ADD_BROADCAST_ROWS: Kernel<(P, P, i32, i32)> = Kernel::new(NAME, "add_broadcast_rows_f32");
/// `sum_broadcast_rows_f32(acc, x, n_blocks, row_len)`: acc[j] += Σ_b x[b·row_len + j], in order.
pub(crate) const SUM_BROADCAST_ROWS: Kernel<(P, P, i32, i32)> = Kernel::new(NAME, "sum_broadcast_rows_f32");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "elementwise.cu",
    source: include_str!("elementwise.cu"),
    kernels: &[
        FILL.decl(),
        ADD.decl(),
        ADD_ASSIGN.decl(),
        SCALE.decl(),
        SUM_SQUARES_PARTIAL.decl(),
        SUM_F64_FINISH.decl(),
        CAST_F32_TO_BF16.decl(),
        CAST_BF16_TO_F32.decl(),
        FILL_BF16.decl(),
        ADD_BROADCAST_ROWS.decl(),
        SUM_BROADCAST_ROWS.decl(),
    ],
    defines: &[],
};

// ---- grids (grid, block, shared memory) of the kernels above, as pure functions of the shape ----

/// elementwise.cu (fill, add, add_assign, scale): block 256, grid
/// `min(ceil(n / (256·4)), 8·SMs)` (each thread moves 4 elements per float4 step; grid-stride).
pub fn elementwise(n: usize, sms: usize) -> Result<KernelGrid, String> {
    let blocks = n.div_ceil(crate::cuda::grid::ELEMENTWISE_THREADS * 4).clamp(1, 8 * sms.max(1));
    KernelGrid::new((blocks, 1, 1), crate::cuda::grid::ELEMENTWISE_THREADS, 0)
}

/// Pass 1 of Σx² (`sum_squares_partial_f32`): block 256, `min(ceil(n/256), 4·SMs, 1024)` blocks,
/// one f64 partial each. Pass 2 (`sum_f64_finish`) is one block of 256 over those partials.
pub fn sum_squares_partials(n: usize, sms: usize) -> Result<KernelGrid, String> {
    let blocks = n.div_ceil(crate::cuda::grid::ELEMENTWISE_THREADS).clamp(1, (4 * sms.max(1)).min(1024));
    KernelGrid::new((blocks, 1, 1), crate::cuda::grid::ELEMENTWISE_THREADS, 0)
}

/// `sum_f64_finish`: one block of 256.
pub fn sum_finish() -> KernelGrid {
    KernelGrid { grid: (1, 1, 1), block: (256, 1, 1), smem: 0 }
}

/// `add_broadcast_rows_f32`: grid (ceil(row_len/256), n_blocks), block 256. Grid y is at most
/// 65535, so larger `n_blocks` are split into chunks: returns (first block, blocks, grid).
pub fn add_broadcast_rows(row_len: usize, n_blocks: usize) -> Result<Vec<(usize, usize, KernelGrid)>, String> {
    let mut out = Vec::new();
    let mut first = 0;
    while first < n_blocks {
        let count = (n_blocks - first).min(crate::cuda::grid::MAX_GRID_YZ);
        out.push((first, count, KernelGrid::new((row_len.div_ceil(256), count, 1), 256, 0)?));
        first += count;
    }
    Ok(out)
}

/// `sum_broadcast_rows_f32`: grid ceil(row_len/256), block 256, one thread per column.
pub fn sum_broadcast_rows(row_len: usize) -> Result<KernelGrid, String> {
    KernelGrid::new((row_len.div_ceil(256), 1, 1), 256, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::grid::grid_stride;

    #[test]
    fn elementwise_grids_are_bounded_and_nonempty() {
        assert_eq!(elementwise(1, 132).unwrap().grid.0, 1);
        assert_eq!(elementwise(10_000, 132).unwrap().grid.0, 10);
        assert_eq!(elementwise(1 << 30, 132).unwrap().grid.0, 8 * 132);
        assert_eq!(grid_stride(1000, 132).unwrap().grid.0, 4);
        assert_eq!(grid_stride(1 << 30, 132).unwrap().grid.0, 1056);
        let p = sum_squares_partials(1 << 30, 132).unwrap();
        assert_eq!(p.grid.0, 528);
        assert!(sum_squares_partials(1 << 30, 1000).unwrap().grid.0 <= 1024);
    }

    /// elementwise.cu's `f32_to_bf16_rne` (the casts and `fill_bf16`), line for line in u32
    /// arithmetic: it must round as `half::bf16::from_f32` (the CPU backend's rounding) for every
    /// class of input, so bf16 buffers hold the same bits on both backends.
    fn f32_to_bf16_rne(f: f32) -> u16 {
        let x = f.to_bits();
        if (x & 0x7fff_ffff) > 0x7f80_0000 {
            return ((x >> 16) | 0x0040) as u16;
        }
        ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }

    #[test]
    fn the_cast_kernels_round_as_half() {
        use rand::{Rng, SeedableRng};
        let edges = [
            0.0,
            -0.0,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc1_2345),
            1e-40,
            -f32::MIN_POSITIVE,
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let random = (0..200_000).map(|_| f32::from_bits(rng.random::<u32>()));
        for f in edges.into_iter().chain(random) {
            assert_eq!(f32_to_bf16_rne(f), half::bf16::from_f32(f).to_bits(), "{f:e} ({:#010x})", f.to_bits());
        }
    }

    #[test]
    fn broadcast_rows_split_grid_y() {
        let chunks = add_broadcast_rows(1000, 70_000).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[0].0, chunks[0].1, chunks[0].2.grid), (0, 65_535, (4, 65_535, 1)));
        assert_eq!((chunks[1].0, chunks[1].1), (65_535, 4_465));
        assert!(add_broadcast_rows(10, 0).unwrap().is_empty());
        assert_eq!(sum_broadcast_rows(257).unwrap().grid.0, 2);
    }
}
