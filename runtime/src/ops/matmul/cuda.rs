//! CUDA code of the GEMM: `matmul.cu` beside this file (descriptors in `kernels.rs`; f32 SIMT, or
//! bf16 tensor cores on bf16 operands: bf16 buffers as they are, f32 ones rounded into scratch) or
//! cuBLAS, by [`crate::cuda::Precision`], [`crate::cuda::MatmulImpl`] and the buffers' dtypes.

use super::kernels::{self as k, GemmArgs};
use crate::backend::Backend;
use crate::bf16_staging::STAGING_NAME;
use crate::cuda::kernel_prelude::*;
use crate::dtype::DType;
use crate::ops::elementwise::{self as ew, kernels::CAST_F32_TO_BF16};
use crate::ops::matmul;

/// Whether a GEMM with buffers of these dtypes (`[out, a, b]`) runs the bf16 GEMM on its buffers
/// as they are: under [`Precision::Bf16Mixed`] whenever one is bf16 (f32 operands are rounded per
/// call, as before), and under [`Precision::F32`] when both operands are bf16 (their products are
/// exact in f32 and the bf16 GEMM accumulates in f32, so it computes what the f32 GEMM of the
/// widened operands would, up to the order of the sums). Otherwise bf16 buffers are staged and
/// the GEMM of the backend's precision runs on f32 copies.
pub(crate) fn bf16_gemm_takes(precision: Precision, [out, a, b]: [DType; 3]) -> bool {
    let bf16 = |d: DType| d == DType::Bf16;
    match precision {
        Precision::Bf16Mixed => bf16(out) || bf16(a) || bf16(b),
        Precision::F32 => bf16(a) && bf16(b),
    }
}

impl CudaBackend {
    /// Rounds `n` f32 at `src` to bf16 at `dst`.
    fn cast_bf16(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let l = cfg("matmul", lc::grid_stride(n, self.sms()))?;
        // SAFETY: cast_f32_to_bf16(out, x, n): out holds n bf16, x n floats (callers size both).
        unsafe { self.call_kernel(CAST_F32_TO_BF16, l, (DevicePtr(dst), DevicePtr(src), n as u64)) }
    }

    /// One GEMM operand as bf16 for the tensor-core GEMM: an f32 operand is rounded into `dst`
    /// (through `tmp` when its leading dimension is padded); a bf16 operand is used in place, or
    /// copied into the padded layout of `dst` (no cast). Returns the bf16 matrix's address and
    /// leading dimension.
    fn stage_bf16(
        &self,
        dst: &mut Scratch<u16>,
        tmp: &mut Scratch<u16>,
        src: &CudaBuf,
        st: Bf16Staging,
    ) -> Result<(u64, usize)> {
        let (stream, mem) = (&self.dev.stream, self.memory_tracker());
        let n = st.rows * st.cols;
        let stored_bf16 = src.dtype() == DType::Bf16;
        if st.needs_padding() && self.dev.pad_2d_ok.load(Ordering::Relaxed) {
            let t = if stored_bf16 {
                src.device_ptr()
            } else {
                let t = raw_ptr(tmp.get(stream, mem, n)?);
                self.cast_bf16(t, src.device_ptr(), n)?;
                t
            };
            let d = raw_ptr(dst.get(stream, mem, st.padded_len())?);
            let (sp, dp, w, h) = st.copy_2d_bytes();
            // SAFETY: `t` holds rows×cols bf16 (pitch cols·2: the bf16 buffer itself, or the tmp
            // scratch), `d` rows×ld bf16 (pitch ld·2 >= width); they are distinct allocations.
            match unsafe { self.copy_2d_async((d, dp), (t, sp), (w, h)) } {
                Ok(()) => return Ok((d, st.ld)),
                Err(e) => {
                    tracing::warn!(
                        "padded bf16 staging disabled on this device ({e}); GEMMs fall back to unpadded operands"
                    );
                    self.dev.pad_2d_ok.store(false, Ordering::Relaxed);
                }
            }
        }
        if stored_bf16 {
            return Ok((src.device_ptr(), st.cols));
        }
        let d = raw_ptr(dst.get(stream, mem, n)?);
        self.cast_bf16(d, src.device_ptr(), n)?;
        Ok((d, st.cols))
    }

    /// Whether [`CudaBackend::compute`] hands this GEMM with bf16 buffers to the bf16 GEMM
    /// directly, without f32 staging ([`bf16_gemm_takes`]).
    pub(crate) fn bf16_gemm(&self, a: &matmul::Matmul<'_, CudaBuf>) -> bool {
        bf16_gemm_takes(self.opts.precision, [a.out.dtype(), a.a.dtype(), a.b.dtype()])
    }

