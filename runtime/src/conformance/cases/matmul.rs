//! See [`super`].

use super::*;

pub fn spec(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> MatmulSpec {
    MatmulSpec { m, n, k, trans_a, trans_b, accumulate }
}

/// `op(a) · op(b)` in f64 with naive loops, reading `a`, `b` in their stored layouts.
pub fn matmul_ref(a: &[f64], b: &[f64], s: MatmulSpec) -> Vec<f64> {
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
pub fn matmul_backward<B: Backend>(
    be: &B,
    w: &B::Buf,
    a: &B::Buf,
    b: &B::Buf,
    s: MatmulSpec,
    da: &mut B::Buf,
    db: &mut B::Buf,
) -> crate::Result<()> {
    let (m, n, k) = (s.m, s.n, s.k);
    let () = match (s.trans_a, s.trans_b) {
        (false, false) => be.matmul(da, w, b, spec(m, k, n, false, true, false)), // dA = W·Bᵀ
        (false, true) => be.matmul(da, w, b, spec(m, k, n, false, false, false)), // dA = W·B
        (true, false) => be.matmul(da, b, w, spec(k, m, n, false, true, false)),  // dA[k,m] = B·Wᵀ
        (true, true) => be.matmul(da, b, w, spec(k, m, n, true, true, false)),    // dA[k,m] = Bᵀ·Wᵀ
    }?;
    let () = match (s.trans_a, s.trans_b) {
        (false, false) => be.matmul(db, a, w, spec(k, n, m, true, false, true)), // dB = Aᵀ·W
        (true, false) => be.matmul(db, a, w, spec(k, n, m, false, false, true)), // dB = A·W
        (false, true) => be.matmul(db, w, a, spec(n, k, m, true, false, true)),  // dB[n,k] = Wᵀ·A
        (true, true) => be.matmul(db, w, a, spec(n, k, m, true, true, true)),    // dB[n,k] = Wᵀ·Aᵀ
    }?;
    Ok(())
}

/// Forward and backward of one matmul configuration; `fd_samples` limits the finite
/// differences to that many random entries per tensor (for the large, parallel products).
pub fn matmul_case<B: Backend>(be: &B, ck: &mut Checks, s: MatmulSpec, fd_samples: Option<usize>) -> CaseResult {
    let MatmulSpec { m, n, k, trans_a, trans_b, accumulate } = s;
    let case = format!("matmul {m}x{n}x{k} trans_a={trans_a} trans_b={trans_b} accumulate={accumulate}");
    let mut rng = rng_for(&case);
    let a = normal(&mut rng, m * k, 0.0, 1.0);
    let b = normal(&mut rng, k * n, 0.0, 1.0);
    let w = normal(&mut rng, m * n, 0.0, 1.0);
    let out0 = normal(&mut rng, m * n, 0.0, 1.0);
    let db0 = normal(&mut rng, k * n, 0.0, 1.0);

    let (ab, bb, wb) = (up(be, "a", &a)?, up(be, "b", &b)?, up(be, "w", &w)?);
    let mut out = if accumulate { up(be, "out", &out0)? } else { nan_buf(be, "out", m * n)? };
    be.matmul(&mut out, &ab, &bb, s)?;

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
    ck.within(&format!("{case}: forward"), &down(be, &out)?, &want, &bound);

    let mut da = nan_buf(be, "da", m * k)?;
    let mut db = up(be, "db", &db0)?;
    matmul_backward(be, &wb, &ab, &bb, s, &mut da, &mut db)?;
    let (got_da, got_db) = (down(be, &da)?, down(be, &db)?);
    let w64 = f64s(&w);
    let loss = |x: &[Vec<f64>]| weighted_sum(&w64, &matmul_ref(&x[0], &x[1], s));
    let inputs = vec![a64, b64];
    let db0 = f64s(&db0);
    match fd_samples {
        None => {
            let g = fd_grads(&inputs, loss);
            ck.grad(&format!("{case}: dA"), &got_da, &g[0]);
            ck.grad(&format!("{case}: dB (accumulated)"), &got_db, &add64(&g[1], &db0));
        }
        Some(count) => {
            let at = vec![sample_indices(&mut rng, m * k, count), sample_indices(&mut rng, k * n, count)];
            let g = fd_grads_at(&inputs, &at, loss);
            let pick = |v: &[f32], idx: &[usize]| idx.iter().map(|&i| v[i]).collect::<Vec<f32>>();
            let db0_at: Vec<f64> = at[1].iter().map(|&i| db0[i]).collect();
            ck.grad(&format!("{case}: dA (sampled)"), &pick(&got_da, &at[0]), &g[0]);
            ck.grad(&format!("{case}: dB (accumulated, sampled)"), &pick(&got_db, &at[1]), &add64(&g[1], &db0_at));
        }
    }
    Ok(())
}

pub fn matmul_odd_sizes_all_transposes_and_accumulate<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            for accumulate in [false, true] {
                matmul_case(be, ck, spec(7, 13, 5, trans_a, trans_b, accumulate), None)?;
            }
        }
    }
    Ok(())
}

pub fn matmul_thin_shapes<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for (m, n, k) in [(1, 17, 3), (9, 1, 33), (4, 6, 1), (3, 5, 40)] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            matmul_case(be, ck, spec(m, n, k, trans_a, trans_b, trans_a), None)?;
        }
    }
    Ok(())
}

pub fn matmul_parallel_path_all_transposes<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    // 70·80·60 = 336 000 ≥ 2¹⁸ multiply-adds: the rayon-parallel gemm path (also for the
    // backward products, which have the same m·n·k).
    for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
        matmul_case(be, ck, spec(70, 80, 60, trans_a, trans_b, trans_a != trans_b), Some(40))?;
    }
    Ok(())
}

pub fn matmul_empty_inner_dimension<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let (a, b) = (up(be, "a", &[])?, up(be, "b", &[])?);
    let mut out = nan_buf(be, "out", 6)?;
    be.matmul(&mut out, &a, &b, spec(2, 3, 0, false, false, false))?;
    check_eq!(ck, down(be, &out)?, vec![0.0; 6], "k = 0 overwrites with zeros");
    let mut out = up(be, "out", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
    be.matmul(&mut out, &a, &b, spec(3, 2, 0, true, true, true))?;
    check_eq!(ck, down(be, &out)?, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "k = 0 accumulates nothing");
    Ok(())
}
