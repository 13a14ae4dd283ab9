//! Length checks shared by the op families' argument checks (each op family's `check` runs once,
//! in front of every backend, so all backends refuse bad shapes the same way: an error, never a
//! panic, before touching memory).

use crate::dtype::DType;
use crate::error::{Result, RuntimeError};
use crate::ops::Storage;

pub(crate) fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(RuntimeError::Shape { op, detail: format!("{what} has {got} elements, expected {want}") });
    }
    Ok(())
}

pub(crate) fn check_prefix(op: &'static str, have: usize, row_len: usize) -> Result<()> {
    if have < row_len {
        return Err(RuntimeError::Shape {
            op,
            detail: format!("row buffer has {have} elements, fewer than row_len {row_len}"),
        });
    }
    Ok(())
}

pub(crate) fn rows_of(op: &'static str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 || !len.is_multiple_of(dim) {
        return Err(RuntimeError::Shape { op, detail: format!("length {len} is not a multiple of dim {dim}") });
    }
    Ok(len / dim)
}

pub(crate) fn check_valid(op: &'static str, cols: usize, valid: usize) -> Result<()> {
    if valid == 0 || valid > cols {
        return Err(RuntimeError::Invalid { op, detail: format!("valid_cols {valid} must be in 1..={cols}") });
    }
    Ok(())
}

/// Buffers bf16-mixed keeps in f32 (statistics, losses, parameters and their gradients, optimizer
/// moments): a bf16 buffer there is refused, naming it.
pub(crate) fn check_f32<T: Storage>(op: &'static str, what: &str, buf: &T) -> Result<()> {
    if buf.dtype() != DType::F32 {
        return Err(RuntimeError::Invalid {
            op,
            detail: format!("`{what}` is {}, this op keeps it in f32 (allocate it with DType::F32)", buf.dtype()),
        });
    }
    Ok(())
}

/// [`check_f32`] of an optional buffer.
pub(crate) fn check_opt_f32<T: Storage>(op: &'static str, what: &str, buf: Option<&T>) -> Result<()> {
    buf.map_or(Ok(()), |b| check_f32(op, what, b))
}

/// `check_len` of an optional buffer.
pub(crate) fn check_opt_len<T: Storage>(op: &'static str, what: &str, buf: Option<&T>, want: usize) -> Result<()> {
    match buf {
        Some(b) => check_len(op, what, b.elems(), want),
        None => Ok(()),
    }
}
