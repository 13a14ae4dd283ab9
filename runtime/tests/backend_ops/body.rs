// The test bodies of `grad_check.rs`, included once per backend: each module that includes this
// file defines `Be` (the backend), `Buf`/`Ids` (its buffer types), `backend()` (a fresh handle)
// and `runs_here(test)` (None, after printing why, where `Be` cannot run on this machine).

// =====================================================================================
// matmul
// =====================================================================================

fn spec(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> MatmulSpec {
    MatmulSpec { m, n, k, trans_a, trans_b, accumulate }
}

/// `op(a) · op(b)` in f64 with naive loops, reading `a`, `b` in their stored layouts.
fn matmul_ref(a: &[f64], b: &[f64], s: MatmulSpec) -> Vec<f64> {
    let (m, n, k) = (s.m, s.n, s.k);
    let a_at = |i: usize, l: usize| {
        if s.trans_a {
            a[l * m + i]
        } else {
            a[i * k + l]
        }
    };
    let b_at = |l: usize, j: usize| {
        if s.trans_b {
            b[j * k + l]
        } else {
            b[l * n + j]
        }
    };
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| a_at(i, l) * b_at(l, j)).sum();
        }
    }
    out
}

/// The backward of `out = op(a)·op(b)` written with matmuls only, as the model does:
/// `da` (an activation gradient) is overwritten, `db` (a parameter gradient) accumulated.
fn matmul_backward(
    be: &Be,
    w: &Buf,
    a: &Buf,
    b: &Buf,
    s: MatmulSpec,
    da: &mut Buf,
    db: &mut Buf,
) {
    let (m, n, k) = (s.m, s.n, s.k);
    match (s.trans_a, s.trans_b) {
        (false, false) => be.matmul(da, w, b, spec(m, k, n, false, true, false)), // dA = W·Bᵀ
        (false, true) => be.matmul(da, w, b, spec(m, k, n, false, false, false)), // dA = W·B
        (true, false) => be.matmul(da, b, w, spec(k, m, n, false, true, false)),  // dA[k,m] = B·Wᵀ
        (true, true) => be.matmul(da, b, w, spec(k, m, n, true, true, false)),    // dA[k,m] = Bᵀ·Wᵀ
    }
    .unwrap();
    match (s.trans_a, s.trans_b) {
        (false, false) => be.matmul(db, a, w, spec(k, n, m, true, false, true)), // dB = Aᵀ·W
        (true, false) => be.matmul(db, a, w, spec(k, n, m, false, false, true)), // dB = A·W
        (false, true) => be.matmul(db, w, a, spec(n, k, m, true, false, true)),  // dB[n,k] = Wᵀ·A
        (true, true) => be.matmul(db, w, a, spec(n, k, m, true, true, true)),    // dB[n,k] = Wᵀ·Aᵀ
    }
    .unwrap();
}

/// Forward and backward of one matmul configuration; `fd_samples` limits the finite
/// differences to that many random entries per tensor (for the large, parallel products).
fn matmul_case(
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    fd_samples: Option<usize>,
) {
    let s = spec(m, n, k, trans_a, trans_b, accumulate);
    let case = format!("matmul {m}x{n}x{k} trans_a={trans_a} trans_b={trans_b} accumulate={accumulate}");
    let mut rng = rng_for(&case);
    let a = normal(&mut rng, m * k, 0.0, 1.0);
    let b = normal(&mut rng, k * n, 0.0, 1.0);
    let w = normal(&mut rng, m * n, 0.0, 1.0);
    let out0 = normal(&mut rng, m * n, 0.0, 1.0);
    let db0 = normal(&mut rng, k * n, 0.0, 1.0);

    let be = backend();
    let (ab, bb, wb) = (up(&be, "a", &a), up(&be, "b", &b), up(&be, "w", &w));
    let mut out = if accumulate { up(&be, "out", &out0) } else { nan_buf(&be, "out", m * n) };
    be.matmul(&mut out, &ab, &bb, s).unwrap();

    let (a64, b64) = (f64s(&a), f64s(&b));
    let prod = matmul_ref(&a64, &b64, s);
    let prod_abs = matmul_ref(&abs64(&a64), &abs64(&b64), s);
    // Bound: inputs are exact f32 values, so the only error is rounding in the dot products:
    // |fl(Σₗ aᵢₗbₗⱼ) − Σₗ aᵢₗbₗⱼ| ≤ γₖ·Σₗ|aᵢₗbₗⱼ| (Higham, any summation order, FMA or not), and
    // γₖ₊₁·(Σ|ab| + |out₀|) with the extra rounding of `+=`. Rigorous, so no safety factor; a
    // wrong transpose or a dropped `+=` gives O(1) errors against O(√k·u) bounds.
    let (want, bound): (Vec<f64>, Vec<f64>) = if accumulate {
        let o = f64s(&out0);
        (add64(&prod, &o), prod_abs.iter().zip(&o).map(|(p, o)| gamma(k + 1) * (p + o.abs())).collect())
    } else {
        (prod, prod_abs.iter().map(|p| gamma(k) * p).collect())
    };
    assert_within(&format!("{case}: forward"), &down(&be, &out), &want, &bound);

    let mut da = nan_buf(&be, "da", m * k);
    let mut db = up(&be, "db", &db0);
    matmul_backward(&be, &wb, &ab, &bb, s, &mut da, &mut db);
    let (got_da, got_db) = (down(&be, &da), down(&be, &db));
    let w64 = f64s(&w);
    let loss = |x: &[Vec<f64>]| weighted_sum(&w64, &matmul_ref(&x[0], &x[1], s));
    let inputs = vec![a64, b64];
    let db0 = f64s(&db0);
    match fd_samples {
        None => {
            let g = fd_grads(&inputs, loss);
            assert_grad(&format!("{case}: dA"), &got_da, &g[0]);
            assert_grad(&format!("{case}: dB (accumulated)"), &got_db, &add64(&g[1], &db0));
        }
        Some(count) => {
            let at = vec![sample_indices(&mut rng, m * k, count), sample_indices(&mut rng, k * n, count)];
            let g = fd_grads_at(&inputs, &at, loss);
            let pick = |v: &[f32], idx: &[usize]| idx.iter().map(|&i| v[i]).collect::<Vec<f32>>();
            let db0_at: Vec<f64> = at[1].iter().map(|&i| db0[i]).collect();
            assert_grad(&format!("{case}: dA (sampled)"), &pick(&got_da, &at[0]), &g[0]);
            assert_grad(&format!("{case}: dB (accumulated, sampled)"), &pick(&got_db, &at[1]), &add64(&g[1], &db0_at));
        }
    }
}

#[test]
fn matmul_odd_sizes_all_transposes_and_accumulate() {
    let Some(()) = runs_here(stringify!(matmul_odd_sizes_all_transposes_and_accumulate)) else { return };
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            for accumulate in [false, true] {
                matmul_case(7, 13, 5, trans_a, trans_b, accumulate, None);
            }
        }
    }
}

#[test]
fn matmul_thin_shapes() {
    let Some(()) = runs_here(stringify!(matmul_thin_shapes)) else { return };
    for (m, n, k) in [(1, 17, 3), (9, 1, 33), (4, 6, 1), (3, 5, 40)] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            matmul_case(m, n, k, trans_a, trans_b, trans_a, None);
        }
    }
}

#[test]
fn matmul_parallel_path_all_transposes() {
    let Some(()) = runs_here(stringify!(matmul_parallel_path_all_transposes)) else { return };
    // 70·80·60 = 336 000 ≥ 2¹⁸ multiply-adds: the rayon-parallel gemm path (also for the
    // backward products, which have the same m·n·k).
    for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
        matmul_case(70, 80, 60, trans_a, trans_b, trans_a != trans_b, Some(40));
    }
}

