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

op_args! {
    /// [`crate::Backend::layernorm_forward`].
    Forward<'a, T> {
        out: &'a mut T, mean: &'a mut T, rstd: &'a mut T,
        x: &'a T, scale: Option<&'a T>, bias: &'a T, dim: usize,
    }
}

op_args! {
    /// [`crate::Backend::layernorm_apply`]: the forward with given statistics.
    Apply<'a, T> {
        out: &'a mut T,
        x: &'a T, mean: &'a T, rstd: &'a T, scale: Option<&'a T>, bias: &'a T, dim: usize,
    }
}

op_args! {
    /// [`crate::Backend::layernorm_backward`].
    Backward<'a, T> {
        dx: &'a mut T, dscale: Option<&'a mut T>, dbias: &'a mut T,
        dout: &'a T, x: &'a T, mean: &'a T, rstd: &'a T, scale: Option<&'a T>, dim: usize, accumulate_dx: bool,
    }
}

op_args! {
    /// [`crate::Backend::layernorm_row_sums`]: `Σx`, or `Σ(x − center)²` when `center` is given.
    RowSums<'a, T> { sums: &'a mut T, x: &'a T, center: Option<&'a T>, dim: usize }
}

op_args! {
    /// [`crate::Backend::layernorm_finish_stats`]: all-reduced sums → mean or rstd, in place.
    FinishStats<'a, T> { sums: &'a mut T, dim_global: usize, squared: bool }
}

op_args! {
    /// [`crate::Backend::layernorm_backward_row_sums`]: `[Σĝ, Σĝx̂]` as `[2, rows]`.
    BackwardRowSums<'a, T> {
        sums: &'a mut T,
        dout: &'a T, x: &'a T, mean: &'a T, rstd: &'a T, scale: Option<&'a T>, dim: usize,
    }
}

op_args! {
    /// [`crate::Backend::layernorm_backward_apply`]: the backward from all-reduced `sums`.
    BackwardApply<'a, T> {
        dx: &'a mut T, dscale: Option<&'a mut T>, dbias: &'a mut T,
        dout: &'a T, x: &'a T, mean: &'a T, rstd: &'a T, scale: Option<&'a T>,
        sums: &'a T, dim: usize, dim_global: usize, accumulate_dx: bool,
    }
}

impl<'a, T> BackwardApply<'a, T> {
    /// The buffers it shares with the fused backward, and its all-reduced `sums` and `dim_global`.
    pub fn split(self) -> (Backward<'a, T>, &'a T, usize) {
        let fused = Backward {
            dx: self.dx,
            dscale: self.dscale,
            dbias: self.dbias,
            dout: self.dout,
            x: self.x,
            mean: self.mean,
            rstd: self.rstd,
            scale: self.scale,
            dim: self.dim,
            accumulate_dx: self.accumulate_dx,
        };
        (fused, self.sums, self.dim_global)
    }
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
