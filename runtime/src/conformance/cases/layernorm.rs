//! See [`super`].

use super::*;

pub const LN_EPS: f64 = 1e-5;

pub struct LnRef {
    pub out: Vec<f64>,
    pub mean: Vec<f64>,
    pub rstd: Vec<f64>,
    pub xhat: Vec<f64>,
}

/// LayerNorm in f64; `ddof` 0 is the op's biased variance (1 would be the unbiased one).
pub fn layernorm_ref_with(x: &[f64], scale: Option<&[f64]>, bias: &[f64], dim: usize, ddof: f64, eps: f64) -> LnRef {
    let rows = x.len() / dim;
    let mut r =
        LnRef { out: vec![0.0; x.len()], mean: vec![0.0; rows], rstd: vec![0.0; rows], xhat: vec![0.0; x.len()] };
    for row in 0..rows {
        let xr = &x[row * dim..(row + 1) * dim];
        let mu = xr.iter().sum::<f64>() / dim as f64;
        let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / (dim as f64 - ddof);
        let rs = 1.0 / (var + eps).sqrt();
        r.mean[row] = mu;
        r.rstd[row] = rs;
        for j in 0..dim {
            let xh = (xr[j] - mu) * rs;
            r.xhat[row * dim + j] = xh;
            r.out[row * dim + j] = xh * scale.map_or(1.0, |s| s[j]) + bias[j];
        }
    }
    r
}

pub fn layernorm_ref(x: &[f64], scale: Option<&[f64]>, bias: &[f64], dim: usize) -> LnRef {
    layernorm_ref_with(x, scale, bias, dim, 0.0, LN_EPS)
}

/// Rows of varied mean and spread; every fifth row has variance ≈ 1e-5 ≈ eps, so that dropping
/// eps or mis-placing it changes the result by O(1).
pub fn layernorm_input(rng: &mut rand_chacha::ChaCha8Rng, rows: usize, dim: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * dim);
    for r in 0..rows {
        if r % 5 == 2 {
            x.extend(normal(rng, dim, 0.0, 3e-3));
        } else {
            let offset = uniform(rng, 1, -1.0, 1.0)[0];
            let spread = uniform(rng, 1, 0.5, 2.0)[0];
            x.extend(normal(rng, dim, offset, spread));
        }
    }
    x
}

pub struct LnInputs {
    pub x: Vec<f32>,
    pub scale: Option<Vec<f32>>,
    pub bias: Vec<f32>,
}

/// Runs the forward on `be` and checks out/mean/rstd; returns the saved (mean, rstd) buffers.
pub fn layernorm_forward_checked<B: Backend>(
    be: &B,
    ck: &mut Checks,
    case: &str,
    inp: &LnInputs,
    dim: usize,
) -> crate::Result<(B::Buf, B::Buf)> {
    let rows = inp.x.len() / dim;
    let (xb, bb) = (up(be, "x", &inp.x)?, up(be, "bias", &inp.bias)?);
    let sb = inp.scale.as_ref().map(|s| up(be, "scale", s)).transpose()?;
    let mut out = nan_buf(be, "out", inp.x.len())?;
    let (mut mean, mut rstd) = (nan_buf(be, "mean", rows)?, nan_buf(be, "rstd", rows)?);
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &xb, sb.as_ref(), &bb, dim)?;

    let x64 = f64s(&inp.x);
    let s64 = inp.scale.as_ref().map(|s| f64s(s));
    let b64 = f64s(&inp.bias);
    let r = layernorm_ref(&x64, s64.as_deref(), &b64, dim);
    // Error analysis of the f32 forward (u = 2⁻²⁴), per row:
    //   mean: |δμ| ≤ γ_dim·Σ|x|/dim + u|μ| ≤ (dim+1)·u·max|x|;
    //   var = Σ(x−μ̂)²/dim: relative ≤ (dim+3)·u (δμ enters only at second order);
    //   rstd = 1/√(var+eps): relative ≤ ((dim+3)·u + u)/2 + 2u ≤ (dim+8)·u/2;
    //   x̂ = (x−μ̂)·rstd: absolute ≤ |δμ|·rstd + |x̂|·(dim+8)·u/2 + u|x̂|;
    //   out = x̂·s + b: absolute ≤ |s|·err(x̂) + 2u·(|x̂s| + |b|).
    // So err ≤ (dim+8)·u·|s|·(max|x|·rstd + |x̂|) + 2u·(|x̂s| + |b|); we allow 2× that.
    let mut bound = vec![0.0; inp.x.len()];
    let (mut mean_bound, mut rstd_bound) = (vec![0.0; rows], vec![0.0; rows]);
    for row in 0..rows {
        let xr = &x64[row * dim..(row + 1) * dim];
        let max_abs = xr.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let du = (dim + 8) as f64 * U;
        mean_bound[row] = 2.0 * (dim + 1) as f64 * U * max_abs;
        rstd_bound[row] = 2.0 * du * r.rstd[row];
        for j in 0..dim {
            let i = row * dim + j;
            let s = s64.as_ref().map_or(1.0, |s| s[j].abs());
            bound[i] = 2.0
                * (du * s * (max_abs * r.rstd[row] + r.xhat[i].abs()) + 2.0 * U * (r.xhat[i].abs() * s + b64[j].abs()));
        }
    }
    ck.within(&format!("{case}: out"), &down(be, &out)?, &r.out, &bound);
    ck.within(&format!("{case}: mean"), &down(be, &mean)?, &r.mean, &mean_bound);
    ck.within(&format!("{case}: rstd"), &down(be, &rstd)?, &r.rstd, &rstd_bound);
    Ok((mean, rstd))
}

