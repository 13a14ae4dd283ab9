//! Elementwise ops, reductions and buffer moves over flat f32 buffers.
//!
//! - [`Fill`] `buf = value`; [`Write`] `dst[offset..] = host data`; [`Copy`]
//!   `dst[dst_off..+len] = src[src_off..+len]`.
//! - [`AddAssign`] `acc += x`; [`Add`] `out = a + b`; [`Scale`] `x *= s`.
//! - [`SumSquares`] `Σ x²`, accumulated in f64.
//! - [`AddBroadcastRows`] `out[i·row_len + j] += row[j]` (position embeddings; only the first
//!   `row_len` elements of `row` are read) and its backward [`SumBroadcastRows`]
//!   `acc[j] += Σ_i x[i·row_len + j]` (accumulated).
//!
//! CPU: [`cpu`]; CUDA: `elementwise.cu` (grid-stride loops; the broadcast rows in `embedding.cu`).

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::{Result, RuntimeError};
use crate::ops::checks::{check_f32, check_len, check_prefix, rows_of};
use crate::ops::Storage;

op_args! {
    /// `buf = value`.
    Fill<'a, T> { buf: &'a mut T, value: f32 }
}

op_args! {
    /// `dst[offset..offset + data.len()] = data` from host memory.
    Write<'a, T> { dst: &'a mut T, offset: usize, data: &'a [f32] }
}

op_args! {
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    Copy<'a, T> { dst: &'a mut T, dst_off: usize, src: &'a T, src_off: usize, len: usize }
}

op_args! {
    /// `acc += x`.
    AddAssign<'a, T> { acc: &'a mut T, x: &'a T }
}

op_args! {
    /// `out = a + b`.
    Add<'a, T> { out: &'a mut T, a: &'a T, b: &'a T }
}

op_args! {
    /// `x *= s`.
    Scale<'a, T> { x: &'a mut T, s: f32 }
}

op_args! {
    /// `*out = Σ x²` in f64.
    SumSquares<'a, T> { x: &'a T, out: &'a mut f64 }
}

op_args! {
    /// `out[i·row_len + j] += row[j]`.
    AddBroadcastRows<'a, T> { out: &'a mut T, row: &'a T, row_len: usize }
}

op_args! {
    /// `acc[j] += Σ_i x[i·row_len + j]`.
    SumBroadcastRows<'a, T> { acc: &'a mut T, x: &'a T, row_len: usize }
}

impl<T: Storage> Write<'_, T> {
    pub fn check(&self) -> Result<()> {
        let (offset, end) = (self.offset, self.offset + self.data.len());
        if end > self.dst.elems() {
            return Err(RuntimeError::Shape {
                op: "write",
                detail: format!("range {offset}..{end} exceeds buffer of {}", self.dst.elems()),
            });
        }
        Ok(())
    }
}

impl<T: Storage> Copy<'_, T> {
    pub fn check(&self) -> Result<()> {
        let (dst, src, len) = (self.dst.elems(), self.src.elems(), self.len);
        if self.dst_off + len > dst || self.src_off + len > src {
            return Err(RuntimeError::Shape {
                op: "copy",
                detail: format!(
                    "copy of {len} from offset {} (of {src}) to offset {} (of {dst}) is out of range",
                    self.src_off, self.dst_off
                ),
            });
        }
        Ok(())
    }
}

impl<T: Storage> AddAssign<'_, T> {
    pub fn check(&self) -> Result<()> {
        check_len("add_assign", "x", self.x.elems(), self.acc.elems())
    }
}

impl<T: Storage> Add<'_, T> {
    pub fn check(&self) -> Result<()> {
        check_len("add", "a", self.a.elems(), self.out.elems())?;
        check_len("add", "b", self.b.elems(), self.out.elems())
    }
}

impl<T: Storage> AddBroadcastRows<'_, T> {
    pub fn check(&self) -> Result<()> {
        check_prefix("add_broadcast_rows", self.row.elems(), self.row_len)?;
        rows_of("add_broadcast_rows", self.out.elems(), self.row_len).map(drop)
    }
}

impl<T: Storage> SumBroadcastRows<'_, T> {
    pub fn check(&self) -> Result<()> {
        check_f32("sum_broadcast_rows", "acc", self.acc)?;
        check_prefix("sum_broadcast_rows", self.acc.elems(), self.row_len)?;
        rows_of("sum_broadcast_rows", self.x.elems(), self.row_len).map(drop)
    }
}
