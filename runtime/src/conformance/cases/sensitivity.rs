//! See [`super`].

use super::*;

pub fn round32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

pub fn matmul_bound_rejects_a_wrong_transpose<B: Backend>(_be: &B, ck: &mut Checks) -> CaseResult {
    // Square shapes, so a misread layout still has the right length.
    let mut rng = rng_for("sensitivity matmul");
    let (a, b) = (f64s(&normal(&mut rng, 36, 0.0, 1.0)), f64s(&normal(&mut rng, 36, 0.0, 1.0)));
    let s = spec(6, 6, 6, false, false, false);
    let want = matmul_ref(&a, &b, s);
    let bound: Vec<f64> = matmul_ref(&abs64(&a), &abs64(&b), s).iter().map(|p| gamma(6) * p).collect();
    check!(ck, within_bound(&round32(&want), &want, &bound).is_ok());
    for bug in [spec(6, 6, 6, true, false, false), spec(6, 6, 6, false, true, false)] {
        check!(ck, within_bound(&round32(&matmul_ref(&a, &b, bug)), &want, &bound).is_err(), "{bug:?}");
    }
    Ok(())
}

pub fn attention_checks_reject_a_missing_scale_and_a_stopped_masked_gradient<B: Backend>(
    be: &B,
    ck: &mut Checks,
) -> CaseResult {
    let sh = shape(2, 3, 5, 2, 8, false);
    let mask = [1, 0, 1, 1, 0, 0, 0, 0, 0, 0];
    let case = "sensitivity attention";
    let inp = attn_inputs(case, &sh);
    let run = attn_run(be, &inp, Some(&mask), sh)?;
    let (q, k, v, w) = (f64s(&inp.q), f64s(&inp.k), f64s(&inp.v), f64s(&inp.w));
    let good = attn_ref(&q, &k, &v, Some(&mask), &sh, alpha_of(&sh), None);
    let (out_bound, _) = attn_forward_bounds(&good, &q, &k, &v, &sh);
    check!(ck, within_bound(&run.out, &good.out, &out_bound).is_ok());
    // Without 1/√d the outputs differ far beyond the bound.
    let unscaled = attn_ref(&q, &k, &v, Some(&mask), &sh, 1.0, None);
    check!(ck, within_bound(&round32(&unscaled.out), &good.out, &out_bound).is_err());
    // A reference whose fully masked batch row is a constant (gradient stopped at the mask, as
    // jnp.where would give) disagrees with the op on dq: the check tells the two rules apart.
    let stopped = fd_grads(std::slice::from_ref(&q), |x| {
        weighted_sum(&w, &attn_ref(&x[0], &k, &v, Some(&mask), &sh, alpha_of(&sh), None).out)
    });
    let half = sh.q_len * sh.width();
    check!(ck, grad_rel_err(&run.dq[half..], &stopped[0][half..], GRAD_TOL).is_err());
    let flowing = fd_grads(&[q], |x| {
        weighted_sum(&w, &attn_ref(&x[0], &k, &v, Some(&mask), &sh, alpha_of(&sh), Some(&good.s)).out)
    });
    check!(ck, grad_rel_err(&run.dq[half..], &flowing[0][half..], GRAD_TOL).is_ok());
    Ok(())
}

