//! The kernel-grid type ([`KernelGrid`]: grid, block, dynamic shared memory) and CUDA's limits,
//! the grids several families share (1-D grid-stride, one thread per item), the GEMM operand
//! layouts (bf16 staging with padded leading dimensions, cuBLAS's column-major view) and the
//! kernels' integer-argument check — pure functions, unit-tested on machines without a GPU.
//! Each family's own grids live with its descriptors, in `runtime/src/ops/<family>/kernels.rs`.

use crate::backend::MatmulSpec;

/// Largest grid y and z dimension CUDA accepts.
pub const MAX_GRID_YZ: usize = 65_535;
/// Largest grid x dimension CUDA accepts.
pub const MAX_GRID_X: usize = (1 << 31) - 1;
/// Static shared memory every block may use without opting in.
pub const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// Grid, block and dynamic shared memory of one kernel call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelGrid {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

impl KernelGrid {
    pub(crate) fn new(grid: (usize, usize, usize), block: usize, smem: usize) -> Result<Self, String> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Err(format!("empty grid {grid:?}"));
        }
        if grid.0 > MAX_GRID_X || grid.1 > MAX_GRID_YZ || grid.2 > MAX_GRID_YZ {
            return Err(format!("grid {grid:?} exceeds CUDA's limits (x < 2^31, y and z <= 65535)"));
        }
        Ok(Self { grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32), block: (block as u32, 1, 1), smem: smem as u32 })
    }

    /// The cudarc form of this kernel call.
    pub fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig { grid_dim: self.grid, block_dim: self.block, shared_mem_bytes: self.smem }
    }

    /// Total threads of the grid.
    pub fn threads(&self) -> u64 {
        let g = self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64;
        g * self.block.0 as u64 * self.block.1 as u64 * self.block.2 as u64
    }
}

/// Block size of the 1-D memory-bound kernels (elementwise.cu, glu.cu, adamw.cu).
pub const ELEMENTWISE_THREADS: usize = 256;

/// glu.cu and adamw.cu: block 256, grid `min(ceil(n / 256), 8·SMs)` (grid-stride).
pub fn grid_stride(n: usize, sms: usize) -> Result<KernelGrid, String> {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS).clamp(1, 8 * sms.max(1));
    KernelGrid::new((blocks, 1, 1), ELEMENTWISE_THREADS, 0)
}

/// Row-major leading dimensions `(lda, ldb, ldc)` of a [`MatmulSpec`] over unpadded buffers.
pub fn matmul_lds(s: &MatmulSpec) -> (usize, usize, usize) {
    let lda = if s.trans_a { s.m } else { s.k };
    let ldb = if s.trans_b { s.k } else { s.n };
    (lda, ldb, s.n)
}

/// The bf16 GEMM's fast path (16-byte cp.async) needs leading dimensions that are multiples of 8
/// elements: `ld` rounded up to the next multiple of 8 (e.g. ffn 2730 -> 2736, vocab 16385 -> 16392).
pub fn padded_ld(ld: usize) -> usize {
    ld.next_multiple_of(8)
}

/// How one f32 operand of a mixed-precision GEMM is staged as bf16: `rows × cols` as stored
/// (row-major), cast into a `rows × ld` scratch matrix with `ld = padded_ld(cols)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bf16Staging {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl Bf16Staging {
    pub fn new(rows: usize, cols: usize) -> Self {
        Self { rows, cols, ld: padded_ld(cols) }
    }
    /// Whether the cast needs the extra 2-D copy into the padded layout.
    pub fn needs_padding(&self) -> bool {
        self.ld != self.cols
    }
    /// bf16 elements of the padded matrix.
    pub fn padded_len(&self) -> usize {
        self.rows * self.ld
    }
    /// The 2-D copy (bytes): (source pitch, destination pitch, row width, rows).
    pub fn copy_2d_bytes(&self) -> (usize, usize, usize, usize) {
        (self.cols * 2, self.ld * 2, self.cols * 2, self.rows)
    }
}

