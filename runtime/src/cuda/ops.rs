//! The kernel-call plumbing of [`CudaBackend`]: the call of a typed kernel descriptor
//! ([`CudaBackend::call_kernel`]), stream-ordered 2-D copies, and [`Backend`] itself, whose
//! `compute` hands each (already checked) op to its family's CUDA code in
//! `runtime/src/ops/<family>/cuda.rs`.

use std::ffi::c_void;
use std::sync::atomic::Ordering;

use cudarc::driver::sys as ds;

use super::device::{driver_err, ScratchSet};
use super::grid::{self as lc, KernelGrid};
use super::kernel::{DevicePtr, Kernel, KernelArgs, RawArg};
use super::memory::{CudaBuf, CudaIds, DeviceData};
use super::CudaBackend;
use crate::backend::Backend;
use crate::bf16_staging::compute_staged;
use crate::dtype::DType;
use crate::error::{Result, RuntimeError};
use crate::memory::MemoryTracker;
use crate::ops::{HostIds, Op, Storage};

/// What the op families' CUDA code (`runtime/src/ops/<family>/cuda.rs`) needs to call kernels.
pub(crate) mod kernel_prelude {
    pub(crate) use super::super::device::{driver_err, Scratch, ScratchSet};
    pub(crate) use super::super::grid::{self as lc, Bf16Staging, KernelGrid};
    pub(crate) use super::super::kernel::{DevicePtr, Kernel, KernelArgs};
    pub(crate) use super::super::memory::{raw_ptr, CudaBuf, CudaIds};
    pub(crate) use super::super::{CudaBackend, MatmulImpl, Precision};
    pub(crate) use super::{cfg, int, mut_ptr, opt_ptr, ptr};
    pub(crate) use crate::backend::{AttentionShape, MatmulSpec};
    pub(crate) use crate::error::{Result, RuntimeError};
    pub(crate) use std::sync::atomic::Ordering;
}

pub(crate) fn cfg(op: &'static str, r: std::result::Result<KernelGrid, String>) -> Result<KernelGrid> {
    r.map_err(|detail| RuntimeError::Invalid { op, detail })
}

pub(crate) fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    lc::to_i32(what, v).map_err(|detail| RuntimeError::Invalid { op, detail })
}

/// The device address of a buffer the kernel reads.
pub(crate) fn ptr(b: &CudaBuf) -> DevicePtr {
    DevicePtr(b.device_ptr())
}

/// The device address of an optional buffer, null when absent.
pub(crate) fn opt_ptr(b: Option<&CudaBuf>) -> DevicePtr {
    DevicePtr(b.map_or(0, CudaBuf::device_ptr))
}

/// The device address of a buffer the kernel writes (taking `&mut` keeps outputs distinct).
pub(crate) fn mut_ptr(b: &mut CudaBuf) -> DevicePtr {
    DevicePtr(b.device_ptr())
}

impl CudaBackend {
    pub(crate) fn sms(&self) -> usize {
        self.dev.info.multiprocessors
    }

    pub(crate) fn memory_tracker(&self) -> &MemoryTracker {
        &self.dev.memory
    }

