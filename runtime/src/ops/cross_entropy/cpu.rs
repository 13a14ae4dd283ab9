//! Fused softmax cross-entropy: one sweep per row computes the loss and overwrites the logits
//! with their gradient, so the `[rows, classes]` gradient never exists beside the logits.

use crate::ops::math::{exp_shifted_in_place, max};
use rayon::prelude::*;

pub fn fused(logits: &mut [f32], losses: &mut [f32], targets: &[i32], classes: usize, grad_scale: f32) {
    logits.par_chunks_mut(classes).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(|((row, loss), &t)| {
        let t = t as usize;
        let max = max(row);
        let target_logit = row[t];
        let sum = exp_shifted_in_place(row, max);
        *loss = max + sum.ln() - target_logit;
        let k = grad_scale / sum;
        for x in row.iter_mut() {
            *x *= k;
        }
        row[t] -= grad_scale;
    });
}

/// Vocab-parallel step 1: the max over this rank's valid columns.
pub fn vp_max(row_max: &mut [f32], logits: &[f32], cols: usize, valid: usize) {
    row_max.par_iter_mut().zip(logits.par_chunks(cols)).for_each(|(m, row)| *m = max(&row[..valid]));
}

/// Vocab-parallel step 2: `[Σ e^(x−max), target logit (0 if not here)]` per row.
pub fn vp_sums(
    stats: &mut [f32],
    logits: &[f32],
    row_max: &[f32],
    targets: &[i32],
    cols: usize,
    valid: usize,
    start: usize,
) {
    let rows = row_max.len();
    let (sums, tl) = stats.split_at_mut(rows);
    sums.par_iter_mut().zip(tl.par_iter_mut()).enumerate().for_each(|(r, (s, t))| {
        let row = &logits[r * cols..r * cols + valid];
        let m = row_max[r];
        let mut acc = [0.0f32; 16];
        for c in row.chunks(16) {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += crate::ops::math::exp(x - m);
            }
        }
        *s = acc.iter().sum();
        let local = (targets[r] as usize).wrapping_sub(start);
        *t = if local < valid { row[local] } else { 0.0 };
    });
}

/// Vocab-parallel step 3: losses and the in-place gradient.
#[allow(clippy::too_many_arguments)]
pub fn vp_grad(
    logits: &mut [f32],
    losses: &mut [f32],
    row_max: &[f32],
    stats: &[f32],
    targets: &[i32],
    cols: usize,
    valid: usize,
    start: usize,
    grad_scale: f32,
) {
    let rows = row_max.len();
    logits.par_chunks_mut(cols).zip(losses.par_iter_mut()).enumerate().for_each(|(r, (row, loss))| {
        let (m, sum, target_logit) = (row_max[r], stats[r], stats[rows + r]);
        *loss = m + sum.ln() - target_logit;
        let k = grad_scale / sum;
        for x in row[..valid].iter_mut() {
            *x = crate::ops::math::exp(*x - m) * k;
        }
        row[valid..].fill(0.0);
        let local = (targets[r] as usize).wrapping_sub(start);
        if local < valid {
            row[local] -= grad_scale;
        }
    });
}
