//! The kernel families: one `.cu` file each, with the names of its `extern "C"` entry points.

/// Helpers shared by every family (bf16 conversion, warp/block reductions, grid-stride helpers).
/// [`crate::compile_ptx`] prepends it to each family's source; it holds no kernel.
pub const PRELUDE: &str = include_str!("../cuda/common.cuh");

/// One `.cu` file: a family of kernels compiled together as one NVRTC program (one PTX module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFamily {
    /// Short name, also the module name the backend loads the PTX under (e.g. `"matmul"`).
    pub name: &'static str,
    /// File name under `kernels/cuda/`.
    pub file: &'static str,
    /// The CUDA C source (without [`PRELUDE`]).
    pub source: &'static str,
    /// Every `extern "C" __global__` function of the file, in source order.
    pub entry_points: &'static [&'static str],
    /// Extra NVRTC options for this family. None uses `--use_fast_math`: every family must match
    /// the CPU reference to a few ulp in the fp32 parity mode.
    pub extra_options: &'static [&'static str],
}

static FAMILIES: [KernelFamily; 9] = [
    KernelFamily {
        name: "matmul",
        file: "matmul.cu",
        source: include_str!("../cuda/matmul.cu"),
        entry_points: &[
            "matmul_bf16_nn_128x128",
            "matmul_bf16_nt_128x128",
            "matmul_bf16_tn_128x128",
            "matmul_bf16_tt_128x128",
            "matmul_bf16_nn_64x64",
            "matmul_bf16_nt_64x64",
            "matmul_bf16_tn_64x64",
            "matmul_bf16_tt_64x64",
            "matmul_f32_nn",
            "matmul_f32_nt",
            "matmul_f32_tn",
            "matmul_f32_tt",
        ],
        extra_options: &[],
    },
    KernelFamily {
        name: "attention",
        file: "attention.cu",
        source: include_str!("../cuda/attention.cu"),
        entry_points: &[
            "attention_fwd_f32_hd32",
            "attention_fwd_f32_hd64",
            "attention_fwd_f32_hd128",
            "attention_bwd_preprocess_f32",
            "attention_bwd_dkdv_f32_hd32",
            "attention_bwd_dkdv_f32_hd64",
            "attention_bwd_dkdv_f32_hd128",
            "attention_bwd_dq_f32_hd32",
            "attention_bwd_dq_f32_hd64",
            "attention_bwd_dq_f32_hd128",
        ],
        extra_options: &[],
    },
    KernelFamily {
        name: "attention_tc",
        file: "attention_tc.cu",
        source: include_str!("../cuda/attention_tc.cu"),
        entry_points: &[
            "attention_tc_fwd_f32_hd64",
            "attention_tc_fwd_f32_hd128",
            "attention_tc_fwd_bf16_hd64",
            "attention_tc_fwd_bf16_hd128",
            "attention_tc_bwd_preprocess_bf16",
            "attention_tc_bwd_dkdv_f32_hd64",
            "attention_tc_bwd_dkdv_f32_hd128",
            "attention_tc_bwd_dkdv_bf16_hd64",
            "attention_tc_bwd_dkdv_bf16_hd128",
            "attention_tc_bwd_dq_f32_hd64",
            "attention_tc_bwd_dq_f32_hd128",
            "attention_tc_bwd_dq_bf16_hd64",
            "attention_tc_bwd_dq_bf16_hd128",
        ],
        extra_options: &[],
    },
    KernelFamily {
        name: "cross_entropy",
        file: "cross_entropy.cu",
        source: include_str!("../cuda/cross_entropy.cu"),
        entry_points: &[
            "cross_entropy_fused_f32",
            "vocab_parallel_max_f32",
            "vocab_parallel_sumexp_f32",
            "vocab_parallel_grad_f32",
        ],
        extra_options: &[],
    },
    KernelFamily {
        name: "layernorm",
        file: "layernorm.cu",
        source: include_str!("../cuda/layernorm.cu"),
        entry_points: &[
            "layernorm_forward_f32",
            "layernorm_backward_f32",
            "layernorm_param_grads_f32",
            "layernorm_sharded_sums_f32",
            "layernorm_sharded_stats_f32",
            "layernorm_apply_f32",
            "layernorm_backward_sums_f32",
        ],
        extra_options: &[],
    },
    KernelFamily {
        name: "glu",
        file: "glu.cu",
        source: include_str!("../cuda/glu.cu"),
        entry_points: &["gelu_glu_forward_f32", "gelu_glu_backward_f32"],
        extra_options: &[],
    },
    KernelFamily {
        name: "embedding",
        file: "embedding.cu",
        source: include_str!("../cuda/embedding.cu"),
        entry_points: &[
            "embedding_forward_f32",
            "embedding_backward_f32",
            "add_broadcast_rows_f32",
            "sum_broadcast_rows_f32",
        ],
        extra_options: &[],
    },
    KernelFamily {
        name: "adamw",
        file: "adamw.cu",
        source: include_str!("../cuda/adamw.cu"),
        entry_points: &["adamw_f32", "adamw_f32_bf16copy"],
        extra_options: &[],
    },
    KernelFamily {
        name: "elementwise",
        file: "elementwise.cu",
        source: include_str!("../cuda/elementwise.cu"),
        entry_points: &[
            "fill_f32",
            "add_f32",
            "add_assign_f32",
            "scale_f32",
            "sum_squares_partial_f32",
            "sum_f64_finish",
            "cast_f32_to_bf16",
            "cast_bf16_to_f32",
        ],
        extra_options: &[],
    },
];

/// All kernel families.
pub fn families() -> &'static [KernelFamily] {
    &FAMILIES
}

/// The family called `name`, if any.
pub fn family(name: &str) -> Option<&'static KernelFamily> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// The `extern "C" __global__` function names declared in `source`, in order.
#[cfg(test)]
fn declared_entry_points(source: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__ void ";
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(pos) = rest.find(MARK) {
        rest = &rest[pos + MARK.len()..];
        // Skip an optional `__launch_bounds__(...)` between `void` and the name.
        let mut tail = rest.trim_start();
        if let Some(after) = tail.strip_prefix("__launch_bounds__(") {
            tail = after.split_once(')').map_or("", |(_, t)| t).trim_start();
        }
        let name: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        names.push(name);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_point_lists_match_the_sources() {
        for f in families() {
            let declared = declared_entry_points(f.source);
            assert_eq!(declared, f.entry_points, "family {} ({})", f.name, f.file);
        }
    }

    #[test]
    fn every_family_opens_with_a_comment_and_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for f in families() {
            assert!(f.source.starts_with("// "), "{} must open with its description comment", f.file);
            assert!(f.file.ends_with(".cu") && f.file.starts_with(f.name));
            for e in f.entry_points {
                assert!(seen.insert(*e), "entry point {e} defined twice");
            }
        }
        assert!(!PRELUDE.contains("__global__ void"), "the prelude holds no kernel");
    }

    #[test]
    fn no_family_uses_fast_math() {
        for f in families() {
            assert!(f.extra_options.iter().all(|o| !o.contains("fast_math") && !o.contains("fast-math")));
        }
    }
}
