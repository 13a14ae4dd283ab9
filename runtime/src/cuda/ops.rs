//! [`Backend`] for [`CudaBackend`]: argument checks (the same as the CPU backend's, so both
//! refuse the same calls with the same messages), then the launchers. Each launcher restates the
//! argument list of its kernel as documented in `kernels/cuda/*.cu`.

use std::ffi::c_void;
use std::sync::atomic::Ordering;

use cudarc::driver::sys as ds;
use dm_kernels::launch::AttentionKernel;

use super::device::{driver_err, Scratch, ScratchSet};
use super::launch_cfg::{self as lc, AttentionPath, Bf16Staging, Launch};
use super::memory::{raw_ptr, CudaBuf, CudaIds};
use super::{CudaBackend, MatmulImpl, Precision};
use crate::backend::{AdamWStep, AttentionShape, Backend, KeyMask, MatmulSpec, VocabRange};
use crate::checks::{
    check_attention, check_embedding, check_layernorm, check_len, check_prefix, check_valid, rows_of, LayerNormLens,
};
use crate::error::{Result, RuntimeError};
use crate::memory::MemoryTracker;

/// One kernel argument, with the exact C type of the parameter.
#[derive(Debug, Clone, Copy)]
enum Arg {
    /// A device pointer (`T*`), 0 for null.
    P(u64),
    /// `int`.
    I(i32),
    /// `float`.
    F(f32),
    /// `u64` (unsigned long long) element counts.
    U(u64),
}

fn cfg(op: &'static str, r: std::result::Result<Launch, String>) -> Result<Launch> {
    r.map_err(|detail| RuntimeError::Invalid { op, detail })
}

fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    lc::to_i32(what, v).map_err(|detail| RuntimeError::Invalid { op, detail })
}

fn ptr(b: &CudaBuf) -> Arg {
    Arg::P(b.device_ptr())
}

fn opt_ptr(b: Option<&CudaBuf>) -> Arg {
    Arg::P(b.map_or(0, CudaBuf::device_ptr))
}

fn mut_ptr(b: &mut CudaBuf) -> Arg {
    Arg::P(b.device_ptr())
}

/// `dst` offset by `elems` f32 elements.
fn offset_f32(base: u64, elems: usize) -> Arg {
    Arg::P(base + 4 * elems as u64)
}

impl CudaBackend {
    fn sms(&self) -> usize {
        self.dev.info.multiprocessors
    }

    fn memory_tracker(&self) -> &MemoryTracker {
        &self.dev.memory
    }