    /// The device's scratch buffers, locked (a poisoned lock is still usable: scratch holds no
    /// invariant a panic could break).
    pub(crate) fn scratch(&self) -> std::sync::MutexGuard<'_, ScratchSet> {
        self.dev.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Calls kernel `k` with `args` (whose type the descriptor fixes) on the compute stream.
    ///
    /// # Safety
    /// Every pointer must be null (where the kernel allows it) or a live allocation of this device large
    /// enough for everything the kernel reads or writes under this grid and these sizes;
    /// output buffers must not be read or written by anything else until the stream reaches them.
    pub(crate) unsafe fn call_kernel<A: KernelArgs>(&self, kernel: Kernel<A>, l: KernelGrid, args: A) -> Result<()> {
        let (family, entry) = (kernel.family, kernel.entry);
        let k = &self.dev.kernels;
        let f = k.function(&self.dev.ctx, family, entry)?;
        if l.smem as usize > lc::DEFAULT_SMEM_LIMIT {
            lc::check_smem(entry, l.smem as usize, self.dev.info.max_shared_memory_per_block_optin)
                .map_err(RuntimeError::Device)?;
            k.ensure_smem(&self.dev.ctx, entry, &f, l.smem as usize)?;
        }
        let mut vals = args.raw();
        let mut params: Vec<*mut c_void> = vals.iter_mut().map(RawArg::as_param).collect();
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
            driver_err(&format!("calling {entry} (grid {:?}, block {:?}, smem {})", l.grid, l.block, l.smem), e)
        })
    }

    /// A stream-ordered 2-D copy (bytes) between device addresses (`cuMemcpy2DAsync`): `height`
    /// rows of `width` bytes from `(src, src_pitch)` to `(dst, dst_pitch)`.
    ///
    /// # Safety
    /// Both ranges (`height` rows of `width` bytes at the given pitches) must lie inside live
    /// allocations of this device, and must not overlap.
    pub(crate) unsafe fn copy_2d_async(
        &self,
        (dst, dst_pitch): (u64, usize),
        (src, src_pitch): (u64, usize),
        (width, height): (usize, usize),
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
    pub(crate) unsafe fn copy_2d(
        &self,
        (dst, dst_pitch): (u64, usize),
        (src, src_pitch): (u64, usize),
        (width, height): (usize, usize),
    ) -> Result<()> {
        if self.dev.copy_2d_async_ok.load(Ordering::Relaxed) {
            // SAFETY: forwarded.
            match unsafe { self.copy_2d_async((dst, dst_pitch), (src, src_pitch), (width, height)) } {
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

impl Storage for CudaBuf {
    fn elems(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        CudaBuf::dtype(self)
    }
}

impl Storage for CudaIds {
    fn elems(&self) -> usize {
        self.len()
    }
}

impl HostIds for CudaIds {
    fn host_ids(&self) -> &[i32] {
        self.host()
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
    fn zeros_typed(&self, name: &str, len: usize, dtype: DType) -> Result<CudaBuf> {
        CudaBuf::zeros_typed(&self.dev.stream, &self.dev.memory, name, len, dtype)
    }
    /// The elements as f32 (bf16 ones widened exactly on the host).
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let n = buf.len;
        let stream = &self.dev.stream;
        let out = match &buf.data {
            DeviceData::F32(d) => {
                let mut out = vec![0.0f32; n];
                if n > 0 {
                    stream.memcpy_dtoh(&d.slice(0..n), &mut out).map_err(|e| driver_err("download", e))?;
                }
                self.synchronize()?;
                out
            }
            DeviceData::Bf16(d) => {
                let mut bits = vec![0u16; n];
                if n > 0 {
                    stream.memcpy_dtoh(&d.slice(0..n), &mut bits).map_err(|e| driver_err("download", e))?;
                }
                self.synchronize()?;
                bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect()
            }
        };
        Ok(out)
    }
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<CudaIds> {
        CudaIds::upload(&self.dev.stream, &self.dev.memory, name, ids)
    }

    /// Fill, write and copy handle bf16 buffers natively, as does a GEMM that feeds bf16
    /// operands to the bf16 GEMM ([`CudaBackend::bf16_gemm`]); every other op whose buffers include
    /// bf16 ones runs its f32 kernels through the staging adapter ([`compute_staged`]).
    fn compute(&self, op: Op<'_, CudaBuf, CudaIds>) -> Result<()> {
        match op {
            Op::Fill(a) => self.fill_cuda(a),
            Op::Write(a) => self.write_cuda(a),
            Op::Copy(a) => self.copy_cuda(a),
            Op::Matmul(a) if self.bf16_gemm(&a) => self.matmul_cuda(a),
            op => compute_staged(self, op, |op| self.compute_f32(op)),
        }
    }
}

impl CudaBackend {
    /// One op whose buffers are all f32 (bf16 ones were staged by [`compute_staged`]).
    fn compute_f32(&self, op: Op<'_, CudaBuf, CudaIds>) -> Result<()> {
        match op {
            Op::Fill(a) => self.fill_cuda(a),
            Op::Write(a) => self.write_cuda(a),
            Op::Copy(a) => self.copy_cuda(a),
            Op::AddAssign(a) => self.add_assign_cuda(a),
            Op::Add(a) => self.add_cuda(a),
            Op::Scale(a) => self.scale_cuda(a),
            Op::SumSquares(a) => self.sum_squares_cuda(a),
            Op::AddBroadcastRows(a) => self.add_broadcast_rows_cuda(a),
            Op::SumBroadcastRows(a) => self.sum_broadcast_rows_cuda(a),
            Op::Matmul(a) => self.matmul_cuda(a),
            Op::LayerNormForward(a) => self.layernorm_forward_cuda(a),
            Op::LayerNormBackward(a) => self.layernorm_backward_cuda(a),
            Op::LayerNormRowSums(a) => self.layernorm_row_sums_cuda(a),
            Op::LayerNormFinishStats(a) => self.layernorm_finish_stats_cuda(a),
            Op::LayerNormApply(a) => self.layernorm_apply_cuda(a),
            Op::LayerNormBackwardRowSums(a) => self.layernorm_backward_row_sums_cuda(a),
            Op::LayerNormBackwardApply(a) => self.layernorm_backward_apply_cuda(a),
            Op::GeluGluForward(a) => self.gelu_glu_forward_cuda(a),
            Op::GeluGluBackward(a) => self.gelu_glu_backward_cuda(a),
            Op::EmbeddingForward(a) => self.embedding_forward_cuda(a),
            Op::EmbeddingBackward(a) => self.embedding_backward_cuda(a),
            Op::AttentionForward(a) => self.attention_forward_cuda(a),
            Op::AttentionBackward(a) => self.attention_backward_cuda(a),
            Op::CrossEntropyFused(a) => self.cross_entropy_fused_cuda(a),
            Op::VocabParallelMax(a) => self.vocab_parallel_max_cuda(a),
            Op::VocabParallelSums(a) => self.vocab_parallel_sums_cuda(a),
            Op::VocabParallelGrad(a) => self.vocab_parallel_grad_cuda(a),
            Op::AdamW(a) => self.adamw_cuda(a),
        }
    }
}
