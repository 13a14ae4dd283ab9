//! The tensor-parallel pieces of LayerNorm and cross-entropy, each op on its own against an f64
//! reference of its own inputs (the all-reduced sums a rank receives are random inputs here), so
//! a rank's share of the work is checked without a communicator. That the pieces compose to the
//! fused ops is `runtime/tests/sharded_ops.rs`'s (CPU) and the tp parity fixtures' concern.

use super::*;

/// The shape of one rank's LayerNorm shard: `rows × dim` of a `dim_global`-wide row.
#[derive(Debug, Clone, Copy)]
pub struct LnShard {
    pub rows: usize,
    pub dim: usize,
    pub dim_global: usize,
}

/// The inputs of the sharded LayerNorm ops: the shard of `x`, statistics and all-reduced sums as
/// a rank would receive them, parameters, and the upstream gradient.
struct LnShardInputs {
    case: String,
    sh: LnShard,
    x: Vec<f32>,
    center: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    sums: Vec<f32>,
    bwd_sums: Vec<f32>,
    scale: Option<Vec<f32>>,
    bias: Vec<f32>,
    dout: Vec<f32>,
    dscale0: Vec<f32>,
    dbias0: Vec<f32>,
    dx0: Vec<f32>,
}

impl LnShardInputs {
    fn draw(case: &str, sh: LnShard, with_scale: bool) -> Self {
        let mut rng = rng_for(case);
        let LnShard { rows, dim, .. } = sh;
        LnShardInputs {
            case: case.to_string(),
            sh,
            x: normal(&mut rng, rows * dim, 0.3, 2.0),
            center: normal(&mut rng, rows, 0.0, 0.5),
            mean: normal(&mut rng, rows, 0.0, 0.3),
            rstd: uniform(&mut rng, rows, 0.5, 2.0),
            sums: normal(&mut rng, rows, 0.0, 50.0).into_iter().map(|v| v.abs() + 1.0).collect(),
            bwd_sums: normal(&mut rng, 2 * rows, 0.0, 20.0),
            scale: with_scale.then(|| normal(&mut rng, dim, 1.0, 0.5)),
            bias: normal(&mut rng, dim, 0.0, 0.5),
            dout: normal(&mut rng, rows * dim, 0.0, 1.0),
            dscale0: normal(&mut rng, dim, 0.0, 0.1),
            dbias0: normal(&mut rng, dim, 0.0, 0.1),
            dx0: normal(&mut rng, rows * dim, 0.0, 1.0),
        }
    }

    fn s(&self, j: usize) -> f64 {
        self.scale.as_ref().map_or(1.0, |s| s[j] as f64)
    }

    /// x̂ = (x − mean)·rstd in f64 from the f32 inputs.
    fn xhat(&self, r: usize, j: usize, dim: usize) -> f64 {
        (self.x[r * dim + j] as f64 - self.mean[r] as f64) * self.rstd[r] as f64
    }
}

