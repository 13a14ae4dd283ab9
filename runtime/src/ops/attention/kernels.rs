//! Kernel descriptors of `attention.cu` (f32 FlashAttention-2, head-dim variants 32/64/128) and
//! `attention_tc.cu` (bf16 tensor cores, variants 64/128, f32 or bf16 I/O), the tile and block
//! constants both sources receive as defines, and the choice of kernel, grid and dynamic shared
//! memory for a call ([`AttentionPath`]).

use crate::backend::AttentionShape;
use crate::cuda::grid::KernelGrid;
use crate::cuda::kernel::{DevicePtr as P, Kernel};
use dm_kernels::{Define, KernelFamily};

const F32_NAME: &str = "attention";
const TC_NAME: &str = "attention_tc";

/// Query/key tile of every attention kernel (`ATT_T` and `TC_T` in the sources).
pub const TILE: usize = 64;
/// Threads per block of the f32 kernels (`ATT_NT`).
pub const F32_THREADS: usize = 256;
/// Threads per block of the tensor-core kernels (`TC_NT`: 4 warps).
pub const TC_THREADS: usize = 128;
/// Head-dimension variants of the f32 kernels, and of the tensor-core kernels.
pub const F32_VARIANTS: [usize; 3] = [32, 64, 128];
pub const TC_VARIANTS: [usize; 2] = [64, 128];

/// (out, lse, q, k, v, mask, B, H, Tq, Tk, hd, causal, scale).
pub(crate) type ForwardArgs = (P, P, P, P, P, P, i32, i32, i32, i32, i32, i32, f32);
/// (dk, dv, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale).
pub(crate) type DkDvArgs = (P, P, P, P, P, P, P, P, P, i32, i32, i32, i32, i32, i32, f32);
/// (dq, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale).
pub(crate) type DqArgs = (P, P, P, P, P, P, P, P, i32, i32, i32, i32, i32, i32, f32);
/// (D, dout, out, B, H, Tq, hd).
pub(crate) type PreprocessArgs = (P, P, P, i32, i32, i32, i32);

/// Forward: out = softmax(scale·q·kᵀ + mask) · v per (batch, head), and the row log-sum-exp.
pub(crate) const FWD_F32: [Kernel<ForwardArgs>; 3] = [
    Kernel::new(F32_NAME, "attention_fwd_f32_hd32"),
    Kernel::new(F32_NAME, "attention_fwd_f32_hd64"),
    Kernel::new(F32_NAME, "attention_fwd_f32_hd128"),
];
/// Backward preprocess: D = rowsum(dout ∘ out) (f32 I/O, serves both paths).
pub(crate) const BWD_PREPROCESS_F32: Kernel<PreprocessArgs> = Kernel::new(F32_NAME, "attention_bwd_preprocess_f32");
/// Backward, one key tile a block: dk and dv (overwritten).
pub(crate) const BWD_DKDV_F32: [Kernel<DkDvArgs>; 3] = [
    Kernel::new(F32_NAME, "attention_bwd_dkdv_f32_hd32"),
    Kernel::new(F32_NAME, "attention_bwd_dkdv_f32_hd64"),
    Kernel::new(F32_NAME, "attention_bwd_dkdv_f32_hd128"),
];
/// Backward, one query tile a block: dq (overwritten).
pub(crate) const BWD_DQ_F32: [Kernel<DqArgs>; 3] = [
    Kernel::new(F32_NAME, "attention_bwd_dq_f32_hd32"),
    Kernel::new(F32_NAME, "attention_bwd_dq_f32_hd64"),
    Kernel::new(F32_NAME, "attention_bwd_dq_f32_hd128"),
];

/// The tensor-core forward, f32 I/O (bf16 MMAs inside).
pub(crate) const TC_FWD_F32: [Kernel<ForwardArgs>; 2] =
    [Kernel::new(TC_NAME, "attention_tc_fwd_f32_hd64"), Kernel::new(TC_NAME, "attention_tc_fwd_f32_hd128")];
/// The tensor-core forward with bf16 q, k, v, out (not called yet: activations are f32).
const TC_FWD_BF16: [Kernel<ForwardArgs>; 2] =
    [Kernel::new(TC_NAME, "attention_tc_fwd_bf16_hd64"), Kernel::new(TC_NAME, "attention_tc_fwd_bf16_hd128")];
