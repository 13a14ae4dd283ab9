//! bf16 operands: the GEMM and attention with their inputs rounded to bf16, against the f64
//! reference *of the rounded inputs*, so input rounding costs nothing and the bounds are those
//! of the arithmetic that follows (plus the roundings that path adds on purpose). The same bodies
//! serve bf16 storage (`zeros_typed(.., DType::Bf16)`, the CPU backend's and the bf16-mixed
//! policy's buffers) and a backend that rounds f32 operands itself (CUDA's
//! `Precision::Bf16Mixed` tensor-core path, which `gpu-check` runs them on).

use super::*;
use crate::DType;

/// How the bf16 operands of a case reach the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Operands {
    /// In bf16 buffers: storage rounds them (and the outputs the case stores in bf16).
    Stored,
    /// In f32 buffers: the backend rounds them itself (CUDA bf16-mixed); outputs are f32.
    RoundedByBackend,
}

impl Bf16Operands {
    fn dtype(self) -> DType {
        match self {
            Bf16Operands::Stored => DType::Bf16,
            Bf16Operands::RoundedByBackend => DType::F32,
        }
    }
}

/// A buffer of `dtype` holding NaN (rounded to bf16's NaN): an overwritten output.
pub fn nan_typed<B: Backend>(be: &B, name: &str, len: usize, dtype: DType) -> crate::Result<B::Buf> {
    let mut b = be.zeros_typed(name, len, dtype)?;
    be.fill(&mut b, f32::NAN)?;
    Ok(b)
}

/// `op(â)·op(b̂)` (into f32, and for stored operands also into a bf16 output). Products of two
/// bf16 values are exact in f32 (8 + 8 significand bits), so the only error is the f32
/// accumulation: ≤ γ_{2k}·Σ|âb̂| in any order, 2k since tensor cores may truncate rather than
/// round the aligned addends (≤ 2u a step). A bf16 output rounds once more: + u_bf16·(|want| + e).
/// A wrong rounding of the operands (truncation, a missed one) shows as ≈ u_bf16 ≫ γ errors.
pub fn matmul_bf16_case<B: Backend>(be: &B, ck: &mut Checks, s: MatmulSpec, ops: Bf16Operands) -> CaseResult {
    let MatmulSpec { m, n, k, trans_a, trans_b, accumulate } = s;
    let case = format!("matmul bf16 {ops:?} {m}x{n}x{k} trans_a={trans_a} trans_b={trans_b} accumulate={accumulate}");
    let mut rng = rng_for(&case);
    let (a, b) = (normal(&mut rng, m * k, 0.0, 1.0), normal(&mut rng, k * n, 0.0, 1.0));
    let out0 = normal(&mut rng, m * n, 0.0, 1.0);
    let dt = ops.dtype();
    let (ab, bb) = (be.upload_typed("a", &a, dt)?, be.upload_typed("b", &b, dt)?);
    let (a64, b64) = (f64s(&round_bf16_all(&a)), f64s(&round_bf16_all(&b)));
    let prod = matmul_ref(&a64, &b64, s);
    let prod_abs = matmul_ref(&abs64(&a64), &abs64(&b64), s);
    let outputs: &[DType] = match ops {
        Bf16Operands::Stored => &[DType::F32, DType::Bf16],
        Bf16Operands::RoundedByBackend => &[DType::F32],
    };
    for &out_dt in outputs {
        let o0 = if out_dt == DType::Bf16 { round_bf16_all(&out0) } else { out0.clone() };
        let mut out =
            if accumulate { be.upload_typed("out", &o0, out_dt)? } else { nan_typed(be, "out", m * n, out_dt)? };
        be.matmul(&mut out, &ab, &bb, s)?;
        let (mut want, mut bound) = (prod.clone(), vec![0.0; m * n]);
        for i in 0..m * n {
            let (acc, e) = if accumulate {
                (prod[i] + o0[i] as f64, gamma(2 * k + 2) * (prod_abs[i] + (o0[i] as f64).abs()))
            } else {
                (prod[i], gamma(2 * k) * prod_abs[i])
            };
            want[i] = acc;
            bound[i] = if out_dt == DType::Bf16 { e + U_BF16 * (acc.abs() + e) } else { e };
        }
        ck.within(&format!("{case}: forward into {out_dt}"), &down(be, &out)?, &want, &bound);
    }
    Ok(())
}