#[test]
fn matmul_empty_inner_dimension() {
    let Some(()) = runs_here(stringify!(matmul_empty_inner_dimension)) else { return };
    let be = backend();
    let (a, b) = (up(&be, "a", &[]), up(&be, "b", &[]));
    let mut out = nan_buf(&be, "out", 6);
    be.matmul(&mut out, &a, &b, spec(2, 3, 0, false, false, false)).unwrap();
    assert_eq!(down(&be, &out), vec![0.0; 6], "k = 0 overwrites with zeros");
    let mut out = up(&be, "out", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    be.matmul(&mut out, &a, &b, spec(3, 2, 0, true, true, true)).unwrap();
    assert_eq!(down(&be, &out), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "k = 0 accumulates nothing");
}

// =====================================================================================
// layernorm
// =====================================================================================

const LN_EPS: f64 = 1e-5;

struct LnRef {
    out: Vec<f64>,
    mean: Vec<f64>,
    rstd: Vec<f64>,
    xhat: Vec<f64>,
}

/// LayerNorm in f64; `ddof` 0 is the op's biased variance (1 would be the unbiased one).
fn layernorm_ref_with(x: &[f64], scale: Option<&[f64]>, bias: &[f64], dim: usize, ddof: f64, eps: f64) -> LnRef {
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

fn layernorm_ref(x: &[f64], scale: Option<&[f64]>, bias: &[f64], dim: usize) -> LnRef {
    layernorm_ref_with(x, scale, bias, dim, 0.0, LN_EPS)
}

/// Rows of varied mean and spread; every fifth row has variance ≈ 1e-5 ≈ eps, so that dropping
/// eps or mis-placing it changes the result by O(1).
fn layernorm_input(rng: &mut rand_chacha::ChaCha8Rng, rows: usize, dim: usize) -> Vec<f32> {
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

struct LnInputs {
    x: Vec<f32>,
    scale: Option<Vec<f32>>,
    bias: Vec<f32>,
}

/// Runs the forward on `be` and checks out/mean/rstd; returns the saved (mean, rstd) buffers.
fn layernorm_forward_checked(be: &Be, case: &str, inp: &LnInputs, dim: usize) -> (Buf, Buf) {
    let rows = inp.x.len() / dim;
    let (xb, bb) = (up(be, "x", &inp.x), up(be, "bias", &inp.bias));
    let sb = inp.scale.as_ref().map(|s| up(be, "scale", s));
    let mut out = nan_buf(be, "out", inp.x.len());
    let (mut mean, mut rstd) = (nan_buf(be, "mean", rows), nan_buf(be, "rstd", rows));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &xb, sb.as_ref(), &bb, dim).unwrap();

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
    assert_within(&format!("{case}: out"), &down(be, &out), &r.out, &bound);
    assert_within(&format!("{case}: mean"), &down(be, &mean), &r.mean, &mean_bound);
    assert_within(&format!("{case}: rstd"), &down(be, &rstd), &r.rstd, &rstd_bound);
    (mean, rstd)
}

fn layernorm_case(rows: usize, dim: usize, with_scale: bool, accumulate_dx: bool) {
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

    let be = backend();
    let (mean, rstd) = layernorm_forward_checked(&be, &case, &inp, dim);

    let (xb, wb) = (up(&be, "x", &inp.x), up(&be, "dout", &w));
    let sb = inp.scale.as_ref().map(|s| up(&be, "scale", s));
    let mut dx = if accumulate_dx { up(&be, "dx", &dx0) } else { nan_buf(&be, "dx", rows * dim) };
    let mut dscale = with_scale.then(|| up(&be, "dscale", &dscale0));
    let mut dbias = up(&be, "dbias", &dbias0);
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
    )
    .unwrap();

    let w64 = f64s(&w);
    let mut inputs = vec![f64s(&inp.x), f64s(&inp.bias)];
    if let Some(s) = &inp.scale {
        inputs.push(f64s(s));
    }
    let g = fd_grads(&inputs, |x| {
        weighted_sum(&w64, &layernorm_ref(&x[0], x.get(2).map(|s| s.as_slice()), &x[1], dim).out)
    });
    let want_dx = if accumulate_dx { add64(&g[0], &f64s(&dx0)) } else { g[0].clone() };
    assert_grad(&format!("{case}: dx"), &down(&be, &dx), &want_dx);
    assert_grad(&format!("{case}: dbias (accumulated)"), &down(&be, &dbias), &add64(&g[1], &f64s(&dbias0)));
    if let Some(ds) = &dscale {
        assert_grad(&format!("{case}: dscale (accumulated)"), &down(&be, ds), &add64(&g[2], &f64s(&dscale0)));
    }
}

#[test]
fn layernorm_with_scale() {
    let Some(()) = runs_here(stringify!(layernorm_with_scale)) else { return };
    layernorm_case(37, 13, true, false);
    layernorm_case(70, 50, true, true);
    layernorm_case(5, 8, true, false);
}

#[test]
fn layernorm_bias_only() {
    let Some(()) = runs_here(stringify!(layernorm_bias_only)) else { return };
    layernorm_case(37, 13, false, true);
    layernorm_case(70, 50, false, false);
    layernorm_case(1, 3, false, true);
}

// =====================================================================================
// GELU-GLU
// =====================================================================================

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

fn gelu_glu_ref(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| gelu64(a) * b).collect()
}

/// `a` spans the saturated tails (|a| up to 7) and the curved middle; `b`, `w` are N(0, 1.5²).
fn gelu_glu_inputs(case: &str, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
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
fn gelu_glu_bound(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| 2.0 * (3.0 * U * a.abs() + 2.0 * U * gelu64(a).abs()) * b.abs()).collect()
}

#[test]
fn gelu_glu_forward_and_backward() {
    let Some(()) = runs_here(stringify!(gelu_glu_forward_and_backward)) else { return };
    for n in [1000, 33] {
        let case = format!("gelu_glu n={n}");
        let (a, b, w) = gelu_glu_inputs(&case, n);
        let be = backend();
        let (ab, bb, wb) = (up(&be, "a", &a), up(&be, "b", &b), up(&be, "dout", &w));
        let mut out = nan_buf(&be, "out", n);
        be.gelu_glu_forward(&mut out, &ab, &bb).unwrap();
        let (a64, b64, w64) = (f64s(&a), f64s(&b), f64s(&w));
        assert_within(
            &format!("{case}: forward"),
            &down(&be, &out),
            &gelu_glu_ref(&a64, &b64),
            &gelu_glu_bound(&a64, &b64),
        );

        let (mut da, mut db) = (nan_buf(&be, "da", n), nan_buf(&be, "db", n));
        be.gelu_glu_backward(&mut da, &mut db, &wb, &ab, &bb).unwrap();
        let g = fd_grads(&[a64, b64], |x| weighted_sum(&w64, &gelu_glu_ref(&x[0], &x[1])));
        assert_grad(&format!("{case}: da"), &down(&be, &da), &g[0]);
        assert_grad(&format!("{case}: db"), &down(&be, &db), &g[1]);
    }
}

// =====================================================================================
// embedding
// =====================================================================================

/// `out[i] = table[ids[i] − start]` for ids in the range, zero rows otherwise.
fn embedding_ref(table: &[f64], ids: &[i32], range: VocabRange, dim: usize) -> Vec<f64> {
    let mut out = vec![0.0; ids.len() * dim];
    for (i, &id) in ids.iter().enumerate() {
        if id >= range.start as i32 && id < range.end as i32 {
            let r = id as usize - range.start;
            out[i * dim..(i + 1) * dim].copy_from_slice(&table[r * dim..(r + 1) * dim]);
        }
    }
    out
}

