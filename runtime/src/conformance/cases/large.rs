//! The model-sized cases ([`crate::conformance::large_cases`]): the bodies of the small cases at
//! the widths of DalleBart mini and mega (GEMMs of 2730 and 16385 columns, LayerNorm over 1024
//! and 2730, mini's attention shapes, head dims 24 to 128, the 16385-class loss), with the finite
//! differences at a few random entries per tensor. Too slow for `cargo test` on the CPU (their
//! f64 references alone take seconds); `gpu-check` runs them on each CUDA variant.

use super::*;

/// Finite-difference entries per tensor in the model-sized cases.
const FD_LARGE: FdEntries = FdEntries::Sampled(6);

pub fn large_matmul_model_shapes<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for (m, n, k) in [(67, 45, 131), (130, 2730, 64), (64, 16385, 40), (1, 1, 1)] {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for accumulate in [false, true] {
                matmul_case(be, ck, spec(m, n, k, trans_a, trans_b, accumulate), Some(6))?;
            }
        }
    }
    Ok(())
}

pub fn large_layernorm_model_widths<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for (rows, dim) in [(37, 64), (64, 1024), (19, 2730), (8, 100)] {
        for with_scale in [false, true] {
            for accumulate_dx in [false, true] {
                layernorm_case(be, ck, rows, dim, with_scale, accumulate_dx, FD_LARGE)?;
            }
        }
    }
    Ok(())
}

pub fn large_layernorm_shard_of_mega<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for with_scale in [false, true] {
        layernorm_shard_case(be, ck, LnShard { rows: 33, dim: 1365, dim_global: 2730 }, with_scale)?;
    }
    Ok(())
}

/// (name, shape, key mask) of the attention of mini's encoder, decoder and cross attention, and
/// of other head dims; masks with partial rows and (for two) a batch row that sees no key.
pub fn attention_model_shapes() -> Vec<(&'static str, AttentionShape, Option<Vec<i32>>)> {
    // (name, batch, q_len, kv_len, heads, head_dim, causal, mask: 0 none, 1 partial,
    //  2 partial + a fully masked batch row)
    let shapes = [
        ("encoder self", 3, 64, 64, 4, 64, false, 2u8),
        ("decoder causal", 2, 256, 256, 2, 64, true, 0),
        ("cross", 2, 256, 64, 2, 64, false, 2),
        ("odd causal+mask", 2, 100, 100, 3, 32, true, 1),
        ("hd24", 1, 70, 70, 2, 24, false, 0),
        ("hd80 cross", 1, 130, 90, 2, 80, false, 1),
        ("hd128 causal", 1, 128, 128, 1, 128, true, 0),
    ];
    let mut rng = rng_for("attention model shapes: masks");
    shapes
        .into_iter()
        .map(|(name, b, tq, tk, h, d, causal, mask_kind)| {
            let mask = (mask_kind > 0).then(|| {
                (0..b)
                    .flat_map(|bi| {
                        let len = if mask_kind == 2 && bi == 0 { 0 } else { rand::Rng::random_range(&mut rng, 1..=tk) };
                        (0..tk).map(move |j| (j < len) as i32)
                    })
                    .collect::<Vec<i32>>()
            });
            (name, shape(b, tq, tk, h, d, causal), mask)
        })
        .collect()
}

pub fn large_attention_model_shapes<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    for (name, sh, mask) in attention_model_shapes() {
        attention_case(be, ck, name, sh, mask.as_deref(), FD_LARGE)?;
    }
    Ok(())
}

pub fn large_cross_entropy_image_vocab<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    cross_entropy_case(be, ck, 33, 129, 0.25, 5.0, FD_LARGE)?;
    cross_entropy_case(be, ck, 64, 16385, 0.25, 5.0, FD_LARGE)?;
    vocab_parallel_case(be, ck, VocabShard { rows: 64, cols: 8200, valid: 8193, start: 8192 }, 0.25)?;
    Ok(())
}

pub fn large_embedding_image_vocab<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let mut rng = rng_for("large embedding ids");
    let ids: Vec<i32> = (0..512).map(|_| rand::Rng::random_range(&mut rng, -3..16405)).collect();
    embedding_case(be, ck, 16385, VocabRange::full(16385), 1024, &ids, FD_LARGE)?;
    let ids: Vec<i32> = (0..64).map(|_| rand::Rng::random_range(&mut rng, 0..300)).collect();
    embedding_case(be, ck, 300, VocabRange { start: 100, end: 200 }, 96, &ids, FD_LARGE)?;
    Ok(())
}

pub fn large_gelu_glu_and_elementwise<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    gelu_glu_case(be, ck, 2048 * 2730, FD_LARGE)?;
    elementwise_case(be, ck, (1 << 20) + 3)?;
    broadcast_rows_case(be, ck, 8, 256 * 1024 + 1)?;
    broadcast_rows_case(be, ck, 5, 64 * 3 + 1)?;
    Ok(())
}