/// layernorm_row_sums (plain and centred), layernorm_finish_stats (mean and rstd),
/// layernorm_apply, layernorm_backward_row_sums and layernorm_backward_apply on one shard.
pub fn layernorm_shard_case<B: Backend>(be: &B, ck: &mut Checks, sh: LnShard, with_scale: bool) -> CaseResult {
    let LnShard { rows, dim, dim_global } = sh;
    let case = format!("sharded layernorm rows={rows} dim={dim}/{dim_global} scale={with_scale}");
    let inp = LnShardInputs::draw(&case, sh, with_scale);
    let x64 = f64s(&inp.x);
    let xb = up(be, "x", &inp.x)?;

    // Row sums: Σx within γ_dim·Σ|x|; Σ(x − c)² (two roundings per term, non-negative terms)
    // within γ_{dim+3}·Σ(x − c)². Rigorous, any order.
    let mut s1 = nan_buf(be, "sums", rows)?;
    be.layernorm_row_sums(&mut s1, &xb, None, dim)?;
    let row = |r: usize| &x64[r * dim..(r + 1) * dim];
    let want: Vec<f64> = (0..rows).map(|r| row(r).iter().sum()).collect();
    let bound: Vec<f64> = (0..rows).map(|r| gamma(dim) * row(r).iter().map(|v| v.abs()).sum::<f64>()).collect();
    ck.within(&format!("{case}: row_sums"), &down(be, &s1)?, &want, &bound);
    let cb = up(be, "center", &inp.center)?;
    let mut s2 = nan_buf(be, "sums", rows)?;
    be.layernorm_row_sums(&mut s2, &xb, Some(&cb), dim)?;
    let want: Vec<f64> = (0..rows).map(|r| row(r).iter().map(|v| (v - inp.center[r] as f64).powi(2)).sum()).collect();
    let bound: Vec<f64> = want.iter().map(|w| gamma(dim + 3) * w).collect();
    ck.within(&format!("{case}: row_sums centred"), &down(be, &s2)?, &want, &bound);

    // Statistics from all-reduced sums: the mean is one division (2u); rstd = 1/√(s/n + eps) is
    // four roundings, two of them halved by the square root, plus eps's own f32 rounding (≤ u/2
    // of rstd): ≤ 4u relative; 2× both.
    let sums64 = f64s(&inp.sums);
    let mut m = up(be, "sums", &inp.sums)?;
    be.layernorm_finish_stats(&mut m, dim_global, false)?;
    let want: Vec<f64> = sums64.iter().map(|s| s / dim_global as f64).collect();
    let bound: Vec<f64> = want.iter().map(|w| 2.0 * U * w.abs()).collect();
    ck.within(&format!("{case}: finish_stats mean"), &down(be, &m)?, &want, &bound);
    let mut r = up(be, "sums", &inp.sums)?;
    be.layernorm_finish_stats(&mut r, dim_global, true)?;
    let want: Vec<f64> = sums64.iter().map(|s| 1.0 / (s / dim_global as f64 + LN_EPS).sqrt()).collect();
    let bound: Vec<f64> = want.iter().map(|w| 8.0 * U * w).collect();
    ck.within(&format!("{case}: finish_stats rstd"), &down(be, &r)?, &want, &bound);

    layernorm_shard_apply(be, ck, &inp, &xb)?;
    layernorm_shard_backward(be, ck, &inp, &xb)
}

/// `out = (x − mean)·rstd·scale + bias`: t = x̂·s carries γ₃ (three roundings), the bias add one
/// more: |err| ≤ γ₃|t| + u(|t|(1 + γ₃) + |b|); 2× that.
fn layernorm_shard_apply<B: Backend>(be: &B, ck: &mut Checks, inp: &LnShardInputs, xb: &B::Buf) -> CaseResult {
    let (LnShard { rows, dim, .. }, case) = (inp.sh, &inp.case);
    let (mb, rb, bb) = (up(be, "mean", &inp.mean)?, up(be, "rstd", &inp.rstd)?, up(be, "bias", &inp.bias)?);
    let sb = inp.scale.as_ref().map(|s| up(be, "scale", s)).transpose()?;
    let mut out = nan_buf(be, "out", rows * dim)?;
    be.layernorm_apply(&mut out, xb, &mb, &rb, sb.as_ref(), &bb, dim)?;
    let (mut want, mut bound) = (vec![0.0; rows * dim], vec![0.0; rows * dim]);
    for r in 0..rows {
        for j in 0..dim {
            let t = inp.xhat(r, j, dim) * inp.s(j);
            let b = inp.bias[j] as f64;
            want[r * dim + j] = t + b;
            bound[r * dim + j] = 2.0 * (gamma(3) * t.abs() + U * (t.abs() * (1.0 + gamma(3)) + b.abs()));
        }
    }
    ck.within(&format!("{case}: apply"), &down(be, &out)?, &want, &bound);
    Ok(())
}