fn embedding_case(vocab: usize, range: VocabRange, dim: usize, ids: &[i32]) {
    let case = format!("embedding vocab={vocab} range={}..{} dim={dim} tokens={}", range.start, range.end, ids.len());
    let mut rng = rng_for(&case);
    let table = normal(&mut rng, range.len() * dim, 0.0, 1.0);
    let w = normal(&mut rng, ids.len() * dim, 0.0, 1.0);
    let dtable0 = normal(&mut rng, range.len() * dim, 0.0, 1.0);

    let be = backend();
    let (tb, wb, idb) = (up(&be, "table", &table), up(&be, "dout", &w), up_ids(&be, "ids", ids));
    let mut out = nan_buf(&be, "out", ids.len() * dim);
    be.embedding_forward(&mut out, &tb, &idb, range, dim).unwrap();
    let t64 = f64s(&table);
    // A gather is a copy: exact (bound 0), zero rows included.
    let want = embedding_ref(&t64, ids, range, dim);
    assert_within(&format!("{case}: forward"), &down(&be, &out), &want, &vec![0.0; want.len()]);

    let mut dtable = up(&be, "dtable", &dtable0);
    be.embedding_backward(&mut dtable, &wb, &idb, range, dim).unwrap();
    let w64 = f64s(&w);
    let g = fd_grads(&[t64], |x| weighted_sum(&w64, &embedding_ref(&x[0], ids, range, dim)));
    let got = down(&be, &dtable);
    assert_grad(&format!("{case}: dtable (accumulated)"), &got, &add64(&g[0], &f64s(&dtable0)));
    // Rows no in-range id refers to are left exactly as they were.
    for r in 0..range.len() {
        let id = (range.start + r) as i32;
        if !ids.contains(&id) {
            assert_eq!(&got[r * dim..(r + 1) * dim], &dtable0[r * dim..(r + 1) * dim], "{case}: row of id {id}");
        }
    }
}

#[test]
fn embedding_full_range_with_repeats() {
    let Some(()) = runs_here(stringify!(embedding_full_range_with_repeats)) else { return };
    let mut rng = rng_for("embedding full ids");
    let mut ids: Vec<i32> = (0..40).map(|_| rand::Rng::random_range(&mut rng, 0..11)).collect();
    ids.extend([3, 3, 3, 0, 10]); // repeats accumulate, both ends of the vocabulary
    embedding_case(11, VocabRange::full(11), 6, &ids);
}

#[test]
fn embedding_partial_range() {
    let Some(()) = runs_here(stringify!(embedding_partial_range)) else { return };
    // A tensor-parallel rank holding rows 5..12 of a 20-row vocabulary: ids below, above, at both
    // edges and negative; repeated in-range ids.
    let ids = [4, 5, 11, 12, 7, 7, 19, 0, -1, 5, 8, 7, 13, 11];
    embedding_case(20, VocabRange { start: 5, end: 12 }, 9, &ids);
    let mut rng = rng_for("embedding partial ids");
    let ids: Vec<i32> = (0..64).map(|_| rand::Rng::random_range(&mut rng, -2..34)).collect();
    embedding_case(32, VocabRange { start: 16, end: 32 }, 5, &ids);
}

// =====================================================================================
// attention
// =====================================================================================

fn visible(mask: Option<&[i32]>, sh: &AttentionShape, b: usize, i: usize, j: usize) -> bool {
    (!sh.causal || j <= i) && mask.is_none_or(|m| m[b * sh.kv_len + j] != 0)
}

fn q_idx(sh: &AttentionShape, b: usize, i: usize, h: usize, c: usize) -> usize {
    (b * sh.q_len + i) * sh.width() + h * sh.head_dim + c
}
fn kv_idx(sh: &AttentionShape, b: usize, j: usize, h: usize, c: usize) -> usize {
    (b * sh.kv_len + j) * sh.width() + h * sh.head_dim + c
}
fn row_idx(sh: &AttentionShape, b: usize, h: usize, i: usize) -> usize {
    (b * sh.heads + h) * sh.q_len + i
}

/// Scaled scores `alpha·q·k` per (b, h, i, j), flattened as `row_idx·kv_len + j`.
fn attn_scores(q: &[f64], k: &[f64], sh: &AttentionShape, alpha: f64) -> Vec<f64> {
    let mut s = vec![0.0; sh.batch * sh.heads * sh.q_len * sh.kv_len];
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            for i in 0..sh.q_len {
                for j in 0..sh.kv_len {
                    let dot: f64 = (0..sh.head_dim).map(|c| q[q_idx(sh, b, i, h, c)] * k[kv_idx(sh, b, j, h, c)]).sum();
                    s[row_idx(sh, b, h, i) * sh.kv_len + j] = alpha * dot;
                }
            }
        }
    }
    s
}

/// Softmax of each score row over its visible keys, and the row log-sum-exp.
/// A row with no visible key attends to all keys with probabilities softmax(s − shift), lse NaN:
/// with `shift` = the scores themselves this is exactly uniform; with `shift` frozen at the
/// unperturbed inputs, finite differences see the gradient of softmax(s + const) at the uniform
/// point — the rule the op defines (JAX's finite mask bias: all scores equal ⇒ uniform, and the
/// gradient flows as through s + const).
fn attn_probs(s: &[f64], shift: &[f64], mask: Option<&[i32]>, sh: &AttentionShape) -> (Vec<f64>, Vec<f64>) {
    let tk = sh.kv_len;
    let mut p = vec![0.0; s.len()];
    let mut lse = vec![0.0; sh.lse_len()];
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            for i in 0..sh.q_len {
                let r = row_idx(sh, b, h, i);
                let (sr, pr) = (&s[r * tk..(r + 1) * tk], &mut p[r * tk..(r + 1) * tk]);
                let vis: Vec<bool> = (0..tk).map(|j| visible(mask, sh, b, i, j)).collect();
                if vis.iter().any(|&v| v) {
                    let m = (0..tk).filter(|&j| vis[j]).map(|j| sr[j]).fold(f64::NEG_INFINITY, f64::max);
                    let l = m + (0..tk).filter(|&j| vis[j]).map(|j| (sr[j] - m).exp()).sum::<f64>().ln();
                    for j in 0..tk {
                        pr[j] = if vis[j] { (sr[j] - l).exp() } else { 0.0 };
                    }
                    lse[r] = l;
                } else {
                    let t: Vec<f64> = (0..tk).map(|j| sr[j] - shift[r * tk + j]).collect();
                    let m = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = t.iter().map(|t| (t - m).exp()).sum();
                    for j in 0..tk {
                        pr[j] = (t[j] - m).exp() / z;
                    }
                    lse[r] = f64::NAN;
                }
            }
        }
    }
    (p, lse)
}

/// `out[b, i, h, :] = Σⱼ p[b, h, i, j]·v[b, j, h, :]`.
fn attn_pv(p: &[f64], v: &[f64], sh: &AttentionShape) -> Vec<f64> {
    let mut out = vec![0.0; sh.batch * sh.q_len * sh.width()];
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            for i in 0..sh.q_len {
                let r = row_idx(sh, b, h, i);
                for c in 0..sh.head_dim {
                    out[q_idx(sh, b, i, h, c)] =
                        (0..sh.kv_len).map(|j| p[r * sh.kv_len + j] * v[kv_idx(sh, b, j, h, c)]).sum();
                }
            }
        }
    }
    out
}

struct AttnRef {
    out: Vec<f64>,
    lse: Vec<f64>,
    p: Vec<f64>,
    s: Vec<f64>,
}

/// Attention in f64. `alpha` is the score scale (1/√head_dim for the op); `shift` is the frozen
/// score shift of fully masked rows (None: the current scores, i.e. exactly uniform).
fn attn_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[i32]>,
    sh: &AttentionShape,
    alpha: f64,
    shift: Option<&[f64]>,
) -> AttnRef {
    let s = attn_scores(q, k, sh, alpha);
    let (p, lse) = attn_probs(&s, shift.unwrap_or(&s), mask, sh);
    AttnRef { out: attn_pv(&p, v, sh), lse, p, s }
}

fn alpha_of(sh: &AttentionShape) -> f64 {
    1.0 / (sh.head_dim as f64).sqrt()
}

struct AttnInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    w: Vec<f32>,
}

fn attn_inputs(case: &str, sh: &AttentionShape) -> AttnInputs {
    let mut rng = rng_for(case);
    let (nq, nk) = (sh.batch * sh.q_len * sh.width(), sh.batch * sh.kv_len * sh.width());
    AttnInputs {
        q: normal(&mut rng, nq, 0.0, 1.5), // scores of spread ~1.5: peaked but not one-hot rows
        k: normal(&mut rng, nk, 0.0, 1.0),
        v: normal(&mut rng, nk, 0.0, 1.0),
        w: normal(&mut rng, nq, 0.0, 1.0),
    }
}

