//! See [`super`].

use super::*;

pub struct CeRef {
    pub losses: Vec<f64>,
    pub grad: Vec<f64>,
    pub bound_loss: Vec<f64>,
    pub bound_grad: Vec<f64>,
}

/// losses[r] = logsumexp(x[r]) − x[r, t], grad = grad_scale·(softmax − onehot), with bounds.
pub fn cross_entropy_ref(x: &[f64], targets: &[i32], classes: usize, grad_scale: f64) -> CeRef {
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

pub fn cross_entropy_case<B: Backend>(
    be: &B,
    ck: &mut Checks,
    rows: usize,
    classes: usize,
    grad_scale: f32,
    offset: f32,
    fd: FdEntries,
) -> CaseResult {
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

    let mut lb = up(be, "logits", &logits)?;
    let mut losses = nan_buf(be, "losses", rows)?;
    let tb = up_ids(be, "targets", &targets)?;
    be.cross_entropy_fused(&mut lb, &mut losses, &tb, classes, grad_scale)?;

    let x64 = f64s(&logits);
    let gs = grad_scale as f64;
    let r = cross_entropy_ref(&x64, &targets, classes, gs);
    let grad = down(be, &lb)?;
    ck.within(&format!("{case}: losses"), &down(be, &losses)?, &r.losses, &r.bound_loss);
    ck.within(&format!("{case}: in-place gradient"), &grad, &r.grad, &r.bound_grad);
    // The in-place gradient is ∂L/∂logits of L = grad_scale · Σ_r losses[r].
    let loss = |x: &[Vec<f64>]| gs * cross_entropy_ref(&x[0], &targets, classes, gs).losses.iter().sum::<f64>();
    let at = match fd {
        FdEntries::All => (0..x64.len()).collect(),
        // Random entries are almost all tiny probabilities (~1/classes) whose differences are
        // at the noise floor: add the target entries (−gs·(1 − p)) of as many rows.
        FdEntries::Sampled(n) => {
            let mut at = sample_indices(&mut rng, x64.len(), n);
            at.extend((0..rows.min(n)).map(|r| r * classes + targets[r] as usize));
            at.sort_unstable();
            at.dedup();
            at
        }
    };
    let g = fd_grads_at(&[x64], std::slice::from_ref(&at), loss);
    let at = [at];
    ck.grad(&format!("{case}: gradient vs finite differences of grad_scale·Σ losses"), &pick(&grad, &at[0]), &g[0]);
    Ok(())
}

pub fn cross_entropy_odd_class_counts<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    cross_entropy_case(be, ck, 7, 129, 0.37, 5.0, FdEntries::All)?;
    cross_entropy_case(be, ck, 3, 1001, 2.5, 100.0, FdEntries::All)?;
    cross_entropy_case(be, ck, 4, 17, 1.0, 0.0, FdEntries::All)?;
    Ok(())
}

pub fn cross_entropy_rejects_out_of_range_targets<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0];
    for bad in [3, -1, i32::MAX] {
        let mut lb = up(be, "logits", &logits)?;
        let mut losses = up(be, "losses", &[7.0, 7.0])?;
        let tb = up_ids(be, "targets", &[1, bad])?;
        let err = be.cross_entropy_fused(&mut lb, &mut losses, &tb, 3, 1.0).err().ok_or("a bad call was accepted")?;
        check!(ck, matches!(err, RuntimeError::Invalid { op: "cross_entropy_fused", .. }), "{err}");
        check!(ck, err.to_string().contains(&bad.to_string()), "{err}");
        check_eq!(ck, down(be, &lb)?, logits, "a refused call leaves the logits alone");
        check_eq!(ck, down(be, &losses)?, [7.0, 7.0]);
    }
    Ok(())
}
