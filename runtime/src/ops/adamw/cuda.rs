//! CUDA code of AdamW: `adamw.cu` beside this file (descriptors in `kernels.rs`; bias corrections
//! computed on the host in f64).

use super::kernels as k;
use crate::cuda::kernel_prelude::*;
use crate::ops::adamw;

impl CudaBackend {
    pub(crate) fn adamw_cuda(&self, a: adamw::AdamW<'_, CudaBuf>) -> Result<()> {
        let adamw::AdamW { param, grad, m, v, step } = a;
        let n = param.len;
        if n == 0 {
            return Ok(());
        }
        let (bc1, bc2) = lc::adamw_bias_corrections(step.b1, step.b2, step.step);
        let l = cfg("adamw", lc::grid_stride(n, self.sms()))?;
        let args = (
            mut_ptr(param),
            ptr(grad),
            mut_ptr(m),
            mut_ptr(v),
            n as u64,
            step.lr,
            step.b1,
            step.b2,
            step.eps,
            step.weight_decay,
            bc1,
            bc2,
            step.grad_scale,
            DevicePtr::NULL,
        );
        // SAFETY: adamw_f32(param, grad, m, v, n, lr, b1, b2, eps, wd, bc1, bc2, grad_scale,
        // grad_scale_dev = null), the four arrays n floats each.
        unsafe { self.call_kernel(k::ADAMW, l, args) }
    }
}
