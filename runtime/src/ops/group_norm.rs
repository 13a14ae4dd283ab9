//! GroupNorm over NHWC activations, as Flax's `nn.GroupNorm` computes it:
//!
//! for each image and group `g` of `channels / groups` consecutive channels, over all positions
//! and the group's channels: `mean = E[x]`, `var = max(E[x²] − E[x]², 0)`, then
//! `out = (x − mean) / √(var + eps) · scale[c] + bias[c]`.
//!
//! The CPU implementation accumulates the two sums in f64 (per rayon task, combined in task
//! order, so results are deterministic), then applies `out = x·a[c] + b[c]` with
//! `a = scale·rstd`, `b = bias − mean·a` in one parallel pass.

use crate::error::{Result, RuntimeError};
use crate::ops::checks::check_len;
use rayon::prelude::*;

const OP: &str = "group_norm";

/// Positions per rayon task.
const POSITIONS_PER_TASK: usize = 1024;

/// The shape of one GroupNorm call: `x` is `[batch, positions, channels]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormShape {
    pub batch: usize,
    /// Height × width.
    pub positions: usize,
    pub channels: usize,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNormShape {
    pub fn len(&self) -> usize {
        self.batch * self.positions * self.channels
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks the shape (channels divisible into groups) and the buffer lengths.
pub fn check_group_norm(s: &GroupNormShape, x: usize, scale: usize, bias: usize, out: usize) -> Result<()> {
    if s.batch == 0 || s.positions == 0 || s.groups == 0 || !s.channels.is_multiple_of(s.groups) || s.channels == 0 {
        return Err(RuntimeError::Invalid {
            op: OP,
            detail: format!("{} channels cannot be split into {} equal groups ({s:?})", s.channels, s.groups),
        });
    }
    if s.eps.is_nan() || s.eps <= 0.0 {
        return Err(RuntimeError::Invalid { op: OP, detail: format!("eps must be positive, got {}", s.eps) });
    }
    check_len(OP, "x", x, s.len())?;
    check_len(OP, "scale", scale, s.channels)?;
    check_len(OP, "bias", bias, s.channels)?;
    check_len(OP, "out", out, s.len())
}

/// `out` (overwritten) = GroupNorm of `x`; see the module docs.
pub fn group_norm(out: &mut [f32], x: &[f32], scale: &[f32], bias: &[f32], s: &GroupNormShape) -> Result<()> {
    check_group_norm(s, x.len(), scale.len(), bias.len(), out.len())?;
    let image = s.positions * s.channels;
    for (xb, ob) in x.chunks_exact(image).zip(out.chunks_exact_mut(image)) {
        let (a, b) = affine(xb, scale, bias, s);
        ob.par_chunks_mut(POSITIONS_PER_TASK * s.channels)
            .zip(xb.par_chunks(POSITIONS_PER_TASK * s.channels))
            .for_each(|(o, x)| {
                for (orow, xrow) in o.chunks_exact_mut(s.channels).zip(x.chunks_exact(s.channels)) {
                    for (((o, x), a), b) in orow.iter_mut().zip(xrow).zip(&a).zip(&b) {
                        *o = x * a + b;
                    }
                }
            });
    }
    Ok(())
}

/// Per-channel `(a, b)` with `GroupNorm(x)[c] = x·a[c] + b[c]` for one image.
fn affine(x: &[f32], scale: &[f32], bias: &[f32], s: &GroupNormShape) -> (Vec<f32>, Vec<f32>) {
    let per_group = s.channels / s.groups;
    let partials: Vec<Vec<(f64, f64)>> = x
        .par_chunks(POSITIONS_PER_TASK * s.channels)
        .map(|chunk| {
            let mut sums = vec![(0.0f64, 0.0f64); s.groups];
            for row in chunk.chunks_exact(s.channels) {
                for (sum, g) in sums.iter_mut().zip(row.chunks_exact(per_group)) {
                    let (s1, s2) = g.iter().fold((0.0f32, 0.0f32), |(a, b), &v| (a + v, b + v * v));
                    sum.0 += s1 as f64;
                    sum.1 += s2 as f64;
                }
            }
            sums
        })
        .collect();
    let count = (s.positions * per_group) as f64;
    let (mut a, mut b) = (vec![0.0f32; s.channels], vec![0.0f32; s.channels]);
    for g in 0..s.groups {
        let (s1, s2) = partials.iter().fold((0.0, 0.0), |(a, b), p| (a + p[g].0, b + p[g].1));
        let mean = s1 / count;
        let var = (s2 / count - mean * mean).max(0.0);
        let rstd = 1.0 / (var + s.eps as f64).sqrt();
        for c in g * per_group..(g + 1) * per_group {
            let ac = scale[c] as f64 * rstd;
            a[c] = ac as f32;
            b[c] = (bias[c] as f64 - mean * ac) as f32;
        }
    }
    (a, b)
}
