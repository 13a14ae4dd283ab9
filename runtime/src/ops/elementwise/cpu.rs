//! Elementwise ops and reductions, parallel over chunks large enough to amortise rayon.

use rayon::prelude::*;

/// Elements per rayon task for memory-bound loops.
pub const CHUNK: usize = 1 << 15;

pub fn fill(x: &mut [f32], value: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.fill(value));
}

pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(a, x)| {
        for (a, x) in a.iter_mut().zip(x) {
            *a += x;
        }
    });
}

pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
}

pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// Σ x², deterministic: per-chunk partials are combined in chunk order (rayon's own `sum`
/// may associate differently from run to run, which would break bitwise-reproducible training).
pub fn sum_squares(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| {
            // f32 lanes over short runs, f64 across them: fast and accurate enough for a norm.
            c.chunks(256).map(|r| r.iter().map(|v| v * v).sum::<f32>() as f64).sum::<f64>()
        })
        .collect();
    partials.iter().sum()
}

pub fn add_broadcast_rows(out: &mut [f32], row: &[f32]) {
    out.par_chunks_mut(row.len()).for_each(|o| {
        for (o, r) in o.iter_mut().zip(row) {
            *o += r;
        }
    });
}

pub fn sum_broadcast_rows(acc: &mut [f32], x: &[f32]) {
    for block in x.chunks(acc.len()) {
        for (a, v) in acc.iter_mut().zip(block) {
            *a += v;
        }
    }
}
