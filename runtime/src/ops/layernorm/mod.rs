//! LayerNorm over the last dimension (eps 1e-5, biased variance), with or without scale
//! (`scale = None` is dalle-mini's bias-only LayerNorm), fused or split into steps for a dimension
//! sharded over tensor-parallel ranks.
//!
//! Contract (rows = `x.len / dim`):
//! - [`Forward`]: `out = (x − mean)·rstd·scale + bias` per row; writes `mean`, `rstd` (`[rows]`).
//! - [`Backward`]: `dscale`, `dbias` accumulated (`+=`); `dx` overwritten, or accumulated when
//!   `accumulate_dx`.
//! - Sharded steps: [`RowSums`] → all-reduce → [`FinishStats`] (twice: mean, then rstd) →
//!   [`Apply`]; backward [`BackwardRowSums`] (`[2, rows]` planar) → all-reduce →
//!   [`BackwardApply`]. With one shard these equal the fused ops.
//!
//! CPU: [`cpu`]; CUDA: `layernorm.cu` (one warp per row; the backward writes per-block partials
//! that a second kernel reduces in a fixed order).

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::{Result, RuntimeError};
use crate::ops::checks::{check_f32, check_len, check_opt_f32, check_opt_len, rows_of};
use crate::ops::Storage;

/// [`crate::Backend::layernorm_forward`].
pub struct Forward<'a, T> {
    pub out: &'a mut T,
    pub mean: &'a mut T,
    pub rstd: &'a mut T,
    pub x: &'a T,
    pub scale: Option<&'a T>,
    pub bias: &'a T,
    pub dim: usize,
}

/// [`crate::Backend::layernorm_apply`]: the forward with given statistics.
pub struct Apply<'a, T> {
    pub out: &'a mut T,
    pub x: &'a T,
    pub mean: &'a T,
    pub rstd: &'a T,
    pub scale: Option<&'a T>,
    pub bias: &'a T,
    pub dim: usize,
}

/// [`crate::Backend::layernorm_backward`].
pub struct Backward<'a, T> {
    pub dx: &'a mut T,
    pub dscale: Option<&'a mut T>,
    pub dbias: &'a mut T,
    pub dout: &'a T,
    pub x: &'a T,
    pub mean: &'a T,
    pub rstd: &'a T,
    pub scale: Option<&'a T>,
    pub dim: usize,
    pub accumulate_dx: bool,
}

/// [`crate::Backend::layernorm_row_sums`]: `Σx`, or `Σ(x − center)²` when `center` is given.
pub struct RowSums<'a, T> {
    pub sums: &'a mut T,
    pub x: &'a T,
    pub center: Option<&'a T>,
    pub dim: usize,
}

/// [`crate::Backend::layernorm_finish_stats`]: all-reduced sums → mean or rstd, in place.
pub struct FinishStats<'a, T> {
    pub sums: &'a mut T,
    pub dim_global: usize,
    pub squared: bool,
}

/// [`crate::Backend::layernorm_backward_row_sums`]: `[Σĝ, Σĝx̂]` as `[2, rows]`.
pub struct BackwardRowSums<'a, T> {
    pub sums: &'a mut T,
    pub dout: &'a T,
    pub x: &'a T,
    pub mean: &'a T,
    pub rstd: &'a T,
    pub scale: Option<&'a T>,
    pub dim: usize,
}

/// [`crate::Backend::layernorm_backward_apply`]: the backward from all-reduced `sums`.
pub struct BackwardApply<'a, T> {
    pub dx: &'a mut T,
    pub dscale: Option<&'a mut T>,
    pub dbias: &'a mut T,
    pub dout: &'a T,
    pub x: &'a T,
    pub mean: &'a T,
    pub rstd: &'a T,
    pub scale: Option<&'a T>,
    pub sums: &'a T,
    pub dim: usize,
    pub dim_global: usize,
    pub accumulate_dx: bool,
}

/// The buffers every LayerNorm call reads: `x` (f32 or bf16) and the per-row statistics (f32).
fn check_stats<T: Storage>(op: &'static str, x: &T, mean: &T, rstd: &T, dim: usize) -> Result<usize> {
    let rows = rows_of(op, x.elems(), dim)?;
    check_f32(op, "mean", mean)?;
    check_f32(op, "rstd", rstd)?;
    check_len(op, "mean", mean.elems(), rows)?;
    check_len(op, "rstd", rstd.elems(), rows)?;
    Ok(rows)
}

