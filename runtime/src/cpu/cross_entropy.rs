//! Fused softmax cross-entropy: one sweep per row computes the loss and overwrites the logits
//! with their gradient, so the `[rows, classes]` gradient never exists beside the logits.

use super::math::{exp_shifted_in_place, max};
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
