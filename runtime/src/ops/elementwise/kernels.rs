//! Kernel descriptors of `elementwise.cu`: flat memory-bound kernels (fill, add, scale, Σx², the
//! f32 ↔ bf16 casts) and the broadcast-row add / sum. Grids: `crate::cuda::grid::{elementwise,
//! grid_stride, sum_squares_partials, sum_finish, add_broadcast_rows, sum_broadcast_rows}`.

use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::KernelFamily;

const NAME: &str = "elementwise";

/// `fill_f32(x, value, n)`: x[i] = value.
pub(crate) const FILL: Kernel<(P, f32, u64)> = Kernel::new(NAME, "fill_f32");
/// `add_f32(out, a, b, n)`: out = a + b (out aliases neither input).
pub(crate) const ADD: Kernel<(P, P, P, u64)> = Kernel::new(NAME, "add_f32");
/// `add_assign_f32(acc, x, n)`: acc += x.
pub(crate) const ADD_ASSIGN: Kernel<(P, P, u64)> = Kernel::new(NAME, "add_assign_f32");
/// `scale_f32(x, s, n)`: x *= s.
pub(crate) const SCALE: Kernel<(P, f32, u64)> = Kernel::new(NAME, "scale_f32");
/// `sum_squares_partial_f32(x, n, partials)`: one f64 Σx² partial per block.
pub(crate) const SUM_SQUARES_PARTIAL: Kernel<(P, u64, P)> = Kernel::new(NAME, "sum_squares_partial_f32");
/// `sum_f64_finish(partials, count, out, accumulate)`: out[0] (+)= Σ partials, one block.
pub(crate) const SUM_F64_FINISH: Kernel<(P, i32, P, i32)> = Kernel::new(NAME, "sum_f64_finish");
/// `cast_f32_to_bf16(out, x, n)`: round-to-nearest-even f32 → bf16.
pub(crate) const CAST_F32_TO_BF16: Kernel<(P, P, u64)> = Kernel::new(NAME, "cast_f32_to_bf16");
/// `cast_bf16_to_f32(out, x, n)`: exact bf16 → f32 (not called yet: activations are f32).
const CAST_BF16_TO_F32: Kernel<(P, P, u64)> = Kernel::new(NAME, "cast_bf16_to_f32");
/// `add_broadcast_rows_f32(out, row, n_blocks, row_len)`: out[b·row_len + j] += row[j].
pub(crate) const ADD_BROADCAST_ROWS: Kernel<(P, P, i32, i32)> = Kernel::new(NAME, "add_broadcast_rows_f32");
/// `sum_broadcast_rows_f32(acc, x, n_blocks, row_len)`: acc[j] += Σ_b x[b·row_len + j], in order.
pub(crate) const SUM_BROADCAST_ROWS: Kernel<(P, P, i32, i32)> = Kernel::new(NAME, "sum_broadcast_rows_f32");

pub const FAMILY: KernelFamily = KernelFamily {
    name: NAME,
    file: "elementwise.cu",
    source: include_str!("elementwise.cu"),
    kernels: &[
        FILL.decl(),
        ADD.decl(),
        ADD_ASSIGN.decl(),
        SCALE.decl(),
        SUM_SQUARES_PARTIAL.decl(),
        SUM_F64_FINISH.decl(),
        CAST_F32_TO_BF16.decl(),
        CAST_BF16_TO_F32.decl(),
        ADD_BROADCAST_ROWS.decl(),
        SUM_BROADCAST_ROWS.decl(),
    ],
    defines: &[],
};
