//! CUDA code of GELU-GLU: `kernels/cuda/glu.cu`.

use crate::cuda::kernel_prelude::*;
use crate::ops::gelu_glu;

impl CudaBackend {
    pub(crate) fn gelu_glu_forward_cuda(&self, a: gelu_glu::Forward<'_, CudaBuf>) -> Result<()> {
        let gelu_glu::Forward { out, a, b } = a;
        if out.len == 0 {
            return Ok(());
        }
        let l = cfg("gelu_glu_forward", lc::grid_stride(out.len, self.sms()))?;
        // SAFETY: gelu_glu_forward_f32(out, a, b, n), all n floats.
        unsafe {
            self.call_kernel("glu", "gelu_glu_forward_f32", l, &[mut_ptr(out), ptr(a), ptr(b), Arg::U(out.len as u64)])
        }
    }
    pub(crate) fn gelu_glu_backward_cuda(&self, a: gelu_glu::Backward<'_, CudaBuf>) -> Result<()> {
        let gelu_glu::Backward { da, db, dout, a, b } = a;
        let n = dout.len;
        if n == 0 {
            return Ok(());
        }
        let l = cfg("gelu_glu_backward", lc::grid_stride(n, self.sms()))?;
        let args = [mut_ptr(da), mut_ptr(db), ptr(dout), ptr(a), ptr(b), Arg::U(n as u64)];
        // SAFETY: gelu_glu_backward_f32(da, db, dout, a, b, n), all n floats.
        unsafe { self.call_kernel("glu", "gelu_glu_backward_f32", l, &args) }
    }
}
