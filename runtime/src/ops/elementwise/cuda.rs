//! CUDA code of the elementwise ops: `elementwise.cu` beside this file (descriptors in
//! `kernels.rs`); host transfers and copies through the stream.

use super::kernels as k;
use crate::cuda::kernel_prelude::*;
use crate::cuda::memory::DeviceData;
use crate::dtype::DType;
use crate::ops::elementwise as ew;

impl CudaBackend {
    /// `fill_f32` over the `n` floats at `ptr` (Backend::fill, and zeroing for other ops).
    pub(crate) fn fill_raw(&self, op: &'static str, ptr: u64, n: usize, value: f32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let l = cfg(op, k::elementwise(n, self.sms()))?;
        // SAFETY: fill_f32(x, value, n) writes x[0..n); `ptr` addresses at least n floats.
        unsafe { self.call_kernel(k::FILL, l, (DevicePtr(ptr), value, n as u64)) }
    }

    /// Backend::fill on a buffer of either dtype (`fill_f32`, or `fill_bf16` rounding `value`).
    pub(crate) fn fill_cuda(&self, a: ew::Fill<'_, CudaBuf>) -> Result<()> {
        let ew::Fill { buf, value } = a;
        match buf.dtype() {
            DType::F32 => self.fill_raw("fill", buf.device_ptr(), buf.len, value),
            DType::Bf16 => {
                if buf.len == 0 {
                    return Ok(());
                }
                let l = cfg("fill", lc::grid_stride(buf.len, self.sms()))?;
                // SAFETY: fill_bf16(x, value, n) writes x[0..n) bf16; `buf` holds len of them.
                unsafe { self.call_kernel(k::FILL_BF16, l, (mut_ptr(buf), value, buf.len as u64)) }
            }
        }
    }

    /// Host data into a buffer of either dtype (bf16: rounded on the host as the CPU rounds).
    pub(crate) fn write_cuda(&self, a: ew::Write<'_, CudaBuf>) -> Result<()> {
        let ew::Write { dst, offset, data } = a;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len();
        let copied = match &mut dst.data {
            DeviceData::F32(d) => self.dev.stream.memcpy_htod(data, &mut d.slice_mut(offset..end)),
            DeviceData::Bf16(d) => {
                let bits: Vec<u16> = data.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                self.dev.stream.memcpy_htod(&bits, &mut d.slice_mut(offset..end))
            }
        };
        copied.map_err(|e| driver_err("write", e))
    }

    /// A copy between buffers of any dtypes: a device copy when they match (bf16 → bf16 copies the
    /// bits; the CPU's widen-and-round also quiets a signalling NaN, the only difference), else the
    /// widening (`cast_bf16_to_f32`, exact) or rounding (`cast_f32_to_bf16`) cast over the range.
    pub(crate) fn copy_cuda(&self, a: ew::Copy<'_, CudaBuf>) -> Result<()> {
        let ew::Copy { dst, dst_off, src, src_off, len } = a;
        if len == 0 {
            return Ok(());
        }
        let (d, s) = (dst_off..dst_off + len, src_off..src_off + len);
        let stream = &self.dev.stream;
        let cast = match (&mut dst.data, &src.data) {
            (DeviceData::F32(o), DeviceData::F32(i)) => {
                return stream.memcpy_dtod(&i.slice(s), &mut o.slice_mut(d)).map_err(|e| driver_err("copy", e))
            }
            (DeviceData::Bf16(o), DeviceData::Bf16(i)) => {
                return stream.memcpy_dtod(&i.slice(s), &mut o.slice_mut(d)).map_err(|e| driver_err("copy", e))
            }
            (DeviceData::F32(_), DeviceData::Bf16(_)) => k::CAST_BF16_TO_F32,
            (DeviceData::Bf16(_), DeviceData::F32(_)) => k::CAST_F32_TO_BF16,
        };
        let l = cfg("copy", lc::grid_stride(len, self.sms()))?;
        let args = (DevicePtr(dst.elem_ptr(dst_off)), DevicePtr(src.elem_ptr(src_off)), len as u64);
        // SAFETY: cast_*(out, x, n) over n elements: the checked ranges dst_off..+len and
        // src_off..+len lie inside their buffers (addresses by each buffer's element size), and
        // `dst` is a distinct &mut buffer.
        unsafe { self.call_kernel(cast, l, args) }
    }

