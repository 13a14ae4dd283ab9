//! CUDA code of GELU-GLU: `glu.cu` beside this file (descriptors in `kernels.rs`).

use super::kernels as k;
use crate::cuda::kernel_prelude::*;
use crate::ops::gelu_glu;

impl CudaBackend {
    pub(crate) fn gelu_glu_forward_cuda(&self, a: gelu_glu::Forward<'_, CudaBuf>) -> Result<()> {
        let gelu_glu::Forward { out, a, b } = a;
        let n = out.len;
        if n == 0 {
            return Ok(());
        }
        let l = cfg("gelu_glu_forward", lc::grid_stride(n, self.sms()))?;
        // SAFETY: gelu_glu_forward_f32(out, a, b, n), all n floats.
        unsafe { self.call_kernel(k::FORWARD, l, (mut_ptr(out), ptr(a), ptr(b), n as u64)) }
    }
    pub(crate) fn gelu_glu_backward_cuda(&self, a: gelu_glu::Backward<'_, CudaBuf>) -> Result<()> {
        let gelu_glu::Backward { da, db, dout, a, b } = a;
        let n = dout.len;
        if n == 0 {
            return Ok(());
        }
        let l = cfg("gelu_glu_backward", lc::grid_stride(n, self.sms()))?;
        let args = (mut_ptr(da), mut_ptr(db), ptr(dout), ptr(a), ptr(b), n as u64);
        // SAFETY: gelu_glu_backward_f32(da, db, dout, a, b, n), all n floats.
        unsafe { self.call_kernel(k::BACKWARD, l, args) }
    }
}