pub fn layernorm_case<B: Backend>(
    be: &B,
    ck: &mut Checks,
    rows: usize,
    dim: usize,
    with_scale: bool,
    accumulate_dx: bool,
    fd: FdEntries,
) -> CaseResult {
    let case = format!("layernorm rows={rows} dim={dim} scale={with_scale} accumulate_dx={accumulate_dx}");
    let mut rng = rng_for(&case);
    let inp = LnInputs {
        x: layernorm_input(&mut rng, rows, dim),
        scale: with_scale.then(|| normal(&mut rng, dim, 1.0, 0.3)),
        bias: normal(&mut rng, dim, 0.0, 0.5),
    };
    let w = normal(&mut rng, rows * dim, 0.0, 1.0);
    let dx0 = normal(&mut rng, rows * dim, 0.0, 1.0);
    let dscale0 = normal(&mut rng, dim, 0.0, 1.0);
    let dbias0 = normal(&mut rng, dim, 0.0, 1.0);

    let (mean, rstd) = layernorm_forward_checked(be, ck, &case, &inp, dim)?;

    let (xb, wb) = (up(be, "x", &inp.x)?, up(be, "dout", &w)?);
    let sb = inp.scale.as_ref().map(|s| up(be, "scale", s)).transpose()?;
    let mut dx = if accumulate_dx { up(be, "dx", &dx0)? } else { nan_buf(be, "dx", rows * dim)? };
    let mut dscale = with_scale.then(|| up(be, "dscale", &dscale0)).transpose()?;
    let mut dbias = up(be, "dbias", &dbias0)?;
    be.layernorm_backward(
        &mut dx,
        dscale.as_mut(),
        &mut dbias,
        &wb,
        &xb,
        &mean,
        &rstd,
        sb.as_ref(),
        dim,
        accumulate_dx,
    )?;

    let w64 = f64s(&w);
    let mut inputs = vec![f64s(&inp.x), f64s(&inp.bias)];
    if let Some(s) = &inp.scale {
        inputs.push(f64s(s));
    }
    let (at, g) = fd_grads_picked(&mut rng, &inputs, fd, |x| {
        weighted_sum(&w64, &layernorm_ref(&x[0], x.get(2).map(|s| s.as_slice()), &x[1], dim).out)
    });
    let want_dx = if accumulate_dx { add64(&g[0], &pick(&f64s(&dx0), &at[0])) } else { g[0].clone() };
    ck.grad(&format!("{case}: dx"), &pick(&down(be, &dx)?, &at[0]), &want_dx);
    let want_db = add64(&g[1], &pick(&f64s(&dbias0), &at[1]));
    ck.grad(&format!("{case}: dbias (accumulated)"), &pick(&down(be, &dbias)?, &at[1]), &want_db);
    if let Some(ds) = &dscale {
        let want_ds = add64(&g[2], &pick(&f64s(&dscale0), &at[2]));
        ck.grad(&format!("{case}: dscale (accumulated)"), &pick(&down(be, ds)?, &at[2]), &want_ds);
    }
    Ok(())
}

pub fn layernorm_with_scale<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    layernorm_case(be, ck, 37, 13, true, false, FdEntries::All)?;
    layernorm_case(be, ck, 70, 50, true, true, FdEntries::All)?;
    layernorm_case(be, ck, 5, 8, true, false, FdEntries::All)?;
    Ok(())
}

pub fn layernorm_bias_only<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    layernorm_case(be, ck, 37, 13, false, true, FdEntries::All)?;
    layernorm_case(be, ck, 70, 50, false, false, FdEntries::All)?;
    layernorm_case(be, ck, 1, 3, false, true, FdEntries::All)?;
    Ok(())
}
