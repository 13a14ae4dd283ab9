//! cuBLAS GEMMs for [`super::MatmulImpl::Cublas`]: the vendor baseline every custom GEMM is
//! compared against (and a fallback). cuBLAS is column-major; [`grid::cublas_row_major`]
//! turns our row-major product into its column-major transpose by swapping the operands.
//!
//! - f32: `cublasSgemm` (default math mode: no TF32 unless `NVIDIA_TF32_OVERRIDE` says so).
//! - bf16 mixed: `cublasGemmEx` with bf16 A and B, f32 or bf16 C, `CUBLAS_COMPUTE_32F` (f32 accumulate).
//!
//! cuBLAS allocates its own workspace, which the memory tracker does not see.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as br, sys as bs, CudaBlas};
use cudarc::driver::CudaStream;

use super::grid::{self, CublasGemm};
use crate::backend::MatmulSpec;
use crate::error::{Result, RuntimeError};

/// A cuBLAS handle bound to the backend's compute stream.
pub(crate) struct Blas {
    handle: CudaBlas,
}

fn blas_err(what: &str, e: br::CublasError) -> RuntimeError {
    RuntimeError::Device(format!("cuBLAS {what} failed: {e}"))
}

fn op(t: bool) -> bs::cublasOperation_t {
    if t {
        bs::cublasOperation_t::CUBLAS_OP_T
    } else {
        bs::cublasOperation_t::CUBLAS_OP_N
    }
}

fn int(what: &str, v: usize) -> Result<i32> {
    grid::to_i32(what, v).map_err(|detail| RuntimeError::Invalid { op: "matmul", detail })
}

impl Blas {
    /// Creates the handle; fails cleanly when libcublas cannot be loaded.
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        if !super::device::cublas_library_present() {
            return Err(RuntimeError::Device(format!(
                "cuBLAS is unavailable: libcublas was not found (looked for {}); use MatmulImpl::Custom \
                 or add the CUDA toolkit's lib folder to LD_LIBRARY_PATH",
                super::device::library_candidates("cublas")
            )));
        }
        let handle = CudaBlas::new(stream).map_err(|e| blas_err("cublasCreate", e))?;
        Ok(Self { handle })
    }

    fn dims(g: &CublasGemm) -> Result<[i32; 6]> {
        Ok([int("n", g.m)?, int("m", g.n)?, int("k", g.k)?, int("lda", g.lda)?, int("ldb", g.ldb)?, int("ldc", g.ldc)?])
    }

    /// Row-major f32 `C (= | +=) op(A)·op(B)` with the given row-major leading dimensions.
    ///
    /// # Safety
    /// `a`, `b`, `c` must be live device allocations of this context holding the matrices that
    /// `spec` and the leading dimensions describe; `c` must not overlap `a` or `b`.
    pub(crate) unsafe fn sgemm(&self, spec: &MatmulSpec, a: u64, lda: usize, b: u64, ldb: usize, c: u64) -> Result<()> {
        let g = grid::cublas_row_major(spec, lda, ldb, spec.n);
        let [m, n, k, lda, ldb, ldc] = Self::dims(&g)?;
        let alpha = 1.0f32;
        let beta = if spec.accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: forwarded from this function's contract; alpha/beta are host scalars (the
        // handle's default pointer mode), cuBLAS's A is our B and its B our A (operand swap).
        unsafe {
            br::sgemm(
                *self.handle.handle(),
                op(g.trans_a),
                op(g.trans_b),
                m,
                n,
                k,
                &alpha,
                b as *const f32,
                lda,
                a as *const f32,
                ldb,
                &beta,
                c as *mut f32,
                ldc,
            )
        }
        .map_err(|e| blas_err("sgemm", e))
    }

    /// Row-major `C (= | +=) op(A)·op(B)` with bf16 `A`, `B` (raw bit patterns), accumulated in
    /// f32; `C` is f32, or bf16 when `c_bf16` (read widened when accumulating, rounded once on
    /// write, nearest even).
    ///
    /// # Safety
    /// As [`Blas::sgemm`], with `a` and `b` holding bf16 matrices and `c` m·n elements of its type.
    pub(crate) unsafe fn gemm_bf16(
        &self,
        spec: &MatmulSpec,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        (c, c_bf16): (u64, bool),
    ) -> Result<()> {
        let g = grid::cublas_row_major(spec, lda, ldb, spec.n);
        let c_type = if c_bf16 { bs::cudaDataType_t::CUDA_R_16BF } else { bs::cudaDataType_t::CUDA_R_32F };
        let [m, n, k, lda, ldb, ldc] = Self::dims(&g)?;
        let alpha = 1.0f32;
        let beta = if spec.accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: forwarded from this function's contract; with CUBLAS_COMPUTE_32F alpha and beta
        // are f32 host scalars.
        unsafe {
            br::gemm_ex(
                *self.handle.handle(),
                op(g.trans_a),
                op(g.trans_b),
                m,
                n,
                k,
                (&alpha) as *const f32 as *const c_void,
                b as *const c_void,
                bs::cudaDataType_t::CUDA_R_16BF,
                lda,
                a as *const c_void,
                bs::cudaDataType_t::CUDA_R_16BF,
                ldb,
                (&beta) as *const f32 as *const c_void,
                c as *mut c_void,
                c_type,
                ldc,
                bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("gemmEx (bf16)", e))
    }
}
