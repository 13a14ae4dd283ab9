//! Forward-only image ops for convolutional models (the VQGAN): 2-D convolution, GroupNorm,
//! nearest ×2 upsampling, swish and single-head attention over spatial positions.
//!
//! Activations are NHWC (`[batch, height, width, channels]`, channels fastest), as Flax stores
//! them; convolution kernels are HWIO (`[kh, kw, in, out]`). Each op lives in its own file, which
//! holds the op's contract (a shape struct saying what it computes), its one argument check
//! (`check_*`, an error on any inconsistent length, never a panic) and its CPU implementation
//! over host slices. A CUDA backend adds a kernel per op behind the same shape struct and check;
//! until it does, [`not_on_cuda`] is the error it returns.

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

use crate::error::RuntimeError;

/// The error a backend without a kernel for `op` returns.
pub fn not_on_cuda(op: &'static str) -> RuntimeError {
    RuntimeError::Invalid {
        op,
        detail: "not implemented on CUDA: this image op has only a CPU implementation (run it on the CPU backend)"
            .into(),
    }
}