/// The stored shapes of a GEMM's A (`[m, k]` or `[k, m]`) and B (`[k, n]` or `[n, k]`) operands.
pub fn bf16_staging(s: &MatmulSpec) -> (Bf16Staging, Bf16Staging) {
    let a = if s.trans_a { Bf16Staging::new(s.k, s.m) } else { Bf16Staging::new(s.m, s.k) };
    let b = if s.trans_b { Bf16Staging::new(s.n, s.k) } else { Bf16Staging::new(s.k, s.n) };
    (a, b)
}

/// A cuBLAS (column-major) GEMM that computes a row-major product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CublasGemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// cuBLAS's A is our B (operands swapped); these are cuBLAS's leading dimensions.
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// Row-major `C[m,n] = op(A)·op(B)` is column-major `Cᵀ[n,m] = op(B)ᵀ·op(A)ᵀ`: a row-major
/// matrix with leading dimension `ld` is its transpose in column-major with the same `ld`, so
/// cuBLAS gets B as its first operand and A as its second, the transpose flags unchanged,
/// m and n swapped. `lda`, `ldb` are the row-major leading dimensions of A and B.
pub fn cublas_row_major(s: &MatmulSpec, lda: usize, ldb: usize, ldc: usize) -> CublasGemm {
    CublasGemm { trans_a: s.trans_b, trans_b: s.trans_a, m: s.n, n: s.m, k: s.k, lda: ldb, ldb: lda, ldc }
}

/// Whether a kernel needing `smem` bytes of dynamic shared memory fits the device's opt-in limit.
pub fn check_smem(entry: &str, smem: usize, device_optin_limit: usize) -> Result<(), String> {
    if smem > device_optin_limit {
        return Err(format!(
            "{entry} needs {smem} bytes of dynamic shared memory, more than this GPU allows per block \
             ({device_optin_limit} bytes)"
        ));
    }
    Ok(())
}

/// Kernels with one thread per item and no grid-stride loop (`layernorm_param_grads_f32`,
/// `layernorm_sharded_stats_f32`): grid ceil(n/256), block 256.
pub fn one_thread_each(n: usize) -> Result<KernelGrid, String> {
    KernelGrid::new((n.div_ceil(256).max(1), 1, 1), 256, 0)
}

/// AdamW bias corrections `(1 − b1^t, 1 − b2^t)`, computed in f64 and rounded to f32 exactly as
/// the CPU reference does (the kernel takes them as arguments).
pub fn adamw_bias_corrections(b1: f32, b2: f32, step: u64) -> (f32, f32) {
    let t = step.min(i32::MAX as u64) as i32;
    ((1.0 - (b1 as f64).powi(t)) as f32, (1.0 - (b2 as f64).powi(t)) as f32)
}