/// D = rowsum(dout ∘ out) over bf16 dout and out (not called yet).
const TC_BWD_PREPROCESS_BF16: Kernel<PreprocessArgs> = Kernel::new(TC_NAME, "attention_tc_bwd_preprocess_bf16");
/// The tensor-core dk, dv, f32 I/O.
pub(crate) const TC_BWD_DKDV_F32: [Kernel<DkDvArgs>; 2] =
    [Kernel::new(TC_NAME, "attention_tc_bwd_dkdv_f32_hd64"), Kernel::new(TC_NAME, "attention_tc_bwd_dkdv_f32_hd128")];
/// The tensor-core dk, dv over bf16 tensors (not called yet).
const TC_BWD_DKDV_BF16: [Kernel<DkDvArgs>; 2] =
    [Kernel::new(TC_NAME, "attention_tc_bwd_dkdv_bf16_hd64"), Kernel::new(TC_NAME, "attention_tc_bwd_dkdv_bf16_hd128")];
/// The tensor-core dq, f32 I/O.
pub(crate) const TC_BWD_DQ_F32: [Kernel<DqArgs>; 2] =
    [Kernel::new(TC_NAME, "attention_tc_bwd_dq_f32_hd64"), Kernel::new(TC_NAME, "attention_tc_bwd_dq_f32_hd128")];
/// The tensor-core dq over bf16 tensors (not called yet).
const TC_BWD_DQ_BF16: [Kernel<DqArgs>; 2] =
    [Kernel::new(TC_NAME, "attention_tc_bwd_dq_bf16_hd64"), Kernel::new(TC_NAME, "attention_tc_bwd_dq_bf16_hd128")];

pub const F32_FAMILY: KernelFamily = KernelFamily {
    name: F32_NAME,
    file: "attention.cu",
    source: include_str!("attention.cu"),
    kernels: &[
        FWD_F32[0].decl(),
        FWD_F32[1].decl(),
        FWD_F32[2].decl(),
        BWD_PREPROCESS_F32.decl(),
        BWD_DKDV_F32[0].decl(),
        BWD_DKDV_F32[1].decl(),
        BWD_DKDV_F32[2].decl(),
        BWD_DQ_F32[0].decl(),
        BWD_DQ_F32[1].decl(),
        BWD_DQ_F32[2].decl(),
    ],
    defines: &[Define::new("ATT_T", TILE), Define::new("ATT_NT", F32_THREADS)],
};

pub const TC_FAMILY: KernelFamily = KernelFamily {
    name: TC_NAME,
    file: "attention_tc.cu",
    source: include_str!("attention_tc.cu"),
    kernels: &[
        TC_FWD_F32[0].decl(),
        TC_FWD_F32[1].decl(),
        TC_FWD_BF16[0].decl(),
        TC_FWD_BF16[1].decl(),
        TC_BWD_PREPROCESS_BF16.decl(),
        TC_BWD_DKDV_F32[0].decl(),
        TC_BWD_DKDV_F32[1].decl(),
        TC_BWD_DKDV_BF16[0].decl(),
        TC_BWD_DKDV_BF16[1].decl(),
        TC_BWD_DQ_F32[0].decl(),
        TC_BWD_DQ_F32[1].decl(),
        TC_BWD_DQ_BF16[0].decl(),
        TC_BWD_DQ_BF16[1].decl(),
    ],
    defines: &[Define::new("TC_T", TILE), Define::new("TC_NT", TC_THREADS)],
};

/// Which attention kernel, for the grid and shared memory of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    Forward,
    BackwardDkDv,
    BackwardDq,
}

/// Which attention kernel family serves a call, and its head-dimension variant (index into
/// [`F32_VARIANTS`] or [`TC_VARIANTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// attention.cu: f32 FlashAttention-2 (the parity path; also hd <= 32 in mixed precision).
    F32 { hdm: usize },
    /// attention_tc.cu `_f32` entry points: bf16 tensor cores, f32 I/O.
    TensorCore { hdm: usize },
}

