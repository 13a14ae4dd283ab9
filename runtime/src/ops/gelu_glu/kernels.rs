//! Kernel descriptors of `glu.cu`: GELU-GLU forward and backward, 1-D grid-stride. Grid:
//! `crate::cuda::grid::grid_stride`.

use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::KernelFamily;

const NAME: &str = "glu";

/// `gelu_glu_forward_f32(out, a, b, n)`: out = gelu(a) · b (exact erf GELU).
pub(crate) const FORWARD: Kernel<(P, P, P, u64)> = Kernel::new(NAME, "gelu_glu_forward_f32");
/// `gelu_glu_backward_f32(da, db, dout, a, b, n)`: da = dout · b · gelu'(a), db = dout · gelu(a).
pub(crate) const BACKWARD: Kernel<(P, P, P, P, P, u64)> = Kernel::new(NAME, "gelu_glu_backward_f32");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "glu.cu",
    source: include_str!("glu.cu"),
    kernels: &[FORWARD.decl(), BACKWARD.decl()],
    defines: &[],
};
