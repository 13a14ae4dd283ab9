//! The numerics of the conformance checks: seeded random inputs, f32 error bounds, comparison of
//! f32 results against f64 references, and central finite differences in f64.

use crate::{Backend, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Unit roundoff of f32 with round-to-nearest: u = 2⁻²⁴ (half of `f32::EPSILON`).
/// Every correctly rounded f32 operation has relative error at most `U`.
pub const U: f64 = f32::EPSILON as f64 / 2.0;

/// Higham's γₙ = n·u / (1 − n·u): a rigorous bound on the relative error of n successive f32
/// roundings, e.g. |fl(Σ xᵢyᵢ) − Σ xᵢyᵢ| ≤ γₙ·Σ|xᵢyᵢ| for a dot product of length n evaluated
/// in *any* order (blocked, pairwise, multi-lane, with or without FMA).
pub fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U;
    assert!(nu < 0.5, "gamma({n}) is meaningless");
    nu / (1.0 - nu)
}

/// Tolerance for an f32 analytic gradient against an f64 central finite difference, as
/// Tolerance for an f32 analytic gradient against an f64 central finite difference, as
/// `max|got − want| / max|want|` over one tensor.
///
/// Why 1e-4: the f64 finite difference is accurate to ~1e-9 relative (truncation h²·f‴ with
/// h = 1e-6·|x| is ~1e-12; cancellation eps₆₄·|L|/h is ~1e-10·|L| with |L| = O(10)), so all of
/// the error budget is the f32 backward. That backward chains O(10) roundings of sums of length
/// n ≤ ~100 with cancellation ratios (Σ|terms| / |Σ terms|) of at most ~10, i.e. ≲ 10·100·u ≈
/// 6e-5 in the worst case and ~√n·u ≈ 1e-6 typically. Any real bug (a wrong transpose, a missing
/// scale, a dropped term) produces relative errors of 1e-2 or more.
pub const GRAD_TOL: f64 = 1e-4;

/// Relative step of the central differences: h = FD_STEP·max(1, |x|) (in f64).
pub const FD_STEP: f64 = 1e-6;

/// A per-case seed: FNV-1a of the case name, so every case draws fresh, distinct inputs.
pub fn seed_for(case: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in case.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn rng_for(case: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed_for(case))
}

/// `n` draws of N(mean, std²) (as `rand_distr::Normal` draws them: mean + std·z).
pub fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n).map(|_| mean + std * rng.sample::<f32, _>(StandardNormal)).collect()
}

pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn abs64(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v.abs()).collect()
}

pub fn add64(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a + b).collect()
}

/// Σ w ⊙ out: the scalar loss whose gradient is the backward's `dout = w`.
pub fn weighted_sum(w: &[f64], out: &[f64]) -> f64 {
    debug_assert_eq!(w.len(), out.len());
    w.iter().zip(out).map(|(w, o)| w * o).sum()
}

pub fn up<B: Backend>(be: &B, name: &str, data: &[f32]) -> Result<B::Buf> {
    be.upload(name, data)
}

pub fn up_ids<B: Backend>(be: &B, name: &str, ids: &[i32]) -> Result<B::Ids> {
    be.upload_ids(name, ids)
}

/// A buffer full of NaN: an op that claims to overwrite its output must not read it.
pub fn nan_buf<B: Backend>(be: &B, name: &str, len: usize) -> Result<B::Buf> {
    be.upload(name, &vec![f32::NAN; len])
}

pub fn down<B: Backend>(be: &B, buf: &B::Buf) -> Result<Vec<f32>> {
    be.download(buf)
}

/// Checks |got[i] − want[i]| ≤ bound[i] for every element (NaN/inf in `got` always fails).
/// Returns the worst ratio error/bound.
pub fn within_bound(got: &[f32], want: &[f64], bound: &[f64]) -> std::result::Result<f64, String> {
    if got.len() != want.len() || want.len() != bound.len() {
        return Err(format!("lengths differ: got {}, want {}, bound {}", got.len(), want.len(), bound.len()));
    }
    let mut worst = 0.0f64;
    let mut failures = Vec::new();
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        // A NaN error must fail, hence the explicit is_nan.
        if !got[i].is_finite() || err.is_nan() || err > bound[i] {
            failures.push(format!("[{i}] got {} want {} (err {err:.3e} > bound {:.3e})", got[i], want[i], bound[i]));
        } else if bound[i] > 0.0 {
            worst = worst.max(err / bound[i]);
        }
    }
    if failures.is_empty() {
        Ok(worst)
    } else {
        let n = failures.len();
        failures.truncate(5);
        Err(format!("{n} of {} elements out of bound: {}", got.len(), failures.join("; ")))
    }
}

/// `max|got − want| / max|want|` over one tensor, with the worst element; an error for
/// non-finite values, an all-zero reference (a degenerate test) or lengths that differ.
pub fn grad_rel(got: &[f32], want: &[f64]) -> std::result::Result<GradErr, String> {
    if got.len() != want.len() {
        return Err(format!("lengths differ: got {}, want {}", got.len(), want.len()));
    }
    if let Some(i) = got.iter().position(|g| !g.is_finite()) {
        return Err(format!("non-finite gradient {} at [{i}]", got[i]));
    }
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    if scale == 0.0 || !scale.is_finite() {
        return Err(format!("degenerate reference gradient (max |want| = {scale})"));
    }
    let (mut worst, mut at) = (0.0f64, 0);
    for i in 0..got.len() {
        let e = (got[i] as f64 - want[i]).abs();
        if e > worst {
            (worst, at) = (e, i);
        }
    }
    Ok(GradErr { rel: worst / scale, at, got: got[at], want: want[at], scale })
}