/// The smallest of `variants` that serves `head_dim`.
fn variant(variants: &[usize], head_dim: usize) -> Option<usize> {
    variants.iter().copied().find(|&v| head_dim <= v && head_dim > 0)
}

impl AttentionPath {
    /// The f32 path for `head_dim`, or the tensor-core path when `tensor_cores` and hd > 32
    /// (the header of attention_tc.cu: hd <= 32 heads are cheaper on the f32 kernels).
    pub fn choose(head_dim: usize, tensor_cores: bool) -> Result<Self, String> {
        if tensor_cores && head_dim > 32 {
            if let Some(hdm) = variant(&TC_VARIANTS, head_dim) {
                return Ok(AttentionPath::TensorCore { hdm });
            }
        }
        variant(&F32_VARIANTS, head_dim)
            .map(|hdm| AttentionPath::F32 { hdm })
            .ok_or_else(|| format!("head_dim {head_dim} is not supported (the attention kernels serve 1..=128)"))
    }

    pub fn hdm(&self) -> usize {
        match *self {
            AttentionPath::F32 { hdm } | AttentionPath::TensorCore { hdm } => hdm,
        }
    }

    /// The index of this path's variant in its family's kernel arrays.
    fn index(&self) -> usize {
        let variants: &[usize] = match self {
            AttentionPath::F32 { .. } => &F32_VARIANTS,
            AttentionPath::TensorCore { .. } => &TC_VARIANTS,
        };
        variants.iter().position(|&v| v == self.hdm()).expect("paths are built from the variant lists")
    }

    /// The forward kernel of this path.
    pub(crate) fn forward(&self) -> Kernel<ForwardArgs> {
        match self {
            AttentionPath::F32 { .. } => FWD_F32[self.index()],
            AttentionPath::TensorCore { .. } => TC_FWD_F32[self.index()],
        }
    }

    /// The dK/dV backward kernel of this path.
    pub(crate) fn backward_dkdv(&self) -> Kernel<DkDvArgs> {
        match self {
            AttentionPath::F32 { .. } => BWD_DKDV_F32[self.index()],
            AttentionPath::TensorCore { .. } => TC_BWD_DKDV_F32[self.index()],
        }
    }

    /// The dQ backward kernel of this path.
    pub(crate) fn backward_dq(&self) -> Kernel<DqArgs> {
        match self {
            AttentionPath::F32 { .. } => BWD_DQ_F32[self.index()],
            AttentionPath::TensorCore { .. } => TC_BWD_DQ_F32[self.index()],
        }
    }