/// Element bounds of the f32 forward's `out` and `lse`, from the f64 reference.
///
/// Scores: δs ≤ γ_{d+1}·α·Σ_c|q_c k_c| (dot product of length d plus the scaling). The
/// probabilities p = exp(s − lse) then carry a relative error ε_p ≤ 2δs + 2u·max|s − m| (the
/// rounding of the shifted argument) + (span + 10)·u (the ~2-ulp exp, the sum of `span` terms,
/// the division). out = Σ p·v adds γ_kv relative to Σ p|v|: |err| ≤ (ε_p + γ_kv)·Σⱼ pⱼ|vⱼ|.
/// lse = m + ln Σ: |err| ≤ 2δs + 2u·max|s − m| + (span + 6)·u + 2u·|lse|. 2× both.
fn attn_forward_bounds(r: &AttnRef, q: &[f64], k: &[f64], v: &[f64], sh: &AttentionShape) -> (Vec<f64>, Vec<f64>) {
    let tk = sh.kv_len;
    let s_abs = attn_scores(&abs64(q), &abs64(k), sh, alpha_of(sh));
    let pv_abs = attn_pv(&r.p, &abs64(v), sh);
    let mut out_bound = vec![0.0; r.out.len()];
    let mut lse_bound = vec![0.0; r.lse.len()];
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            for i in 0..sh.q_len {
                let row = row_idx(sh, b, h, i);
                let span = if sh.causal { i + 1 } else { tk };
                let sr = &r.s[row * tk..(row + 1) * tk];
                let smax = sr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let s_range = sr.iter().map(|s| (smax - s).abs()).fold(0.0, f64::max);
                let ds = gamma(sh.head_dim + 1) * s_abs[row * tk..(row + 1) * tk].iter().copied().fold(0.0, f64::max);
                let eps_p = 2.0 * ds + 2.0 * U * s_range + (span + 10) as f64 * U;
                for c in 0..sh.head_dim {
                    let o = q_idx(sh, b, i, h, c);
                    out_bound[o] = 2.0 * (eps_p + gamma(tk)) * pv_abs[o] + 1e-30;
                }
                lse_bound[row] =
                    2.0 * (2.0 * ds + 2.0 * U * s_range + (span + 6) as f64 * U + 2.0 * U * r.lse[row].abs());
            }
        }
    }
    (out_bound, lse_bound)
}

/// (b, i) query rows that see no key (same for every head).
fn fully_masked_rows(mask: Option<&[i32]>, sh: &AttentionShape) -> Vec<(usize, usize)> {
    let mut rows = Vec::new();
    for b in 0..sh.batch {
        for i in 0..sh.q_len {
            if !(0..sh.kv_len).any(|j| visible(mask, sh, b, i, j)) {
                rows.push((b, i));
            }
        }
    }
    rows
}