/// Parameters and their gradients (all f32): `scale`/`dscale` present together, each `dim` long.
fn check_params<T: Storage>(
    op: &'static str,
    scale: Option<&T>,
    dscale: Option<&T>,
    dbias: &T,
    dim: usize,
) -> Result<()> {
    check_len(op, "dbias", dbias.elems(), dim)?;
    check_f32(op, "dbias", dbias)?;
    check_opt_f32(op, "scale", scale)?;
    check_opt_f32(op, "dscale", dscale)?;
    if scale.is_some() != dscale.is_some() {
        return Err(RuntimeError::Invalid {
            op,
            detail: "scale and dscale must both be given or both be absent".into(),
        });
    }
    check_opt_len(op, "scale", scale, dim)?;
    check_opt_len(op, "dscale", dscale, dim)
}

fn check_dim_global(op: &'static str, dim_global: usize) -> Result<()> {
    if dim_global == 0 {
        return Err(RuntimeError::Invalid { op, detail: "dim_global is 0".into() });
    }
    Ok(())
}

/// The forward (fused or with given statistics): `out` like `x`, `bias`/`scale` `dim` long (f32).
fn check_forward<T: Storage>(op: &'static str, out: &T, x: &T, bias: &T, scale: Option<&T>, dim: usize) -> Result<()> {
    check_len(op, "out", out.elems(), x.elems())?;
    check_f32(op, "bias", bias)?;
    check_opt_f32(op, "scale", scale)?;
    check_len(op, "bias", bias.elems(), dim)?;
    check_opt_len(op, "scale", scale, dim)
}

impl<T: Storage> Forward<'_, T> {
    pub fn check(&self) -> Result<()> {
        let op = "layernorm_forward";
        check_stats(op, self.x, self.mean, self.rstd, self.dim)?;
        check_forward(op, self.out, self.x, self.bias, self.scale, self.dim)
    }
}

impl<T: Storage> Apply<'_, T> {
    pub fn check(&self) -> Result<()> {
        let op = "layernorm_apply";
        check_stats(op, self.x, self.mean, self.rstd, self.dim)?;
        check_forward(op, self.out, self.x, self.bias, self.scale, self.dim)
    }
}

impl<T: Storage> Backward<'_, T> {
    pub fn check(&self) -> Result<()> {
        let op = "layernorm_backward";
        check_stats(op, self.x, self.mean, self.rstd, self.dim)?;
        check_len(op, "dx", self.dx.elems(), self.x.elems())?;
        check_len(op, "dout", self.dout.elems(), self.x.elems())?;
        check_params(op, self.scale, self.dscale.as_deref(), self.dbias, self.dim)
    }
}

impl<T: Storage> RowSums<'_, T> {
    pub fn check(&self) -> Result<()> {
        let op = "layernorm_row_sums";
        let rows = rows_of(op, self.x.elems(), self.dim)?;
        check_len(op, "sums", self.sums.elems(), rows)?;
        check_f32(op, "sums", self.sums)?;
        check_opt_f32(op, "center", self.center)?;
        check_opt_len(op, "center", self.center, rows)
    }
}

impl<T: Storage> FinishStats<'_, T> {
    pub fn check(&self) -> Result<()> {
        check_f32("layernorm_finish_stats", "sums", self.sums)?;
        check_dim_global("layernorm_finish_stats", self.dim_global)
    }
}

impl<T: Storage> BackwardRowSums<'_, T> {
    pub fn check(&self) -> Result<()> {
        let op = "layernorm_backward_row_sums";
        let rows = check_stats(op, self.x, self.mean, self.rstd, self.dim)?;
        check_len(op, "sums", self.sums.elems(), 2 * rows)?;
        check_f32(op, "sums", self.sums)?;
        check_opt_f32(op, "scale", self.scale)?;
        check_len(op, "dout", self.dout.elems(), self.x.elems())?;
        check_opt_len(op, "scale", self.scale, self.dim)
    }
}

impl<T: Storage> BackwardApply<'_, T> {
    pub fn check(&self) -> Result<()> {
        let op = "layernorm_backward_apply";
        let rows = check_stats(op, self.x, self.mean, self.rstd, self.dim)?;
        check_len(op, "dx", self.dx.elems(), self.x.elems())?;
        check_len(op, "dout", self.dout.elems(), self.x.elems())?;
        check_len(op, "sums", self.sums.elems(), 2 * rows)?;
        check_f32(op, "sums", self.sums)?;
        check_params(op, self.scale, self.dscale.as_deref(), self.dbias, self.dim)?;
        check_dim_global(op, self.dim_global)
    }
}