    /// Dynamic shared memory (bytes) of `kernel` on this path. Above 48 KiB the caller must raise
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` first.
    pub fn smem(&self, kernel: AttentionKernel) -> usize {
        let t = TILE;
        match *self {
            AttentionPath::F32 { hdm } => {
                let ld = hdm + 1; // row stride of a [64][hd] tile (padded against bank conflicts)
                let p = t * (t + 1); // one [64][64] probability / score tile
                let floats = match kernel {
                    // Q, K, V tiles, P, key-validity flags
                    AttentionKernel::Forward => 3 * t * ld + p + t,
                    // K, V, Q, dO tiles, Pᵀ and dSᵀ, lse, D, key validity
                    AttentionKernel::BackwardDkDv => 4 * t * ld + 2 * p + 3 * t,
                    // Q, dO, K, V tiles, dS, lse, D, key validity
                    AttentionKernel::BackwardDq => 4 * t * ld + p + 3 * t,
                };
                floats * 4
            }
            // 0 for the forward (static shared memory only); four [64][hdm] bf16 tiles plus three
            // 64-float rows for both backward kernels.
            AttentionPath::TensorCore { hdm } => match kernel {
                AttentionKernel::Forward => 0,
                AttentionKernel::BackwardDkDv | AttentionKernel::BackwardDq => 4 * t * hdm * 2 + 3 * t * 4,
            },
        }
    }

    /// Threads per block.
    pub fn threads(&self) -> usize {
        match self {
            AttentionPath::F32 { .. } => F32_THREADS,
            AttentionPath::TensorCore { .. } => TC_THREADS,
        }
    }

    /// KernelGrid of `kernel`: grid (ceil(T/64), B·H) with T = Tq (forward, dQ) or Tk (dK dV).
    pub fn grid(&self, kernel: AttentionKernel, s: &AttentionShape) -> Result<KernelGrid, String> {
        let t = match kernel {
            AttentionKernel::BackwardDkDv => s.kv_len,
            _ => s.q_len,
        };
        KernelGrid::new((t.div_ceil(TILE), s.batch * s.heads, 1), self.threads(), self.smem(kernel))
    }
}

/// `attention_bwd_preprocess_f32`: block 256 (8 warps, one (b, i, h) row each), grid ceil(B·Tq·H/8).
pub fn preprocess_grid(s: &AttentionShape) -> Result<KernelGrid, String> {
    KernelGrid::new(((s.batch * s.q_len * s.heads).div_ceil(8), 1, 1), 256, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::grid::check_smem;

    #[test]
    fn attention_paths_shapes_and_shared_memory() {
        let s = AttentionShape { batch: 8, q_len: 256, kv_len: 64, heads: 16, head_dim: 64, causal: false };
        let f32p = AttentionPath::choose(64, false).unwrap();
        assert_eq!(f32p, AttentionPath::F32 { hdm: 64 });
        assert_eq!(f32p.forward().entry, "attention_fwd_f32_hd64");
        let l = f32p.grid(AttentionKernel::Forward, &s).unwrap();
        assert_eq!((l.grid, l.block, l.smem), ((4, 128, 1), (256, 1, 1), 66_816));
        let l = f32p.grid(AttentionKernel::BackwardDkDv, &s).unwrap();
        assert_eq!((l.grid, l.smem), ((1, 128, 1), 100_608));
        assert_eq!(f32p.grid(AttentionKernel::BackwardDq, &s).unwrap().smem, 83_968);
        assert_eq!(AttentionPath::F32 { hdm: 32 }.backward_dq().entry, "attention_bwd_dq_f32_hd32");

        let tc = AttentionPath::choose(64, true).unwrap();
        assert_eq!(tc, AttentionPath::TensorCore { hdm: 64 });
        assert_eq!(tc.backward_dq().entry, "attention_tc_bwd_dq_f32_hd64");
        assert_eq!(AttentionPath::TensorCore { hdm: 128 }.backward_dkdv().entry, "attention_tc_bwd_dkdv_f32_hd128");
        let l = tc.grid(AttentionKernel::Forward, &s).unwrap();
        assert_eq!((l.block, l.smem), ((128, 1, 1), 0));
        assert_eq!(tc.grid(AttentionKernel::BackwardDkDv, &s).unwrap().smem, 33_536);
        assert_eq!(AttentionPath::TensorCore { hdm: 128 }.smem(AttentionKernel::BackwardDkDv), 66_304);
        // hd <= 32 stays on the f32 kernels even in mixed precision; hd > 128 is refused.
        assert_eq!(AttentionPath::choose(16, true).unwrap(), AttentionPath::F32 { hdm: 32 });
        assert_eq!(AttentionPath::choose(80, false).unwrap(), AttentionPath::F32 { hdm: 128 });
        assert_eq!(AttentionPath::choose(80, true).unwrap(), AttentionPath::TensorCore { hdm: 128 });
        assert!(AttentionPath::choose(129, false).is_err());
        assert!(AttentionPath::choose(0, false).is_err());
        // H100 allows 227 KiB per block; A100 163 KiB, too little for the f32 hd128 dK/dV kernel.
        let big = AttentionPath::F32 { hdm: 128 }.smem(AttentionKernel::BackwardDkDv);
        assert!(check_smem("dkdv", big, 232_448).is_ok());
        assert!(check_smem("dkdv", big, 166_912 - 1024).is_err());
        assert_eq!(preprocess_grid(&s).unwrap().grid.0, (8 * 256 * 16) / 8);
    }

    #[test]
    fn every_head_dim_has_a_kernel_on_both_paths() {
        for hd in 1..=128 {
            for tc in [false, true] {
                let p = AttentionPath::choose(hd, tc).unwrap();
                assert!(p.hdm() >= hd);
                let _ = (p.forward(), p.backward_dkdv(), p.backward_dq());
            }
        }
    }
}