/// The backward's two halves. Row sums: Σĝ (ĝ = dout·s, one rounding a term) within
/// γ_{dim+1}·Σ|ĝ|, Σĝx̂ (four a term) within γ_{dim+4}·Σ|ĝx̂|. Apply, from given sums S₁, S₂:
/// dx = rstd·(ĝ − S₁/n − x̂·S₂/n), at most eight roundings along any term, within
/// γ₈·rstd·(|ĝ| + |S₁/n| + |x̂·S₂/n|) (plus one for `+=`); dscale += Σ_r dout·x̂ within
/// γ_{rows+4}·(|dscale₀| + Σ|dout·x̂|); dbias += Σ_r dout within γ_{rows+1}·(|dbias₀| + Σ|dout|).
/// 2× the apply bound (its terms are not all of one sign); the sums are rigorous.
fn layernorm_shard_backward<B: Backend>(be: &B, ck: &mut Checks, inp: &LnShardInputs, xb: &B::Buf) -> CaseResult {
    let (LnShard { rows, dim, dim_global }, case) = (inp.sh, &inp.case);
    let (mb, rb, gb) = (up(be, "mean", &inp.mean)?, up(be, "rstd", &inp.rstd)?, up(be, "dout", &inp.dout)?);
    let sb = inp.scale.as_ref().map(|s| up(be, "scale", s)).transpose()?;
    let mut sums = nan_buf(be, "sums", 2 * rows)?;
    be.layernorm_backward_row_sums(&mut sums, &gb, xb, &mb, &rb, sb.as_ref(), dim)?;
    let (mut want, mut bound) = (vec![0.0; 2 * rows], vec![0.0; 2 * rows]);
    for r in 0..rows {
        for j in 0..dim {
            let gh = inp.dout[r * dim + j] as f64 * inp.s(j);
            let ghx = gh * inp.xhat(r, j, dim);
            want[r] += gh;
            want[rows + r] += ghx;
            bound[r] += gamma(dim + 1) * gh.abs();
            bound[rows + r] += gamma(dim + 4) * ghx.abs();
        }
    }
    ck.within(&format!("{case}: backward_row_sums"), &down(be, &sums)?, &want, &bound);

    let n = dim_global as f64;
    let given = up(be, "all-reduced sums", &inp.bwd_sums)?;
    for accumulate_dx in [false, true] {
        let mut dx = if accumulate_dx { up(be, "dx", &inp.dx0)? } else { nan_buf(be, "dx", rows * dim)? };
        let mut ds = up(be, "dscale", &inp.dscale0)?;
        let mut db = up(be, "dbias", &inp.dbias0)?;
        let dsr = if inp.scale.is_some() { Some(&mut ds) } else { None };
        be.layernorm_backward_apply(
            &mut dx,
            dsr,
            &mut db,
            &gb,
            xb,
            &mb,
            &rb,
            sb.as_ref(),
            &given,
            dim,
            dim_global,
            accumulate_dx,
        )?;
        let (mut want, mut bound) = (vec![0.0; rows * dim], vec![0.0; rows * dim]);
        let (mut want_ds, mut bound_ds) = (f64s(&inp.dscale0), abs64(&f64s(&inp.dscale0)));
        let (mut want_db, mut bound_db) = (f64s(&inp.dbias0), abs64(&f64s(&inp.dbias0)));
        for r in 0..rows {
            let (m1, m2) = (inp.bwd_sums[r] as f64 / n, inp.bwd_sums[rows + r] as f64 / n);
            let rs = inp.rstd[r] as f64;
            for j in 0..dim {
                let i = r * dim + j;
                let (g, xh) = (inp.dout[i] as f64, inp.xhat(r, j, dim));
                let gh = g * inp.s(j);
                let v = rs * (gh - m1 - xh * m2);
                let e = 2.0 * gamma(8) * rs * (gh.abs() + m1.abs() + (xh * m2).abs());
                (want[i], bound[i]) = if accumulate_dx {
                    let acc = v + inp.dx0[i] as f64;
                    (acc, e + U * (acc.abs() + e))
                } else {
                    (v, e)
                };
                want_ds[j] += g * xh;
                bound_ds[j] += (g * xh).abs();
                want_db[j] += g;
                bound_db[j] += g.abs();
            }
        }
        let what = if accumulate_dx { "backward_apply dx +=" } else { "backward_apply dx" };
        ck.within(&format!("{case}: {what}"), &down(be, &dx)?, &want, &bound);
        let bound_db: Vec<f64> = bound_db.iter().map(|b| gamma(rows + 1) * b).collect();
        ck.within(&format!("{case}: backward_apply dbias (accumulated)"), &down(be, &db)?, &want_db, &bound_db);
        if inp.scale.is_some() {
            let bound_ds: Vec<f64> = bound_ds.iter().map(|b| gamma(rows + 4) * b).collect();
            ck.within(&format!("{case}: backward_apply dscale (accumulated)"), &down(be, &ds)?, &want_ds, &bound_ds);
        }
    }
    Ok(())
}

pub fn layernorm_shard_ops_against_f64<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for with_scale in [false, true] {
        layernorm_shard_case(be, ck, LnShard { rows: 9, dim: 13, dim_global: 30 }, with_scale)?;
    }
    layernorm_shard_case(be, ck, LnShard { rows: 3, dim: 70, dim_global: 70 }, true)?;
    Ok(())
}

/// One rank's columns of the vocab-parallel cross-entropy: `cols` columns of which `valid` are
/// real (the rest padding), holding global classes `start ..`.
#[derive(Debug, Clone, Copy)]
pub struct VocabShard {
    pub rows: usize,
    pub cols: usize,
    pub valid: usize,
    pub start: usize,
}

