//! CUDA code of the LayerNorms: `layernorm.cu` beside this file (descriptors in `kernels.rs`).
//! The sharded-LayerNorm kernels
//! exchange row sums as interleaved pairs `[rows][2]`, the trait as `[rows]` or planar
//! `[2, rows]`: 2-D copies (pitch 8 ↔ 4 bytes) convert.

use super::kernels as k;
use crate::cuda::kernel_prelude::*;
use crate::ops::layernorm as ln;

impl CudaBackend {
    /// Calls a one-warp-per-row kernel of `layernorm.cu` with the arguments `args(rows, dim)`.
    ///
    /// # Safety
    /// The pointers of `args` must each address what the kernel reads or writes for `rows` rows
    /// of `dim` (the op's check guarantees the lengths).
    unsafe fn layernorm_per_row<A: KernelArgs>(
        &self,
        op: &'static str,
        kernel: Kernel<A>,
        (rows, dim): (usize, usize),
        args: impl FnOnce(i32, i32) -> A,
    ) -> Result<()> {
        let l = cfg(op, k::layernorm_rows(rows))?;
        let args = args(int(op, "rows", rows)?, int(op, "dim", dim)?);
        // SAFETY: forwarded from the caller.
        unsafe { self.call_kernel(kernel, l, args) }
    }

