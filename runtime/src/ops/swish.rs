//! Swish (SiLU), in place: `x ← x · sigmoid(x) = x / (1 + e^(−x))`, elementwise, any shape.
//! Written as `x / (1 + e^(−x))` so it stays finite for every finite `x` (e^(−x) → ∞ gives 0).

use crate::ops::elementwise::cpu::CHUNK;
use rayon::prelude::*;

/// Applies swish to every element of `x`. No shape to check: any length is valid.
pub fn swish_in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp()));
}