struct AttnRun {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn attn_run(inp: &AttnInputs, mask: Option<&[i32]>, sh: AttentionShape) -> AttnRun {
    let be = backend();
    let (qb, kb, vb, wb) = (up(&be, "q", &inp.q), up(&be, "k", &inp.k), up(&be, "v", &inp.v), up(&be, "dout", &inp.w));
    let mb = mask.map(|m| up_ids(&be, "mask", m));
    let mut out = nan_buf(&be, "out", inp.q.len());
    let mut lse = nan_buf(&be, "lse", sh.lse_len());
    be.attention_forward(&mut out, &mut lse, &qb, &kb, &vb, mb.as_ref(), sh).unwrap();
    let (mut dq, mut dk, mut dv) =
        (nan_buf(&be, "dq", inp.q.len()), nan_buf(&be, "dk", inp.k.len()), nan_buf(&be, "dv", inp.v.len()));
    be.attention_backward(&mut dq, &mut dk, &mut dv, &wb, &qb, &kb, &vb, &out, &lse, mb.as_ref(), sh).unwrap();
    AttnRun { out: down(&be, &out), lse: down(&be, &lse), dq: down(&be, &dq), dk: down(&be, &dk), dv: down(&be, &dv) }
}

fn attention_case(name: &str, sh: AttentionShape, mask: Option<&[i32]>) {
    let case = format!("attention {name} {sh:?}");
    let inp = attn_inputs(&case, &sh);
    let run = attn_run(&inp, mask, sh);
    let (q, k, v, w) = (f64s(&inp.q), f64s(&inp.k), f64s(&inp.v), f64s(&inp.w));
    let alpha = alpha_of(&sh);
    let r = attn_ref(&q, &k, &v, mask, &sh, alpha, None);

    // Forward.
    let (out_bound, lse_bound) = attn_forward_bounds(&r, &q, &k, &v, &sh);
    assert_within(&format!("{case}: out"), &run.out, &r.out, &out_bound);
    // lse of rows that see a key: the log-sum-exp of their scaled visible scores. Rows that see
    // none hold NaN: the CPU backend's marker of a uniform row (attention.rs), which its backward
    // reads; the trait leaves that value unspecified.
    let finite: Vec<usize> = (0..r.lse.len()).filter(|&i| r.lse[i].is_finite()).collect();
    let pick32 = |x: &[f32], idx: &[usize]| idx.iter().map(|&i| x[i]).collect::<Vec<f32>>();
    let pick64 = |x: &[f64], idx: &[usize]| idx.iter().map(|&i| x[i]).collect::<Vec<f64>>();
    assert_within(
        &format!("{case}: lse"),
        &pick32(&run.lse, &finite),
        &pick64(&r.lse, &finite),
        &pick64(&lse_bound, &finite),
    );
    for i in (0..r.lse.len()).filter(|&i| r.lse[i].is_nan()) {
        assert!(
            run.lse[i].is_nan(),
            "{case}: lse[{i}] of a fully masked row is {}, expected the NaN marker",
            run.lse[i]
        );
    }

    // Backward against finite differences, fully masked rows with their score shift frozen.
    let shift = r.s.clone();
    let g =
        fd_grads(&[q, k, v], |x| weighted_sum(&w, &attn_ref(&x[0], &x[1], &x[2], mask, &sh, alpha, Some(&shift)).out));
    assert_grad(&format!("{case}: dq"), &run.dq, &g[0]);
    assert_grad(&format!("{case}: dk"), &run.dk, &g[1]);
    assert_grad(&format!("{case}: dv"), &run.dv, &g[2]);

    // The fully masked rows on their own, so an error there cannot hide under larger gradients.
    let w_ = sh.width();
    let masked = fully_masked_rows(mask, &sh);
    for &(b, i) in &masked {
        let o = (b * sh.q_len + i) * w_;
        assert_grad(&format!("{case}: dq of fully masked row b={b} i={i}"), &run.dq[o..o + w_], &g[0][o..o + w_]);
    }
    for b in 0..sh.batch {
        if masked.iter().filter(|&&(mb, _)| mb == b).count() == sh.q_len {
            let o = b * sh.kv_len * w_..(b + 1) * sh.kv_len * w_;
            assert_grad(&format!("{case}: dk of fully masked batch row {b}"), &run.dk[o.clone()], &g[1][o.clone()]);
            assert_grad(&format!("{case}: dv of fully masked batch row {b}"), &run.dv[o.clone()], &g[2][o]);
        }
    }
}

fn shape(batch: usize, q_len: usize, kv_len: usize, heads: usize, head_dim: usize, causal: bool) -> AttentionShape {
    AttentionShape { batch, q_len, kv_len, heads, head_dim, causal }
}

#[test]
fn attention_cross_no_mask() {
    let Some(()) = runs_here(stringify!(attention_cross_no_mask)) else { return };
    attention_case("cross", shape(2, 5, 7, 3, 8, false), None);
    attention_case("cross", shape(1, 9, 4, 1, 16, false), None);
}

#[test]
fn attention_cross_key_padding_and_fully_masked_batch_row() {
    let Some(()) = runs_here(stringify!(attention_cross_key_padding_and_fully_masked_batch_row)) else { return };
    // Batch 0 sees every key, batch 1 some (any non-zero value means visible), batch 2 none.
    let mask = [
        1, 1, 1, 1, 1, 1, 1, 1, 1, //
        1, 1, 0, 1, 3, 0, 0, 1, 0, //
        0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    attention_case("cross, padded", shape(3, 4, 9, 2, 16, false), Some(&mask));
    let mask = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    attention_case("self, padded", shape(2, 5, 5, 3, 8, false), Some(&mask));
}

#[test]
fn attention_causal() {
    let Some(()) = runs_here(stringify!(attention_causal)) else { return };
    attention_case("causal", shape(2, 6, 6, 1, 16, true), None);
    attention_case("causal", shape(1, 11, 11, 3, 8, true), None);
}

#[test]
fn attention_causal_with_key_padding() {
    let Some(()) = runs_here(stringify!(attention_causal_with_key_padding)) else { return };
    // Batch 1 pads key 0, so its query 0 sees no key at all: uniform over all 7 keys.
    let mask = [
        1, 1, 1, 1, 1, 0, 0, //
        0, 1, 1, 0, 1, 1, 1,
    ];
    attention_case("causal, padded", shape(2, 7, 7, 2, 8, true), Some(&mask));
}

// =====================================================================================
// cross-entropy
// =====================================================================================

struct CeRef {
    losses: Vec<f64>,
    grad: Vec<f64>,
    bound_loss: Vec<f64>,
    bound_grad: Vec<f64>,
}

/// losses[r] = logsumexp(x[r]) − x[r, t], grad = grad_scale·(softmax − onehot), with bounds.
fn cross_entropy_ref(x: &[f64], targets: &[i32], classes: usize, grad_scale: f64) -> CeRef {
    let rows = targets.len();
    let mut r = CeRef {
        losses: vec![0.0; rows],
        grad: vec![0.0; x.len()],
        bound_loss: vec![0.0; rows],
        bound_grad: vec![0.0; x.len()],
    };
    for row in 0..rows {
        let xr = &x[row * classes..(row + 1) * classes];
        let t = targets[row] as usize;
        let m = xr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ln_sum = xr.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let lse = m + ln_sum;
        r.losses[row] = lse - xr[t];
        let range = xr.iter().map(|v| m - v).fold(0.0, f64::max);
        // The f32 sum of `classes` exps (≲ 2 ulp each, of arguments rounded to u·|x − m|) is off
        // by ≤ (classes + 4 + max|x − m|)·u relative, which ln turns into an absolute error;
        // m + ln Σ − x_t adds 2u·(|m| + |ln Σ| + |x_t|). 2× that.
        r.bound_loss[row] =
            2.0 * ((classes + 4) as f64 * U + range * U + 2.0 * U * (m.abs() + ln_sum.abs() + xr[t].abs()));
        for (j, &xj) in xr.iter().enumerate() {
            let p = (xj - lse).exp();
            let i = row * classes + j;
            r.grad[i] = grad_scale * (p - if j == t { 1.0 } else { 0.0 });
            // p_j = e^{x_j − m}/Σ·grad_scale: relative ≤ (classes + 8 + |x_j − m|)·u; the target
            // entry also rounds p_t·gs − gs: + u·|gs|. 2× that.
            r.bound_grad[i] = 2.0 * grad_scale.abs() * ((classes + 8) as f64 * U + (m - xj) * U) * p
                + if j == t { 2.0 * U * grad_scale.abs() } else { 0.0 };
        }
    }
    r
}

fn cross_entropy_case(rows: usize, classes: usize, grad_scale: f32, offset: f32) {
    let case = format!("cross_entropy rows={rows} classes={classes} grad_scale={grad_scale} offset={offset}");
    let mut rng = rng_for(&case);
    let mut logits = Vec::with_capacity(rows * classes);
    for r in 0..rows {
        // Row offsets ±offset: without the max shift, e^{x} overflows f32 for offset 100.
        let o = [offset, -offset, 0.0][r % 3];
        logits.extend(normal(&mut rng, classes, o, 3.0));
    }
    let mut targets: Vec<i32> = (0..rows).map(|_| rand::Rng::random_range(&mut rng, 0..classes as i32)).collect();
    targets[0] = 0;
    targets[rows - 1] = classes as i32 - 1;

    let be = backend();
    let mut lb = up(&be, "logits", &logits);
    let mut losses = nan_buf(&be, "losses", rows);
    let tb = up_ids(&be, "targets", &targets);
    be.cross_entropy_fused(&mut lb, &mut losses, &tb, classes, grad_scale).unwrap();

    let x64 = f64s(&logits);
    let gs = grad_scale as f64;
    let r = cross_entropy_ref(&x64, &targets, classes, gs);
    let grad = down(&be, &lb);
    assert_within(&format!("{case}: losses"), &down(&be, &losses), &r.losses, &r.bound_loss);
    assert_within(&format!("{case}: in-place gradient"), &grad, &r.grad, &r.bound_grad);
    // The in-place gradient is ∂L/∂logits of L = grad_scale · Σ_r losses[r].
    let g = fd_grads(&[x64], |x| gs * cross_entropy_ref(&x[0], &targets, classes, gs).losses.iter().sum::<f64>());
    assert_grad(&format!("{case}: gradient vs finite differences of grad_scale·Σ losses"), &grad, &g[0]);
}

#[test]
fn cross_entropy_odd_class_counts() {
    let Some(()) = runs_here(stringify!(cross_entropy_odd_class_counts)) else { return };
    cross_entropy_case(7, 129, 0.37, 5.0);
    cross_entropy_case(3, 1001, 2.5, 100.0);
    cross_entropy_case(4, 17, 1.0, 0.0);
}

#[test]
fn cross_entropy_rejects_out_of_range_targets() {
    let Some(()) = runs_here(stringify!(cross_entropy_rejects_out_of_range_targets)) else { return };
    let be = backend();
    let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0];
    for bad in [3, -1, i32::MAX] {
        let mut lb = up(&be, "logits", &logits);
        let mut losses = up(&be, "losses", &[7.0, 7.0]);
        let tb = up_ids(&be, "targets", &[1, bad]);
        let err = be.cross_entropy_fused(&mut lb, &mut losses, &tb, 3, 1.0).unwrap_err();
        assert!(matches!(err, RuntimeError::Invalid { op: "cross_entropy_fused", .. }), "{err}");
        assert!(err.to_string().contains(&bad.to_string()), "{err}");
        assert_eq!(down(&be, &lb), logits, "a refused call leaves the logits alone");
        assert_eq!(down(&be, &losses), [7.0, 7.0]);
    }
}

// =====================================================================================
// AdamW
// =====================================================================================

struct AdamRef {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

/// optax.adamw (eps_root 0, decay on every entry) in f64; `bias_correction` false only for the
/// sensitivity test.
fn adamw_ref(st: &mut AdamRef, grad: &[f32], s: &AdamWStep, bias_correction: bool) -> Vec<f64> {
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

fn adamw_step(lr: f32, step: u64, grad_scale: f32) -> AdamWStep {
    AdamWStep { lr, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.1, step, grad_scale }
}

/// Gradients of magnitude 0.1..3 (random sign): with grad_scale 0.37, |g| ≥ 0.037 ≫ eps, so
/// m̂/(√v̂ + eps) is well conditioned.
fn adamw_grad(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    uniform(rng, n, 0.1, 3.0).into_iter().map(|g| if rand::Rng::random_bool(rng, 0.5) { g } else { -g }).collect()
}

#[test]
fn adamw_matches_optax_for_three_steps() {
    let Some(()) = runs_here(stringify!(adamw_matches_optax_for_three_steps)) else { return };
    let n = 40_000; // more than one 32k chunk of the parallel loop
    let mut rng = rng_for("adamw n=40000");
    let p0 = normal(&mut rng, n, 0.0, 1.0);
    let be = backend();
    let mut p = up(&be, "param", &p0);
    let (mut m, mut v) = (be.zeros("m", n).unwrap(), be.zeros("v", n).unwrap());
    let mut st = AdamRef { p: f64s(&p0), m: vec![0.0; n], v: vec![0.0; n] };
    let (mut m_abs, mut bound_p) = (vec![0.0f64; n], vec![0.0f64; n]);
    for t in 1..=3u64 {
        let s = adamw_step(1e-3, t, 0.37);
        let grad = adamw_grad(&mut rng, n);
        be.adamw(&mut p, &up(&be, "grad", &grad), &mut m, &mut v, &s).unwrap();
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
        assert_within(&format!("adamw step {t}: m"), &down(&be, &m), &st.m, &bm);
        assert_within(&format!("adamw step {t}: v"), &down(&be, &v), &st.v, &bv);
        assert_within(&format!("adamw step {t}: param"), &down(&be, &p), &st.p, &bound_p);
        // The derived bound is the "≈1e-6 for lr 1e-3" level, relative to |p| where |p| > 1.
        assert!((0..n).all(|i| bound_p[i] < 1e-6 * st.p[i].abs().max(1.0)), "bound too loose");
    }
}

#[test]
fn adamw_rejects_step_zero() {
    let Some(()) = runs_here(stringify!(adamw_rejects_step_zero)) else { return };
    let be = backend();
    let (mut p, g) = (up(&be, "p", &[1.0]), up(&be, "g", &[1.0]));
    let (mut m, mut v) = (be.zeros("m", 1).unwrap(), be.zeros("v", 1).unwrap());
    let err = be.adamw(&mut p, &g, &mut m, &mut v, &adamw_step(1e-3, 0, 1.0)).unwrap_err();
    assert!(matches!(err, RuntimeError::Invalid { op: "adamw", .. }), "{err}");
    assert_eq!(down(&be, &p), [1.0]);
}

// =====================================================================================
// elementwise, reductions, data movement
// =====================================================================================

#[test]
fn elementwise_ops_are_exact() {
    let Some(()) = runs_here(stringify!(elementwise_ops_are_exact)) else { return };
    let n = 70_001; // several parallel chunks plus a ragged tail
    let mut rng = rng_for("elementwise n=70001");
    let (a, b) = (normal(&mut rng, n, 0.0, 2.0), normal(&mut rng, n, 1.0, 3.0));
    let be = backend();
    let (ab, bb) = (up(&be, "a", &a), up(&be, "b", &b));

    // One f32 rounding each, so the results must equal the host's f32 arithmetic bit for bit.
    let mut out = nan_buf(&be, "out", n);
    be.add(&mut out, &ab, &bb).unwrap();
    assert!(down(&be, &out).iter().zip(a.iter().zip(&b)).all(|(o, (a, b))| o.to_bits() == (a + b).to_bits()), "add");
    let mut acc = up(&be, "acc", &a);
    be.add_assign(&mut acc, &bb).unwrap();
    assert!(
        down(&be, &acc).iter().zip(a.iter().zip(&b)).all(|(o, (a, b))| o.to_bits() == (a + b).to_bits()),
        "add_assign"
    );
    be.scale(&mut acc, -0.37).unwrap();
    assert!(
        down(&be, &acc).iter().zip(a.iter().zip(&b)).all(|(o, (a, b))| o.to_bits() == ((a + b) * -0.37).to_bits()),
        "scale"
    );

    // Σx² in f32 runs of 256 summed in f64: relative error ≤ γ₂₅₇ (the square plus the run).
    let want: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
    let got = be.sum_squares(&ab).unwrap();
    assert!((got - want).abs() <= gamma(257) * want, "sum_squares {got} vs {want}");
    assert_eq!(be.sum_squares(&be.zeros("z", 0).unwrap()).unwrap(), 0.0);

    // fill, write, copy: data movement, exact.
    let mut f = nan_buf(&be, "f", n);
    be.fill(&mut f, 3.25).unwrap();
    assert!(down(&be, &f).iter().all(|&x| x == 3.25), "fill");
    be.write(&mut f, 10, &[1.0, 2.0, 3.0]).unwrap();
    be.copy(&mut f, n - 4, &ab, 5, 4).unwrap();
    let got = down(&be, &f);
    assert_eq!(&got[8..14], &[3.25, 3.25, 1.0, 2.0, 3.0, 3.25]);
    assert_eq!(&got[n - 5..], &[3.25, a[5], a[6], a[7], a[8]]);
    assert!(be.write(&mut f, n - 2, &[1.0, 2.0, 3.0]).is_err(), "write past the end");
    assert!(be.copy(&mut f, n - 3, &ab, 0, 4).is_err(), "copy past the end of dst");
    assert!(be.copy(&mut f, 0, &ab, n - 3, 4).is_err(), "copy past the end of src");
    assert_eq!(down(&be, &f), got, "refused writes change nothing");
    assert_eq!(be.buf_len(&f), n);

    // Length mismatches.
    let short = be.zeros("short", n - 1).unwrap();
    assert!(be.add(&mut out, &ab, &short).is_err());
    assert!(be.add_assign(&mut acc, &short).is_err());
}

#[test]
fn broadcast_rows_add_and_sum() {
    let Some(()) = runs_here(stringify!(broadcast_rows_add_and_sum)) else { return };
    let (blocks, row_len) = (9, 11);
    let mut rng = rng_for("broadcast rows 9x11");
    let x = normal(&mut rng, blocks * row_len, 0.0, 1.0);
    let row = normal(&mut rng, row_len, 0.0, 1.0);
    let acc0 = normal(&mut rng, row_len, 0.0, 1.0);
    let be = backend();
    let (rb, xb) = (up(&be, "row", &row), up(&be, "x", &x));

    let mut out = up(&be, "out", &x);
    be.add_broadcast_rows(&mut out, &rb, row_len).unwrap();
    let got = down(&be, &out);
    for i in 0..blocks * row_len {
        assert_eq!(got[i].to_bits(), (x[i] + row[i % row_len]).to_bits(), "add_broadcast_rows [{i}]");
    }

    // acc[j] += Σ_i x[i, j]: blocks + 1 terms, error ≤ γ_blocks·Σ|terms|.
    let mut acc = up(&be, "acc", &acc0);
    be.sum_broadcast_rows(&mut acc, &xb, row_len).unwrap();
    let want: Vec<f64> =
        (0..row_len).map(|j| acc0[j] as f64 + (0..blocks).map(|i| x[i * row_len + j] as f64).sum::<f64>()).collect();
    let bound: Vec<f64> = (0..row_len)
        .map(|j| {
            gamma(blocks) * (acc0[j].abs() as f64 + (0..blocks).map(|i| x[i * row_len + j].abs() as f64).sum::<f64>())
        })
        .collect();
    assert_within("sum_broadcast_rows", &down(&be, &acc), &want, &bound);

    // Only the first row_len elements of a longer row / acc take part; the rest is untouched.
    let long_row = up(&be, "long_row", &[row.as_slice(), &[1e6; 4]].concat());
    let mut out2 = up(&be, "out2", &x);
    be.add_broadcast_rows(&mut out2, &long_row, row_len).unwrap();
    assert_eq!(down(&be, &out2), got, "add_broadcast_rows with a longer row");
    let mut long_acc = up(&be, "long_acc", &[acc0.as_slice(), &[-5.0; 3]].concat());
    be.sum_broadcast_rows(&mut long_acc, &xb, row_len).unwrap();
    let long_got = down(&be, &long_acc);
    assert_eq!(&long_got[..row_len], down(&be, &acc).as_slice(), "sum_broadcast_rows with a longer acc");
    assert_eq!(&long_got[row_len..], &[-5.0; 3]);

    assert!(be.add_broadcast_rows(&mut out, &rb, row_len + 1).is_err(), "row shorter than row_len");
    assert!(be.sum_broadcast_rows(&mut acc, &xb, row_len + 1).is_err(), "acc shorter than row_len");
    let row7 = up(&be, "row7", &row[..7]);
    assert!(be.add_broadcast_rows(&mut out, &row7, 7).is_err(), "99 is not a multiple of 7");
    assert!(be.sum_broadcast_rows(&mut acc, &xb, 7).is_err());
}

// =====================================================================================
// shape errors and memory accounting
// =====================================================================================

fn is_shape_error<T>(r: dm_runtime::Result<T>, op: &str) -> bool {
    matches!(r, Err(RuntimeError::Shape { op: o, .. }) if o == op)
}

#[test]
fn matmul_shape_errors() {
    let Some(()) = runs_here(stringify!(matmul_shape_errors)) else { return };
    let be = backend();
    let s = spec(3, 4, 5, false, false, false);
    let (a, b, mut out) = (be.zeros("a", 15).unwrap(), be.zeros("b", 20).unwrap(), be.zeros("out", 12).unwrap());
    assert!(be.matmul(&mut out, &a, &b, s).is_ok());
    let (a_bad, b_bad, mut out_bad) =
        (be.zeros("a", 14).unwrap(), be.zeros("b", 21).unwrap(), be.zeros("out", 11).unwrap());
    assert!(is_shape_error(be.matmul(&mut out, &a_bad, &b, s), "matmul"));
    assert!(is_shape_error(be.matmul(&mut out, &a, &b_bad, s), "matmul"));
    assert!(is_shape_error(be.matmul(&mut out_bad, &a, &b, s), "matmul"));
}

#[test]
fn layernorm_shape_errors() {
    let Some(()) = runs_here(stringify!(layernorm_shape_errors)) else { return };
    let be = backend();
    let (rows, dim) = (4, 6);
    let z = |n: usize| be.zeros("t", n).unwrap();
    let (x, bias, scale) = (up(&be, "x", &[1.0; 24]), z(dim), up(&be, "s", &[1.0; 6]));
    let (mut out, mut mean, mut rstd) = (z(rows * dim), z(rows), z(rows));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&scale), &bias, dim).unwrap();
    assert!(is_shape_error(
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&scale), &bias, 5),
        "layernorm_forward"
    ));
    assert!(is_shape_error(
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&scale), &z(dim + 1), dim),
        "layernorm_forward"
    ));
    assert!(is_shape_error(
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&z(dim - 1)), &bias, dim),
        "layernorm_forward"
    ));
    assert!(is_shape_error(
        be.layernorm_forward(&mut out, &mut z(rows + 1), &mut rstd, &x, None, &bias, dim),
        "layernorm_forward"
    ));
    assert!(is_shape_error(
        be.layernorm_forward(&mut z(rows * dim - 1), &mut mean, &mut rstd, &x, None, &bias, dim),
        "layernorm_forward"
    ));
    assert!(is_shape_error(
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, None, &bias, 0),
        "layernorm_forward"
    ));

    let (mut dx, mut ds, mut db, dout) = (z(rows * dim), z(dim), z(dim), z(rows * dim));
    be.layernorm_backward(&mut dx, Some(&mut ds), &mut db, &dout, &x, &mean, &rstd, Some(&scale), dim, false).unwrap();
    let bad_dout = z(rows * dim + 1);
    assert!(is_shape_error(
        be.layernorm_backward(&mut dx, Some(&mut ds), &mut db, &bad_dout, &x, &mean, &rstd, Some(&scale), dim, false),
        "layernorm_backward"
    ));
    assert!(is_shape_error(
        be.layernorm_backward(
            &mut dx,
            Some(&mut ds),
            &mut z(dim + 2),
            &dout,
            &x,
            &mean,
            &rstd,
            Some(&scale),
            dim,
            false
        ),
        "layernorm_backward"
    ));
    assert!(is_shape_error(
        be.layernorm_backward(
            &mut dx,
            Some(&mut ds),
            &mut db,
            &dout,
            &x,
            &z(rows - 1),
            &rstd,
            Some(&scale),
            dim,
            false
        ),
        "layernorm_backward"
    ));
    let r = be.layernorm_backward(&mut dx, None, &mut db, &dout, &x, &mean, &rstd, Some(&scale), dim, false);
    assert!(matches!(r, Err(RuntimeError::Invalid { op: "layernorm_backward", .. })), "scale without dscale");
    // A scale or dscale of the wrong length: an error, not an index panic or a silently
    // truncated dscale.
    let short_scale = up(&be, "s", &[1.0; 5]);
    assert!(is_shape_error(
        be.layernorm_backward(&mut dx, Some(&mut ds), &mut db, &dout, &x, &mean, &rstd, Some(&short_scale), dim, false),
        "layernorm_backward"
    ));
    for bad in [dim - 1, dim + 1] {
        assert!(is_shape_error(
            be.layernorm_backward(
                &mut dx,
                Some(&mut z(bad)),
                &mut db,
                &dout,
                &x,
                &mean,
                &rstd,
                Some(&scale),
                dim,
                false
            ),
            "layernorm_backward"
        ));
    }
}

