//! Single-head softmax attention over the spatial positions of an image (the VQGAN's AttnBlock
//! core): with `q, k, v` of shape `[batch, positions, channels]`,
//! `out[b, i] = Σ_j softmax_j(q[b, i] · k[b, j] / √channels) · v[b, j]`.
//!
//! It is the runtime's fused attention with one head of width `channels`, no mask, not causal,
//! so the CPU path reuses [`crate::ops::attention::cpu::forward`] (the per-row log-sum-exps it also
//! writes are discarded).

use crate::backend::AttentionShape;
use crate::error::Result;
use crate::ops::attention::check_attention;
use crate::ops::checks::check_len;

const OP: &str = "spatial_attention";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpatialAttentionShape {
    pub batch: usize,
    /// Height × width.
    pub positions: usize,
    pub channels: usize,
}

impl SpatialAttentionShape {
    fn as_attention(&self) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            q_len: self.positions,
            kv_len: self.positions,
            heads: 1,
            head_dim: self.channels,
            causal: false,
        }
    }
    pub fn len(&self) -> usize {
        self.batch * self.positions * self.channels
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// FLOPs of the two products (scores and the weighted sum of values).
    pub fn flops(&self) -> f64 {
        self.as_attention().forward_flops()
    }
}

pub fn check_spatial_attention(s: &SpatialAttentionShape, q: usize, k: usize, v: usize, out: usize) -> Result<()> {
    check_attention(OP, &s.as_attention(), q, k, v, None)?;
    check_len(OP, "out", out, s.len())
}

/// `out` (overwritten) = attention of `q` over `k`, `v`; see the module docs.
pub fn spatial_attention(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: &SpatialAttentionShape) -> Result<()> {
    check_spatial_attention(s, q.len(), k.len(), v.len(), out.len())?;
    let mut lse = vec![0.0f32; s.batch * s.positions];
    crate::ops::attention::cpu::forward(out, &mut lse, q, k, v, None, s.as_attention());
    Ok(())
}
