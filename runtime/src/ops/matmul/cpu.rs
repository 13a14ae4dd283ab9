//! Dense matrix product through the `gemm` crate (blocked, AVX2/AVX-512 micro-kernels chosen at
//! run time, rayon-parallel for large products). Transposes are expressed as strides, so no
//! operand is ever copied.

use crate::backend::MatmulSpec;

/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_THRESHOLD: usize = 1 << 18;

/// `out (= | +=) op(a) · op(b)`; lengths already checked by the caller.
pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], s: MatmulSpec) {
    let (m, n, k) = (s.m, s.n, s.k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !s.accumulate {
            out.fill(0.0);
        }
        return;
    }
    // (row stride, column stride) of each operand as the logical matrix.
    let (a_rs, a_cs) = if s.trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if s.trans_b { (1, k as isize) } else { (n as isize, 1) };
    let lhs = View { ptr: a.as_ptr(), rs: a_rs, cs: a_cs };
    let rhs = View { ptr: b.as_ptr(), rs: b_rs, cs: b_cs };
    // SAFETY: the caller checked out.len() == m·n, a.len() == m·k, b.len() == k·n, so every
    // (row, col) addressed through these strides is in bounds; `out` is a distinct &mut slice,
    // so it aliases neither input.
    unsafe {
        gemm_views((m, n, k), (out.as_mut_ptr(), n as isize, 1), s.accumulate, lhs, rhs, 1.0, parallelism(m, n, k))
    }
}

/// Rayon for products of at least [`PARALLEL_THRESHOLD`] multiply-adds, the calling thread below.
pub(crate) fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k >= PARALLEL_THRESHOLD {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    }
}

/// The one call into the `gemm` crate: `dst (= | +=) alpha · lhs[m,k] · rhs[k,n]` on strided
/// views, `dst = (pointer, row stride, column stride)`.
///
/// # Safety
/// Every element addressed through the views must be in bounds, and `dst` must not overlap
/// `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_views(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut f32, isize, isize),
    accumulate: bool,
    lhs: View,
    rhs: View,
    alpha: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A strided view for the attention kernel's per-head products: element (i, j) at
/// `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst (= | +=) alpha · lhs[m,k] · rhs[k,n]` on strided views, single-threaded.
///
/// # Safety
/// Every element addressed through the views must be in bounds, and `dst` must not overlap
/// `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    alpha: f32,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe { gemm_views((m, n, k), (dst, dst_rs, dst_cs), accumulate, lhs, rhs, alpha, gemm::Parallelism::None) }
}
