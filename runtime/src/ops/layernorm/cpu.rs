//! LayerNorm over the last dimension (eps 1e-5, biased variance), with or without scale.

use crate::ops::math::sum;
use rayon::prelude::*;

pub const EPS: f32 = 1e-5;
/// Rows per rayon task; the backward also reduces dscale/dbias partials per task.
const ROWS_PER_TASK: usize = 32;

pub fn forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    scale: Option<&[f32]>,
    bias: &[f32],
    dim: usize,
) {
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, x), (mean, rstd))| {
            let mu = sum(x) / dim as f32;
            let mut sq = [0.0f32; 8];
            for c in x.chunks(8) {
                for (s, v) in sq.iter_mut().zip(c) {
                    *s += (v - mu) * (v - mu);
                }
            }
            let var = sq.iter().sum::<f32>() / dim as f32;
            let r = 1.0 / (var + EPS).sqrt();
            *mean = mu;
            *rstd = r;
            match scale {
                Some(s) => {
                    for j in 0..dim {
                        o[j] = (x[j] - mu) * r * s[j] + bias[j];
                    }
                }
                None => {
                    for j in 0..dim {
                        o[j] = (x[j] - mu) * r + bias[j];
                    }
                }
            }
        });
}

/// What every LayerNorm backward step reads: the output gradient, the forward's input and
/// statistics, the optional scale, and the row length.
pub struct BackwardInputs<'a> {
    pub dout: &'a [f32],
    pub x: &'a [f32],
    pub mean: &'a [f32],
    pub rstd: &'a [f32],
    pub scale: Option<&'a [f32]>,
    pub dim: usize,
}

/// What the backwards write: `dscale` and `dbias` accumulated (`+=`), `dx` overwritten, or
/// accumulated when `accumulate_dx`.
pub struct Grads<'a> {
    pub dx: &'a mut [f32],
    pub dscale: Option<&'a mut [f32]>,
    pub dbias: &'a mut [f32],
    pub accumulate_dx: bool,
}

/// Writes `v` into `dx` (overwrite) or adds it (`accumulate_dx`).
fn put(d: &mut f32, v: f32, accumulate_dx: bool) {
    if accumulate_dx {
        *d += v;
    } else {
        *d = v;
    }
}

/// The fused backward (one device holds the whole row).
pub fn backward(grads: Grads<'_>, inputs: BackwardInputs<'_>) {
    let Grads { dx, dscale, dbias, accumulate_dx } = grads;
    let BackwardInputs { dout, x, mean, rstd, scale, dim } = inputs;
    let block = ROWS_PER_TASK * dim;
    let with_scale = scale.is_some();
    // Each task returns its partial (dscale, dbias); they are summed below.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(block)
        .zip(dout.par_chunks(block).zip(x.par_chunks(block)))
        .zip(mean.par_chunks(ROWS_PER_TASK).zip(rstd.par_chunks(ROWS_PER_TASK)))
        .map(|((dx, (dout, x)), (mean, rstd))| {
            let mut ds = vec![0.0f32; if with_scale { dim } else { 0 }];
            let mut db = vec![0.0f32; dim];
            let mut dyhat = vec![0.0f32; dim];
            let mut xhat = vec![0.0f32; dim];
            for r in 0..mean.len() {
                let (g, xr) = (&dout[r * dim..(r + 1) * dim], &x[r * dim..(r + 1) * dim]);
                let (mu, rs) = (mean[r], rstd[r]);
                for j in 0..dim {
                    xhat[j] = (xr[j] - mu) * rs;
                    db[j] += g[j];
                    dyhat[j] = match scale {
                        Some(s) => g[j] * s[j],
                        None => g[j],
                    };
                }
                if with_scale {
                    for j in 0..dim {
                        ds[j] += g[j] * xhat[j];
                    }
                }
                let mean_dy = sum(&dyhat) / dim as f32;
                let mut dot = [0.0f32; 8];
                for (c, h) in dyhat.chunks(8).zip(xhat.chunks(8)) {
                    for i in 0..c.len() {
                        dot[i] += c[i] * h[i];
                    }
                }
                let mean_dy_xhat = dot.iter().sum::<f32>() / dim as f32;
                let dxr = &mut dx[r * dim..(r + 1) * dim];
                for j in 0..dim {
                    put(&mut dxr[j], rs * (dyhat[j] - mean_dy - xhat[j] * mean_dy_xhat), accumulate_dx);
                }
            }
            (ds, db)
        })
        .collect();
    let mut dscale = dscale;
    for (ds, db) in &partials {
        for (a, b) in dbias.iter_mut().zip(db) {
            *a += b;
        }
        if let Some(dscale) = dscale.as_deref_mut() {
            for (a, b) in dscale.iter_mut().zip(ds) {
                *a += b;
            }
        }
    }
}