#[test]
fn attention_shape_errors() {
    let Some(()) = runs_here(stringify!(attention_shape_errors)) else { return };
    let be = backend();
    let sh = shape(2, 3, 4, 2, 8, false);
    let z = |n: usize| be.zeros("t", n).unwrap();
    let (nq, nk) = (2 * 3 * 16, 2 * 4 * 16);
    let (q, k, v) = (z(nq), z(nk), z(nk));
    let (mut out, mut lse) = (z(nq), z(sh.lse_len()));
    let mask = up_ids(&be, "mask", &[1; 8]);
    be.attention_forward(&mut out, &mut lse, &q, &k, &v, Some(&mask), sh).unwrap();
    let fwd = |q: &Buf,
               k: &Buf,
               v: &Buf,
               out: &mut Buf,
               lse: &mut Buf,
               mask: Option<&Ids>,
               sh| { be.attention_forward(out, lse, q, k, v, mask, sh) };
    assert!(is_shape_error(fwd(&z(nq - 1), &k, &v, &mut out, &mut lse, None, sh), "attention_forward"));
    assert!(is_shape_error(fwd(&q, &z(nk + 16), &v, &mut out, &mut lse, None, sh), "attention_forward"));
    assert!(is_shape_error(fwd(&q, &k, &z(nq), &mut out, &mut lse, None, sh), "attention_forward"));
    assert!(is_shape_error(fwd(&q, &k, &v, &mut z(nq + 1), &mut lse, None, sh), "attention_forward"));
    assert!(is_shape_error(fwd(&q, &k, &v, &mut out, &mut z(sh.lse_len() - 1), None, sh), "attention_forward"));
    let short_mask = up_ids(&be, "mask", &[1; 7]);
    assert!(is_shape_error(fwd(&q, &k, &v, &mut out, &mut lse, Some(&short_mask), sh), "attention_forward"));
    let causal = AttentionShape { causal: true, ..sh };
    assert!(
        matches!(fwd(&q, &k, &v, &mut out, &mut lse, None, causal), Err(RuntimeError::Invalid { .. })),
        "causal needs q_len == kv_len"
    );

    let (mut dq, mut dk, mut dv, dout) = (z(nq), z(nk), z(nk), z(nq));
    be.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, None, sh).unwrap();
    let r = be.attention_backward(&mut dq, &mut z(nk - 1), &mut dv, &dout, &q, &k, &v, &out, &lse, None, sh);
    assert!(is_shape_error(r, "attention_backward"));
    let r = be.attention_backward(&mut dq, &mut dk, &mut dv, &z(nq + 1), &q, &k, &v, &out, &lse, None, sh);
    assert!(is_shape_error(r, "attention_backward"));
    let r = be.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &z(1), None, sh);
    assert!(is_shape_error(r, "attention_backward"));
}

