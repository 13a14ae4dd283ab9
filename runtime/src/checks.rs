//! Argument checks shared by every backend, so each op refuses bad shapes the same way (with
//! an error, never a panic) before touching memory.

use crate::backend::{AttentionShape, VocabRange};
use crate::error::{Result, RuntimeError};

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

pub(crate) fn check_embedding(op: &'static str, range: VocabRange, dim: usize) -> Result<()> {
    if dim == 0 || range.start > range.end {
        return Err(RuntimeError::Invalid {
            op,
            detail: format!("dim {dim} and vocab range {range:?} must be non-empty"),
        });
    }
    Ok(())
}

/// Checks an attention call's shape and the lengths of q, k, v and the optional key mask.
pub(crate) fn check_attention(
    op: &'static str,
    s: &AttentionShape,
    q: usize,
    k: usize,
    v: usize,
    mask: Option<usize>,
) -> Result<()> {
    if s.batch == 0 || s.q_len == 0 || s.kv_len == 0 || s.heads == 0 || s.head_dim == 0 {
        return Err(RuntimeError::Invalid { op, detail: format!("attention shape has a zero dimension: {s:?}") });
    }
    let w = s.width();
    check_len(op, "q", q, s.batch * s.q_len * w)?;
    check_len(op, "k", k, s.batch * s.kv_len * w)?;
    check_len(op, "v", v, s.batch * s.kv_len * w)?;
    if let Some(m) = mask {
        check_len(op, "key mask", m, s.batch * s.kv_len)?;
    }
    if s.causal && s.q_len != s.kv_len {
        return Err(RuntimeError::Invalid { op, detail: "causal attention needs q_len == kv_len".into() });
    }
    Ok(())
}

/// Lengths of a LayerNorm call's buffers (`scale` absent for the bias-only form).
pub(crate) struct LayerNormLens {
    pub x: usize,
    pub out: usize,
    pub mean: usize,
    pub rstd: usize,
    pub bias: usize,
    pub scale: Option<usize>,
}

/// Checks a LayerNorm forward (fused or with given statistics); returns the row count.
pub(crate) fn check_layernorm(op: &'static str, l: LayerNormLens, dim: usize) -> Result<usize> {
    let rows = rows_of(op, l.x, dim)?;
    check_len(op, "out", l.out, l.x)?;
    check_len(op, "mean", l.mean, rows)?;
    check_len(op, "rstd", l.rstd, rows)?;
    check_len(op, "bias", l.bias, dim)?;
    if let Some(s) = l.scale {
        check_len(op, "scale", s, dim)?;
    }
    Ok(rows)
}
