//! Nearest-neighbour ×2 upsampling of NHWC activations: `out[b, y, x, c] = x[b, y/2, x/2, c]`
//! (integer division), i.e. every pixel repeated into a 2×2 block — what
//! `jax.image.resize(..., method="nearest")` computes for an exact doubling.

use crate::error::{Result, RuntimeError};
use crate::ops::checks::check_len;
use rayon::prelude::*;

const OP: &str = "upsample_nearest2x";

/// `x` is `[batch, height, width, channels]`; `out` is `[batch, 2·height, 2·width, channels]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpsampleShape {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl UpsampleShape {
    pub fn input_len(&self) -> usize {
        self.batch * self.height * self.width * self.channels
    }
    pub fn output_len(&self) -> usize {
        4 * self.input_len()
    }
}

pub fn check_upsample(s: &UpsampleShape, x: usize, out: usize) -> Result<()> {
    if s.input_len() == 0 {
        return Err(RuntimeError::Invalid { op: OP, detail: format!("shape has a zero dimension: {s:?}") });
    }
    check_len(OP, "x", x, s.input_len())?;
    check_len(OP, "out", out, s.output_len())
}

/// `out` (overwritten) = `x` with every pixel repeated 2×2.
pub fn upsample_nearest2x(out: &mut [f32], x: &[f32], s: &UpsampleShape) -> Result<()> {
    check_upsample(s, x.len(), out.len())?;
    let c = s.channels;
    let in_row = s.width * c;
    // One task per output row: output row r of image b reads input row r/2 of image b.
    out.par_chunks_mut(2 * in_row).enumerate().for_each(|(r, orow)| {
        let (b, y) = (r / (2 * s.height), (r % (2 * s.height)) / 2);
        let src = &x[(b * s.height + y) * in_row..(b * s.height + y + 1) * in_row];
        for (px, dst) in src.chunks_exact(c).zip(orow.chunks_exact_mut(2 * c)) {
            dst[..c].copy_from_slice(px);
            dst[c..].copy_from_slice(px);
        }
    });
    Ok(())
}
