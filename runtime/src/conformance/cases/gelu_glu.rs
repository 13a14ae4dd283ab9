//! See [`super`].

use super::*;

pub fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

pub fn gelu_glu_ref(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| gelu64(a) * b).collect()
}

/// `a` spans the saturated tails (|a| up to 7) and the curved middle; `b`, `w` are N(0, 1.5²).
pub fn gelu_glu_inputs(case: &str, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = rng_for(case);
    let mut a = uniform(&mut rng, n - n / 4, -7.0, 7.0);
    a.extend(normal(&mut rng, n / 4, 0.0, 1.0));
    a[0] = 0.0;
    let b = normal(&mut rng, n, 0.0, 1.5);
    let w = normal(&mut rng, n, 0.0, 1.0);
    (a, b, w)
}

/// Error bound of the f32 forward. The CDF Φ(a) = ½(1 + erf(a/√2)) is computed with an
/// *absolute* error ≤ 3u (erff ≲ 1 ulp ≤ 2u on |erf| ≤ 1, the rounding of 1 + erf ≤ 2u, halved;
/// the argument's rounding moves erf by ≤ 0.5u): for a ≪ 0 the relative error of Φ is large but
/// harmless. Then a·Φ and ·b add relative roundings: |err| ≤ (3u|a| + 2u|gelu(a)|)·|b|; 2× that.
pub fn gelu_glu_bound(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| 2.0 * (3.0 * U * a.abs() + 2.0 * U * gelu64(a).abs()) * b.abs()).collect()
}

pub fn gelu_glu_forward_and_backward<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for n in [1000, 33] {
        gelu_glu_case(be, ck, n, FdEntries::All)?;
    }
    Ok(())
}

pub fn gelu_glu_case<B: Backend>(be: &B, ck: &mut Checks, n: usize, fd: FdEntries) -> CaseResult {
    let case = format!("gelu_glu n={n}");
    let (a, b, w) = gelu_glu_inputs(&case, n);
    let (ab, bb, wb) = (up(be, "a", &a)?, up(be, "b", &b)?, up(be, "dout", &w)?);
    let mut out = nan_buf(be, "out", n)?;
    be.gelu_glu_forward(&mut out, &ab, &bb)?;
    let (a64, b64, w64) = (f64s(&a), f64s(&b), f64s(&w));
    ck.within(&format!("{case}: forward"), &down(be, &out)?, &gelu_glu_ref(&a64, &b64), &gelu_glu_bound(&a64, &b64));

    let (mut da, mut db) = (nan_buf(be, "da", n)?, nan_buf(be, "db", n)?);
    be.gelu_glu_backward(&mut da, &mut db, &wb, &ab, &bb)?;
    let mut rng = rng_for(&format!("{case}: fd entries"));
    let (at, g) = fd_grads_picked(&mut rng, &[a64, b64], fd, |x| weighted_sum(&w64, &gelu_glu_ref(&x[0], &x[1])));
    ck.grad(&format!("{case}: da"), &pick(&down(be, &da)?, &at[0]), &g[0]);
    ck.grad(&format!("{case}: db"), &pick(&down(be, &db)?, &at[1]), &g[1]);
    Ok(())
}
