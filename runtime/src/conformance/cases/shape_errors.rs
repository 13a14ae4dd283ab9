//! See [`super`].

use super::*;

pub fn is_shape_error<T>(r: crate::Result<T>, op: &str) -> bool {
    matches!(r, Err(RuntimeError::Shape { op: o, .. }) if o == op)
}

pub fn matmul_shape_errors<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let s = spec(3, 4, 5, false, false, false);
    let (a, b, mut out) = (be.zeros("a", 15)?, be.zeros("b", 20)?, be.zeros("out", 12)?);
    check!(ck, be.matmul(&mut out, &a, &b, s).is_ok());
    let (a_bad, b_bad, mut out_bad) = (be.zeros("a", 14)?, be.zeros("b", 21)?, be.zeros("out", 11)?);
    check!(ck, is_shape_error(be.matmul(&mut out, &a_bad, &b, s), "matmul"));
    check!(ck, is_shape_error(be.matmul(&mut out, &a, &b_bad, s), "matmul"));
    check!(ck, is_shape_error(be.matmul(&mut out_bad, &a, &b, s), "matmul"));
    Ok(())
}

/// Records whether `r` is the shape error of `op`.
pub fn shape_error_row<T>(ck: &mut Checks, what: &str, r: crate::Result<T>, op: &str) {
    let detail = match &r {
        Ok(_) => "accepted".to_string(),
        Err(e) => e.to_string(),
    };
    ck.holds(&format!("{op} refuses {what}"), is_shape_error(r, op), detail);
}

pub fn layernorm_shape_errors<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let (rows, dim) = (4, 6);
    let z = |n: usize| be.zeros("t", n);
    let (x, bias, scale) = (up(be, "x", &[1.0; 24])?, z(dim)?, up(be, "s", &[1.0; 6])?);
    let (mut out, mut mean, mut rstd) = (z(rows * dim)?, z(rows)?, z(rows)?);
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&scale), &bias, dim)?;
    // The forward with one argument replaced: (out, mean, scale, bias, dim).
    let mut fwd = |out_len: Option<usize>,
                   mean_len: Option<usize>,
                   scale: Option<&B::Buf>,
                   bias_len,
                   d|
     -> crate::Result<crate::Result<()>> {
        let mut out_bad = out_len.map(z).transpose()?;
        let mut mean_bad = mean_len.map(z).transpose()?;
        let bias_bad = z(bias_len)?;
        let out = out_bad.as_mut().unwrap_or(&mut out);
        let mean = mean_bad.as_mut().unwrap_or(&mut mean);
        let r = be.layernorm_forward(out, mean, &mut rstd, &x, scale, &bias_bad, d);
        Ok(r)
    };
    let op = "layernorm_forward";
    shape_error_row(ck, "a dim that does not divide x", fwd(None, None, Some(&scale), dim, 5)?, op);
    shape_error_row(ck, "a long bias", fwd(None, None, Some(&scale), dim + 1, dim)?, op);
    shape_error_row(ck, "a short scale", fwd(None, None, Some(&z(dim - 1)?), dim, dim)?, op);
    shape_error_row(ck, "a long mean", fwd(None, Some(rows + 1), None, dim, dim)?, op);
    shape_error_row(ck, "a short out", fwd(Some(rows * dim - 1), None, None, dim, dim)?, op);
    shape_error_row(ck, "dim 0", fwd(None, None, None, dim, 0)?, op);

    let (mut dx, mut ds, mut db, dout) = (z(rows * dim)?, z(dim)?, z(dim)?, z(rows * dim)?);
    be.layernorm_backward(&mut dx, Some(&mut ds), &mut db, &dout, &x, &mean, &rstd, Some(&scale), dim, false)?;
    // The backward with one length replaced: (dscale, dbias, dout, mean, scale); None = a
    // correct buffer, Some(0) for dscale = no dscale at all.
    let mut bwd = |ds_len: Option<usize>, db_len, dout_len, mean_len, scale_len| -> crate::Result<crate::Result<()>> {
        let mut ds_bad = match ds_len {
            Some(0) => None,
            Some(n) => Some(z(n)?),
            None => Some(z(dim)?),
        };
        let (mut db_bad, dout_bad, mean_bad, scale_bad) =
            (z(db_len)?, z(dout_len)?, z(mean_len)?, up(be, "s", &vec![1.0; scale_len])?);
        let r = be.layernorm_backward(
            &mut dx,
            ds_bad.as_mut(),
            &mut db_bad,
            &dout_bad,
            &x,
            &mean_bad,
            &rstd,
            Some(&scale_bad),
            dim,
            false,
        );
        Ok(r)
    };
    let op = "layernorm_backward";
    let n = rows * dim;
    shape_error_row(ck, "a long dout", bwd(None, dim, n + 1, rows, dim)?, op);
    shape_error_row(ck, "a long dbias", bwd(None, dim + 2, n, rows, dim)?, op);
    shape_error_row(ck, "a short mean", bwd(None, dim, n, rows - 1, dim)?, op);
    let r = bwd(Some(0), dim, n, rows, dim)?;
    check!(ck, matches!(r, Err(RuntimeError::Invalid { op: "layernorm_backward", .. })), "scale without dscale");
    // A scale or dscale of the wrong length: an error, not an index panic or a silently
    // truncated dscale.
    shape_error_row(ck, "a short scale", bwd(None, dim, n, rows, dim - 1)?, op);
    for bad in [dim - 1, dim + 1] {
        shape_error_row(ck, &format!("a dscale of {bad}"), bwd(Some(bad), dim, n, rows, dim)?, op);
    }
    Ok(())
}

