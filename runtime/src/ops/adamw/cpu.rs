//! AdamW exactly as `optax.adamw` computes it, in f32, one fused pass over the four arrays.

use crate::backend::AdamWStep;
use crate::ops::elementwise::cpu::CHUNK;
use rayon::prelude::*;

pub fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    let bc1 = (1.0 - (s.b1 as f64).powi(s.step as i32)) as f32;
    let bc2 = (1.0 - (s.b2 as f64).powi(s.step as i32)) as f32;
    let AdamWStep { lr, b1, b2, eps, weight_decay: wd, grad_scale, .. } = *s;
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = g[i] * grad_scale;
                m[i] = (1.0 - b1) * g + b1 * m[i];
                v[i] = (1.0 - b2) * (g * g) + b2 * v[i];
                let m_hat = m[i] / bc1;
                let v_hat = v[i] / bc2;
                let u = m_hat / (v_hat.sqrt() + eps) + wd * p[i];
                p[i] += -lr * u;
            }
        });
}
