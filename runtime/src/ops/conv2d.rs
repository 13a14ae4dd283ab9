//! 2-D convolution, NHWC input, HWIO kernel, optional bias, any stride, explicit zero padding on
//! each side (so Flax's `padding=1` and the VQGAN's bottom/right-padded stride-2 downsample are
//! the same op):
//!
//! `out[b, y, x, o] = bias[o] + Σ_{dy, dx, c} xpad[b, y·stride + dy, x·stride + dx, c] · w[dy, dx, c, o]`
//!
//! where `xpad` is `x` with `padding` zero rows/columns added. The CPU implementation turns the
//! convolution into GEMMs (the `gemm` crate, rayon-parallel):
//! - stride 1: no im2col at all. Over the padded image `P` (`[Hp, Wp, C]`), output position
//!   `p = y·Wp + x` of kernel row `dy` reads `P[dy·Wp·C + p·C .. + kw·C]`: a matrix with row
//!   stride `C` whose rows overlap. So each kernel row is one GEMM `[M, kw·C] · [kw·C, out]`
//!   (`M ≈ Ho·Wp`, the kernel row is contiguous in HWIO), accumulated over `dy`; the `Wp − Wo`
//!   extra columns per row are computed and dropped (2 of 258 at 256 px for a 3×3 kernel).
//! - other strides: im2col into tiles of whole output rows (bounded memory), one GEMM per tile.

use crate::error::{Result, RuntimeError};
use crate::ops::checks::check_len;
use crate::ops::matmul::cpu::{gemm_views, parallelism, View};
use rayon::prelude::*;
use std::borrow::Cow;

const OP: &str = "conv2d";

/// Elements of one im2col tile (64 MiB of f32 at most).
const IM2COL_TILE_ELEMS: usize = 1 << 24;

/// Zero rows/columns added on each side of the input before convolving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// `p` on every side (Flax's `padding=p`).
    pub fn uniform(p: usize) -> Self {
        Padding { top: p, bottom: p, left: p, right: p }
    }
    /// `p` on the bottom and right only (the VQGAN downsample's `jnp.pad`).
    pub fn bottom_right(p: usize) -> Self {
        Padding { top: 0, bottom: p, left: 0, right: p }
    }
    fn is_zero(&self) -> bool {
        *self == Padding::default()
    }
}

/// The shape of one convolution call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: Padding,
}

impl Conv2dShape {
    fn padded_h(&self) -> usize {
        self.height + self.padding.top + self.padding.bottom
    }
    fn padded_w(&self) -> usize {
        self.width + self.padding.left + self.padding.right
    }
    pub fn out_height(&self) -> usize {
        (self.padded_h().saturating_sub(self.kernel_h)) / self.stride.max(1) + 1
    }
    pub fn out_width(&self) -> usize {
        (self.padded_w().saturating_sub(self.kernel_w)) / self.stride.max(1) + 1
    }
    pub fn input_len(&self) -> usize {
        self.batch * self.height * self.width * self.in_channels
    }
    pub fn kernel_len(&self) -> usize {
        self.kernel_h * self.kernel_w * self.in_channels * self.out_channels
    }
    pub fn output_len(&self) -> usize {
        self.batch * self.out_height() * self.out_width() * self.out_channels
    }
    /// Multiply-adds × 2 (the bias not counted).
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.out_height() * self.out_width()) as f64 * self.kernel_len() as f64
    }
}

/// Checks a convolution's shape and the lengths of its buffers.
pub fn check_conv2d(s: &Conv2dShape, x: usize, kernel: usize, bias: Option<usize>, out: usize) -> Result<()> {
    let dims = [s.batch, s.height, s.width, s.in_channels, s.out_channels, s.kernel_h, s.kernel_w, s.stride];
    if dims.contains(&0) {
        return Err(RuntimeError::Invalid { op: OP, detail: format!("shape has a zero dimension: {s:?}") });
    }
    if s.padded_h() < s.kernel_h || s.padded_w() < s.kernel_w {
        return Err(RuntimeError::Invalid {
            op: OP,
            detail: format!("the {}×{} kernel is larger than the padded input: {s:?}", s.kernel_h, s.kernel_w),
        });
    }
    check_len(OP, "x", x, s.input_len())?;
    check_len(OP, "kernel", kernel, s.kernel_len())?;
    if let Some(b) = bias {
        check_len(OP, "bias", b, s.out_channels)?;
    }
    check_len(OP, "out", out, s.output_len())
}

/// `out` (overwritten) = the convolution of `x` with `kernel` plus `bias`; see the module docs.
pub fn conv2d(out: &mut [f32], x: &[f32], kernel: &[f32], bias: Option<&[f32]>, s: &Conv2dShape) -> Result<()> {
    check_conv2d(s, x.len(), kernel.len(), bias.map(<[f32]>::len), out.len())?;
    let in_image = s.height * s.width * s.in_channels;
    let out_image = s.out_height() * s.out_width() * s.out_channels;
    for (xb, ob) in x.chunks_exact(in_image).zip(out.chunks_exact_mut(out_image)) {
        if s.stride == 1 {
            conv_stride1(ob, xb, kernel, s)?;
        } else {
            conv_im2col(ob, xb, kernel, s)?;
        }
        if let Some(b) = bias {
            add_bias(ob, b);
        }
    }
    Ok(())
}

