//! See [`super`].

use super::*;

pub fn visible(mask: Option<&[i32]>, sh: &AttentionShape, b: usize, i: usize, j: usize) -> bool {
    (!sh.causal || j <= i) && mask.is_none_or(|m| m[b * sh.kv_len + j] != 0)
}

pub fn q_idx(sh: &AttentionShape, b: usize, i: usize, h: usize, c: usize) -> usize {
    (b * sh.q_len + i) * sh.width() + h * sh.head_dim + c
}
pub fn kv_idx(sh: &AttentionShape, b: usize, j: usize, h: usize, c: usize) -> usize {
    (b * sh.kv_len + j) * sh.width() + h * sh.head_dim + c
}
pub fn row_idx(sh: &AttentionShape, b: usize, h: usize, i: usize) -> usize {
    (b * sh.heads + h) * sh.q_len + i
}

/// Scaled scores `alpha·q·k` per (b, h, i, j), flattened as `row_idx·kv_len + j`.
pub fn attn_scores(q: &[f64], k: &[f64], sh: &AttentionShape, alpha: f64) -> Vec<f64> {
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
pub fn attn_probs(s: &[f64], shift: &[f64], mask: Option<&[i32]>, sh: &AttentionShape) -> (Vec<f64>, Vec<f64>) {
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
pub fn attn_pv(p: &[f64], v: &[f64], sh: &AttentionShape) -> Vec<f64> {
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

pub struct AttnRef {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub p: Vec<f64>,
    pub s: Vec<f64>,
}

/// Attention in f64. `alpha` is the score scale (1/√head_dim for the op); `shift` is the frozen
/// score shift of fully masked rows (None: the current scores, i.e. exactly uniform).
pub fn attn_ref(
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

pub fn alpha_of(sh: &AttentionShape) -> f64 {
    1.0 / (sh.head_dim as f64).sqrt()
}

pub struct AttnInputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub w: Vec<f32>,
}

pub fn attn_inputs(case: &str, sh: &AttentionShape) -> AttnInputs {
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
pub fn attn_forward_bounds(r: &AttnRef, q: &[f64], k: &[f64], v: &[f64], sh: &AttentionShape) -> (Vec<f64>, Vec<f64>) {
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
pub fn fully_masked_rows(mask: Option<&[i32]>, sh: &AttentionShape) -> Vec<(usize, usize)> {
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

pub struct AttnRun {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

pub fn attn_run<B: Backend>(
    be: &B,
    inp: &AttnInputs,
    mask: Option<&[i32]>,
    sh: AttentionShape,
) -> crate::Result<AttnRun> {
    let (qb, kb, vb, wb) = (up(be, "q", &inp.q)?, up(be, "k", &inp.k)?, up(be, "v", &inp.v)?, up(be, "dout", &inp.w)?);
    let mb = mask.map(|m| up_ids(be, "mask", m)).transpose()?;
    let mut out = nan_buf(be, "out", inp.q.len())?;
    let mut lse = nan_buf(be, "lse", sh.lse_len())?;
    be.attention_forward(&mut out, &mut lse, &qb, &kb, &vb, mb.as_ref(), sh)?;
    let (mut dq, mut dk, mut dv) =
        (nan_buf(be, "dq", inp.q.len())?, nan_buf(be, "dk", inp.k.len())?, nan_buf(be, "dv", inp.v.len())?);
    be.attention_backward(&mut dq, &mut dk, &mut dv, &wb, &qb, &kb, &vb, &out, &lse, mb.as_ref(), sh)?;
    Ok(AttnRun {
        out: down(be, &out)?,
        lse: down(be, &lse)?,
        dq: down(be, &dq)?,
        dk: down(be, &dk)?,
        dv: down(be, &dv)?,
    })
}

pub fn attention_case<B: Backend>(
    be: &B,
    ck: &mut Checks,
    name: &str,
    sh: AttentionShape,
    mask: Option<&[i32]>,
    fd: FdEntries,
) -> CaseResult {
    let case = format!("attention {name} {sh:?}");
    let inp = attn_inputs(&case, &sh);
    let run = attn_run(be, &inp, mask, sh)?;
    let (q, k, v, w) = (f64s(&inp.q), f64s(&inp.k), f64s(&inp.v), f64s(&inp.w));
    let alpha = alpha_of(&sh);
    let r = attn_ref(&q, &k, &v, mask, &sh, alpha, None);

    // Forward.
    let (out_bound, lse_bound) = attn_forward_bounds(&r, &q, &k, &v, &sh);
    ck.within(&format!("{case}: out"), &run.out, &r.out, &out_bound);
    // lse of rows that see a key: the log-sum-exp of their scaled visible scores. Rows that see
    // none hold NaN: the CPU backend's marker of a uniform row (attention.rs), which its backward
    // reads; the trait leaves that value unspecified.
    let finite: Vec<usize> = (0..r.lse.len()).filter(|&i| r.lse[i].is_finite()).collect();
    let pick32 = |x: &[f32], idx: &[usize]| idx.iter().map(|&i| x[i]).collect::<Vec<f32>>();
    let pick64 = |x: &[f64], idx: &[usize]| idx.iter().map(|&i| x[i]).collect::<Vec<f64>>();
    ck.within(
        &format!("{case}: lse"),
        &pick32(&run.lse, &finite),
        &pick64(&r.lse, &finite),
        &pick64(&lse_bound, &finite),
    );
    for i in (0..r.lse.len()).filter(|&i| r.lse[i].is_nan()) {
        check!(
            ck,
            run.lse[i].is_nan(),
            "{case}: lse[{i}] of a fully masked row is {}, expected the NaN marker",
            run.lse[i]
        );
    }

    // Backward against finite differences, fully masked rows with their score shift frozen.
    let shift = r.s.clone();
    let loss = |x: &[Vec<f64>]| weighted_sum(&w, &attn_ref(&x[0], &x[1], &x[2], mask, &sh, alpha, Some(&shift)).out);
    let mut rng = rng_for(&format!("{case}: fd entries"));
    let (at, g) = fd_grads_picked(&mut rng, &[q, k, v], fd, loss);
    ck.grad(&format!("{case}: dq"), &pick(&run.dq, &at[0]), &g[0]);
    ck.grad(&format!("{case}: dk"), &pick(&run.dk, &at[1]), &g[1]);
    ck.grad(&format!("{case}: dv"), &pick(&run.dv, &at[2]), &g[2]);
    if fd != FdEntries::All {
        // Sampled entries land in fully masked rows in proportion to their share; the rows on
        // their own need every entry differenced (the small cases do that).
        return Ok(());
    }

    // The fully masked rows on their own, so an error there cannot hide under larger gradients.
    let w_ = sh.width();
    let masked = fully_masked_rows(mask, &sh);
    for &(b, i) in &masked {
        let o = (b * sh.q_len + i) * w_;
        ck.grad(&format!("{case}: dq of fully masked row b={b} i={i}"), &run.dq[o..o + w_], &g[0][o..o + w_]);
    }
    for b in 0..sh.batch {
        if masked.iter().filter(|&&(mb, _)| mb == b).count() == sh.q_len {
            let o = b * sh.kv_len * w_..(b + 1) * sh.kv_len * w_;
            ck.grad(&format!("{case}: dk of fully masked batch row {b}"), &run.dk[o.clone()], &g[1][o.clone()]);
            ck.grad(&format!("{case}: dv of fully masked batch row {b}"), &run.dv[o.clone()], &g[2][o]);
        }
    }
    Ok(())
}

pub fn shape(batch: usize, q_len: usize, kv_len: usize, heads: usize, head_dim: usize, causal: bool) -> AttentionShape {
    AttentionShape { batch, q_len, kv_len, heads, head_dim, causal }
}

pub fn attention_cross_no_mask<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    attention_case(be, ck, "cross", shape(2, 5, 7, 3, 8, false), None, FdEntries::All)?;
    attention_case(be, ck, "cross", shape(1, 9, 4, 1, 16, false), None, FdEntries::All)?;
    Ok(())
}

pub fn attention_cross_key_padding_and_fully_masked_batch_row<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    // Batch 0 sees every key, batch 1 some (any non-zero value means visible), batch 2 none.
    let mask = [
        1, 1, 1, 1, 1, 1, 1, 1, 1, //
        1, 1, 0, 1, 3, 0, 0, 1, 0, //
        0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    attention_case(be, ck, "cross, padded", shape(3, 4, 9, 2, 16, false), Some(&mask), FdEntries::All)?;
    let mask = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    attention_case(be, ck, "self, padded", shape(2, 5, 5, 3, 8, false), Some(&mask), FdEntries::All)?;
    Ok(())
}

pub fn attention_causal<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    attention_case(be, ck, "causal", shape(2, 6, 6, 1, 16, true), None, FdEntries::All)?;
    attention_case(be, ck, "causal", shape(1, 11, 11, 3, 8, true), None, FdEntries::All)?;
    Ok(())
}

pub fn attention_causal_with_key_padding<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    // Batch 1 pads key 0, so its query 0 sees no key at all: uniform over all 7 keys.
    let mask = [
        1, 1, 1, 1, 1, 0, 0, //
        0, 1, 1, 0, 1, 1, 1,
    ];
    attention_case(be, ck, "causal, padded", shape(2, 7, 7, 2, 8, true), Some(&mask), FdEntries::All)?;
    Ok(())
}