    fn matmul_f32(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, s: MatmulSpec) -> Result<()> {
        let (lda, ldb, ldc) = lc::matmul_lds(&s);
        let (pa, pb, pc) = (a.device_ptr(), b.device_ptr(), out.device_ptr());
        match self.opts.matmul {
            MatmulImpl::Cublas => self.with_blas(|blas| {
                // SAFETY: lengths were checked against the spec: a holds m·k, b k·n, out m·n floats
                // with these leading dimensions; out is a distinct &mut buffer.
                unsafe { blas.sgemm(&s, pa, lda, pb, ldb, pc) }
            }),
            MatmulImpl::Custom => {
                let l = cfg("matmul", k::matmul_f32(s.m, s.n))?;
                let kernel = k::F32[s.trans_a as usize][s.trans_b as usize];
                let args = self.gemm_args(pc, pa, lda, pb, ldb, ldc, &s)?;
                // SAFETY: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta) as matmul.cu documents;
                // the buffers hold the checked m·k, k·n and m·n floats; gridDim.z = 1 (no split-K).
                unsafe { self.call_kernel(kernel, l, args) }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_args(
        &self,
        c: u64,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        ldc: usize,
        s: &MatmulSpec,
    ) -> Result<GemmArgs> {
        let op = "matmul";
        Ok((
            DevicePtr(c),
            DevicePtr(a),
            DevicePtr(b),
            int(op, "m", s.m)?,
            int(op, "n", s.n)?,
            int(op, "k", s.k)?,
            int(op, "lda", lda)?,
            int(op, "ldb", ldb)?,
            int(op, "ldc", ldc)?,
            1.0,
            if s.accumulate { 1.0 } else { 0.0 },
        ))
    }

    /// The tensor-core GEMM (custom `matmul_bf16_*` or cuBLAS `GemmEx`) with f32 accumulation;
    /// operands of either dtype ([`Self::stage_bf16`]), output f32 or bf16 (rounded once on write:
    /// GemmEx writes bf16 C itself; the custom kernels write f32, so a bf16 `out` is staged
    /// through an f32 copy, widened first when accumulating).
    fn matmul_bf16(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, s: MatmulSpec) -> Result<()> {
        let (sa, sb) = lc::bf16_staging(&s);
        let mut guard = self.scratch();
        let sc = &mut *guard;
        let (pa, lda) = self.stage_bf16(&mut sc.bf16_a, &mut sc.bf16_tmp, a, sa)?;
        let (pb, ldb) = self.stage_bf16(&mut sc.bf16_b, &mut sc.bf16_tmp, b, sb)?;
        let out_bf16 = out.dtype() == DType::Bf16;
        match self.opts.matmul {
            MatmulImpl::Cublas => self.with_blas(|blas| {
                // SAFETY: pa/pb hold the bf16 operands with leading dimensions lda/ldb (staged
                // above, in stream order before this GEMM, or the bf16 buffers themselves); out
                // holds m·n elements of its dtype.
                unsafe { blas.gemm_bf16(&s, pa, lda, pb, ldb, (out.device_ptr(), out_bf16)) }
            }),
            MatmulImpl::Custom if !out_bf16 => self.gemm_bf16_custom(out.device_ptr(), (pa, lda), (pb, ldb), &s),
            MatmulImpl::Custom => {
                let len = out.len;
                let mut wide = self.zeros(STAGING_NAME, len)?;
                if s.accumulate {
                    self.copy_cuda(ew::Copy { dst: &mut wide, dst_off: 0, src: out, src_off: 0, len })?;
                }
                self.gemm_bf16_custom(wide.device_ptr(), (pa, lda), (pb, ldb), &s)?;
                self.copy_cuda(ew::Copy { dst: out, dst_off: 0, src: &wide, src_off: 0, len })
            }
        }
    }

    /// `matmul_bf16_*` (tile by shape) into the f32 matrix at `c` (`m·n`, ld n).
    fn gemm_bf16_custom(&self, c: u64, (pa, lda): (u64, usize), (pb, ldb): (u64, usize), s: &MatmulSpec) -> Result<()> {
        let tile = k::choose_bf16_tile(s.m, s.n, self.sms());
        let l = cfg("matmul", k::matmul_bf16(s.m, s.n, tile))?;
        let variants = match tile {
            k::Bf16Tile::T128 => &k::BF16_128,
            k::Bf16Tile::T64 => &k::BF16_64,
        };
        let kernel = variants[s.trans_a as usize][s.trans_b as usize];
        let args = self.gemm_args(c, pa, lda, pb, ldb, s.n, s)?;
        // SAFETY: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta) with bf16 A and B (leading
        // dimensions lda, ldb >= their column counts, staged by the caller), f32 C of m·n; no split-K.
        unsafe { self.call_kernel(kernel, l, args) }
    }

    /// The GEMM of an op whose buffers are f32 (from [`CudaBackend::compute`]'s staging) or
    /// accepted by [`Self::bf16_gemm`]: the f32 GEMM in [`Precision::F32`] on f32 buffers, the bf16
    /// GEMM otherwise.
    pub(crate) fn matmul_cuda(&self, a: matmul::Matmul<'_, CudaBuf>) -> Result<()> {
        let matmul::Matmul { out, a, b, spec } = a;
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        if spec.k == 0 {
            return if spec.accumulate { Ok(()) } else { self.fill_cuda(ew::Fill { buf: out, value: 0.0 }) };
        }
        let all_f32 = [&*out, a, b].iter().all(|x| x.dtype() == DType::F32);
        match self.opts.precision {
            Precision::F32 if all_f32 => self.matmul_f32(out, a, b, spec),
            _ => self.matmul_bf16(out, a, b, spec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DType::{Bf16 as B, F32 as F};

    #[test]
    fn bf16_buffers_reach_the_bf16_gemm_by_precision() {
        assert!(!bf16_gemm_takes(Precision::Bf16Mixed, [F, F, F]), "all f32: the usual path (cast per call)");
        for dts in [[B, F, F], [F, B, F], [F, F, B], [B, B, B]] {
            assert!(bf16_gemm_takes(Precision::Bf16Mixed, dts), "{dts:?}");
        }
        assert!(bf16_gemm_takes(Precision::F32, [F, B, B]) && bf16_gemm_takes(Precision::F32, [B, B, B]));
        for dts in [[F, F, F], [B, F, F], [F, B, F], [F, F, B], [B, B, F]] {
            assert!(!bf16_gemm_takes(Precision::F32, dts), "{dts:?}: staged, then the f32 GEMM");
        }
    }
}