    /// Shared by the single-device and sharded layernorm backward: the block-partial backward
    /// kernel, then the fixed-order reduction of the partials into dscale/dbias. `row_sums` is
    /// null (single device: the kernel computes the row sums) or the all-reduced interleaved
    /// pairs over `dim_global` columns.
    fn layernorm_backward_kernels(
        &self,
        sc: &mut ScratchSet,
        op: &'static str,
        b: ln::Backward<'_, CudaBuf>,
        (row_sums, dim_global): (u64, usize),
    ) -> Result<()> {
        let ln::Backward { dx, dscale, dbias, dout, x, mean, rstd, scale, dim, accumulate_dx } = b;
        let rows = x.len / dim;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, k::layernorm_backward(rows, dim, self.sms()))?;
        let parts = l.grid.0 as usize;
        let partials = raw_ptr(sc.f32_a.get(&self.dev.stream, &self.dev.memory, parts * 2 * dim)?);
        let args = (
            mut_ptr(dx),
            DevicePtr(partials),
            ptr(dout),
            ptr(x),
            ptr(mean),
            ptr(rstd),
            opt_ptr(scale),
            DevicePtr(row_sums),
            int(op, "rows", rows)?,
            int(op, "dim", dim)?,
            int(op, "dim_global", dim_global)?,
            accumulate_dx as i32,
        );
        // SAFETY: layernorm_backward_f32(dx, partials, dout, x, mean, rstd, scale, row_sums, rows,
        // dim, dim_global, accumulate_dx): x/dout/dx hold rows·dim, mean/rstd rows, scale dim (or
        // null), row_sums 2·rows interleaved (or null); partials grid·2·dim; dim <= block·16
        // (grid::layernorm_backward checked it).
        unsafe { self.call_kernel(k::BACKWARD, l, args)? };
        let l = cfg(op, k::layernorm_param_grads(dim))?;
        let dscale = DevicePtr(dscale.map_or(0, |d| d.device_ptr()));
        let args = (dscale, mut_ptr(dbias), DevicePtr(partials), int(op, "parts", parts)?, int(op, "dim", dim)?);
        // SAFETY: layernorm_param_grads_f32(dscale, dbias, partials, n_parts, dim): dscale (or
        // null) and dbias hold dim floats, partials the n_parts·2·dim written just above.
        unsafe { self.call_kernel(k::PARAM_GRADS, l, args) }
    }

    pub(crate) fn layernorm_forward_cuda(&self, a: ln::Forward<'_, CudaBuf>) -> Result<()> {
        let ln::Forward { out, mean, rstd, x, scale, bias, dim } = a;
        let op = "layernorm_forward";
        let rows = x.len / dim;
        if rows == 0 {
            return Ok(());
        }
        let pointers = (mut_ptr(out), mut_ptr(mean), mut_ptr(rstd), ptr(x), opt_ptr(scale), ptr(bias));
        // SAFETY: layernorm_forward_f32(out, mean, rstd, x, scale, bias, rows, dim) with checked
        // lengths (scale may be null).
        unsafe { self.layernorm_per_row(op, k::FORWARD, (rows, dim), |r, d| per_row(pointers, r, d)) }
    }

    pub(crate) fn layernorm_backward_cuda(&self, a: ln::Backward<'_, CudaBuf>) -> Result<()> {
        let dim = a.dim;
        let mut guard = self.scratch();
        self.layernorm_backward_kernels(&mut guard, "layernorm_backward", a, (0, dim))
    }

    pub(crate) fn layernorm_row_sums_cuda(&self, a: ln::RowSums<'_, CudaBuf>) -> Result<()> {
        let ln::RowSums { sums, x, center, dim } = a;
        let op = "layernorm_row_sums";
        let rows = x.len / dim;
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.scratch();
        let pairs = raw_ptr(guard.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let (px, pc, pp) = (ptr(x), opt_ptr(center), DevicePtr(pairs));
        // SAFETY: layernorm_sharded_sums_f32(x, center, sums, rows, dim) writes 2·rows interleaved
        // floats (Σ(x−c), Σ(x−c)²) into the pairs scratch; x holds rows·dim, center rows (or null).
        unsafe { self.layernorm_per_row(op, k::SHARDED_SUMS, (rows, dim), |r, d| (px, pc, pp, r, d))? };
        // The trait wants Σx without a centre and Σ(x−c)² with one: pick that column of the pairs.
        let column = if center.is_some() { 4 } else { 0 };
        // SAFETY: reads one float of each 8-byte pair (rows of them) from the pairs scratch and
        // writes `sums`' rows floats contiguously.
        unsafe { self.copy_2d((sums.device_ptr(), 4), (pairs + column, 8), (4, rows)) }
    }

    pub(crate) fn layernorm_finish_stats_cuda(&self, a: ln::FinishStats<'_, CudaBuf>) -> Result<()> {
        let ln::FinishStats { sums, dim_global, squared } = a;
        let op = "layernorm_finish_stats";
        let rows = sums.len;
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.scratch();
        let sc = &mut *guard;
        let pairs = raw_ptr(sc.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let dummy = raw_ptr(sc.f32_a.get(&self.dev.stream, &self.dev.memory, rows)?);
        // pairs = (S, 0) for the mean, (0, S) for the variance about an already-subtracted mean:
        // layernorm_sharded_stats_f32 then gives mean = S/n, resp. rstd = 1/√(S/n + eps).
        self.fill_raw(op, pairs, 2 * rows, 0.0)?;
        let column = if squared { 4 } else { 0 };
        // SAFETY: writes one float of each pair of the 2·rows pairs scratch from sums' rows floats.
        unsafe { self.copy_2d((pairs + column, 8), (sums.device_ptr(), 4), (4, rows))? };
        let (mean_out, rstd_out) = if squared { (dummy, sums.device_ptr()) } else { (sums.device_ptr(), dummy) };
        let l = cfg(op, lc::one_thread_each(rows))?;
        let args = (
            DevicePtr(pairs),
            DevicePtr::NULL,
            DevicePtr(mean_out),
            DevicePtr(rstd_out),
            int(op, "rows", rows)?,
            int(op, "dim_global", dim_global)?,
        );
        // SAFETY: layernorm_sharded_stats_f32(sums, center = null, mean, rstd, rows, dim_global):
        // reads 2·rows pairs, writes rows floats to each of mean and rstd (sums' buffer and the
        // dummy scratch, distinct from the pairs); grid ceil(rows/256) of 256 threads.
        unsafe { self.call_kernel(k::SHARDED_STATS, l, args) }
    }

    pub(crate) fn layernorm_apply_cuda(&self, a: ln::Apply<'_, CudaBuf>) -> Result<()> {
        let ln::Apply { out, x, mean, rstd, scale, bias, dim } = a;
        let op = "layernorm_apply";
        let rows = x.len / dim;
        if rows == 0 {
            return Ok(());
        }
        let pointers = (mut_ptr(out), ptr(x), ptr(mean), ptr(rstd), opt_ptr(scale), ptr(bias));
        // SAFETY: layernorm_apply_f32(out, x, mean, rstd, scale, bias, rows, dim), lengths checked.
        unsafe { self.layernorm_per_row(op, k::APPLY, (rows, dim), |r, d| per_row(pointers, r, d)) }
    }

    pub(crate) fn layernorm_backward_row_sums_cuda(&self, a: ln::BackwardRowSums<'_, CudaBuf>) -> Result<()> {
        let ln::BackwardRowSums { sums, dout, x, mean, rstd, scale, dim } = a;
        let op = "layernorm_backward_row_sums";
        let rows = x.len / dim;
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.scratch();
        let pairs = raw_ptr(guard.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let pointers = (ptr(dout), ptr(x), ptr(mean), ptr(rstd), opt_ptr(scale), DevicePtr(pairs));
        // SAFETY: layernorm_backward_sums_f32(dout, x, mean, rstd, scale, sums, rows, dim) writes
        // 2·rows interleaved floats into the pairs scratch; inputs have the checked lengths.
        unsafe { self.layernorm_per_row(op, k::BACKWARD_SUMS, (rows, dim), |r, d| per_row(pointers, r, d))? };
        let s = sums.device_ptr();
        // SAFETY: de-interleave the pairs into the trait's [2, rows] layout: column 0 into
        // sums[0..rows), column 1 into sums[rows..2·rows).
        unsafe {
            self.copy_2d((s, 4), (pairs, 8), (4, rows))?;
            self.copy_2d((s + 4 * rows as u64, 4), (pairs + 4, 8), (4, rows))
        }
    }

    pub(crate) fn layernorm_backward_apply_cuda(&self, a: ln::BackwardApply<'_, CudaBuf>) -> Result<()> {
        let ln::BackwardApply { dx, dscale, dbias, dout, x, mean, rstd, scale, sums, dim, dim_global, accumulate_dx } =
            a;
        let op = "layernorm_backward_apply";
        let rows = x.len / dim;
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.scratch();
        let pairs = raw_ptr(guard.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let s = sums.device_ptr();
        // SAFETY: interleave the trait's [2, rows] sums into the kernel's pairs (sums[r] ->
        // pairs[2r], sums[rows + r] -> pairs[2r + 1]); the pairs scratch holds 2·rows floats.
        // The backward kernel call below uses f32_a for its partials, so the pairs (f32_b) survive.
        unsafe {
            self.copy_2d((pairs, 8), (s, 4), (4, rows))?;
            self.copy_2d((pairs + 4, 8), (s + 4 * rows as u64, 4), (4, rows))?;
        }
        let grads = ln::Backward { dx, dscale, dbias, dout, x, mean, rstd, scale, dim, accumulate_dx };
        self.layernorm_backward_kernels(&mut guard, op, grads, (pairs, dim_global))
    }
}

/// The six pointers of a warp-per-row kernel followed by (rows, dim).
fn per_row(
    (a, b, c, d, e, f): (DevicePtr, DevicePtr, DevicePtr, DevicePtr, DevicePtr, DevicePtr),
    rows: i32,
    dim: i32,
) -> k::PerRowArgs {
    (a, b, c, d, e, f, rows, dim)
}