#[test]
fn other_ops_shape_errors() {
    let Some(()) = runs_here(stringify!(other_ops_shape_errors)) else { return };
    let be = backend();
    let z = |n: usize| be.zeros("t", n).unwrap();
    assert!(is_shape_error(be.gelu_glu_forward(&mut z(5), &z(5), &z(4)), "gelu_glu_forward"));
    assert!(is_shape_error(be.gelu_glu_backward(&mut z(5), &mut z(5), &z(5), &z(6), &z(5)), "gelu_glu_backward"));
    let ids = up_ids(&be, "ids", &[0, 1, 2]);
    assert!(is_shape_error(
        be.embedding_forward(&mut z(12), &z(19), &ids, VocabRange::full(5), 4),
        "embedding_forward"
    ));
    assert!(is_shape_error(
        be.embedding_forward(&mut z(11), &z(20), &ids, VocabRange::full(5), 4),
        "embedding_forward"
    ));
    assert!(is_shape_error(
        be.embedding_backward(&mut z(8), &z(12), &ids, VocabRange { start: 1, end: 4 }, 4),
        "embedding_backward"
    ));
    let targets = up_ids(&be, "targets", &[0, 1]);
    assert!(is_shape_error(be.cross_entropy_fused(&mut z(7), &mut z(2), &targets, 3, 1.0), "cross_entropy_fused"));
    assert!(is_shape_error(be.cross_entropy_fused(&mut z(6), &mut z(3), &targets, 3, 1.0), "cross_entropy_fused"));
    assert!(is_shape_error(be.adamw(&mut z(4), &z(4), &mut z(3), &mut z(4), &adamw_step(1e-3, 1, 1.0)), "adamw"));
}


