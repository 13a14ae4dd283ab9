//! Every op of the runtime, one folder (or file) per op family. Each family's `mod.rs` is its
//! contract (what it computes, the shapes, what is accumulated), the argument struct of each call
//! and its ONE argument check; `cpu.rs` is the CPU implementation over host slices; the CUDA
//! kernels are `<family>.cu` beside them, described by typed descriptors in `kernels.rs` (entry
//! points, argument types, `-D` constants) and called from `cuda.rs`. [`kernel_registry`] lists the
//! families once.
//!
//! [`crate::Backend`]'s named methods wrap their arguments in an [`Op`], run [`Op::check`] and
//! hand the op to the backend's `compute`, so a backend only computes and every backend refuses
//! the same calls with the same messages.
//!
//! The image ops of the VQGAN (forward only) are single files below: 2-D convolution, GroupNorm,
//! nearest ×2 upsampling, swish and single-head attention over spatial positions. Activations
//! are NHWC (`[batch, height, width, channels]`, channels fastest), as Flax stores them;
//! convolution kernels are HWIO (`[kh, kw, in, out]`). Each holds its shape struct, its check
//! (`check_*`) and its CPU implementation; a backend without a kernel for one returns
//! [`not_on_cuda`].

pub mod adamw;
pub mod attention;
pub(crate) mod checks;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gelu_glu;
pub mod kernel_registry;
pub mod layernorm;
pub mod math;
pub mod matmul;

pub mod conv2d;
pub mod group_norm;
pub mod spatial_attention;
pub mod swish;
pub mod upsample;

pub use conv2d::{conv2d, Conv2dShape, Padding};
pub use group_norm::{group_norm, GroupNormShape};
pub use spatial_attention::{spatial_attention, SpatialAttentionShape};
pub use swish::swish_in_place;
pub use upsample::{upsample_nearest2x, UpsampleShape};

use crate::error::{Result, RuntimeError};

/// The error a backend without a kernel for `op` returns.
pub fn not_on_cuda(op: &'static str) -> RuntimeError {
    RuntimeError::Invalid {
        op,
        detail: "not implemented on CUDA: this image op has only a CPU implementation (run it on the CPU backend)"
            .into(),
    }
}

/// A device buffer as the argument checks see it: a number of elements of one element type.
pub trait Storage {
    fn elems(&self) -> usize;
    /// The element type; f32 unless the backend stores bf16 ([`crate::Backend::zeros_typed`]).
    fn dtype(&self) -> crate::DType {
        crate::DType::F32
    }
}

/// Token ids whose values the host can read (every backend keeps the host copy it uploaded), so
/// the checks can refuse out-of-range targets before a kernel reads out of bounds.
pub trait HostIds {
    fn host_ids(&self) -> &[i32];
}

/// One checked call of a [`crate::Backend`] op over buffers `T` and ids `I`.
pub enum Op<'a, T, I> {
    Fill(elementwise::Fill<'a, T>),
    Write(elementwise::Write<'a, T>),
    Copy(elementwise::Copy<'a, T>),
    AddAssign(elementwise::AddAssign<'a, T>),
    Add(elementwise::Add<'a, T>),
    Scale(elementwise::Scale<'a, T>),
    SumSquares(elementwise::SumSquares<'a, T>),
    AddBroadcastRows(elementwise::AddBroadcastRows<'a, T>),
    SumBroadcastRows(elementwise::SumBroadcastRows<'a, T>),
    Matmul(matmul::Matmul<'a, T>),
    LayerNormForward(layernorm::Forward<'a, T>),
    LayerNormBackward(layernorm::Backward<'a, T>),
    LayerNormRowSums(layernorm::RowSums<'a, T>),
    LayerNormFinishStats(layernorm::FinishStats<'a, T>),
    LayerNormApply(layernorm::Apply<'a, T>),
    LayerNormBackwardRowSums(layernorm::BackwardRowSums<'a, T>),
    LayerNormBackwardApply(layernorm::BackwardApply<'a, T>),
    GeluGluForward(gelu_glu::Forward<'a, T>),
    GeluGluBackward(gelu_glu::Backward<'a, T>),
    EmbeddingForward(embedding::Forward<'a, T, I>),
    EmbeddingBackward(embedding::Backward<'a, T, I>),
    AttentionForward(attention::Forward<'a, T, I>),
    AttentionBackward(attention::Backward<'a, T, I>),
    CrossEntropyFused(cross_entropy::Fused<'a, T, I>),
    VocabParallelMax(cross_entropy::VocabMax<'a, T>),
    VocabParallelSums(cross_entropy::VocabSums<'a, T, I>),
    VocabParallelGrad(cross_entropy::VocabGrad<'a, T, I>),
    AdamW(adamw::AdamW<'a, T>),
}

impl<T: Storage, I: Storage + HostIds> Op<'_, T, I> {
    /// The op family's argument check (ops without constraints always pass).
    pub fn check(&self) -> Result<()> {
        match self {
            Op::Fill(_) | Op::Scale(_) | Op::SumSquares(_) => Ok(()),
            Op::Write(a) => a.check(),
            Op::Copy(a) => a.check(),
            Op::AddAssign(a) => a.check(),
            Op::Add(a) => a.check(),
            Op::AddBroadcastRows(a) => a.check(),
            Op::SumBroadcastRows(a) => a.check(),
            Op::Matmul(a) => a.check(),
            Op::LayerNormForward(a) => a.check(),
            Op::LayerNormBackward(a) => a.check(),
            Op::LayerNormRowSums(a) => a.check(),
            Op::LayerNormFinishStats(a) => a.check(),
            Op::LayerNormApply(a) => a.check(),
            Op::LayerNormBackwardRowSums(a) => a.check(),
            Op::LayerNormBackwardApply(a) => a.check(),
            Op::GeluGluForward(a) => a.check(),
            Op::GeluGluBackward(a) => a.check(),
            Op::EmbeddingForward(a) => a.check(),
            Op::EmbeddingBackward(a) => a.check(),
            Op::AttentionForward(a) => a.check(),
            Op::AttentionBackward(a) => a.check(),
            Op::CrossEntropyFused(a) => a.check(),
            Op::VocabParallelMax(a) => a.check(),
            Op::VocabParallelSums(a) => a.check(),
            Op::VocabParallelGrad(a) => a.check(),
            Op::AdamW(a) => a.check(),
        }
    }
}
