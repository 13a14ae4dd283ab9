//! Kernel descriptors of `adamw.cu`: the fused AdamW update, 1-D grid-stride. Grid:
//! `crate::cuda::grid::grid_stride`.

use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::KernelFamily;

const NAME: &str = "adamw";

/// (param, grad, m, v, n, lr, b1, b2, eps, weight_decay, bc1, bc2, grad_scale, grad_scale_dev).
pub(crate) type AdamwArgs = (P, P, P, P, u64, f32, f32, f32, f32, f32, f32, f32, f32, P);
/// As [`AdamwArgs`] with `param_bf16` after `v`.
type AdamwBf16CopyArgs = (P, P, P, P, P, u64, f32, f32, f32, f32, f32, f32, f32, f32, P);

/// `adamw_f32(param, grad, m, v, n, lr, b1, b2, eps, weight_decay, bc1, bc2, grad_scale,
/// grad_scale_dev)`: one decoupled-weight-decay Adam step per element (grad scaled by
/// `*grad_scale_dev` when non-null, else by `grad_scale`).
pub(crate) const ADAMW: Kernel<AdamwArgs> = Kernel::new(NAME, "adamw_f32");
/// `adamw_f32_bf16copy(param, grad, m, v, param_bf16, n, ...)`: as [`ADAMW`], also writing a bf16
/// copy of the updated parameters (not called yet: no persistent bf16 weights).
const ADAMW_BF16_COPY: Kernel<AdamwBf16CopyArgs> = Kernel::new(NAME, "adamw_f32_bf16copy");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "adamw.cu",
    source: include_str!("adamw.cu"),
    kernels: &[ADAMW.decl(), ADAMW_BF16_COPY.decl()],
    defines: &[],
};