pub fn attention_shape_errors<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let sh = shape(2, 3, 4, 2, 8, false);
    let z = |n: usize| be.zeros("t", n);
    let (nq, nk) = (2 * 3 * 16, 2 * 4 * 16);
    let (q, k, v) = (z(nq)?, z(nk)?, z(nk)?);
    let (mut out, mut lse) = (z(nq)?, z(sh.lse_len())?);
    let mask = up_ids(be, "mask", &[1; 8])?;
    be.attention_forward(&mut out, &mut lse, &q, &k, &v, Some(&mask), sh)?;
    let fwd = |q: &B::Buf, k: &B::Buf, v: &B::Buf, out: &mut B::Buf, lse: &mut B::Buf, mask: Option<&B::Ids>, sh| {
        be.attention_forward(out, lse, q, k, v, mask, sh)
    };
    check!(ck, is_shape_error(fwd(&z(nq - 1)?, &k, &v, &mut out, &mut lse, None, sh), "attention_forward"));
    check!(ck, is_shape_error(fwd(&q, &z(nk + 16)?, &v, &mut out, &mut lse, None, sh), "attention_forward"));
    check!(ck, is_shape_error(fwd(&q, &k, &z(nq)?, &mut out, &mut lse, None, sh), "attention_forward"));
    check!(ck, is_shape_error(fwd(&q, &k, &v, &mut z(nq + 1)?, &mut lse, None, sh), "attention_forward"));
    check!(ck, is_shape_error(fwd(&q, &k, &v, &mut out, &mut z(sh.lse_len() - 1)?, None, sh), "attention_forward"));
    let short_mask = up_ids(be, "mask", &[1; 7])?;
    check!(ck, is_shape_error(fwd(&q, &k, &v, &mut out, &mut lse, Some(&short_mask), sh), "attention_forward"));
    let causal = AttentionShape { causal: true, ..sh };
    check!(
        ck,
        matches!(fwd(&q, &k, &v, &mut out, &mut lse, None, causal), Err(RuntimeError::Invalid { .. })),
        "causal needs q_len == kv_len"
    );

    let (mut dq, mut dk, mut dv, dout) = (z(nq)?, z(nk)?, z(nk)?, z(nq)?);
    be.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, None, sh)?;
    let r = be.attention_backward(&mut dq, &mut z(nk - 1)?, &mut dv, &dout, &q, &k, &v, &out, &lse, None, sh);
    check!(ck, is_shape_error(r, "attention_backward"));
    let r = be.attention_backward(&mut dq, &mut dk, &mut dv, &z(nq + 1)?, &q, &k, &v, &out, &lse, None, sh);
    check!(ck, is_shape_error(r, "attention_backward"));
    let r = be.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &z(1)?, None, sh);
    check!(ck, is_shape_error(r, "attention_backward"));
    Ok(())
}

pub fn other_ops_shape_errors<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let z = |n: usize| be.zeros("t", n);
    check!(ck, is_shape_error(be.gelu_glu_forward(&mut z(5)?, &z(5)?, &z(4)?), "gelu_glu_forward"));
    check!(
        ck,
        is_shape_error(be.gelu_glu_backward(&mut z(5)?, &mut z(5)?, &z(5)?, &z(6)?, &z(5)?), "gelu_glu_backward")
    );
    let ids = up_ids(be, "ids", &[0, 1, 2])?;
    check!(
        ck,
        is_shape_error(be.embedding_forward(&mut z(12)?, &z(19)?, &ids, VocabRange::full(5), 4), "embedding_forward")
    );
    check!(
        ck,
        is_shape_error(be.embedding_forward(&mut z(11)?, &z(20)?, &ids, VocabRange::full(5), 4), "embedding_forward")
    );
    check!(
        ck,
        is_shape_error(
            be.embedding_backward(&mut z(8)?, &z(12)?, &ids, VocabRange { start: 1, end: 4 }, 4),
            "embedding_backward"
        )
    );
    let targets = up_ids(be, "targets", &[0, 1])?;
    check!(ck, is_shape_error(be.cross_entropy_fused(&mut z(7)?, &mut z(2)?, &targets, 3, 1.0), "cross_entropy_fused"));
    check!(ck, is_shape_error(be.cross_entropy_fused(&mut z(6)?, &mut z(3)?, &targets, 3, 1.0), "cross_entropy_fused"));
    check!(
        ck,
        is_shape_error(be.adamw(&mut z(4)?, &z(4)?, &mut z(3)?, &mut z(4)?, &adamw_step(1e-3, 1, 1.0)), "adamw")
    );
    Ok(())
}