    pub(crate) fn add_assign_cuda(&self, a: ew::AddAssign<'_, CudaBuf>) -> Result<()> {
        let ew::AddAssign { acc, x } = a;
        if acc.len == 0 {
            return Ok(());
        }
        let l = cfg("add_assign", k::elementwise(acc.len, self.sms()))?;
        // SAFETY: add_assign_f32(acc, x, n) over n = acc.len = x.len floats.
        unsafe { self.call_kernel(k::ADD_ASSIGN, l, (mut_ptr(acc), ptr(x), acc.len as u64)) }
    }
    pub(crate) fn add_cuda(&self, a: ew::Add<'_, CudaBuf>) -> Result<()> {
        let ew::Add { out, a, b } = a;
        if out.len == 0 {
            return Ok(());
        }
        let l = cfg("add", k::elementwise(out.len, self.sms()))?;
        // SAFETY: add_f32(out, a, b, n), all n floats; `out` is a distinct &mut buffer, so it
        // aliases neither input (as the kernel requires).
        unsafe { self.call_kernel(k::ADD, l, (mut_ptr(out), ptr(a), ptr(b), out.len as u64)) }
    }
    pub(crate) fn scale_cuda(&self, a: ew::Scale<'_, CudaBuf>) -> Result<()> {
        let ew::Scale { x, s } = a;
        if x.len == 0 {
            return Ok(());
        }
        let l = cfg("scale", k::elementwise(x.len, self.sms()))?;
        // SAFETY: scale_f32(x, s, n) over x's n floats.
        unsafe { self.call_kernel(k::SCALE, l, (mut_ptr(x), s, x.len as u64)) }
    }
    pub(crate) fn sum_squares_cuda(&self, a: ew::SumSquares<'_, CudaBuf>) -> Result<()> {
        let ew::SumSquares { x, out: result } = a;
        if x.len == 0 {
            *result = 0.0;
            return Ok(());
        }
        let l = cfg("sum_squares", k::sum_squares_partials(x.len, self.sms()))?;
        let blocks = l.grid.0 as usize;
        let mut guard = self.scratch();
        let sc = &mut *guard;
        let partials = raw_ptr(sc.f64_partials.get(&self.dev.stream, &self.dev.memory, blocks)?);
        let out_slice = sc.f64_out.get(&self.dev.stream, &self.dev.memory, 1)?;
        let out = raw_ptr(out_slice);
        // SAFETY: sum_squares_partial_f32(x, n, partials) writes gridDim.x doubles; `partials`
        // holds `blocks` of them.
        unsafe { self.call_kernel(k::SUM_SQUARES_PARTIAL, l, (ptr(x), x.len as u64, DevicePtr(partials)))? };
        let args = (DevicePtr(partials), int("sum_squares", "blocks", blocks)?, DevicePtr(out), 0);
        // SAFETY: sum_f64_finish(partials, count, out, accumulate = 0): one block reads `blocks`
        // partials and writes out[0].
        unsafe { self.call_kernel(k::SUM_F64_FINISH, k::sum_finish(), args)? };
        let mut host = [0.0f64];
        self.dev.stream.memcpy_dtoh(&out_slice.slice(0..1), &mut host).map_err(|e| driver_err("sum_squares", e))?;
        drop(guard);
        self.synchronize()?;
        *result = host[0];
        Ok(())
    }
    pub(crate) fn add_broadcast_rows_cuda(&self, a: ew::AddBroadcastRows<'_, CudaBuf>) -> Result<()> {
        let ew::AddBroadcastRows { out, row, row_len } = a;
        let n_blocks = out.len / row_len;
        let op = "add_broadcast_rows";
        let base = out.device_ptr();
        for (first, count, l) in
            k::add_broadcast_rows(row_len, n_blocks).map_err(|detail| RuntimeError::Invalid { op, detail })?
        {
            let out = DevicePtr(base).offset_f32(first * row_len);
            let args = (out, ptr(row), int(op, "blocks", count)?, int(op, "row_len", row_len)?);
            // SAFETY: add_broadcast_rows_f32(out, row, n_blocks, row_len) touches out[0..count·row_len)
            // from the chunk's first block (inside `out`, whose length is n_blocks·row_len) and
            // reads row[0..row_len) (checked prefix).
            unsafe { self.call_kernel(k::ADD_BROADCAST_ROWS, l, args)? };
        }
        Ok(())
    }
    pub(crate) fn sum_broadcast_rows_cuda(&self, a: ew::SumBroadcastRows<'_, CudaBuf>) -> Result<()> {
        let ew::SumBroadcastRows { acc, x, row_len } = a;
        let op = "sum_broadcast_rows";
        let n_blocks = x.len / row_len;
        let l = cfg(op, k::sum_broadcast_rows(row_len))?;
        let args = (mut_ptr(acc), ptr(x), int(op, "blocks", n_blocks)?, int(op, "row_len", row_len)?);
        // SAFETY: sum_broadcast_rows_f32(acc, x, n_blocks, row_len): acc holds >= row_len floats,
        // x n_blocks·row_len.
        unsafe { self.call_kernel(k::SUM_BROADCAST_ROWS, l, args) }
    }
}
