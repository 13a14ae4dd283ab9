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

/// `buf = value`.
pub struct Fill<'a, T> {
    pub buf: &'a mut T,
    pub value: f32,
}

/// `dst[offset..offset + data.len()] = data` from host memory.
pub struct Write<'a, T> {
    pub dst: &'a mut T,
    pub offset: usize,
    pub data: &'a [f32],
}

/// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
pub struct Copy<'a, T> {
    pub dst: &'a mut T,
    pub dst_off: usize,
    pub src: &'a T,
    pub src_off: usize,
    pub len: usize,
}

/// `acc += x`.
pub struct AddAssign<'a, T> {
    pub acc: &'a mut T,
    pub x: &'a T,
}

/// `out = a + b`.
pub struct Add<'a, T> {
    pub out: &'a mut T,
    pub a: &'a T,
    pub b: &'a T,
}

/// `x *= s`.
pub struct Scale<'a, T> {
    pub x: &'a mut T,
    pub s: f32,
}

/// `*out = Σ x²` in f64.
pub struct SumSquares<'a, T> {
    pub x: &'a T,
    pub out: &'a mut f64,
}

/// `out[i·row_len + j] += row[j]`.
pub struct AddBroadcastRows<'a, T> {
    pub out: &'a mut T,
    pub row: &'a T,
    pub row_len: usize,
}

/// `acc[j] += Σ_i x[i·row_len + j]`.
pub struct SumBroadcastRows<'a, T> {
    pub acc: &'a mut T,
    pub x: &'a T,
    pub row_len: usize,
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