pub fn layernorm_bound_rejects_unbiased_variance_and_missing_eps<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let (rows, dim) = (10, 50);
    let mut rng = rng_for("sensitivity layernorm");
    let x = layernorm_input(&mut rng, rows, dim);
    let bias = normal(&mut rng, dim, 0.0, 0.5);
    let (xb, bb) = (up(be, "x", &x)?, up(be, "bias", &bias)?);
    let (mut out, mut mean, mut rstd) =
        (nan_buf(be, "out", rows * dim)?, nan_buf(be, "mean", rows)?, nan_buf(be, "rstd", rows)?);
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &xb, None, &bb, dim)?;
    let got = down(be, &out)?;
    let (x64, b64) = (f64s(&x), f64s(&bias));
    let good = layernorm_ref(&x64, None, &b64, dim);
    let bound: Vec<f64> = (0..rows * dim)
        .map(|i| {
            let row = &x64[i / dim * dim..(i / dim + 1) * dim];
            let max_abs = row.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let du = (dim + 8) as f64 * U;
            2.0 * (du * (max_abs * good.rstd[i / dim] + good.xhat[i].abs())
                + 2.0 * U * (good.xhat[i].abs() + b64[i % dim].abs()))
        })
        .collect();
    check!(ck, within_bound(&got, &good.out, &bound).is_ok());
    for (what, ddof, eps) in [("unbiased variance", 1.0, LN_EPS), ("no eps", 0.0, 0.0), ("eps 1e-6", 0.0, 1e-6)] {
        let bug = layernorm_ref_with(&x64, None, &b64, dim, ddof, eps);
        check!(ck, within_bound(&got, &bug.out, &bound).is_err(), "{what} should be rejected");
    }
    Ok(())
}

pub fn gelu_bound_rejects_the_tanh_approximation<B: Backend>(_be: &B, ck: &mut Checks) -> CaseResult {
    let (a, b, _) = gelu_glu_inputs("sensitivity gelu", 200);
    let (a64, b64) = (f64s(&a), f64s(&b));
    let tanh_gelu =
        |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
    let approx: Vec<f64> = a64.iter().zip(&b64).map(|(&a, &b)| tanh_gelu(a) * b).collect();
    check!(ck, within_bound(&round32(&approx), &gelu_glu_ref(&a64, &b64), &gelu_glu_bound(&a64, &b64)).is_err());
    Ok(())
}

pub fn cross_entropy_checks_reject_a_missing_grad_scale<B: Backend>(_be: &B, ck: &mut Checks) -> CaseResult {
    let (rows, classes, gs) = (3, 129, 0.37);
    let mut rng = rng_for("sensitivity cross_entropy");
    let logits = normal(&mut rng, rows * classes, 0.0, 3.0);
    let targets = [5, 0, 128];
    let r = cross_entropy_ref(&f64s(&logits), &targets, classes, gs);
    let unscaled = cross_entropy_ref(&f64s(&logits), &targets, classes, 1.0);
    check!(ck, within_bound(&round32(&r.grad), &r.grad, &r.bound_grad).is_ok());
    check!(ck, within_bound(&round32(&unscaled.grad), &r.grad, &r.bound_grad).is_err());
    check!(ck, grad_rel_err(&round32(&unscaled.grad), &r.grad, GRAD_TOL).is_err());
    Ok(())
}

pub fn adamw_bound_rejects_missing_bias_correction<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let n = 500;
    let mut rng = rng_for("sensitivity adamw");
    let p0 = normal(&mut rng, n, 0.0, 1.0);
    let grad = adamw_grad(&mut rng, n);
    let s = adamw_step(1e-3, 1, 0.37);
    let mut p = up(be, "p", &p0)?;
    let (mut m, mut v) = (be.zeros("m", n)?, be.zeros("v", n)?);
    be.adamw(&mut p, &up(be, "g", &grad)?, &mut m, &mut v, &s)?;
    let got = down(be, &p)?;
    let mut good = AdamRef { p: f64s(&p0), m: vec![0.0; n], v: vec![0.0; n] };
    let upd = adamw_ref(&mut good, &grad, &s, true);
    let bound: Vec<f64> = (0..n).map(|i| 2.0 * (U * good.p[i].abs() + 16.0 * U * 1e-3 * upd[i].abs())).collect();
    check!(ck, within_bound(&got, &good.p, &bound).is_ok());
    let mut bad = AdamRef { p: f64s(&p0), m: vec![0.0; n], v: vec![0.0; n] };
    adamw_ref(&mut bad, &grad, &s, false);
    check!(ck, within_bound(&got, &bad.p, &bound).is_err());
    Ok(())
}