fn add_bias(out: &mut [f32], bias: &[f32]) {
    let rows_per_task = (1 << 14) / bias.len() + 1;
    out.par_chunks_mut(rows_per_task * bias.len()).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    });
}

/// One image zero-padded to `[Hp, Wp, C]` (borrowed when there is no padding).
fn padded_image<'a>(x: &'a [f32], s: &Conv2dShape) -> Cow<'a, [f32]> {
    if s.padding.is_zero() {
        return Cow::Borrowed(x);
    }
    let (c, wp) = (s.in_channels, s.padded_w());
    let mut p = vec![0.0f32; s.padded_h() * wp * c];
    p.par_chunks_mut(wp * c).enumerate().for_each(|(py, row)| {
        let Some(y) = py.checked_sub(s.padding.top).filter(|y| *y < s.height) else { return };
        let src = &x[y * s.width * c..(y + 1) * s.width * c];
        row[s.padding.left * c..(s.padding.left + s.width) * c].copy_from_slice(src);
    });
    Cow::Owned(p)
}

/// Stride 1: one GEMM per kernel row over overlapping rows of the padded image (module docs).
fn conv_stride1(out: &mut [f32], x: &[f32], kernel: &[f32], s: &Conv2dShape) -> Result<()> {
    let p = padded_image(x, s);
    let (c, co, wp) = (s.in_channels, s.out_channels, s.padded_w());
    let (ho, wo) = (s.out_height(), s.out_width());
    let m = (ho - 1) * wp + wo;
    let k = s.kernel_w * c;
    let mut wide_store = Vec::new();
    let wide: &mut [f32] = if wp == wo {
        out
    } else {
        wide_store.resize(m * co, 0.0);
        &mut wide_store
    };
    for dy in 0..s.kernel_h {
        let a = Operand { data: &p[dy * wp * c..], rs: c, cs: 1 };
        let b = Operand { data: &kernel[dy * k * co..(dy + 1) * k * co], rs: co, cs: 1 };
        gemm_into(wide, m, co, k, a, b, dy > 0)?;
    }
    if wp != wo {
        out.par_chunks_mut(wo * co).enumerate().for_each(|(y, row)| {
            row.copy_from_slice(&wide_store[y * wp * co..(y * wp + wo) * co]);
        });
    }
    Ok(())
}

/// Any stride: im2col of whole output rows into bounded tiles, one GEMM per tile.
fn conv_im2col(out: &mut [f32], x: &[f32], kernel: &[f32], s: &Conv2dShape) -> Result<()> {
    let p = padded_image(x, s);
    let (c, co, wp) = (s.in_channels, s.out_channels, s.padded_w());
    let wo = s.out_width();
    let k = s.kernel_h * s.kernel_w * c;
    let tile_rows = (IM2COL_TILE_ELEMS / (wo * k)).max(1);
    let mut cols = vec![0.0f32; tile_rows.min(s.out_height()) * wo * k];
    for (tile, out_tile) in out.chunks_mut(tile_rows * wo * co).enumerate() {
        let rows = out_tile.len() / (wo * co);
        let cols = &mut cols[..rows * wo * k];
        cols.par_chunks_mut(k).enumerate().for_each(|(i, col)| {
            let (y, xo) = (tile * tile_rows + i / wo, i % wo);
            for dy in 0..s.kernel_h {
                let start = ((y * s.stride + dy) * wp + xo * s.stride) * c;
                let len = s.kernel_w * c;
                col[dy * len..(dy + 1) * len].copy_from_slice(&p[start..start + len]);
            }
        });
        let a = Operand { data: cols, rs: k, cs: 1 };
        let b = Operand { data: kernel, rs: co, cs: 1 };
        gemm_into(out_tile, rows * wo, co, k, a, b, false)?;
    }
    Ok(())
}

/// A read-only strided matrix: element (i, j) at `data[i·rs + j·cs]` (rows may overlap).
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl Operand<'_> {
    fn fits(&self, rows: usize, cols: usize) -> bool {
        (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m, n] (= | +=) a[m, k] · b[k, n]`, `dst` contiguous row-major.
fn gemm_into(dst: &mut [f32], m: usize, n: usize, k: usize, a: Operand, b: Operand, accumulate: bool) -> Result<()> {
    if m == 0 || n == 0 || k == 0 || dst.len() < m * n || !a.fits(m, k) || !b.fits(k, n) {
        return Err(RuntimeError::Invalid {
            op: OP, detail: format!("internal GEMM {m}×{k}·{k}×{n} out of bounds")
        });
    }
    let lhs = View { ptr: a.data.as_ptr(), rs: a.rs as isize, cs: a.cs as isize };
    let rhs = View { ptr: b.data.as_ptr(), rs: b.rs as isize, cs: b.cs as isize };
    // SAFETY: the check above proves every element addressed through (rs, cs) is inside `a.data`,
    // `b.data` and `dst`; `dst` is a distinct &mut slice, so it overlaps neither input. The
    // overlapping rows of `a` are only read.
    unsafe {
        gemm_views((m, n, k), (dst.as_mut_ptr(), n as isize, 1), accumulate, lhs, rhs, 1.0, parallelism(m, n, k))
    };
    Ok(())
}