/// The outcome of [`grad_rel`]: the relative error and where it is worst.
#[derive(Debug, Clone, Copy)]
pub struct GradErr {
    pub rel: f64,
    pub at: usize,
    pub got: f32,
    pub want: f64,
    pub scale: f64,
}

impl GradErr {
    pub fn describe(&self, tol: f64) -> String {
        format!(
            "relative error {:.3e} vs {tol:.1e} (worst at [{}]: got {} want {}, max|want| {:.3e})",
            self.rel, self.at, self.got, self.want, self.scale
        )
    }
}

/// [`grad_rel`] within `tol`: the relative error, or why not.
pub fn grad_rel_err(got: &[f32], want: &[f64], tol: f64) -> std::result::Result<f64, String> {
    let e = grad_rel(got, want)?;
    if e.rel <= tol {
        Ok(e.rel)
    } else {
        Err(e.describe(tol))
    }
}

/// The worst `|got − want| / bound` over all elements (infinite for a non-finite `got`, a NaN
/// error, a zero bound exceeded, or lengths that differ).
pub fn worst_ratio(got: &[f32], want: &[f64], bound: &[f64]) -> f64 {
    if got.len() != want.len() || want.len() != bound.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        if !got[i].is_finite() || err.is_nan() {
            return f64::INFINITY;
        }
        if bound[i] > 0.0 {
            worst = worst.max(err / bound[i]);
        } else if err > 0.0 {
            return f64::INFINITY;
        }
    }
    worst
}

/// Central finite differences of `loss` with respect to every element of every input.
pub fn fd_grads(inputs: &[Vec<f64>], loss: impl Fn(&[Vec<f64>]) -> f64) -> Vec<Vec<f64>> {
    let all: Vec<Vec<usize>> = inputs.iter().map(|x| (0..x.len()).collect()).collect();
    fd_grads_at(inputs, &all, loss)
}

/// Central finite differences at the listed indices of each input (for products too large to
/// difference every element); entry `[t][s]` is ∂loss/∂inputs[t][at[t][s]].
pub fn fd_grads_at(inputs: &[Vec<f64>], at: &[Vec<usize>], loss: impl Fn(&[Vec<f64>]) -> f64) -> Vec<Vec<f64>> {
    let mut x: Vec<Vec<f64>> = inputs.to_vec();
    let mut grads = Vec::with_capacity(inputs.len());
    for t in 0..inputs.len() {
        let mut g = Vec::with_capacity(at[t].len());
        for &i in &at[t] {
            let x0 = x[t][i];
            let h = FD_STEP * x0.abs().max(1.0);
            x[t][i] = x0 + h;
            let lp = loss(&x);
            x[t][i] = x0 - h;
            let lm = loss(&x);
            x[t][i] = x0;
            g.push((lp - lm) / (2.0 * h));
        }
        grads.push(g);
    }
    grads
}

/// `count` distinct random indices below `len` (all of them when `len <= count`), sorted.
pub fn sample_indices(rng: &mut ChaCha8Rng, len: usize, count: usize) -> Vec<usize> {
    if len <= count {
        return (0..len).collect();
    }
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < count {
        picked.insert(rng.random_range(0..len));
    }
    picked.into_iter().collect()
}

/// Unit roundoff of bf16 with round-to-nearest-even: 8 significand bits, u = 2⁻⁸. A rounded
/// value x̂ satisfies |x̂ − x| ≤ U_BF16·|x| (normal range).
pub const U_BF16: f64 = 1.0 / 256.0;

/// `x` rounded to the nearest bf16 (ties to even), as bf16 storage and tensor-core operands
/// round it, widened back to f32 (exact).
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

pub fn round_bf16_all(x: &[f32]) -> Vec<f32> {
    x.iter().copied().map(round_bf16).collect()
}

/// Which entries of each input the finite differences visit: every one (the small cases), or a
/// fixed number of random ones per tensor (the model-sized cases of [`crate::conformance::large`],
/// whose references are too costly to difference element by element).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdEntries {
    All,
    Sampled(usize),
}

/// Central finite differences of `loss` at the entries `entries` picks in each input: the
/// indices per input and ∂loss/∂input at them (in the same order).
pub fn fd_grads_picked(
    rng: &mut ChaCha8Rng,
    inputs: &[Vec<f64>],
    entries: FdEntries,
    loss: impl Fn(&[Vec<f64>]) -> f64,
) -> (Vec<Vec<usize>>, Vec<Vec<f64>>) {
    let at: Vec<Vec<usize>> = inputs
        .iter()
        .map(|x| match entries {
            FdEntries::All => (0..x.len()).collect(),
            FdEntries::Sampled(n) => sample_indices(rng, x.len(), n),
        })
        .collect();
    let g = fd_grads_at(inputs, &at, loss);
    (at, g)
}

/// `x[i]` for each listed index.
pub fn pick<T: Copy>(x: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| x[i]).collect()
}

/// `max |got − want| / max |want|`; infinite when the lengths differ, when `got` is not finite
/// where `want` is, or when NaN positions differ (NaN in `want` must be NaN in `got`, e.g. the
/// lse marker of a fully masked row). For comparing two backends' results (whole-model checks
/// and the parity fixtures), where no element bound is derived.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut max_ref, mut max_diff) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if w.is_nan() {
            if !g.is_nan() {
                return f64::INFINITY;
            }
            continue;
        }
        if !g.is_finite() {
            return f64::INFINITY;
        }
        max_ref = max_ref.max((w as f64).abs());
        max_diff = max_diff.max((g as f64 - w as f64).abs());
    }
    if max_diff == 0.0 {
        0.0
    } else {
        max_diff / max_ref.max(1e-30)
    }
}
