//! Fused multi-head softmax attention (FlashAttention-style: the probabilities are never stored).
//!
//! Contract: scores scaled by 1/√head_dim, optional key-padding mask (`[batch, kv_len]`,
//! non-zero = visible) and causal mask. [`Forward`] writes `out` (the layout of `q`) and the
//! per-row log-sum-exp `lse` (`[batch, heads, q_len]`; NaN for a fully masked row, which then
//! attends uniformly, as JAX's finite mask bias does). [`Backward`] overwrites `dq, dk, dv`,
//! recomputing the probabilities from `lse`. Nothing is accumulated.
//!
//! CPU: [`cpu`]; CUDA: `attention.cu` (f32) and `attention_tc.cu` (bf16 tensor cores).

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::{Result, RuntimeError};
use crate::ops::checks::{check_f32, check_len};
use crate::ops::Storage;

/// Multi-head attention over `q: [batch, q_len, heads·head_dim]` and
/// `k, v: [batch, kv_len, heads·head_dim]`; head `h` is the contiguous column slice
/// `h·head_dim .. (h+1)·head_dim` (as dalle-mini splits heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query `i` sees keys `j <= i` only (decoder self-attention; requires q_len == kv_len).
    pub causal: bool,
}

impl AttentionShape {
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Length of the saved log-sum-exp buffer: `[batch, heads, q_len]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.q_len
    }
    /// Forward FLOPs of the two batched products (QKᵀ and PV), causal not discounted.
    pub fn forward_flops(&self) -> f64 {
        4.0 * (self.batch * self.heads * self.q_len * self.kv_len * self.head_dim) as f64
    }
}

/// The inputs both directions read.
pub struct Inputs<'a, T, I> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub mask: Option<&'a I>,
}

/// [`crate::Backend::attention_forward`].
pub struct Forward<'a, T, I> {
    pub out: &'a mut T,
    pub lse: &'a mut T,
    pub x: Inputs<'a, T, I>,
    pub shape: AttentionShape,
}

/// [`crate::Backend::attention_backward`].
pub struct Backward<'a, T, I> {
    pub dq: &'a mut T,
    pub dk: &'a mut T,
    pub dv: &'a mut T,
    pub dout: &'a T,
    pub x: Inputs<'a, T, I>,
    pub out: &'a T,
    pub lse: &'a T,
    pub shape: AttentionShape,
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

impl<T: Storage, I: Storage> Inputs<'_, T, I> {
    fn check(&self, op: &'static str, s: &AttentionShape) -> Result<()> {
        let mask = self.mask.map(|m| m.elems());
        check_attention(op, s, self.q.elems(), self.k.elems(), self.v.elems(), mask)
    }
}

impl<T: Storage, I: Storage> Forward<'_, T, I> {
    pub fn check(&self) -> Result<()> {
        let op = "attention_forward";
        self.x.check(op, &self.shape)?;
        check_len(op, "out", self.out.elems(), self.x.q.elems())?;
        check_f32(op, "lse", self.lse)?;
        check_len(op, "lse", self.lse.elems(), self.shape.lse_len())
    }
}

impl<T: Storage, I: Storage> Backward<'_, T, I> {
    pub fn check(&self) -> Result<()> {
        let op = "attention_backward";
        self.x.check(op, &self.shape)?;
        let (q, k, v) = (self.x.q.elems(), self.x.k.elems(), self.x.v.elems());
        for (what, got, want) in [
            ("dq", self.dq.elems(), q),
            ("dk", self.dk.elems(), k),
            ("dv", self.dv.elems(), v),
            ("dout", self.dout.elems(), q),
            ("out", self.out.elems(), q),
            ("lse", self.lse.elems(), self.shape.lse_len()),
        ] {
            check_len(op, what, got, want)?;
        }
        check_f32(op, "lse", self.lse)
    }
}
