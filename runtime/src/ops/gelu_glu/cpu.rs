//! GELU-GLU: `out = gelu(a) · b` with the exact (erf) GELU that dalle-mini uses.

use crate::ops::elementwise::cpu::CHUNK;
use rayon::prelude::*;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline]
fn cdf(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2))
}

#[inline]
pub fn gelu(x: f32) -> f32 {
    x * cdf(x)
}

/// d gelu / dx = Φ(x) + x·φ(x).
#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    cdf(x) + x * INV_SQRT_2PI * crate::ops::math::exp(-0.5 * x * x)
}

pub fn forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = gelu(a) * b;
        }
    });
}

pub fn backward(da: &mut [f32], db: &mut [f32], dout: &[f32], a: &[f32], b: &[f32]) {
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))))
        .for_each(|((da, db), (g, (a, b)))| {
            for i in 0..g.len() {
                let (x, y, g) = (a[i], b[i], g[i]);
                da[i] = g * y * gelu_grad(x);
                db[i] = g * gelu(x);
            }
        });
}
