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

pub fn layernorm_shape_errors<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let (rows, dim) = (4, 6);
    let z = |n: usize| be.zeros("t", n);
    let (x, bias, scale) = (up(be, "x", &[1.0; 24])?, z(dim)?, up(be, "s", &[1.0; 6])?);
    let (mut out, mut mean, mut rstd) = (z(rows * dim)?, z(rows)?, z(rows)?);
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&scale), &bias, dim)?;
    check!(
        ck,
        is_shape_error(
            be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&scale), &bias, 5),
            "layernorm_forward"
        )
    );
    check!(
        ck,
        is_shape_error(
            be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&scale), &z(dim + 1)?, dim),
            "layernorm_forward"
        )
    );
    check!(
        ck,
        is_shape_error(
            be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, Some(&z(dim - 1)?), &bias, dim),
            "layernorm_forward"
        )
    );
    check!(
        ck,
        is_shape_error(
            be.layernorm_forward(&mut out, &mut z(rows + 1)?, &mut rstd, &x, None, &bias, dim),
            "layernorm_forward"
        )
    );
    check!(
        ck,
        is_shape_error(
            be.layernorm_forward(&mut z(rows * dim - 1)?, &mut mean, &mut rstd, &x, None, &bias, dim),
            "layernorm_forward"
        )
    );
    check!(
        ck,
        is_shape_error(be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, None, &bias, 0), "layernorm_forward")
    );

    let (mut dx, mut ds, mut db, dout) = (z(rows * dim)?, z(dim)?, z(dim)?, z(rows * dim)?);
    be.layernorm_backward(&mut dx, Some(&mut ds), &mut db, &dout, &x, &mean, &rstd, Some(&scale), dim, false)?;
    let bad_dout = z(rows * dim + 1)?;
    check!(
        ck,
        is_shape_error(
            be.layernorm_backward(
                &mut dx,
                Some(&mut ds),
                &mut db,
                &bad_dout,
                &x,
                &mean,
                &rstd,
                Some(&scale),
                dim,
                false
            ),
            "layernorm_backward"
        )
    );
    check!(
        ck,
        is_shape_error(
            be.layernorm_backward(
                &mut dx,
                Some(&mut ds),
                &mut z(dim + 2)?,
                &dout,
                &x,
                &mean,
                &rstd,
                Some(&scale),
                dim,
                false
            ),
            "layernorm_backward"
        )
    );
    check!(
        ck,
        is_shape_error(
            be.layernorm_backward(
                &mut dx,
                Some(&mut ds),
                &mut db,
                &dout,
                &x,
                &z(rows - 1)?,
                &rstd,
                Some(&scale),
                dim,
                false
            ),
            "layernorm_backward"
        )
    );
    let r = be.layernorm_backward(&mut dx, None, &mut db, &dout, &x, &mean, &rstd, Some(&scale), dim, false);
    check!(ck, matches!(r, Err(RuntimeError::Invalid { op: "layernorm_backward", .. })), "scale without dscale");
    // A scale or dscale of the wrong length: an error, not an index panic or a silently
    // truncated dscale.
    let short_scale = up(be, "s", &[1.0; 5])?;
    check!(
        ck,
        is_shape_error(
            be.layernorm_backward(
                &mut dx,
                Some(&mut ds),
                &mut db,
                &dout,
                &x,
                &mean,
                &rstd,
                Some(&short_scale),
                dim,
                false
            ),
            "layernorm_backward"
        )
    );
    for bad in [dim - 1, dim + 1] {
        check!(
            ck,
            is_shape_error(
                be.layernorm_backward(
                    &mut dx,
                    Some(&mut z(bad)?),
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
            )
        );
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
