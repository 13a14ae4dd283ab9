//! Grid constants the CUDA kernel-call code needs: tile sizes, block sizes and dynamic shared memory.
//! They restate what the `.cu` files document above each kernel; keep both in step.

/// bf16 tensor-core GEMM tiles: (BM, BN, threads per block). Grid: (ceil(n/BN), ceil(m/BM), splits).
/// Static shared memory only (48 KiB for 128×128, 24 KiB for 64×64): no opt-in needed.
pub const MATMUL_BF16_128: (usize, usize, usize) = (128, 128, 256);
pub const MATMUL_BF16_64: (usize, usize, usize) = (64, 64, 128);
/// K tile of both bf16 GEMMs: with split-K, each split covers a whole number of these.
pub const MATMUL_BF16_BK: usize = 32;
/// f32 SIMT GEMM tile: (BM, BN, threads). Grid: (ceil(n/64), ceil(m/64), splits).
pub const MATMUL_F32: (usize, usize, usize) = (64, 64, 256);
pub const MATMUL_F32_BK: usize = 16;

/// Attention: query/key tile and block size of every f32 attention kernel.
pub const ATTENTION_TILE: usize = 64;
pub const ATTENTION_THREADS: usize = 256;

/// Which attention kernel, for [`attention_smem_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    Forward,
    BackwardDkDv,
    BackwardDq,
}

/// The head-dimension variant (32, 64 or 128) that serves `head_dim`, or None above 128.
pub fn attention_variant(head_dim: usize) -> Option<usize> {
    [32, 64, 128].into_iter().find(|&v| head_dim <= v && head_dim > 0)
}

/// Dynamic shared memory (bytes) of an f32 attention kernel compiled for head-dim variant `hdm`.
/// Above 48 KiB the caller must raise `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` first.
pub fn attention_smem_bytes(kernel: AttentionKernel, hdm: usize) -> usize {
    let t = ATTENTION_TILE;
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

/// Tensor-core attention (attention_tc.cu): 64-row tiles, 4 warps.
pub const ATTENTION_TC_THREADS: usize = 128;

/// The tensor-core head-dimension variant (64 or 128) that serves `head_dim`, or None above 128.
pub fn attention_tc_variant(head_dim: usize) -> Option<usize> {
    [64, 128].into_iter().find(|&v| head_dim <= v && head_dim > 0)
}

/// Dynamic shared memory (bytes) of the tensor-core attention kernels compiled for variant `hdm`:
/// 0 for the forward (static shared memory only), `4·64·hdm` bf16 tiles plus three 64-float rows
/// for `BackwardDkDv` and `BackwardDq` (66,304 B at hdm 128: above 48 KiB, so raise
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` first).
pub fn attention_tc_smem_bytes(kernel: AttentionKernel, hdm: usize) -> usize {
    match kernel {
        AttentionKernel::Forward => 0,
        AttentionKernel::BackwardDkDv | AttentionKernel::BackwardDq => {
            4 * ATTENTION_TILE * hdm * 2 + 3 * ATTENTION_TILE * 4
        }
    }
}

/// Largest `dim` `layernorm_backward_f32` handles with `threads` per block (16 columns a thread).
pub const LAYERNORM_BWD_COLS_PER_THREAD: usize = 16;

/// The block size for `layernorm_backward_f32` on rows of `dim`.
pub fn layernorm_backward_threads(dim: usize) -> usize {
    dim.div_ceil(LAYERNORM_BWD_COLS_PER_THREAD).next_multiple_of(32).clamp(64, 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_variants_and_smem() {
        assert_eq!(attention_variant(16), Some(32));
        assert_eq!(attention_variant(64), Some(64));
        assert_eq!(attention_variant(80), Some(128));
        assert_eq!(attention_variant(129), None);
        assert_eq!(attention_smem_bytes(AttentionKernel::Forward, 64), (3 * 64 * 65 + 64 * 65 + 64) * 4);
        assert!(attention_smem_bytes(AttentionKernel::BackwardDkDv, 128) <= 227 * 1024);
        assert_eq!(attention_tc_variant(16), Some(64));
        assert_eq!(attention_tc_smem_bytes(AttentionKernel::BackwardDq, 64), 33_536);
        assert_eq!(attention_tc_smem_bytes(AttentionKernel::BackwardDkDv, 128), 66_304);
    }

    #[test]
    fn layernorm_block_covers_dim() {
        for dim in [16, 64, 1024, 2730, 4096, 16384] {
            let t = layernorm_backward_threads(dim);
            assert!(t * LAYERNORM_BWD_COLS_PER_THREAD >= dim && t.is_multiple_of(32) && t <= 1024, "{dim}");
        }
    }
}