/// Relative tolerance (`max|got − want| / max|want|`) of an attention gradient on bf16 operands
/// against the finite differences of the rounded inputs' reference. What is still rounded: the
/// probabilities P and dS (tensor cores), or the stored output O that the backward reads and
/// the stored gradients (bf16 storage): at most two bf16 roundings per term of each gradient sum
/// (≤ 2u_bf16 relative per term), and the metric allows a cancellation ratio
/// Σ|terms| / max|gradient| of 4: 8·u_bf16 ≈ 3.1e-2. A missing scale or a stopped gradient is off
/// by O(1).
pub const BF16_ATTN_GRAD_TOL: f64 = 8.0 * U_BF16;

/// Attention forward and backward on bf16 operands (q, k, v and dout rounded). `out` within the
/// f32 bound of the rounded inputs plus u_bf16·Σⱼ pⱼ|vⱼ| (P rounded before P·V on tensor cores)
/// and, when stored in bf16, + u_bf16·(|out| + e); lse (f32) within its f32 bound; dq, dk, dv
/// within [`BF16_ATTN_GRAD_TOL`] of the finite differences.
pub fn attention_bf16_case<B: Backend>(
    be: &B,
    ck: &mut Checks,
    name: &str,
    sh: AttentionShape,
    mask: Option<&[i32]>,
    ops: Bf16Operands,
    fd: FdEntries,
) -> CaseResult {
    let case = format!("attention bf16 {ops:?} {name} {sh:?}");
    let raw = attn_inputs(&case, &sh);
    let inp = AttnInputs {
        q: round_bf16_all(&raw.q),
        k: round_bf16_all(&raw.k),
        v: round_bf16_all(&raw.v),
        w: round_bf16_all(&raw.w),
    };
    let dt = ops.dtype();
    let upl = |name: &str, x: &[f32]| be.upload_typed(name, x, dt);
    let (qb, kb, vb, wb) = (upl("q", &raw.q)?, upl("k", &raw.k)?, upl("v", &raw.v)?, upl("dout", &raw.w)?);
    let mb = mask.map(|m| up_ids(be, "mask", m)).transpose()?;
    let mut out = nan_typed(be, "out", inp.q.len(), dt)?;
    let mut lse = nan_buf(be, "lse", sh.lse_len())?;
    be.attention_forward(&mut out, &mut lse, &qb, &kb, &vb, mb.as_ref(), sh)?;
    let (mut dq, mut dk, mut dv) = (
        nan_typed(be, "dq", inp.q.len(), dt)?,
        nan_typed(be, "dk", inp.k.len(), dt)?,
        nan_typed(be, "dv", inp.v.len(), dt)?,
    );
    be.attention_backward(&mut dq, &mut dk, &mut dv, &wb, &qb, &kb, &vb, &out, &lse, mb.as_ref(), sh)?;

    let (q, k, v, w) = (f64s(&inp.q), f64s(&inp.k), f64s(&inp.v), f64s(&inp.w));
    let alpha = alpha_of(&sh);
    let r = attn_ref(&q, &k, &v, mask, &sh, alpha, None);
    let (f32_bound, lse_bound) = attn_forward_bounds(&r, &q, &k, &v, &sh);
    let pv_abs = attn_pv(&r.p, &abs64(&v), &sh);
    let out_bound: Vec<f64> = (0..r.out.len())
        .map(|i| {
            let e = f32_bound[i] + U_BF16 * pv_abs[i];
            if dt == DType::Bf16 {
                e + U_BF16 * (r.out[i].abs() + e)
            } else {
                e
            }
        })
        .collect();
    ck.within(&format!("{case}: out"), &down(be, &out)?, &r.out, &out_bound);
    let finite: Vec<usize> = (0..r.lse.len()).filter(|&i| r.lse[i].is_finite()).collect();
    let got_lse = down(be, &lse)?;
    ck.within(&format!("{case}: lse"), &pick(&got_lse, &finite), &pick(&r.lse, &finite), &pick(&lse_bound, &finite));

    let shift = r.s.clone();
    let loss = |x: &[Vec<f64>]| weighted_sum(&w, &attn_ref(&x[0], &x[1], &x[2], mask, &sh, alpha, Some(&shift)).out);
    let mut rng = rng_for(&format!("{case}: fd entries"));
    let (at, g) = fd_grads_picked(&mut rng, &[q, k, v], fd, loss);
    for (t, (label, buf)) in [("dq", &dq), ("dk", &dk), ("dv", &dv)].into_iter().enumerate() {
        let got = pick(&down(be, buf)?, &at[t]);
        match grad_rel(&got, &g[t]) {
            Ok(e) => ck.holds(
                &format!("{case}: {label} within {BF16_ATTN_GRAD_TOL:.1e} (relative {:.2e})", e.rel),
                e.rel <= BF16_ATTN_GRAD_TOL,
                e.describe(BF16_ATTN_GRAD_TOL),
            ),
            Err(why) => ck.holds(&format!("{case}: {label}"), false, why),
        }
    }
    Ok(())
}