/// The bf16 GEMM bound (reference of the rounded operands, γ_{2k}) rejects a GEMM that skipped
/// the rounding and one that truncated instead of rounding to nearest, and accepts the f32
/// rounding of the true result.
pub fn bf16_bound_rejects_unrounded_and_truncated_operands<B: Backend>(_be: &B, ck: &mut Checks) -> CaseResult {
    let mut rng = rng_for("sensitivity bf16 matmul");
    let s = spec(8, 8, 64, false, false, false);
    let (a, b) = (normal(&mut rng, 8 * 64, 0.0, 1.0), normal(&mut rng, 64 * 8, 0.0, 1.0));
    let (ar, br) = (f64s(&round_bf16_all(&a)), f64s(&round_bf16_all(&b)));
    let want = matmul_ref(&ar, &br, s);
    let bound: Vec<f64> = matmul_ref(&abs64(&ar), &abs64(&br), s).iter().map(|p| gamma(2 * 64) * p).collect();
    check!(ck, within_bound(&round32(&want), &want, &bound).is_ok(), "the rounded operands' product passes");
    let unrounded = matmul_ref(&f64s(&a), &f64s(&b), s);
    check!(ck, within_bound(&round32(&unrounded), &want, &bound).is_err(), "unrounded operands are caught");
    let trunc = |x: &[f32]| x.iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000) as f64).collect::<Vec<f64>>();
    let truncated = matmul_ref(&trunc(&a), &trunc(&b), s);
    check!(ck, within_bound(&round32(&truncated), &want, &bound).is_err(), "truncated operands are caught");
    Ok(())
}

/// The sharded LayerNorm apply bound rejects a missing bias and a swapped mean/rstd, and the
/// vocab-parallel gradient bound one that forgot the padding or the grad scale (the bodies'
/// bounds, on host-computed wrong results).
pub fn sharded_bounds_reject_a_missing_bias_and_an_unscaled_gradient<B: Backend>(
    _be: &B,
    ck: &mut Checks,
) -> CaseResult {
    let mut rng = rng_for("sensitivity sharded");
    let (x, b) = (f64s(&normal(&mut rng, 40, 0.0, 1.0)), f64s(&normal(&mut rng, 40, 0.0, 0.5)));
    let (mean, rstd) = (0.2f64, 1.7f64);
    let want: Vec<f64> = x.iter().zip(&b).map(|(x, b)| (x - mean) * rstd + b).collect();
    let bound: Vec<f64> = x
        .iter()
        .zip(&b)
        .map(|(x, b)| {
            let t = (x - mean) * rstd;
            2.0 * (gamma(3) * t.abs() + U * (t.abs() * (1.0 + gamma(3)) + b.abs()))
        })
        .collect();
    check!(ck, within_bound(&round32(&want), &want, &bound).is_ok());
    let no_bias: Vec<f64> = x.iter().map(|x| (x - mean) * rstd).collect();
    check!(ck, within_bound(&round32(&no_bias), &want, &bound).is_err(), "a missing bias is caught");
    let swapped: Vec<f64> = x.iter().zip(&b).map(|(x, b)| (x - rstd) * mean + b).collect();
    check!(ck, within_bound(&round32(&swapped), &want, &bound).is_err(), "swapped statistics are caught");
    // Gradient of a softmax row scaled by gs = 0.5; a missing scale is off by 2×.
    let logits = f64s(&normal(&mut rng, 30, 0.0, 3.0));
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|v| (v - m).exp()).sum();
    let p: Vec<f64> = logits.iter().map(|v| (v - m).exp() / sum).collect();
    let want: Vec<f64> = p.iter().map(|p| 0.5 * p).collect();
    let bound: Vec<f64> = logits.iter().zip(&p).map(|(x, p)| 2.0 * (5.0 + (x - m).abs()) * U * 0.5 * p).collect();
    check!(ck, within_bound(&round32(&want), &want, &bound).is_ok());
    check!(ck, within_bound(&round32(&p), &want, &bound).is_err(), "an unscaled gradient is caught");
    Ok(())
}
