//! CUDA code of the GEMM: `matmul.cu` beside this file (descriptors in `kernels.rs`; f32 SIMT or bf16 tensor cores after staging
//! the operands as bf16) or cuBLAS, by [`crate::cuda::Precision`] and [`crate::cuda::MatmulImpl`].

use super::kernels::{self as k, GemmArgs};
use crate::cuda::kernel_prelude::*;
use crate::ops::elementwise::kernels::CAST_F32_TO_BF16;
use crate::ops::matmul;

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

    /// Stages one f32 GEMM operand as bf16 in `dst` (through `tmp` when its leading dimension
    /// is padded); returns the bf16 matrix's address and leading dimension.
    fn stage_bf16(
        &self,
        dst: &mut Scratch<u16>,
        tmp: &mut Scratch<u16>,
        src: u64,
        st: Bf16Staging,
    ) -> Result<(u64, usize)> {
        let (stream, mem) = (&self.dev.stream, self.memory_tracker());
        let n = st.rows * st.cols;
        if st.needs_padding() && self.dev.pad_2d_ok.load(Ordering::Relaxed) {
            let t = raw_ptr(tmp.get(stream, mem, n)?);
            self.cast_bf16(t, src, n)?;
            let d = raw_ptr(dst.get(stream, mem, st.padded_len())?);
            let (sp, dp, w, h) = st.copy_2d_bytes();
            // SAFETY: `t` holds rows×cols bf16 (pitch cols·2), `d` rows×ld bf16 (pitch ld·2 >= width);
            // they are distinct scratch buffers.
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
        let d = raw_ptr(dst.get(stream, mem, n)?);
        self.cast_bf16(d, src, n)?;
        Ok((d, st.cols))
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

    fn matmul_bf16(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, s: MatmulSpec) -> Result<()> {
        let (sa, sb) = lc::bf16_staging(&s);
        let mut guard = self.scratch();
        let sc = &mut *guard;
        let (pa, lda) = self.stage_bf16(&mut sc.bf16_a, &mut sc.bf16_tmp, a.device_ptr(), sa)?;
        let (pb, ldb) = self.stage_bf16(&mut sc.bf16_b, &mut sc.bf16_tmp, b.device_ptr(), sb)?;
        let pc = out.device_ptr();
        match self.opts.matmul {
            MatmulImpl::Cublas => self.with_blas(|blas| {
                // SAFETY: pa/pb hold the bf16 operands with leading dimensions lda/ldb (staged
                // above, in stream order before this GEMM); out holds m·n floats.
                unsafe { blas.gemm_bf16(&s, pa, lda, pb, ldb, pc) }
            }),
            MatmulImpl::Custom => {
                let tile = k::choose_bf16_tile(s.m, s.n, self.sms());
                let l = cfg("matmul", k::matmul_bf16(s.m, s.n, tile))?;
                let variants = match tile {
                    k::Bf16Tile::T128 => &k::BF16_128,
                    k::Bf16Tile::T64 => &k::BF16_64,
                };
                let kernel = variants[s.trans_a as usize][s.trans_b as usize];
                let args = self.gemm_args(pc, pa, lda, pb, ldb, s.n, &s)?;
                // SAFETY: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta) with bf16 A and B staged
                // above (leading dimensions lda, ldb >= their column counts), f32 C of m·n; no split-K.
                unsafe { self.call_kernel(kernel, l, args) }
            }
        }
    }

    pub(crate) fn matmul_cuda(&self, a: matmul::Matmul<'_, CudaBuf>) -> Result<()> {
        let matmul::Matmul { out, a, b, spec } = a;
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        if spec.k == 0 {
            return if spec.accumulate { Ok(()) } else { self.fill_raw("matmul", out.device_ptr(), out.len, 0.0) };
        }
        match self.opts.precision {
            Precision::F32 => self.matmul_f32(out, a, b, spec),
            Precision::Bf16Mixed => self.matmul_bf16(out, a, b, spec),
        }
    }
}