/// The GEMM shapes the bf16 cases run: odd sizes, every transpose, with and without `+=`.
fn matmul_bf16_odd_sizes<B: Backend>(be: &B, ck: &mut Checks, ops: Bf16Operands) -> CaseResult {
    for (m, n, k) in [(7, 13, 5), (9, 1, 33), (3, 5, 40)] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            for accumulate in [false, true] {
                matmul_bf16_case(be, ck, MatmulSpec { m, n, k, trans_a, trans_b, accumulate }, ops)?;
            }
        }
    }
    Ok(())
}

fn attention_bf16_small<B: Backend>(be: &B, ck: &mut Checks, ops: Bf16Operands) -> CaseResult {
    let mask = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    attention_bf16_case(be, ck, "self, padded", shape(2, 5, 5, 3, 8, false), Some(&mask), ops, FdEntries::All)?;
    attention_bf16_case(be, ck, "causal", shape(1, 11, 11, 2, 16, true), None, ops, FdEntries::All)?;
    Ok(())
}

pub fn matmul_bf16_storage_odd_sizes<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    matmul_bf16_odd_sizes(be, ck, Bf16Operands::Stored)
}

pub fn attention_bf16_storage<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    attention_bf16_small(be, ck, Bf16Operands::Stored)
}

/// For a backend that rounds f32 operands itself (see [`crate::conformance::bf16_mixed_cases`]).
pub fn matmul_bf16_rounded_by_backend<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    matmul_bf16_odd_sizes(be, ck, Bf16Operands::RoundedByBackend)?;
    for (m, n, k) in [(67, 45, 131), (130, 2730, 64), (64, 16385, 40), (256, 2730, 1024)] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let s = MatmulSpec { m, n, k, trans_a, trans_b, accumulate: trans_a };
            matmul_bf16_case(be, ck, s, Bf16Operands::RoundedByBackend)?;
        }
    }
    Ok(())
}

/// For a backend that rounds f32 operands itself: small shapes and those of the model, all with
/// head_dim > 32 (CUDA's bf16-mixed attention takes the tensor-core path, which rounds, from
/// head_dim 33; below it computes in f32, which the rounded inputs' reference would reject).
pub fn attention_bf16_rounded_by_backend<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let ops = Bf16Operands::RoundedByBackend;
    let mask = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    attention_bf16_case(be, ck, "self, padded", shape(2, 5, 5, 2, 40, false), Some(&mask), ops, FdEntries::All)?;
    attention_bf16_case(be, ck, "causal", shape(1, 11, 11, 1, 48, true), None, ops, FdEntries::All)?;
    for (name, sh, mask) in super::large::attention_model_shapes().into_iter().filter(|s| s.1.head_dim > 32) {
        attention_bf16_case(be, ck, name, sh, mask.as_deref(), ops, FdEntries::Sampled(6))?;
    }
    Ok(())
}