/// vocab_parallel_max (exact), vocab_parallel_sums (Σ e^(x − max) within 2·((valid + 4)·u +
/// u·max|x − max|) relative, as the fused case bounds it; the target logit exact, 0 for a target
/// of another rank or in the padding) and vocab_parallel_grad from given statistics (loss
/// m + ln Σ − t within 2·(2u|ln Σ| + 2u(|m| + |ln Σ| + |t|)); gradient gs·e^(x−m)/Σ within
/// 2·(5 + |x − m|)·u·|gs|·p, the target entry + 2u|gs|; padding exactly 0).
pub fn vocab_parallel_case<B: Backend>(be: &B, ck: &mut Checks, vs: VocabShard, grad_scale: f32) -> CaseResult {
    let VocabShard { rows, cols, valid, start } = vs;
    let case = format!("vocab_parallel rows={rows} cols={cols} valid={valid} start={start}");
    let mut rng = rng_for(&case);
    let logits = normal(&mut rng, rows * cols, 0.0, 4.0);
    // Targets below, inside, in the padding of and above this rank's columns.
    let targets: Vec<i32> =
        (0..rows).map(|_| rand::Rng::random_range(&mut rng, 0..(start + cols + 40) as i32)).collect();
    let local = |r: usize| (targets[r] as usize).checked_sub(start).filter(|&l| l < valid);
    let x = |r: usize, c: usize| logits[r * cols + c] as f64;

    let lb = up(be, "logits", &logits)?;
    let tb = up_ids(be, "targets", &targets)?;
    let mut mx = nan_buf(be, "max", rows)?;
    be.vocab_parallel_max(&mut mx, &lb, cols, valid)?;
    let want_max: Vec<f64> = (0..rows).map(|r| (0..valid).map(|c| x(r, c)).fold(f64::NEG_INFINITY, f64::max)).collect();
    ck.within(&format!("{case}: max (exact)"), &down(be, &mx)?, &want_max, &vec![0.0; rows]);

    let mut stats = nan_buf(be, "stats", 2 * rows)?;
    be.vocab_parallel_sums(&mut stats, &lb, &mx, &tb, cols, valid, start)?;
    let (mut want, mut bound) = (vec![0.0; 2 * rows], vec![0.0; 2 * rows]);
    for r in 0..rows {
        let m = want_max[r];
        want[r] = (0..valid).map(|c| (x(r, c) - m).exp()).sum();
        let range = (0..valid).map(|c| m - x(r, c)).fold(0.0, f64::max);
        bound[r] = 2.0 * ((valid + 4) as f64 * U + range * U) * want[r];
        want[rows + r] = local(r).map_or(0.0, |l| x(r, l));
    }
    ck.within(&format!("{case}: sums and target logits"), &down(be, &stats)?, &want, &bound);

    // Step 3 from the reference statistics (rounded to f32), so it is checked on its own.
    let stats32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    let max32: Vec<f32> = want_max.iter().map(|&v| v as f32).collect();
    let (mb, sb) = (up(be, "max", &max32)?, up(be, "stats", &stats32)?);
    let mut gl = up(be, "logits", &logits)?;
    let mut losses = nan_buf(be, "losses", rows)?;
    be.vocab_parallel_grad(&mut gl, &mut losses, &mb, &sb, &tb, cols, valid, start, grad_scale)?;
    let gs = grad_scale as f64;
    let (mut wl, mut bl) = (vec![0.0; rows], vec![0.0; rows]);
    let (mut wg, mut bg) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
    for r in 0..rows {
        let (m, sum, t) = (max32[r] as f64, stats32[r] as f64, stats32[rows + r] as f64);
        wl[r] = m + sum.ln() - t;
        bl[r] = 2.0 * (2.0 * U * sum.ln().abs() + 2.0 * U * (m.abs() + sum.ln().abs() + t.abs()));
        for c in 0..valid {
            let p = (x(r, c) - m).exp() / sum;
            let target = local(r) == Some(c);
            wg[r * cols + c] = gs * (p - if target { 1.0 } else { 0.0 });
            bg[r * cols + c] =
                2.0 * (5.0 + (x(r, c) - m).abs()) * U * gs.abs() * p + if target { 2.0 * U * gs.abs() } else { 0.0 };
        }
    }
    ck.within(&format!("{case}: losses"), &down(be, &losses)?, &wl, &bl);
    ck.within(&format!("{case}: in-place gradient (padding 0)"), &down(be, &gl)?, &wg, &bg);
    Ok(())
}

pub fn vocab_parallel_cross_entropy_against_f64<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    vocab_parallel_case(be, ck, VocabShard { rows: 48, cols: 136, valid: 129, start: 50 }, 0.5)?;
    vocab_parallel_case(be, ck, VocabShard { rows: 5, cols: 17, valid: 17, start: 0 }, 2.0)?;
    Ok(())
}