    /// Launches `entry` of kernel family `family`.
    ///
    /// # Safety
    /// `args` must match the kernel's documented parameter list in number, order and C type; every
    /// pointer must be null (where the kernel allows it) or a live allocation of this device large
    /// enough for everything the kernel reads or writes under this launch shape and these sizes;
    /// output buffers must not be read or written by anything else until the stream reaches them.
    unsafe fn launch(&self, family: &'static str, entry: &str, l: Launch, args: &[Arg]) -> Result<()> {
        let kinds: String = args
            .iter()
            .map(|a| match a {
                Arg::P(_) => 'P',
                Arg::U(_) => 'U',
                Arg::I(_) => 'I',
                Arg::F(_) => 'F',
            })
            .collect();
        if super::signatures::signature(family, entry) != Some(kinds.as_str()) {
            return Err(RuntimeError::Device(format!(
                "internal error: arguments {kinds} do not match the declared parameters of {family}/{entry} ({:?})",
                super::signatures::signature(family, entry)
            )));
        }
        let k = &self.dev.kernels;
        let f = k.function(&self.dev.ctx, family, entry)?;
        if l.smem as usize > lc::DEFAULT_SMEM_LIMIT {
            lc::check_smem(entry, l.smem as usize, self.dev.info.max_shared_memory_per_block_optin)
                .map_err(RuntimeError::Device)?;
            k.ensure_smem(&self.dev.ctx, entry, &f, l.smem as usize)?;
        }
        let mut vals: Vec<Arg> = args.to_vec();
        let mut params: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                Arg::P(v) | Arg::U(v) => v as *mut u64 as *mut c_void,
                Arg::I(v) => v as *mut i32 as *mut c_void,
                Arg::F(v) => v as *mut f32 as *mut c_void,
            })
            .collect();
        self.dev.ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        // SAFETY: the caller guarantees the argument list and buffers; `params` points into `vals`,
        // which outlives the call (cuLaunchKernel copies the values before returning); `f` belongs
        // to this context and the stream is the backend's live compute stream.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                l.grid,
                l.block,
                l.smem,
                self.dev.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| {
            driver_err(&format!("launching {entry} (grid {:?}, block {:?}, smem {})", l.grid, l.block, l.smem), e)
        })
    }

    /// A stream-ordered 2-D copy (bytes) between device addresses (`cuMemcpy2DAsync`).
    ///
    /// # Safety
    /// Both ranges (`height` rows of `width` bytes at the given pitches) must lie inside live
    /// allocations of this device, and must not overlap.
    unsafe fn copy_2d_async(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<()> {
        if width == 0 || height == 0 {
            return Ok(());
        }
        let p = memcpy_2d_desc(dst, dst_pitch, src, src_pitch, width, height);
        self.dev.ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        // SAFETY: the descriptor addresses only device memory the caller vouches for; the stream
        // is the backend's compute stream, so the copy is ordered with every kernel.
        unsafe { ds::cuMemcpy2DAsync_v2(&p, self.dev.stream.cu_stream()) }
            .result()
            .map_err(|e| driver_err("cuMemcpy2DAsync", e))
    }

    /// [`Self::copy_2d_async`], falling back to a synchronous `cuMemcpy2DUnaligned` (the driver
    /// may refuse asynchronous intra-device copies whose pitches did not come from
    /// `cuMemAllocPitch`; the fallback is slow but always accepted). Used for the tiny `[rows]`
    /// layout adapters of the sharded LayerNorm ops.
    ///
    /// # Safety
    /// As [`Self::copy_2d_async`].
    unsafe fn copy_2d(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<()> {
        if self.dev.copy_2d_async_ok.load(Ordering::Relaxed) {
            // SAFETY: forwarded.
            match unsafe { self.copy_2d_async(dst, dst_pitch, src, src_pitch, width, height) } {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!("{e}; falling back to synchronous cuMemcpy2DUnaligned for layout adapters");
                    self.dev.copy_2d_async_ok.store(false, Ordering::Relaxed);
                }
            }
        }
        if width == 0 || height == 0 {
            return Ok(());
        }
        self.dev.stream.synchronize().map_err(|e| driver_err("stream synchronize", e))?;
        let p = memcpy_2d_desc(dst, dst_pitch, src, src_pitch, width, height);
        self.dev.ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        // SAFETY: as above; the compute stream is idle (synchronised), so nothing races the copy.
        unsafe { ds::cuMemcpy2DUnaligned_v2(&p) }.result().map_err(|e| driver_err("cuMemcpy2DUnaligned", e))?;
        self.dev.ctx.synchronize().map_err(|e| driver_err("context synchronize", e))
    }

    // ---- elementwise ------------------------------------------------------------------------

    fn fill_raw(&self, op: &'static str, ptr: u64, n: usize, value: f32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::elementwise(n, self.sms()))?;
        // SAFETY: fill_f32(x, value, n) writes x[0..n); `ptr` addresses at least n floats.
        unsafe { self.launch("elementwise", "fill_f32", l, &[Arg::P(ptr), Arg::F(value), Arg::U(n as u64)]) }
    }

    /// Rounds `n` f32 at `src` to bf16 at `dst`.
    fn cast_bf16(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let l = cfg("matmul", lc::grid_stride(n, self.sms()))?;
        // SAFETY: cast_f32_to_bf16(out, x, n): out holds n bf16, x n floats (callers size both).
        unsafe { self.launch("elementwise", "cast_f32_to_bf16", l, &[Arg::P(dst), Arg::P(src), Arg::U(n as u64)]) }
    }

    /// Stages one f32 GEMM operand as bf16 in `dst` (through `tmp` when its leading dimension
    /// is padded); returns the bf16 matrix's address and leading dimension.
    fn stage_bf16(
        &self,
        dst: &mut Scratch<u16>,
        tmp: &mut Scratch<u16>,
        src: u64,
        st: Bf16Staging,
    ) -> Result<(u64, usize)> {
        let (stream, mem) = (&self.dev.stream, self.memory_tracker());
        let n = st.rows * st.cols;
        if st.needs_padding() && self.dev.pad_2d_ok.load(Ordering::Relaxed) {
            let t = raw_ptr(tmp.get(stream, mem, n)?);
            self.cast_bf16(t, src, n)?;
            let d = raw_ptr(dst.get(stream, mem, st.padded_len())?);
            let (sp, dp, w, h) = st.copy_2d_bytes();
            // SAFETY: `t` holds rows×cols bf16 (pitch cols·2), `d` rows×ld bf16 (pitch ld·2 >= width);
            // they are distinct scratch buffers.
            match unsafe { self.copy_2d_async(d, dp, t, sp, w, h) } {
                Ok(()) => return Ok((d, st.ld)),
                Err(e) => {
                    tracing::warn!(
                        "padded bf16 staging disabled on this device ({e}); GEMMs fall back to unpadded operands"
                    );
                    self.dev.pad_2d_ok.store(false, Ordering::Relaxed);
                }
            }
        }
        let d = raw_ptr(dst.get(stream, mem, n)?);
        self.cast_bf16(d, src, n)?;
        Ok((d, st.cols))
    }

    fn matmul_f32(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, s: MatmulSpec) -> Result<()> {
        let (lda, ldb, ldc) = lc::matmul_lds(&s);
        let (pa, pb, pc) = (a.device_ptr(), b.device_ptr(), out.device_ptr());
        match self.opts.matmul {
            MatmulImpl::Cublas => self.with_blas(|blas| {
                // SAFETY: lengths were checked against the spec: a holds m·k, b k·n, out m·n floats
                // with these leading dimensions; out is a distinct &mut buffer.
                unsafe { blas.sgemm(&s, pa, lda, pb, ldb, pc) }
            }),
            MatmulImpl::Custom => {
                let l = cfg("matmul", lc::matmul_f32(s.m, s.n))?;
                let entry = format!("matmul_f32_{}{}", tn(s.trans_a), tn(s.trans_b));
                let args = self.gemm_args(pc, pa, lda, pb, ldb, ldc, &s)?;
                // SAFETY: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta) as matmul.cu documents;
                // the buffers hold the checked m·k, k·n and m·n floats; gridDim.z = 1 (no split-K).
                unsafe { self.launch("matmul", &entry, l, &args) }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_args(
        &self,
        c: u64,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        ldc: usize,
        s: &MatmulSpec,
    ) -> Result<[Arg; 11]> {
        let op = "matmul";
        Ok([
            Arg::P(c),
            Arg::P(a),
            Arg::P(b),
            Arg::I(int(op, "m", s.m)?),
            Arg::I(int(op, "n", s.n)?),
            Arg::I(int(op, "k", s.k)?),
            Arg::I(int(op, "lda", lda)?),
            Arg::I(int(op, "ldb", ldb)?),
            Arg::I(int(op, "ldc", ldc)?),
            Arg::F(1.0),
            Arg::F(if s.accumulate { 1.0 } else { 0.0 }),
        ])
    }

    fn matmul_bf16(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, s: MatmulSpec) -> Result<()> {
        let (sa, sb) = lc::bf16_staging(&s);
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sc = &mut *guard;
        let (pa, lda) = self.stage_bf16(&mut sc.bf16_a, &mut sc.bf16_tmp, a.device_ptr(), sa)?;
        let (pb, ldb) = self.stage_bf16(&mut sc.bf16_b, &mut sc.bf16_tmp, b.device_ptr(), sb)?;
        let pc = out.device_ptr();
        match self.opts.matmul {
            MatmulImpl::Cublas => self.with_blas(|blas| {
                // SAFETY: pa/pb hold the bf16 operands with leading dimensions lda/ldb (staged
                // above, in stream order before this GEMM); out holds m·n floats.
                unsafe { blas.gemm_bf16(&s, pa, lda, pb, ldb, pc) }
            }),
            MatmulImpl::Custom => {
                let tile = lc::choose_bf16_tile(s.m, s.n, self.sms());
                let l = cfg("matmul", lc::matmul_bf16(s.m, s.n, tile))?;
                let entry = format!("matmul_bf16_{}{}_{}", tn(s.trans_a), tn(s.trans_b), tile.suffix());
                let args = self.gemm_args(pc, pa, lda, pb, ldb, s.n, &s)?;
                // SAFETY: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta) with bf16 A and B staged
                // above (leading dimensions lda, ldb >= their column counts), f32 C of m·n; no split-K.
                unsafe { self.launch("matmul", &entry, l, &args) }
            }
        }
    }

    fn attention_path(&self, op: &'static str, s: &AttentionShape) -> Result<AttentionPath> {
        AttentionPath::choose(s.head_dim, self.opts.precision == Precision::Bf16Mixed)
            .map_err(|detail| RuntimeError::Invalid { op, detail })
    }

    fn attention_dims(&self, op: &'static str, s: &AttentionShape) -> Result<[Arg; 5]> {
        Ok([
            Arg::I(int(op, "batch", s.batch)?),
            Arg::I(int(op, "heads", s.heads)?),
            Arg::I(int(op, "q_len", s.q_len)?),
            Arg::I(int(op, "kv_len", s.kv_len)?),
            Arg::I(int(op, "head_dim", s.head_dim)?),
        ])
    }

    /// Shared by the single-device and sharded layernorm backward: the block-partial backward
    /// kernel, then the fixed-order reduction of the partials into dscale/dbias.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_launch(
        &self,
        sc: &mut ScratchSet,
        op: &'static str,
        dx: &mut CudaBuf,
        dscale: Option<&mut CudaBuf>,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        scale: Option<&CudaBuf>,
        row_sums: u64,
        dim: usize,
        dim_global: usize,
        accumulate_dx: bool,
    ) -> Result<()> {
        let rows = x.len / dim;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::layernorm_backward(rows, dim, self.sms()))?;
        let parts = l.grid.0 as usize;
        let partials = raw_ptr(sc.f32_a.get(&self.dev.stream, &self.dev.memory, parts * 2 * dim)?);
        let args = [
            mut_ptr(dx),
            Arg::P(partials),
            ptr(dout),
            ptr(x),
            ptr(mean),
            ptr(rstd),
            opt_ptr(scale),
            Arg::P(row_sums),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "dim", dim)?),
            Arg::I(int(op, "dim_global", dim_global)?),
            Arg::I(accumulate_dx as i32),
        ];
        // SAFETY: layernorm_backward_f32(dx, partials, dout, x, mean, rstd, scale, row_sums, rows,
        // dim, dim_global, accumulate_dx): x/dout/dx hold rows·dim, mean/rstd rows, scale dim (or
        // null), row_sums 2·rows interleaved (or null); partials grid·2·dim; dim <= block·16
        // (launch_cfg::layernorm_backward checked it).
        unsafe { self.launch("layernorm", "layernorm_backward_f32", l, &args)? };
        let l = cfg(op, lc::layernorm_param_grads(dim))?;
        let args = [
            Arg::P(dscale.map_or(0, |d| d.device_ptr())),
            mut_ptr(dbias),
            Arg::P(partials),
            Arg::I(int(op, "parts", parts)?),
            Arg::I(int(op, "dim", dim)?),
        ];
        // SAFETY: layernorm_param_grads_f32(dscale, dbias, partials, n_parts, dim): dscale (or
        // null) and dbias hold dim floats, partials the n_parts·2·dim written just above.
        unsafe { self.launch("layernorm", "layernorm_param_grads_f32", l, &args) }
    }
}

