//! The parameter list of every kernel the backend calls, as a string of argument kinds:
//! `P` pointer, `U` u64 count (both 8 bytes, `.u64` in PTX), `I` int (`.u32`), `F` float (`.f32`).
//!
//! The kernel call code refuses a call whose arguments do not match (an internal error instead of
//! undefined behaviour), and a test compares the table with the `.entry` parameter lists of the
//! PTX that NVRTC produces — so argument lists are checked on machines without a GPU.

/// `(family, entry point, signature)` of every called kernel.
pub(crate) const SIGNATURES: &[(&str, &str, &str)] = &[
    // matmul.cu: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta)
    ("matmul", "matmul_f32_nn", GEMM),
    ("matmul", "matmul_f32_nt", GEMM),
    ("matmul", "matmul_f32_tn", GEMM),
    ("matmul", "matmul_f32_tt", GEMM),
    ("matmul", "matmul_bf16_nn_128x128", GEMM),
    ("matmul", "matmul_bf16_nt_128x128", GEMM),
    ("matmul", "matmul_bf16_tn_128x128", GEMM),
    ("matmul", "matmul_bf16_tt_128x128", GEMM),
    ("matmul", "matmul_bf16_nn_64x64", GEMM),
    ("matmul", "matmul_bf16_nt_64x64", GEMM),
    ("matmul", "matmul_bf16_tn_64x64", GEMM),
    ("matmul", "matmul_bf16_tt_64x64", GEMM),
    // attention.cu / attention_tc.cu (f32 I/O entry points)
    ("attention", "attention_fwd_f32_hd32", ATT_FWD),
    ("attention", "attention_fwd_f32_hd64", ATT_FWD),
    ("attention", "attention_fwd_f32_hd128", ATT_FWD),
    ("attention", "attention_bwd_preprocess_f32", "PPPIIII"),
    ("attention", "attention_bwd_dkdv_f32_hd32", ATT_DKDV),
    ("attention", "attention_bwd_dkdv_f32_hd64", ATT_DKDV),
    ("attention", "attention_bwd_dkdv_f32_hd128", ATT_DKDV),
    ("attention", "attention_bwd_dq_f32_hd32", ATT_DQ),
    ("attention", "attention_bwd_dq_f32_hd64", ATT_DQ),
    ("attention", "attention_bwd_dq_f32_hd128", ATT_DQ),
    ("attention_tc", "attention_tc_fwd_f32_hd64", ATT_FWD),
    ("attention_tc", "attention_tc_fwd_f32_hd128", ATT_FWD),
    ("attention_tc", "attention_tc_bwd_dkdv_f32_hd64", ATT_DKDV),
    ("attention_tc", "attention_tc_bwd_dkdv_f32_hd128", ATT_DKDV),
    ("attention_tc", "attention_tc_bwd_dq_f32_hd64", ATT_DQ),
    ("attention_tc", "attention_tc_bwd_dq_f32_hd128", ATT_DQ),
    // cross_entropy.cu
    ("cross_entropy", "cross_entropy_fused_f32", "PPPIIIF"),
    ("cross_entropy", "vocab_parallel_max_f32", "PPIII"),
    ("cross_entropy", "vocab_parallel_sumexp_f32", "PPPPPIIII"),
    ("cross_entropy", "vocab_parallel_grad_f32", "PPPPPPIIIIF"),
    // layernorm.cu
    ("layernorm", "layernorm_forward_f32", "PPPPPPII"),
    ("layernorm", "layernorm_backward_f32", "PPPPPPPPIIII"),
    ("layernorm", "layernorm_param_grads_f32", "PPPII"),
    ("layernorm", "layernorm_sharded_sums_f32", "PPPII"),
    ("layernorm", "layernorm_sharded_stats_f32", "PPPPII"),
    ("layernorm", "layernorm_apply_f32", "PPPPPPII"),
    ("layernorm", "layernorm_backward_sums_f32", "PPPPPPII"),
    // glu.cu
    ("glu", "gelu_glu_forward_f32", "PPPU"),
    ("glu", "gelu_glu_backward_f32", "PPPPPU"),
    // embedding.cu
    ("embedding", "embedding_forward_f32", "PPPIIII"),
    ("embedding", "embedding_backward_f32", "PPPIIII"),
    ("embedding", "add_broadcast_rows_f32", "PPII"),
    ("embedding", "sum_broadcast_rows_f32", "PPII"),
    // adamw.cu: (param, grad, m, v, n, lr, b1, b2, eps, wd, bc1, bc2, grad_scale, grad_scale_dev)
    ("adamw", "adamw_f32", "PPPPUFFFFFFFFP"),
    // elementwise.cu
    ("elementwise", "fill_f32", "PFU"),
    ("elementwise", "add_f32", "PPPU"),
    ("elementwise", "add_assign_f32", "PPU"),
    ("elementwise", "scale_f32", "PFU"),
    ("elementwise", "sum_squares_partial_f32", "PUP"),
    ("elementwise", "sum_f64_finish", "PIPI"),
    ("elementwise", "cast_f32_to_bf16", "PPU"),
];

const GEMM: &str = "PPPIIIIIIFF";
/// (out, lse, q, k, v, mask, B, H, Tq, Tk, hd, causal, scale)
const ATT_FWD: &str = "PPPPPPIIIIIIF";
/// (dk, dv, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale)
const ATT_DKDV: &str = "PPPPPPPPPIIIIIIF";
/// (dq, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale)
const ATT_DQ: &str = "PPPPPPPPIIIIIIF";

