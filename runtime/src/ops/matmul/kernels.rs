//! Kernel descriptors of `matmul.cu`: the bf16 tensor-core GEMMs (two tile sizes) and the f32 SIMT
//! GEMM, each in the four (A, B) transpose variants, and the tile constants the source receives as
//! defines, and their grids.

use crate::cuda::grid::KernelGrid;
use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::{Define, KernelFamily};

const NAME: &str = "matmul";

/// Every GEMM's arguments: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta).
pub(crate) type GemmArgs = (P, P, P, i32, i32, i32, i32, i32, i32, f32, f32);
/// The four transpose variants, indexed `[trans_a][trans_b]` (nn, nt / tn, tt).
pub(crate) type Variants = [[Kernel<GemmArgs>; 2]; 2];

/// One bf16 tensor-core tile configuration: a square `tile`×`tile` output tile computed by
/// `warps_m`×`warps_n` warps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bf16TileShape {
    pub tile: usize,
    pub warps_m: usize,
    pub warps_n: usize,
}

impl Bf16TileShape {
    pub const fn threads(&self) -> usize {
        self.warps_m * self.warps_n * 32
    }
}

/// 128×128 tiles, 8 warps as 2×4 (48 KiB static shared memory).
pub const BF16_LARGE: Bf16TileShape = Bf16TileShape { tile: 128, warps_m: 2, warps_n: 4 };
/// 64×64 tiles, 4 warps as 2×2 (24 KiB static shared memory), for products with few tiles.
pub const BF16_SMALL: Bf16TileShape = Bf16TileShape { tile: 64, warps_m: 2, warps_n: 2 };
/// K tile of both bf16 GEMMs (a split-K split covers a whole number of these).
pub const BF16_BK: usize = 32;
/// f32 SIMT GEMM: square output tile, K tile and threads (each thread a 4×4 micro-tile).
pub const F32_TILE: usize = 64;
pub const F32_BK: usize = 16;
pub const F32_THREADS: usize = 256;

const fn gemm(entry: &'static str) -> Kernel<GemmArgs> {
    Kernel::new(NAME, entry)
}

/// `matmul_bf16_*_128x128`: C = alpha·op(A)·op(B) + beta·C, bf16 A and B, f32 C.
pub(crate) const BF16_128: Variants = [
    [gemm("matmul_bf16_nn_128x128"), gemm("matmul_bf16_nt_128x128")],
    [gemm("matmul_bf16_tn_128x128"), gemm("matmul_bf16_tt_128x128")],
];
/// `matmul_bf16_*_64x64`: as [`BF16_128`] with 64×64 tiles.
pub(crate) const BF16_64: Variants = [
    [gemm("matmul_bf16_nn_64x64"), gemm("matmul_bf16_nt_64x64")],
    [gemm("matmul_bf16_tn_64x64"), gemm("matmul_bf16_tt_64x64")],
];
/// `matmul_f32_*`: C = alpha·op(A)·op(B) + beta·C in f32 (the parity path).
pub(crate) const F32: Variants =
    [[gemm("matmul_f32_nn"), gemm("matmul_f32_nt")], [gemm("matmul_f32_tn"), gemm("matmul_f32_tt")]];

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "matmul.cu",
    source: include_str!("matmul.cu"),
    kernels: &[
        BF16_128[0][0].decl(),
        BF16_128[0][1].decl(),
        BF16_128[1][0].decl(),
        BF16_128[1][1].decl(),
        BF16_64[0][0].decl(),
        BF16_64[0][1].decl(),
        BF16_64[1][0].decl(),
        BF16_64[1][1].decl(),
        F32[0][0].decl(),
        F32[0][1].decl(),
        F32[1][0].decl(),
        F32[1][1].decl(),
    ],
    defines: &[
        Define::new("MM_BF16_L_TILE", BF16_LARGE.tile),
        Define::new("MM_BF16_L_WARPS_M", BF16_LARGE.warps_m),
        Define::new("MM_BF16_L_WARPS_N", BF16_LARGE.warps_n),
        Define::new("MM_BF16_L_THREADS", BF16_LARGE.threads()),
        Define::new("MM_BF16_S_TILE", BF16_SMALL.tile),
        Define::new("MM_BF16_S_WARPS_M", BF16_SMALL.warps_m),
        Define::new("MM_BF16_S_WARPS_N", BF16_SMALL.warps_n),
        Define::new("MM_BF16_S_THREADS", BF16_SMALL.threads()),
        Define::new("MM_BF16_BK", BF16_BK),
        Define::new("MM_F32_TILE", F32_TILE),
        Define::new("MM_F32_BK", F32_BK),
        Define::new("MM_F32_THREADS", F32_THREADS),
    ],
};

// ---- grids (grid, block, shared memory) of the kernels above, as pure functions of the shape ----

/// matmul.cu `matmul_f32_*`: 64×64 tile, grid (ceil(N/64), ceil(M/64), 1), block 256, no split-K.
pub fn matmul_f32(m: usize, n: usize) -> Result<KernelGrid, String> {
    let t = F32_TILE;
    KernelGrid::new((n.div_ceil(t), m.div_ceil(t), 1), F32_THREADS, 0)
}

/// Tile variant of the bf16 tensor-core GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Tile {
    T128,
    T64,
}

impl Bf16Tile {
    /// The tile configuration the kernels of this variant are compiled with.
    pub fn shape(self) -> Bf16TileShape {
        match self {
            Bf16Tile::T128 => BF16_LARGE,
            Bf16Tile::T64 => BF16_SMALL,
        }
    }
}

/// 128×128 tiles when they give at least one block per SM, else 64×64 (4× the blocks).
pub fn choose_bf16_tile(m: usize, n: usize, sms: usize) -> Bf16Tile {
    let t = BF16_LARGE.tile;
    if m.div_ceil(t) * n.div_ceil(t) >= sms.max(1) {
        Bf16Tile::T128
    } else {
        Bf16Tile::T64
    }
}

/// matmul.cu `matmul_bf16_*_{128x128,64x64}`: grid (ceil(N/BN), ceil(M/BM), 1), block 256 / 128,
/// static shared memory only.
pub fn matmul_bf16(m: usize, n: usize, tile: Bf16Tile) -> Result<KernelGrid, String> {
    let shape = tile.shape();
    KernelGrid::new((n.div_ceil(shape.tile), m.div_ceil(shape.tile), 1), shape.threads(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_grids_cover_the_output() {
        let l = matmul_f32(2048, 16385).unwrap();
        assert_eq!(l.grid, (257, 32, 1));
        assert_eq!(l.block, (256, 1, 1));
        let l = matmul_bf16(2048, 2730, Bf16Tile::T128).unwrap();
        assert_eq!(l.grid, (22, 16, 1));
        let l = matmul_bf16(100, 70, Bf16Tile::T64).unwrap();
        assert_eq!((l.grid, l.block), ((2, 2, 1), (128, 1, 1)));
        assert_eq!(choose_bf16_tile(2048, 2730, 132), Bf16Tile::T128);
        assert_eq!(choose_bf16_tile(1024, 1024, 132), Bf16Tile::T64);
        assert!(matmul_f32(64 * 70_000, 8).is_err(), "grid y over 65535 is refused");
        assert!(matmul_f32(0, 8).is_err(), "empty products are not called");
    }
}