/// `sums[r] = Σ x[r]` or `Σ (x[r] − center[r])²`.
pub fn row_sums(sums: &mut [f32], x: &[f32], center: Option<&[f32]>, dim: usize) {
    sums.par_iter_mut().zip(x.par_chunks(dim)).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, (s, x))| {
        *s = match center {
            None => sum(x),
            Some(c) => {
                let mu = c[r];
                let mut acc = [0.0f32; 8];
                for ch in x.chunks(8) {
                    for (a, v) in acc.iter_mut().zip(ch) {
                        *a += (v - mu) * (v - mu);
                    }
                }
                acc.iter().sum()
            }
        }
    });
}

pub fn finish_stats(sums: &mut [f32], dim_global: usize, squared: bool) {
    let n = dim_global as f32;
    for s in sums.iter_mut() {
        *s = if squared { 1.0 / (*s / n + EPS).sqrt() } else { *s / n };
    }
}

pub fn apply(out: &mut [f32], x: &[f32], mean: &[f32], rstd: &[f32], scale: Option<&[f32]>, bias: &[f32], dim: usize) {
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, (o, x))| {
        let (mu, rs) = (mean[r], rstd[r]);
        for j in 0..dim {
            let s = scale.map_or(1.0, |s| s[j]);
            o[j] = (x[j] - mu) * rs * s + bias[j];
        }
    });
}

/// `sums[r] = Σ ĝ`, `sums[rows + r] = Σ ĝ·x̂`.
pub fn backward_row_sums(sums: &mut [f32], inputs: BackwardInputs<'_>) {
    let BackwardInputs { dout, x, mean, rstd, scale, dim } = inputs;
    let rows = mean.len();
    let (s1, s2) = sums.split_at_mut(rows);
    s1.par_iter_mut().zip(s2.par_iter_mut()).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, (a, b))| {
        let (g, xr) = (&dout[r * dim..(r + 1) * dim], &x[r * dim..(r + 1) * dim]);
        let (mut sa, mut sb) = (0.0f32, 0.0f32);
        for j in 0..dim {
            let gh = g[j] * scale.map_or(1.0, |s| s[j]);
            sa += gh;
            sb += gh * (xr[j] - mean[r]) * rstd[r];
        }
        *a = sa;
        *b = sb;
    });
}

/// The sharded backward's second half, from the all-reduced `sums` of [`backward_row_sums`] over a
/// row of `dim_global` elements; see `Backend::layernorm_backward_apply`.
pub fn backward_apply(grads: Grads<'_>, inputs: BackwardInputs<'_>, sums: &[f32], dim_global: usize) {
    let Grads { dx, dscale, dbias, accumulate_dx } = grads;
    let BackwardInputs { dout, x, mean, rstd, scale, dim } = inputs;
    let rows = mean.len();
    let n = dim_global as f32;
    dx.par_chunks_mut(dim).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, dxr)| {
        let (g, xr) = (&dout[r * dim..(r + 1) * dim], &x[r * dim..(r + 1) * dim]);
        let (m1, m2) = (sums[r] / n, sums[rows + r] / n);
        for j in 0..dim {
            let gh = g[j] * scale.map_or(1.0, |s| s[j]);
            let xh = (xr[j] - mean[r]) * rstd[r];
            put(&mut dxr[j], rstd[r] * (gh - m1 - xh * m2), accumulate_dx);
        }
    });
    let mut dscale = dscale;
    for r in 0..rows {
        let (g, xr) = (&dout[r * dim..(r + 1) * dim], &x[r * dim..(r + 1) * dim]);
        for j in 0..dim {
            dbias[j] += g[j];
            if let Some(ds) = dscale.as_deref_mut() {
                ds[j] += g[j] * (xr[j] - mean[r]) * rstd[r];
            }
        }
    }
}
