//! See [`super`].

use super::*;

pub struct AdamRef {
    pub p: Vec<f64>,
    pub m: Vec<f64>,
    pub v: Vec<f64>,
}

/// optax.adamw (eps_root 0, decay on every entry) in f64; `bias_correction` false only for the
/// sensitivity test.
pub fn adamw_ref(st: &mut AdamRef, grad: &[f32], s: &AdamWStep, bias_correction: bool) -> Vec<f64> {
    let (lr, b1, b2, eps, wd, gs) =
        (s.lr as f64, s.b1 as f64, s.b2 as f64, s.eps as f64, s.weight_decay as f64, s.grad_scale as f64);
    let t = s.step as i32;
    let (bc1, bc2) = if bias_correction { (1.0 - b1.powi(t), 1.0 - b2.powi(t)) } else { (1.0, 1.0) };
    let mut upd = vec![0.0; grad.len()];
    for i in 0..grad.len() {
        let g = gs * grad[i] as f64;
        st.m[i] = (1.0 - b1) * g + b1 * st.m[i];
        st.v[i] = (1.0 - b2) * g * g + b2 * st.v[i];
        let (mh, vh) = (st.m[i] / bc1, st.v[i] / bc2);
        upd[i] = mh / (vh.sqrt() + eps) + wd * st.p[i];
        st.p[i] -= lr * upd[i];
    }
    upd
}

pub fn adamw_step(lr: f32, step: u64, grad_scale: f32) -> AdamWStep {
    AdamWStep { lr, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.1, step, grad_scale }
}

/// Gradients of magnitude 0.1..3 (random sign): with grad_scale 0.37, |g| ≥ 0.037 ≫ eps, so
/// m̂/(√v̂ + eps) is well conditioned.
pub fn adamw_grad(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    uniform(rng, n, 0.1, 3.0).into_iter().map(|g| if rand::Rng::random_bool(rng, 0.5) { g } else { -g }).collect()
}

pub fn adamw_matches_optax_for_three_steps<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let n = 40_000; // more than one 32k chunk of the parallel loop
    let mut rng = rng_for("adamw n=40000");
    let p0 = normal(&mut rng, n, 0.0, 1.0);
    let mut p = up(be, "param", &p0)?;
    let (mut m, mut v) = (be.zeros("m", n)?, be.zeros("v", n)?);
    let mut st = AdamRef { p: f64s(&p0), m: vec![0.0; n], v: vec![0.0; n] };
    let (mut m_abs, mut bound_p) = (vec![0.0f64; n], vec![0.0f64; n]);
    for t in 1..=3u64 {
        let s = adamw_step(1e-3, t, 0.37);
        let grad = adamw_grad(&mut rng, n);
        be.adamw(&mut p, &up(be, "grad", &grad)?, &mut m, &mut v, &s)?;
        let upd = adamw_ref(&mut st, &grad, &s, true);
        // Bounds, accumulated over the steps. m = (1−b1)g + b1·m (with 1 − b1 exact in f32 by
        // Sterbenz, g = gs·grad rounded): ≤ 3 roundings a step relative to the magnitude
        // recursion m_abs = (1−b1)|g| + b1·m_abs; same for v (all terms ≥ 0). 8·t·u leaves 2.5×.
        // p − lr·upd: the subtraction rounds by u·|p|, and lr·upd carries ≲ 16 roundings
        // (bias corrections, sqrt, divide, decay) relative to |upd|. 2× that per step.
        let gs = s.grad_scale as f64;
        let mut bm = vec![0.0; n];
        let mut bv = vec![0.0; n];
        for i in 0..n {
            m_abs[i] = 0.1 * (gs * grad[i] as f64).abs() + 0.9 * m_abs[i];
            bm[i] = 8.0 * t as f64 * U * m_abs[i];
            bv[i] = 8.0 * t as f64 * U * st.v[i];
            bound_p[i] += 2.0 * (U * st.p[i].abs() + 16.0 * U * s.lr as f64 * upd[i].abs());
        }
        ck.within(&format!("adamw step {t}: m"), &down(be, &m)?, &st.m, &bm);
        ck.within(&format!("adamw step {t}: v"), &down(be, &v)?, &st.v, &bv);
        ck.within(&format!("adamw step {t}: param"), &down(be, &p)?, &st.p, &bound_p);
        // The derived bound is the "≈1e-6 for lr 1e-3" level, relative to |p| where |p| > 1.
        check!(ck, (0..n).all(|i| bound_p[i] < 1e-6 * st.p[i].abs().max(1.0)), "bound too loose");
    }
    Ok(())
}

pub fn adamw_rejects_step_zero<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let (mut p, g) = (up(be, "p", &[1.0])?, up(be, "g", &[1.0])?);
    let (mut m, mut v) = (be.zeros("m", 1)?, be.zeros("v", 1)?);
    let err = be.adamw(&mut p, &g, &mut m, &mut v, &adamw_step(1e-3, 0, 1.0)).err().ok_or("a bad call was accepted")?;
    check!(ck, matches!(err, RuntimeError::Invalid { op: "adamw", .. }), "{err}");
    check_eq!(ck, down(be, &p)?, [1.0]);
    Ok(())
}