/// `v` as a kernel's `int` argument, or an error naming it.
pub fn to_i32(what: &str, v: usize) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} = {v} does not fit the kernels' 32-bit int arguments"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_row_major(a: &[f32], b: &[f32], s: &MatmulSpec) -> Vec<f32> {
        let (lda, ldb, _) = matmul_lds(s);
        let mut c = vec![0.0f32; s.m * s.n];
        for i in 0..s.m {
            for j in 0..s.n {
                let mut acc = 0.0;
                for p in 0..s.k {
                    let av = if s.trans_a { a[p * lda + i] } else { a[i * lda + p] };
                    let bv = if s.trans_b { b[j * ldb + p] } else { b[p * ldb + j] };
                    acc += av * bv;
                }
                c[i * s.n + j] = acc;
            }
        }
        c
    }

    /// Column-major BLAS gemm, as cuBLAS computes it: C(i,j) at c[i + j·ldc].
    #[allow(clippy::too_many_arguments)]
    fn blas_col_major(g: &CublasGemm, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; g.ldc * g.n];
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0.0;
                for p in 0..g.k {
                    let av = if g.trans_a { a[p + i * g.lda] } else { a[i + p * g.lda] };
                    let bv = if g.trans_b { b[j + p * g.ldb] } else { b[p + j * g.ldb] };
                    acc += av * bv;
                }
                c[i + j * g.ldc] = acc;
            }
        }
        c
    }

    #[test]
    fn cublas_operand_swap_computes_the_row_major_product() {
        let (m, n, k) = (5, 3, 4);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let s = MatmulSpec { m, n, k, trans_a: ta, trans_b: tb, accumulate: false };
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = naive_row_major(&a, &b, &s);
            let (lda, ldb, ldc) = matmul_lds(&s);
            let g = cublas_row_major(&s, lda, ldb, ldc);
            // cuBLAS's first operand is our B, its second our A.
            let got = blas_col_major(&g, &b, &a);
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "ta={ta} tb={tb}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn leading_dimensions_follow_the_stored_shapes() {
        let s = MatmulSpec { m: 7, n: 5, k: 3, trans_a: true, trans_b: false, accumulate: true };
        assert_eq!(matmul_lds(&s), (7, 5, 5));
        let s = MatmulSpec { m: 7, n: 5, k: 3, trans_a: false, trans_b: true, accumulate: false };
        assert_eq!(matmul_lds(&s), (3, 3, 5));
    }

    #[test]
    fn bf16_padding_rounds_leading_dimensions_to_8() {
        assert_eq!(padded_ld(2730), 2736);
        assert_eq!(padded_ld(16385), 16392);
        assert_eq!(padded_ld(1024), 1024);
        assert_eq!(padded_ld(1), 8);
        // Dense_2 forward of mini: A = GLU hidden [2048, 2730] (padded), B = kernel [2730, 1024].
        let s = MatmulSpec::nn(2048, 1024, 2730);
        let (a, b) = bf16_staging(&s);
        assert_eq!((a.rows, a.cols, a.ld), (2048, 2730, 2736));
        assert!(a.needs_padding() && !b.needs_padding());
        assert_eq!(a.copy_2d_bytes(), (5460, 5472, 5460, 2048));
        assert_eq!(a.padded_len(), 2048 * 2736);
        // dW of lm_head: A = xᵀ stored [tokens, d], B = dlogits [tokens, 16385].
        let s = MatmulSpec { m: 1024, n: 16385, k: 2048, trans_a: true, trans_b: false, accumulate: true };
        let (a, b) = bf16_staging(&s);
        assert_eq!((a.rows, a.cols, a.ld), (2048, 1024, 1024));
        assert_eq!((b.rows, b.cols, b.ld), (2048, 16385, 16392));
    }

    #[test]
    fn padded_copy_description_reproduces_the_matrix() {
        // Emulate cuMemcpy2D with the description and read the matrix back through `ld`.
        let st = Bf16Staging::new(3, 5);
        let src: Vec<u16> = (0..15).collect();
        let (sp, dp, w, h) = st.copy_2d_bytes();
        let mut dst = vec![u16::MAX; st.padded_len()];
        for r in 0..h {
            for c in 0..w / 2 {
                dst[r * dp / 2 + c] = src[r * sp / 2 + c];
            }
        }
        for r in 0..3 {
            for c in 0..5 {
                assert_eq!(dst[r * st.ld + c], src[r * 5 + c]);
            }
        }
    }

    #[test]
    fn adamw_bias_corrections_match_the_cpu_formula() {
        let (c1, c2) = adamw_bias_corrections(0.9, 0.999, 1);
        assert_eq!(c1, (1.0 - 0.9f32 as f64) as f32);
        assert_eq!(c2, (1.0 - 0.999f32 as f64) as f32);
        let (c1, _) = adamw_bias_corrections(0.9, 0.999, 10);
        assert_eq!(c1, (1.0 - (0.9f32 as f64).powi(10)) as f32);
    }

    #[test]
    fn int_arguments_are_checked() {
        assert_eq!(to_i32("dim", 1024), Ok(1024));
        assert!(to_i32("rows", 1 << 31).unwrap_err().contains("rows"));
    }
}