/// A device-to-device `CUDA_MEMCPY2D` descriptor.
fn memcpy_2d_desc(
    dst: u64,
    dst_pitch: usize,
    src: u64,
    src_pitch: usize,
    width: usize,
    height: usize,
) -> ds::CUDA_MEMCPY2D {
    ds::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: ds::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: ds::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_pitch,
        WidthInBytes: width,
        Height: height,
    }
}

fn tn(t: bool) -> &'static str {
    if t {
        "t"
    } else {
        "n"
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> String {
        format!("{} ({})", self.dev.memory.device(), self.dev.info.name)
    }
    fn memory(&self) -> &MemoryTracker {
        &self.dev.memory
    }

    fn zeros(&self, name: &str, len: usize) -> Result<CudaBuf> {
        CudaBuf::zeros(&self.dev.stream, &self.dev.memory, name, len)
    }
    fn upload(&self, name: &str, data: &[f32]) -> Result<CudaBuf> {
        CudaBuf::upload(&self.dev.stream, &self.dev.memory, name, data)
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; buf.len];
        if buf.len > 0 {
            self.dev
                .stream
                .memcpy_dtoh(&buf.data.slice(0..buf.len), &mut out)
                .map_err(|e| driver_err("download", e))?;
        }
        self.synchronize()?;
        Ok(out)
    }
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<CudaIds> {
        CudaIds::upload(&self.dev.stream, &self.dev.memory, name, ids)
    }
    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    fn ids_len(&self, ids: &CudaIds) -> usize {
        ids.len()
    }
    fn write(&self, dst: &mut CudaBuf, offset: usize, data: &[f32]) -> Result<()> {
        let end = offset + data.len();
        if end > dst.len {
            return Err(RuntimeError::Shape {
                op: "write",
                detail: format!("range {offset}..{end} exceeds buffer of {}", dst.len),
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        self.dev.stream.memcpy_htod(data, &mut dst.data.slice_mut(offset..end)).map_err(|e| driver_err("write", e))
    }
    fn fill(&self, buf: &mut CudaBuf, value: f32) -> Result<()> {
        self.fill_raw("fill", buf.device_ptr(), buf.len, value)
    }
    fn copy(&self, dst: &mut CudaBuf, dst_off: usize, src: &CudaBuf, src_off: usize, len: usize) -> Result<()> {
        if dst_off + len > dst.len || src_off + len > src.len {
            return Err(RuntimeError::Shape {
                op: "copy",
                detail: format!(
                    "copy of {len} from offset {src_off} (of {}) to offset {dst_off} (of {}) is out of range",
                    src.len, dst.len
                ),
            });
        }
        if len == 0 {
            return Ok(());
        }
        self.dev
            .stream
            .memcpy_dtod(&src.data.slice(src_off..src_off + len), &mut dst.data.slice_mut(dst_off..dst_off + len))
            .map_err(|e| driver_err("copy", e))
    }

    fn add_assign(&self, acc: &mut CudaBuf, x: &CudaBuf) -> Result<()> {
        check_len("add_assign", "x", x.len, acc.len)?;
        if acc.len == 0 {
            return Ok(());
        }
        let l = cfg("add_assign", lc::elementwise(acc.len, self.sms()))?;
        // SAFETY: add_assign_f32(acc, x, n) over n = acc.len = x.len floats.
        unsafe { self.launch("elementwise", "add_assign_f32", l, &[mut_ptr(acc), ptr(x), Arg::U(acc.len as u64)]) }
    }
    fn add(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        check_len("add", "a", a.len, out.len)?;
        check_len("add", "b", b.len, out.len)?;
        if out.len == 0 {
            return Ok(());
        }
        let l = cfg("add", lc::elementwise(out.len, self.sms()))?;
        // SAFETY: add_f32(out, a, b, n), all n floats; `out` is a distinct &mut buffer, so it
        // aliases neither input (as the kernel requires).
        unsafe { self.launch("elementwise", "add_f32", l, &[mut_ptr(out), ptr(a), ptr(b), Arg::U(out.len as u64)]) }
    }
    fn scale(&self, x: &mut CudaBuf, s: f32) -> Result<()> {
        if x.len == 0 {
            return Ok(());
        }
        let l = cfg("scale", lc::elementwise(x.len, self.sms()))?;
        // SAFETY: scale_f32(x, s, n) over x's n floats.
        unsafe { self.launch("elementwise", "scale_f32", l, &[mut_ptr(x), Arg::F(s), Arg::U(x.len as u64)]) }
    }
    fn sum_squares(&self, x: &CudaBuf) -> Result<f64> {
        if x.len == 0 {
            return Ok(0.0);
        }
        let l = cfg("sum_squares", lc::sum_squares_partials(x.len, self.sms()))?;
        let blocks = l.grid.0 as usize;
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sc = &mut *guard;
        let partials = raw_ptr(sc.f64_partials.get(&self.dev.stream, &self.dev.memory, blocks)?);
        let out_slice = sc.f64_out.get(&self.dev.stream, &self.dev.memory, 1)?;
        let out = raw_ptr(out_slice);
        // SAFETY: sum_squares_partial_f32(x, n, partials) writes gridDim.x doubles; `partials`
        // holds `blocks` of them.
        unsafe {
            self.launch("elementwise", "sum_squares_partial_f32", l, &[ptr(x), Arg::U(x.len as u64), Arg::P(partials)])?
        };
        let args = [Arg::P(partials), Arg::I(int("sum_squares", "blocks", blocks)?), Arg::P(out), Arg::I(0)];
        // SAFETY: sum_f64_finish(partials, count, out, accumulate = 0): one block reads `blocks`
        // partials and writes out[0].
        unsafe { self.launch("elementwise", "sum_f64_finish", lc::sum_finish(), &args)? };
        let mut host = [0.0f64];
        self.dev.stream.memcpy_dtoh(&out_slice.slice(0..1), &mut host).map_err(|e| driver_err("sum_squares", e))?;
        drop(guard);
        self.synchronize()?;
        Ok(host[0])
    }
    fn add_broadcast_rows(&self, out: &mut CudaBuf, row: &CudaBuf, row_len: usize) -> Result<()> {
        check_prefix("add_broadcast_rows", row.len, row_len)?;
        let n_blocks = rows_of("add_broadcast_rows", out.len, row_len)?;
        let op = "add_broadcast_rows";
        let base = out.device_ptr();
        for (first, count, l) in
            lc::add_broadcast_rows(row_len, n_blocks).map_err(|detail| RuntimeError::Invalid { op, detail })?
        {
            let args = [
                offset_f32(base, first * row_len),
                ptr(row),
                Arg::I(int(op, "blocks", count)?),
                Arg::I(int(op, "row_len", row_len)?),
            ];
            // SAFETY: add_broadcast_rows_f32(out, row, n_blocks, row_len) touches out[0..count·row_len)
            // from the chunk's first block (inside `out`, whose length is n_blocks·row_len) and
            // reads row[0..row_len) (checked prefix).
            unsafe { self.launch("embedding", "add_broadcast_rows_f32", l, &args)? };
        }
        Ok(())
    }
    fn sum_broadcast_rows(&self, acc: &mut CudaBuf, x: &CudaBuf, row_len: usize) -> Result<()> {
        let op = "sum_broadcast_rows";
        check_prefix(op, acc.len, row_len)?;
        let n_blocks = rows_of(op, x.len, row_len)?;
        let l = cfg(op, lc::sum_broadcast_rows(row_len))?;
        let args = [mut_ptr(acc), ptr(x), Arg::I(int(op, "blocks", n_blocks)?), Arg::I(int(op, "row_len", row_len)?)];
        // SAFETY: sum_broadcast_rows_f32(acc, x, n_blocks, row_len): acc holds >= row_len floats,
        // x n_blocks·row_len.
        unsafe { self.launch("embedding", "sum_broadcast_rows_f32", l, &args) }
    }

    fn matmul(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, spec: MatmulSpec) -> Result<()> {
        check_len("matmul", "a", a.len, spec.m * spec.k)?;
        check_len("matmul", "b", b.len, spec.k * spec.n)?;
        check_len("matmul", "out", out.len, spec.m * spec.n)?;
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        if spec.k == 0 {
            return if spec.accumulate { Ok(()) } else { self.fill_raw("matmul", out.device_ptr(), out.len, 0.0) };
        }
        match self.opts.precision {
            Precision::F32 => self.matmul_f32(out, a, b, spec),
            Precision::Bf16Mixed => self.matmul_bf16(out, a, b, spec),
        }
    }

    fn layernorm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        scale: Option<&CudaBuf>,
        bias: &CudaBuf,
        dim: usize,
    ) -> Result<()> {
        let op = "layernorm_forward";
        let lens = LayerNormLens {
            x: x.len,
            out: out.len,
            mean: mean.len,
            rstd: rstd.len,
            bias: bias.len,
            scale: scale.map(|s| s.len),
        };
        let rows = check_layernorm(op, lens, dim)?;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::layernorm_rows(rows))?;
        let args = [
            mut_ptr(out),
            mut_ptr(mean),
            mut_ptr(rstd),
            ptr(x),
            opt_ptr(scale),
            ptr(bias),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "dim", dim)?),
        ];
        // SAFETY: layernorm_forward_f32(out, mean, rstd, x, scale, bias, rows, dim) with the lengths
        // checked above (scale may be null).
        unsafe { self.launch("layernorm", "layernorm_forward_f32", l, &args) }
    }

    fn layernorm_backward(
        &self,
        dx: &mut CudaBuf,
        dscale: Option<&mut CudaBuf>,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        scale: Option<&CudaBuf>,
        dim: usize,
        accumulate_dx: bool,
    ) -> Result<()> {
        let op = "layernorm_backward";
        let rows = rows_of(op, x.len, dim)?;
        check_len(op, "dx", dx.len, x.len)?;
        check_len(op, "dout", dout.len, x.len)?;
        check_len(op, "mean", mean.len, rows)?;
        check_len(op, "rstd", rstd.len, rows)?;
        check_len(op, "dbias", dbias.len, dim)?;
        if scale.is_some() != dscale.is_some() {
            return Err(RuntimeError::Invalid {
                op,
                detail: "scale and dscale must both be given or both be absent".into(),
            });
        }
        if let Some(s) = scale {
            check_len(op, "scale", s.len, dim)?;
        }
        if let Some(ds) = dscale.as_deref() {
            check_len(op, "dscale", ds.len, dim)?;
        }
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.layernorm_backward_launch(
            &mut guard,
            op,
            dx,
            dscale,
            dbias,
            dout,
            x,
            mean,
            rstd,
            scale,
            0,
            dim,
            dim,
            accumulate_dx,
        )
    }

    fn layernorm_row_sums(&self, sums: &mut CudaBuf, x: &CudaBuf, center: Option<&CudaBuf>, dim: usize) -> Result<()> {
        let op = "layernorm_row_sums";
        let rows = rows_of(op, x.len, dim)?;
        check_len(op, "sums", sums.len, rows)?;
        if let Some(c) = center {
            check_len(op, "center", c.len, rows)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pairs = raw_ptr(guard.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let l = cfg(op, lc::layernorm_rows(rows))?;
        let args =
            [ptr(x), opt_ptr(center), Arg::P(pairs), Arg::I(int(op, "rows", rows)?), Arg::I(int(op, "dim", dim)?)];
        // SAFETY: layernorm_sharded_sums_f32(x, center, sums, rows, dim) writes 2·rows interleaved
        // floats (Σ(x−c), Σ(x−c)²) into the pairs scratch; x holds rows·dim, center rows (or null).
        unsafe { self.launch("layernorm", "layernorm_sharded_sums_f32", l, &args)? };
        // The trait wants Σx without a centre and Σ(x−c)² with one: pick that column of the pairs.
        let column = if center.is_some() { 4 } else { 0 };
        // SAFETY: reads one float of each 8-byte pair (rows of them) from the pairs scratch and
        // writes `sums`' rows floats contiguously.
        unsafe { self.copy_2d(sums.device_ptr(), 4, pairs + column, 8, 4, rows) }
    }

    fn layernorm_finish_stats(&self, sums: &mut CudaBuf, dim_global: usize, squared: bool) -> Result<()> {
        let op = "layernorm_finish_stats";
        if dim_global == 0 {
            return Err(RuntimeError::Invalid { op, detail: "dim_global is 0".into() });
        }
        let rows = sums.len;
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sc = &mut *guard;
        let pairs = raw_ptr(sc.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let dummy = raw_ptr(sc.f32_a.get(&self.dev.stream, &self.dev.memory, rows)?);
        // pairs = (S, 0) for the mean, (0, S) for the variance about an already-subtracted mean:
        // layernorm_sharded_stats_f32 then gives mean = S/n, resp. rstd = 1/√(S/n + eps).
        self.fill_raw(op, pairs, 2 * rows, 0.0)?;
        let column = if squared { 4 } else { 0 };
        // SAFETY: writes one float of each pair of the 2·rows pairs scratch from sums' rows floats.
        unsafe { self.copy_2d(pairs + column, 8, sums.device_ptr(), 4, 4, rows)? };
        let (mean_out, rstd_out) = if squared { (dummy, sums.device_ptr()) } else { (sums.device_ptr(), dummy) };
        let l = cfg(op, lc::one_thread_each(rows))?;
        let args = [
            Arg::P(pairs),
            Arg::P(0),
            Arg::P(mean_out),
            Arg::P(rstd_out),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "dim_global", dim_global)?),
        ];
        // SAFETY: layernorm_sharded_stats_f32(sums, center = null, mean, rstd, rows, dim_global):
        // reads 2·rows pairs, writes rows floats to each of mean and rstd (sums' buffer and the
        // dummy scratch, distinct from the pairs); grid ceil(rows/256) of 256 threads.
        unsafe { self.launch("layernorm", "layernorm_sharded_stats_f32", l, &args) }
    }

    fn layernorm_apply(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        scale: Option<&CudaBuf>,
        bias: &CudaBuf,
        dim: usize,
    ) -> Result<()> {
        let op = "layernorm_apply";
        let lens = LayerNormLens {
            x: x.len,
            out: out.len,
            mean: mean.len,
            rstd: rstd.len,
            bias: bias.len,
            scale: scale.map(|s| s.len),
        };
        let rows = check_layernorm(op, lens, dim)?;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::layernorm_rows(rows))?;
        let args = [
            mut_ptr(out),
            ptr(x),
            ptr(mean),
            ptr(rstd),
            opt_ptr(scale),
            ptr(bias),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "dim", dim)?),
        ];
        // SAFETY: layernorm_apply_f32(out, x, mean, rstd, scale, bias, rows, dim), lengths checked.
        unsafe { self.launch("layernorm", "layernorm_apply_f32", l, &args) }
    }

    fn layernorm_backward_row_sums(
        &self,
        sums: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        scale: Option<&CudaBuf>,
        dim: usize,
    ) -> Result<()> {
        let op = "layernorm_backward_row_sums";
        let rows = rows_of(op, x.len, dim)?;
        check_len(op, "sums", sums.len, 2 * rows)?;
        check_len(op, "dout", dout.len, x.len)?;
        check_len(op, "mean", mean.len, rows)?;
        check_len(op, "rstd", rstd.len, rows)?;
        if let Some(s) = scale {
            check_len(op, "scale", s.len, dim)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pairs = raw_ptr(guard.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let l = cfg(op, lc::layernorm_rows(rows))?;
        let args = [
            ptr(dout),
            ptr(x),
            ptr(mean),
            ptr(rstd),
            opt_ptr(scale),
            Arg::P(pairs),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "dim", dim)?),
        ];
        // SAFETY: layernorm_backward_sums_f32(dout, x, mean, rstd, scale, sums, rows, dim) writes
        // 2·rows interleaved floats into the pairs scratch; inputs have the checked lengths.
        unsafe { self.launch("layernorm", "layernorm_backward_sums_f32", l, &args)? };
        let s = sums.device_ptr();
        // SAFETY: de-interleave the pairs into the trait's [2, rows] layout: column 0 into
        // sums[0..rows), column 1 into sums[rows..2·rows).
        unsafe {
            self.copy_2d(s, 4, pairs, 8, 4, rows)?;
            self.copy_2d(s + 4 * rows as u64, 4, pairs + 4, 8, 4, rows)
        }
    }

    fn layernorm_backward_apply(
        &self,
        dx: &mut CudaBuf,
        dscale: Option<&mut CudaBuf>,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        scale: Option<&CudaBuf>,
        sums: &CudaBuf,
        dim: usize,
        dim_global: usize,
        accumulate_dx: bool,
    ) -> Result<()> {
        let op = "layernorm_backward_apply";
        let rows = rows_of(op, x.len, dim)?;
        check_len(op, "dx", dx.len, x.len)?;
        check_len(op, "dout", dout.len, x.len)?;
        check_len(op, "mean", mean.len, rows)?;
        check_len(op, "rstd", rstd.len, rows)?;
        check_len(op, "sums", sums.len, 2 * rows)?;
        check_len(op, "dbias", dbias.len, dim)?;
        if scale.is_some() != dscale.is_some() {
            return Err(RuntimeError::Invalid {
                op,
                detail: "scale and dscale must both be given or both be absent".into(),
            });
        }
        if let Some(s) = scale {
            check_len(op, "scale", s.len, dim)?;
        }
        if let Some(s) = dscale.as_deref() {
            check_len(op, "dscale", s.len, dim)?;
        }
        if dim_global == 0 {
            return Err(RuntimeError::Invalid { op, detail: "dim_global is 0".into() });
        }
        if rows == 0 {
            return Ok(());
        }
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pairs = raw_ptr(guard.f32_b.get(&self.dev.stream, &self.dev.memory, 2 * rows)?);
        let s = sums.device_ptr();
        // SAFETY: interleave the trait's [2, rows] sums into the kernel's pairs (sums[r] ->
        // pairs[2r], sums[rows + r] -> pairs[2r + 1]); the pairs scratch holds 2·rows floats.
        // The backward launch below uses f32_a for its partials, so the pairs (f32_b) survive.
        unsafe {
            self.copy_2d(pairs, 8, s, 4, 4, rows)?;
            self.copy_2d(pairs + 4, 8, s + 4 * rows as u64, 4, 4, rows)?;
        }
        self.layernorm_backward_launch(
            &mut guard,
            op,
            dx,
            dscale,
            dbias,
            dout,
            x,
            mean,
            rstd,
            scale,
            pairs,
            dim,
            dim_global,
            accumulate_dx,
        )
    }

    fn gelu_glu_forward(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        check_len("gelu_glu_forward", "a", a.len, out.len)?;
        check_len("gelu_glu_forward", "b", b.len, out.len)?;
        if out.len == 0 {
            return Ok(());
        }
        let l = cfg("gelu_glu_forward", lc::grid_stride(out.len, self.sms()))?;
        // SAFETY: gelu_glu_forward_f32(out, a, b, n), all n floats.
        unsafe {
            self.launch("glu", "gelu_glu_forward_f32", l, &[mut_ptr(out), ptr(a), ptr(b), Arg::U(out.len as u64)])
        }
    }
    fn gelu_glu_backward(
        &self,
        da: &mut CudaBuf,
        db: &mut CudaBuf,
        dout: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
    ) -> Result<()> {
        let n = dout.len;
        for (what, len) in [("da", da.len), ("db", db.len), ("a", a.len), ("b", b.len)] {
            check_len("gelu_glu_backward", what, len, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let l = cfg("gelu_glu_backward", lc::grid_stride(n, self.sms()))?;
        let args = [mut_ptr(da), mut_ptr(db), ptr(dout), ptr(a), ptr(b), Arg::U(n as u64)];
        // SAFETY: gelu_glu_backward_f32(da, db, dout, a, b, n), all n floats.
        unsafe { self.launch("glu", "gelu_glu_backward_f32", l, &args) }
    }

    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        table: &CudaBuf,
        ids: &CudaIds,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        check_embedding(op, range, dim)?;
        check_len(op, "table", table.len, range.len() * dim)?;
        check_len(op, "out", out.len, ids.len() * dim)?;
        if ids.is_empty() {
            return Ok(());
        }
        let l = cfg(op, lc::embedding(ids.len(), dim))?;
        let args = [
            mut_ptr(out),
            ptr(table),
            Arg::P(ids.device_ptr()),
            Arg::I(int(op, "ids", ids.len())?),
            Arg::I(int(op, "dim", dim)?),
            Arg::I(int(op, "vocab start", range.start)?),
            Arg::I(int(op, "vocab end", range.end)?),
        ];
        // SAFETY: embedding_forward_f32(out, table, ids, n_ids, dim, start, end): reads table rows
        // only for ids in [start, end) (range.len() rows held), writes n_ids·dim floats.
        unsafe { self.launch("embedding", "embedding_forward_f32", l, &args) }
    }
    fn embedding_backward(
        &self,
        dtable: &mut CudaBuf,
        dout: &CudaBuf,
        ids: &CudaIds,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        check_embedding(op, range, dim)?;
        check_len(op, "dtable", dtable.len, range.len() * dim)?;
        check_len(op, "dout", dout.len, ids.len() * dim)?;
        if ids.is_empty() {
            return Ok(());
        }
        let l = cfg(op, lc::embedding(ids.len(), dim))?;
        let args = [
            mut_ptr(dtable),
            ptr(dout),
            Arg::P(ids.device_ptr()),
            Arg::I(int(op, "ids", ids.len())?),
            Arg::I(int(op, "dim", dim)?),
            Arg::I(int(op, "vocab start", range.start)?),
            Arg::I(int(op, "vocab end", range.end)?),
        ];
        // SAFETY: embedding_backward_f32(dtable, dout, ids, n_ids, dim, start, end): atomically
        // adds into rows of ids in range (range.len() rows held), reads n_ids·dim floats of dout.
        unsafe { self.launch("embedding", "embedding_backward_f32", l, &args) }
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        mask: KeyMask<'_, Self>,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_forward";
        check_attention(op, &shape, q.len, k.len, v.len, mask.map(|m| m.len()))?;
        check_len(op, "out", out.len, q.len)?;
        check_len(op, "lse", lse.len, shape.lse_len())?;
        let path = self.attention_path(op, &shape)?;
        let l = cfg(op, path.launch(AttentionKernel::Forward, &shape))?;
        let family = if matches!(path, AttentionPath::TensorCore { .. }) { "attention_tc" } else { "attention" };
        let [b, h, tq, tk, hd] = self.attention_dims(op, &shape)?;
        let args = [
            mut_ptr(out),
            mut_ptr(lse),
            ptr(q),
            ptr(k),
            ptr(v),
            Arg::P(mask.map_or(0, CudaIds::device_ptr)),
            b,
            h,
            tq,
            tk,
            hd,
            Arg::I(shape.causal as i32),
            Arg::F(1.0 / (shape.head_dim as f32).sqrt()),
        ];
        // SAFETY: attention_{,tc_}fwd_*(out, lse, q, k, v, mask, B, H, Tq, Tk, hd, causal, scale):
        // q/out hold B·Tq·H·hd, k/v B·Tk·H·hd, lse B·H·Tq floats, mask B·Tk ints or null (all
        // checked); the hd variant serves head_dim and the dynamic shared memory was raised.
        unsafe { self.launch(family, &path.entry(AttentionKernel::Forward), l, &args) }
    }

    fn attention_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        mask: KeyMask<'_, Self>,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_backward";
        check_attention(op, &shape, q.len, k.len, v.len, mask.map(|m| m.len()))?;
        check_len(op, "dq", dq.len, q.len)?;
        check_len(op, "dk", dk.len, k.len)?;
        check_len(op, "dv", dv.len, v.len)?;
        check_len(op, "dout", dout.len, q.len)?;
        check_len(op, "out", out.len, q.len)?;
        check_len(op, "lse", lse.len, shape.lse_len())?;
        let path = self.attention_path(op, &shape)?;
        let family = if matches!(path, AttentionPath::TensorCore { .. }) { "attention_tc" } else { "attention" };
        let [b, h, tq, tk, hd] = self.attention_dims(op, &shape)?;
        let mut guard = self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let d = raw_ptr(guard.f32_a.get(&self.dev.stream, &self.dev.memory, shape.lse_len())?);
        let l = cfg(op, lc::attention_preprocess(&shape))?;
        // SAFETY: attention_bwd_preprocess_f32(D, dout, out, B, H, Tq, hd) writes B·H·Tq floats of
        // D (the scratch holds lse_len) from dout and out (B·Tq·H·hd each). The f32 version serves
        // both paths (attention_tc.cu's header: f32 I/O uses attention.cu's preprocess).
        unsafe {
            self.launch(
                "attention",
                "attention_bwd_preprocess_f32",
                l,
                &[Arg::P(d), ptr(dout), ptr(out), b, h, tq, hd],
            )?
        };
        let (maskp, causal, scale) = (
            Arg::P(mask.map_or(0, CudaIds::device_ptr)),
            Arg::I(shape.causal as i32),
            Arg::F(1.0 / (shape.head_dim as f32).sqrt()),
        );
        let l = cfg(op, path.launch(AttentionKernel::BackwardDkDv, &shape))?;
        let args = [
            mut_ptr(dk),
            mut_ptr(dv),
            ptr(dout),
            ptr(q),
            ptr(k),
            ptr(v),
            ptr(lse),
            Arg::P(d),
            maskp,
            b,
            h,
            tq,
            tk,
            hd,
            causal,
            scale,
        ];
        // SAFETY: *_bwd_dkdv_*(dk, dv, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale):
        // dk/dv overwritten (B·Tk·H·hd each), inputs with the checked lengths, D written just above.
        unsafe { self.launch(family, &path.entry(AttentionKernel::BackwardDkDv), l, &args)? };
        let l = cfg(op, path.launch(AttentionKernel::BackwardDq, &shape))?;
        let args = [
            mut_ptr(dq),
            ptr(dout),
            ptr(q),
            ptr(k),
            ptr(v),
            ptr(lse),
            Arg::P(d),
            maskp,
            b,
            h,
            tq,
            tk,
            hd,
            causal,
            scale,
        ];
        // SAFETY: *_bwd_dq_*(dq, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale): dq
        // overwritten (B·Tq·H·hd), the rest as above.
        unsafe { self.launch(family, &path.entry(AttentionKernel::BackwardDq), l, &args) }
    }

    fn cross_entropy_fused(
        &self,
        logits: &mut CudaBuf,
        losses: &mut CudaBuf,
        targets: &CudaIds,
        classes: usize,
        grad_scale: f32,
    ) -> Result<()> {
        let op = "cross_entropy_fused";
        let rows = rows_of(op, logits.len, classes)?;
        check_len(op, "losses", losses.len, rows)?;
        check_len(op, "targets", targets.len(), rows)?;
        if let Some((r, &t)) = targets.host().iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= classes) {
            return Err(RuntimeError::Invalid { op, detail: format!("target {t} at row {r} is outside 0..{classes}") });
        }
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, classes))?;
        let c = Arg::I(int(op, "classes", classes)?);
        let args = [
            mut_ptr(logits),
            mut_ptr(losses),
            Arg::P(targets.device_ptr()),
            Arg::I(int(op, "rows", rows)?),
            c,
            c,
            Arg::F(grad_scale),
        ];
        // SAFETY: cross_entropy_fused_f32(logits, losses, targets, rows, valid_cols, ld, grad_scale)
        // with ld = valid_cols = classes: logits rows·classes, losses and targets rows (checked).
        unsafe { self.launch("cross_entropy", "cross_entropy_fused_f32", l, &args) }
    }

    fn vocab_parallel_max(
        &self,
        row_max: &mut CudaBuf,
        logits: &CudaBuf,
        cols: usize,
        valid_cols: usize,
    ) -> Result<()> {
        let op = "vocab_parallel_max";
        let rows = rows_of(op, logits.len, cols)?;
        check_len(op, "row_max", row_max.len, rows)?;
        check_valid(op, cols, valid_cols)?;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, valid_cols))?;
        let args = [
            ptr(logits),
            mut_ptr(row_max),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "valid_cols", valid_cols)?),
            Arg::I(int(op, "cols", cols)?),
        ];
        // SAFETY: vocab_parallel_max_f32(logits, row_max, rows, valid_cols, ld): logits rows·cols,
        // row_max rows floats.
        unsafe { self.launch("cross_entropy", "vocab_parallel_max_f32", l, &args) }
    }

    fn vocab_parallel_sums(
        &self,
        stats: &mut CudaBuf,
        logits: &CudaBuf,
        row_max: &CudaBuf,
        targets: &CudaIds,
        cols: usize,
        valid_cols: usize,
        vocab_start: usize,
    ) -> Result<()> {
        let op = "vocab_parallel_sums";
        let rows = rows_of(op, logits.len, cols)?;
        check_len(op, "stats", stats.len, 2 * rows)?;
        check_len(op, "row_max", row_max.len, rows)?;
        check_len(op, "targets", targets.len(), rows)?;
        check_valid(op, cols, valid_cols)?;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, valid_cols))?;
        let s = stats.device_ptr();
        let args = [
            ptr(logits),
            ptr(row_max),
            Arg::P(s),
            offset_f32(s, rows),
            Arg::P(targets.device_ptr()),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "valid_cols", valid_cols)?),
            Arg::I(int(op, "cols", cols)?),
            Arg::I(int(op, "vocab_start", vocab_start)?),
        ];
        // SAFETY: vocab_parallel_sumexp_f32(logits, global_max, sum_exp, target_logit, targets, rows,
        // valid_cols, ld, vocab_start): sum_exp = stats[0..rows), target_logit = stats[rows..2·rows).
        unsafe { self.launch("cross_entropy", "vocab_parallel_sumexp_f32", l, &args) }
    }

    fn vocab_parallel_grad(
        &self,
        logits: &mut CudaBuf,
        losses: &mut CudaBuf,
        row_max: &CudaBuf,
        stats: &CudaBuf,
        targets: &CudaIds,
        cols: usize,
        valid_cols: usize,
        vocab_start: usize,
        grad_scale: f32,
    ) -> Result<()> {
        let op = "vocab_parallel_grad";
        let rows = rows_of(op, logits.len, cols)?;
        check_len(op, "losses", losses.len, rows)?;
        check_len(op, "row_max", row_max.len, rows)?;
        check_len(op, "stats", stats.len, 2 * rows)?;
        check_len(op, "targets", targets.len(), rows)?;
        check_valid(op, cols, valid_cols)?;
        if rows == 0 {
            return Ok(());
        }
        let l = cfg(op, lc::cross_entropy(rows, cols))?;
        let s = stats.device_ptr();
        let args = [
            mut_ptr(logits),
            mut_ptr(losses),
            ptr(row_max),
            Arg::P(s),
            offset_f32(s, rows),
            Arg::P(targets.device_ptr()),
            Arg::I(int(op, "rows", rows)?),
            Arg::I(int(op, "valid_cols", valid_cols)?),
            Arg::I(int(op, "cols", cols)?),
            Arg::I(int(op, "vocab_start", vocab_start)?),
            Arg::F(grad_scale),
        ];
        // SAFETY: vocab_parallel_grad_f32(logits, losses, global_max, global_sum, global_target_logit,
        // targets, rows, valid_cols, ld, vocab_start, grad_scale): logits rows·cols rewritten, losses
        // rows, sum = stats[0..rows), target logit = stats[rows..2·rows).
        unsafe { self.launch("cross_entropy", "vocab_parallel_grad_f32", l, &args) }
    }

    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        step: &AdamWStep,
    ) -> Result<()> {
        let n = param.len;
        check_len("adamw", "grad", grad.len, n)?;
        check_len("adamw", "m", m.len, n)?;
        check_len("adamw", "v", v.len, n)?;
        if step.step == 0 {
            return Err(RuntimeError::Invalid { op: "adamw", detail: "step count is 1-based".into() });
        }
        if n == 0 {
            return Ok(());
        }
        let (bc1, bc2) = lc::adamw_bias_corrections(step.b1, step.b2, step.step);
        let l = cfg("adamw", lc::grid_stride(n, self.sms()))?;
        let args = [
            mut_ptr(param),
            ptr(grad),
            mut_ptr(m),
            mut_ptr(v),
            Arg::U(n as u64),
            Arg::F(step.lr),
            Arg::F(step.b1),
            Arg::F(step.b2),
            Arg::F(step.eps),
            Arg::F(step.weight_decay),
            Arg::F(bc1),
            Arg::F(bc2),
            Arg::F(step.grad_scale),
            Arg::P(0),
        ];
        // SAFETY: adamw_f32(param, grad, m, v, n, lr, b1, b2, eps, wd, bc1, bc2, grad_scale,
        // grad_scale_dev = null), the four arrays n floats each.
        unsafe { self.launch("adamw", "adamw_f32", l, &args) }
    }
}