// =====================================================================================
// sensitivity: the bounds above reject plausible bugs
// =====================================================================================

fn round32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

#[test]
fn matmul_bound_rejects_a_wrong_transpose() {
    let Some(()) = runs_here(stringify!(matmul_bound_rejects_a_wrong_transpose)) else { return };
    // Square shapes, so a misread layout still has the right length.
    let mut rng = rng_for("sensitivity matmul");
    let (a, b) = (f64s(&normal(&mut rng, 36, 0.0, 1.0)), f64s(&normal(&mut rng, 36, 0.0, 1.0)));
    let s = spec(6, 6, 6, false, false, false);
    let want = matmul_ref(&a, &b, s);
    let bound: Vec<f64> = matmul_ref(&abs64(&a), &abs64(&b), s).iter().map(|p| gamma(6) * p).collect();
    assert!(within_bound(&round32(&want), &want, &bound).is_ok());
    for bug in [spec(6, 6, 6, true, false, false), spec(6, 6, 6, false, true, false)] {
        assert!(within_bound(&round32(&matmul_ref(&a, &b, bug)), &want, &bound).is_err(), "{bug:?}");
    }
}

#[test]
fn attention_checks_reject_a_missing_scale_and_a_stopped_masked_gradient() {
    let Some(()) = runs_here(stringify!(attention_checks_reject_a_missing_scale_and_a_stopped_masked_gradient)) else { return };
    let sh = shape(2, 3, 5, 2, 8, false);
    let mask = [1, 0, 1, 1, 0, 0, 0, 0, 0, 0];
    let case = "sensitivity attention";
    let inp = attn_inputs(case, &sh);
    let run = attn_run(&inp, Some(&mask), sh);
    let (q, k, v, w) = (f64s(&inp.q), f64s(&inp.k), f64s(&inp.v), f64s(&inp.w));
    let good = attn_ref(&q, &k, &v, Some(&mask), &sh, alpha_of(&sh), None);
    let (out_bound, _) = attn_forward_bounds(&good, &q, &k, &v, &sh);
    assert!(within_bound(&run.out, &good.out, &out_bound).is_ok());
    // Without 1/√d the outputs differ far beyond the bound.
    let unscaled = attn_ref(&q, &k, &v, Some(&mask), &sh, 1.0, None);
    assert!(within_bound(&round32(&unscaled.out), &good.out, &out_bound).is_err());
    // A reference whose fully masked batch row is a constant (gradient stopped at the mask, as
    // jnp.where would give) disagrees with the op on dq: the check tells the two rules apart.
    let stopped = fd_grads(std::slice::from_ref(&q), |x| {
        weighted_sum(&w, &attn_ref(&x[0], &k, &v, Some(&mask), &sh, alpha_of(&sh), None).out)
    });
    let half = sh.q_len * sh.width();
    assert!(grad_rel_err(&run.dq[half..], &stopped[0][half..], GRAD_TOL).is_err());
    let flowing = fd_grads(&[q], |x| {
        weighted_sum(&w, &attn_ref(&x[0], &k, &v, Some(&mask), &sh, alpha_of(&sh), Some(&good.s)).out)
    });
    assert!(grad_rel_err(&run.dq[half..], &flowing[0][half..], GRAD_TOL).is_ok());
}

#[test]
fn layernorm_bound_rejects_unbiased_variance_and_missing_eps() {
    let Some(()) = runs_here(stringify!(layernorm_bound_rejects_unbiased_variance_and_missing_eps)) else { return };
    let (rows, dim) = (10, 50);
    let mut rng = rng_for("sensitivity layernorm");
    let x = layernorm_input(&mut rng, rows, dim);
    let bias = normal(&mut rng, dim, 0.0, 0.5);
    let be = backend();
    let (xb, bb) = (up(&be, "x", &x), up(&be, "bias", &bias));
    let (mut out, mut mean, mut rstd) =
        (nan_buf(&be, "out", rows * dim), nan_buf(&be, "mean", rows), nan_buf(&be, "rstd", rows));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &xb, None, &bb, dim).unwrap();
    let got = down(&be, &out);
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
    assert!(within_bound(&got, &good.out, &bound).is_ok());
    for (what, ddof, eps) in [("unbiased variance", 1.0, LN_EPS), ("no eps", 0.0, 0.0), ("eps 1e-6", 0.0, 1e-6)] {
        let bug = layernorm_ref_with(&x64, None, &b64, dim, ddof, eps);
        assert!(within_bound(&got, &bug.out, &bound).is_err(), "{what} should be rejected");
    }
}

#[test]
fn gelu_bound_rejects_the_tanh_approximation() {
    let Some(()) = runs_here(stringify!(gelu_bound_rejects_the_tanh_approximation)) else { return };
    let (a, b, _) = gelu_glu_inputs("sensitivity gelu", 200);
    let (a64, b64) = (f64s(&a), f64s(&b));
    let tanh_gelu =
        |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
    let approx: Vec<f64> = a64.iter().zip(&b64).map(|(&a, &b)| tanh_gelu(a) * b).collect();
    assert!(within_bound(&round32(&approx), &gelu_glu_ref(&a64, &b64), &gelu_glu_bound(&a64, &b64)).is_err());
}

#[test]
fn cross_entropy_checks_reject_a_missing_grad_scale() {
    let Some(()) = runs_here(stringify!(cross_entropy_checks_reject_a_missing_grad_scale)) else { return };
    let (rows, classes, gs) = (3, 129, 0.37);
    let mut rng = rng_for("sensitivity cross_entropy");
    let logits = normal(&mut rng, rows * classes, 0.0, 3.0);
    let targets = [5, 0, 128];
    let r = cross_entropy_ref(&f64s(&logits), &targets, classes, gs);
    let unscaled = cross_entropy_ref(&f64s(&logits), &targets, classes, 1.0);
    assert!(within_bound(&round32(&r.grad), &r.grad, &r.bound_grad).is_ok());
    assert!(within_bound(&round32(&unscaled.grad), &r.grad, &r.bound_grad).is_err());
    assert!(grad_rel_err(&round32(&unscaled.grad), &r.grad, GRAD_TOL).is_err());
}

#[test]
fn adamw_bound_rejects_missing_bias_correction() {
    let Some(()) = runs_here(stringify!(adamw_bound_rejects_missing_bias_correction)) else { return };
    let n = 500;
    let mut rng = rng_for("sensitivity adamw");
    let p0 = normal(&mut rng, n, 0.0, 1.0);
    let grad = adamw_grad(&mut rng, n);
    let s = adamw_step(1e-3, 1, 0.37);
    let be = backend();
    let mut p = up(&be, "p", &p0);
    let (mut m, mut v) = (be.zeros("m", n).unwrap(), be.zeros("v", n).unwrap());
    be.adamw(&mut p, &up(&be, "g", &grad), &mut m, &mut v, &s).unwrap();
    let got = down(&be, &p);
    let mut good = AdamRef { p: f64s(&p0), m: vec![0.0; n], v: vec![0.0; n] };
    let upd = adamw_ref(&mut good, &grad, &s, true);
    let bound: Vec<f64> = (0..n).map(|i| 2.0 * (U * good.p[i].abs() + 16.0 * U * 1e-3 * upd[i].abs())).collect();
    assert!(within_bound(&got, &good.p, &bound).is_ok());
    let mut bad = AdamRef { p: f64s(&p0), m: vec![0.0; n], v: vec![0.0; n] };
    adamw_ref(&mut bad, &grad, &s, false);
    assert!(within_bound(&got, &bad.p, &bound).is_err());
}