/// The signature of `entry` of `family`, if the backend calls it.
pub(crate) fn signature(family: &str, entry: &str) -> Option<&'static str> {
    SIGNATURES.iter().find(|(f, e, _)| *f == family && *e == entry).map(|(_, _, s)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signature_names_a_real_entry_point() {
        for (fam, entry, sig) in SIGNATURES {
            let f = dm_kernels::family(fam).unwrap_or_else(|| panic!("no family {fam}"));
            assert!(f.entry_points.contains(entry), "{entry} is not an entry point of {fam}");
            assert!(sig.chars().all(|c| "PUIF".contains(c)), "{entry}: {sig}");
        }
    }

    /// Every `self.call_kernel("family", "entry"` (and `self.layernorm_per_row(op, "entry"`) literal in
    /// the op families' CUDA code, and every
    /// entry the kernel-call code build by name (GEMM and attention variants), has a signature.
    #[test]
    fn every_called_kernel_has_a_signature() {
        let src = [
            include_str!("ops.rs"),
            include_str!("../ops/adamw/cuda.rs"),
            include_str!("../ops/attention/cuda.rs"),
            include_str!("../ops/cross_entropy/cuda.rs"),
            include_str!("../ops/elementwise/cuda.rs"),
            include_str!("../ops/embedding/cuda.rs"),
            include_str!("../ops/gelu_glu/cuda.rs"),
            include_str!("../ops/layernorm/cuda.rs"),
            include_str!("../ops/matmul/cuda.rs"),
        ]
        .concat();
        let mut literal = 0;
        // Calls may be wrapped by rustfmt: the arguments are read past any whitespace.
        let quoted = |s: &str| -> Option<(String, String)> {
            let rest = s.trim_start().strip_prefix('"')?;
            let (first, rest) = rest.split_once('"')?;
            Some((first.to_string(), rest.to_string()))
        };
        for chunk in src.split("self.call_kernel(").skip(1) {
            let Some((fam, rest)) = quoted(chunk) else { continue };
            let Some((entry, _)) = rest.trim_start().strip_prefix(',').and_then(quoted) else { continue };
            assert!(signature(&fam, &entry).is_some(), "{fam}/{entry} called without a signature");
            literal += 1;
        }
        for chunk in src.split("self.layernorm_per_row(").skip(1) {
            let Some(after_op) = chunk.trim_start().strip_prefix("op,") else { continue };
            let Some((entry, _)) = quoted(after_op) else { continue };
            assert!(signature("layernorm", &entry).is_some(), "layernorm/{entry} called without a signature");
            literal += 1;
        }
        assert!(literal >= 25, "found only {literal} literal kernel calls in runtime/src/ops/*/cuda.rs");
        for t in ["n", "t"] {
            for u in ["n", "t"] {
                assert!(signature("matmul", &format!("matmul_f32_{t}{u}")).is_some());
                for tile in [super::super::grid::Bf16Tile::T128, super::super::grid::Bf16Tile::T64] {
                    assert!(signature("matmul", &format!("matmul_bf16_{t}{u}_{}", tile.suffix())).is_some());
                }
            }
        }
        use dm_kernels::grid::AttentionKernel as K;
        for hd in 1..=128 {
            for tc in [false, true] {
                let path = super::super::grid::AttentionPath::choose(hd, tc).unwrap();
                let fam = match path {
                    super::super::grid::AttentionPath::TensorCore { .. } => "attention_tc",
                    _ => "attention",
                };
                for k in [K::Forward, K::BackwardDkDv, K::BackwardDq] {
                    assert!(signature(fam, &path.entry(k)).is_some(), "{fam}/{}", path.entry(k));
                }
            }
        }
    }

    /// The signatures against the PTX NVRTC produces: `.param .u64` for P/U, `.u32` for I,
    /// `.f32` for F, in order. Needs libnvrtc (`scripts/cuda-ci-deps.sh`); SKIPs without it
    /// unless `DM_KERNELS_REQUIRE_NVRTC=1`.
    #[test]
    fn signatures_match_the_ptx_parameter_lists() {
        if let Err(e) = dm_kernels::nvrtc_available() {
            assert!(std::env::var("DM_KERNELS_REQUIRE_NVRTC").as_deref() != Ok("1"), "{e}");
            eprintln!("SKIP signatures_match_the_ptx_parameter_lists: {e}");
            return;
        }
        let mut families: Vec<&str> = SIGNATURES.iter().map(|s| s.0).collect();
        families.dedup();
        for fam in families {
            let ptx = dm_kernels::compile_ptx(dm_kernels::family(fam).unwrap(), "sm_90").unwrap().ptx;
            for (_, entry, sig) in SIGNATURES.iter().filter(|s| s.0 == fam) {
                let start = ptx.find(&format!(".entry {entry}(")).unwrap_or_else(|| panic!("{entry} not in the PTX"));
                let params = &ptx[start..start + ptx[start..].find(')').unwrap()];
                let kinds: String = params
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix(".param ."))
                    .map(|t| match &t[..3] {
                        "u64" | "b64" | "s64" => 'P',
                        "u32" | "b32" | "s32" => 'I',
                        "f32" => 'F',
                        other => panic!("{entry}: unexpected parameter type {other}"),
                    })
                    .collect();
                let want: String = sig.chars().map(|c| if c == 'U' { 'P' } else { c }).collect();
                assert_eq!(kinds, want, "{fam}/{entry}: PTX parameters vs the kernel-call signature");
            }
        }
    }
}
