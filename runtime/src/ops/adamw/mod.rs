//! The AdamW update, exactly as `optax.adamw` (eps_root 0, decay on every entry), in place over a
//! parameter tensor and its two moments (all `n` long). CPU: [`cpu`]; CUDA: `adamw.cu` (bias
//! corrections computed on the host in f64 on both).

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::{Result, RuntimeError};
use crate::ops::checks::{check_f32, check_len};
use crate::ops::Storage;

/// One AdamW update exactly as `optax.adamw` (eps_root 0, decay on every entry):
/// `m = (1-b1)·g + b1·m; v = (1-b2)·g² + b2·v; u = m̂/(√v̂ + eps) + wd·p; p = p - lr·u`,
/// with `g = grad_scale · grad` (grad_scale carries gradient clipping and averaging).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count used for bias correction.
    pub step: u64,
    pub grad_scale: f32,
}

/// [`crate::Backend::adamw`].
pub struct AdamW<'a, T> {
    pub param: &'a mut T,
    pub grad: &'a T,
    pub m: &'a mut T,
    pub v: &'a mut T,
    pub step: AdamWStep,
}

impl<T: Storage> AdamW<'_, T> {
    pub fn check(&self) -> Result<()> {
        let n = self.param.elems();
        check_len("adamw", "grad", self.grad.elems(), n)?;
        check_len("adamw", "m", self.m.elems(), n)?;
        check_len("adamw", "v", self.v.elems(), n)?;
        // fp32 master weights, gradients and moments in every precision.
        for (what, buf) in [("param", &*self.param), ("grad", self.grad), ("m", &*self.m), ("v", &*self.v)] {
            check_f32("adamw", what, buf)?;
        }
        if self.step.step == 0 {
            return Err(RuntimeError::Invalid { op: "adamw", detail: "step count is 1-based".into() });
        }
        Ok(())
    }
}
