//! The CUDA backend: [`CudaBackend`] implements [`Backend`] with the `dm-kernels` CUDA kernels
//! (NVRTC-compiled on first use, disk-cached) and, optionally, cuBLAS — all through cudarc 0.19
//! with dynamic loading, so this crate builds and runs on machines without CUDA: every entry point
//! probes for the driver library first ([`probe`], [`available`]) and answers a clean error.
//!
//! # Device model
//!
//! One [`CudaBackend`] handle = one GPU, one CUDA context (the primary one), **one compute stream**.
//! Ops only enqueue work on that stream and return; [`Backend::download`] and
//! [`Backend::sum_squares`] synchronise (they return host data), as does
//! [`CudaBackend::synchronize`]. Because a single stream orders everything, cudarc's per-buffer
//! event tracking is turned off. Errors of a kernel call surface at the call; errors inside a
//! kernel surface at the next synchronising call. Every allocation (tensors and the backend's own
//! scratch) is registered with the device's [`MemoryTracker`] first, so a budget refusal names
//! the tensor and allocates nothing; cuBLAS's internal workspace is not tracked.
//!
//! # Precision ([`Precision`]) and bf16 buffers
//!
//! Two independent things decide the arithmetic: the backend's [`Precision`] (how GEMMs and
//! attention compute) and each buffer's [`crate::DType`] (how it is stored; the model's
//! bf16-mixed policy, `model/src/precision.rs`, allocates activations and the Dense-kernel weight
//! copies in bf16).
//!
//! - [`Precision::F32`] — the parity mode: GEMMs run the f32 SIMT kernel (`matmul_f32_*`) or
//!   cuBLAS `Sgemm` ([`MatmulImpl`]); attention the f32 FlashAttention-2 kernels of
//!   `attention.cu`. A GEMM whose two operands are bf16 buffers still runs the bf16 GEMM (their
//!   products are exact in f32 and it accumulates in f32).
//! - [`Precision::Bf16Mixed`] — bf16 tensor cores where the FLOPs are: every GEMM runs the bf16
//!   GEMM (`matmul_bf16_*` or cuBLAS `GemmEx`, f32 accumulation). Operands stored in bf16 (the
//!   persistent weight copies, bf16 activations) are fed to it as they are (copied only into the
//!   padded layout when a leading dimension is not a multiple of 8); f32 operands are rounded to
//!   bf16 into scratch per call. The output is written in its buffer's dtype: `GemmEx` writes
//!   bf16 C itself (rounded once), the custom kernels write f32, so a bf16 output is staged
//!   through an f32 copy and rounded. Attention with head_dim > 32 runs the tensor-core kernels
//!   of `attention_tc.cu` (Q, K, V, P, dO, dS enter the MMAs as bf16; softmax statistics, lse and
//!   D stay f32).
//!
//! **bf16 storage.** A [`CudaBuf`] of [`crate::DType::Bf16`] holds 2-byte elements (the tracker
//! is charged `2·len`), with the CPU backend's semantics (`crate::dtype`): ops read bf16 inputs
//! widened exactly, compute in f32 and round each bf16 output once (nearest even, bit for bit as
//! `half::bf16::from_f32`: the casts round in integer arithmetic). Fill, write (rounded on the
//! host), copy (a cast between dtypes), download (widened on the host) and the GEMMs above
//! handle bf16 natively; **every other op** (LayerNorm, GELU-GLU, embeddings, attention,
//! cross-entropy, elementwise, AdamW) runs its f32 kernels through the staging adapter
//! [`crate::bf16_staging::compute_staged`]: each bf16 buffer of the call is widened into a
//! tracked f32 allocation (`cast_bf16_to_f32`), the f32 kernel runs, each bf16 output is rounded
//! back (`cast_f32_to_bf16`). That costs an extra read and write of those buffers per op and a
//! transient f32 copy (seen by the memory tracker, not by `dalle-mesh plan`); bf16-native
//! kernels for those ops would remove it. The adapter is the same code the CPU tests run
//! (`runtime/tests/bf16_staging.rs`: bit-identical to the CPU's native bf16 ops for every op);
//! **bf16 storage on the CUDA backend is built but untested on GPUs.**
//!
//! Not bf16 (checked by the ops): parameters (fp32 master weights), gradients, AdamW moments,
//! LayerNorm statistics and parameters, attention lse, losses and cross-entropy statistics.
//! NCCL (`parallel/src/comm/nccl.rs`) all-reduces a bf16 buffer through an f32 copy; its other
//! collectives take f32 buffers only.

//! # Op → kernel map
//!
//! Each op's kernels live with the op: the source `runtime/src/ops/<family>/<family>.cu`, its
//! typed descriptors in `kernels.rs` and the kernel-call code in `cuda.rs`; this module holds the
//! device, memory, grids ([`grid`]), the typed-kernel mechanism ([`kernel`]) and the kernel call.
//!
//! | op | kernels (`runtime/src/ops/*/*.cu`) |
//! |---|---|
//! | fill, add, add_assign, scale | `fill_f32` / `fill_bf16`, `add_f32`, `add_assign_f32`, `scale_f32` |
//! | write, copy, download | host copies (bf16 rounded / widened on the host); copy between dtypes: `cast_{f32_to_bf16,bf16_to_f32}` |
//! | any other op with bf16 buffers | `cast_bf16_to_f32` per bf16 buffer, the op's f32 kernels below, `cast_f32_to_bf16` per bf16 output |
//! | sum_squares | `sum_squares_partial_f32` + `sum_f64_finish` (f64), 1-value download |
//! | add/sum_broadcast_rows | `add_broadcast_rows_f32`, `sum_broadcast_rows_f32` |
//! | matmul, F32 | `matmul_f32_{nn,nt,tn,tt}`, or cuBLAS `Sgemm` (operands swapped) |
//! | matmul, Bf16Mixed (or two bf16 operands) | `cast_f32_to_bf16` of f32 operands (+ 2-D copy to padded ld; bf16 operands as they are), `matmul_bf16_*` (bf16 out: f32 copy + `cast_f32_to_bf16`), or cuBLAS `GemmEx` (f32 or bf16 C) |
//! | layernorm_forward | `layernorm_forward_f32` |
//! | layernorm_backward | `layernorm_backward_f32` + `layernorm_param_grads_f32` |
//! | layernorm (sharded, tp) | `layernorm_{sharded_sums,sharded_stats,apply,backward_sums,backward}_f32` |
//! | gelu_glu_forward/backward | `gelu_glu_forward_f32`, `gelu_glu_backward_f32` |
//! | embedding_forward/backward | `embedding_forward_f32`, `embedding_backward_f32` (atomicAdd) |
//! | attention_forward | F32: `attention_fwd_f32_hd*`; Bf16Mixed, hd > 32: `attention_tc_fwd_f32_hd*` |
//! | attention_backward | `attention_bwd_preprocess_f32`, `attention{,_tc}_bwd_dkdv_*`, `..._bwd_dq_*` |
//! | cross_entropy_fused | `cross_entropy_fused_f32` |
//! | vocab_parallel_{max,sums,grad} | `vocab_parallel_{max,sumexp,grad}_f32` |
//! | adamw | `adamw_f32` (bias corrections computed on the host in f64, as the CPU does) |
//!
//! The sharded-LayerNorm kernels exchange row sums as interleaved pairs `[rows][2]`, the trait as
//! `[rows]` or planar `[2, rows]`: 2-D copies (`cuMemcpy2DAsync`, pitch 8 ↔ 4 bytes) convert.

mod blas;
pub mod device;
pub mod grid;
pub mod kernel;
pub mod memory;
mod ops;
pub(crate) use ops::kernel_prelude;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream};

pub use device::{driver_library_present, probe, CudaProbe, DeviceInfo};
pub use memory::{CudaBuf, CudaIds};

use crate::error::{Result, RuntimeError};
use crate::memory::MemoryTracker;
use device::{driver_err, KernelCache, ScratchSet};

/// Arithmetic of the compute-heavy ops (see the module docs for exactly what is mixed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 everywhere: the parity mode.
    #[default]
    F32,
    /// bf16 tensor-core GEMMs and attention with f32 accumulation (bf16 operands used as stored);
    /// the other ops compute in f32 whatever their buffers' dtypes.
    Bf16Mixed,
}

/// Which GEMM implementation [`Backend::matmul`] uses, so the custom kernels can always be
/// compared with the vendor library on the same buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MatmulImpl {
    /// dm-kernels' `matmul.cu` (f32 SIMT or bf16 tensor cores, by precision).
    #[default]
    Custom,
    /// cuBLAS (`Sgemm`, or `GemmEx` with bf16 inputs and f32 or bf16 output).
    Cublas,
}

/// How a [`CudaBackend`] computes. [`CudaBackend::with_options`] makes handles with other
/// settings on the same device, stream and memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaOptions {
    pub precision: Precision,
    pub matmul: MatmulImpl,
    /// Memory budget of the device's tracker in bytes (`None` = unlimited); set at creation.
    pub memory_budget: Option<u64>,
}

/// Shared state of one device (every handle of it points here).
pub(crate) struct DeviceState {
    pub(crate) info: DeviceInfo,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) memory: MemoryTracker,
    pub(crate) kernels: Arc<KernelCache>,
    pub(crate) scratch: Mutex<ScratchSet>,
    pub(crate) blas: Mutex<Option<blas::Blas>>,
    /// Whether the padded bf16 staging (a 2-D copy) works here; cleared on the first failure, after
    /// which operands are staged unpadded (the GEMM's slower, bounds-checked path).
    pub(crate) pad_2d_ok: AtomicBool,
    /// Whether asynchronous 2-D copies with arbitrary pitches work here (layout adapters fall
    /// back to a synchronous copy once they failed).
    pub(crate) copy_2d_async_ok: AtomicBool,
}

/// A CUDA device running DalleBart's ops. Cheap to clone; clones share the device.
#[derive(Clone)]
pub struct CudaBackend {
    pub(crate) dev: Arc<DeviceState>,
    pub(crate) opts: CudaOptions,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.dev.info).field("options", &self.opts).finish()
    }
}

/// Whether a usable GPU is present (driver library loads, initialises, and sees a device).
/// Never panics.
pub fn available() -> bool {
    probe().is_ok()
}

impl CudaBackend {
    /// [`probe`]: the driver's view of the GPUs, or a clean error on machines without CUDA.
    pub fn probe() -> Result<CudaProbe> {
        probe()
    }

    /// [`available`].
    pub fn available() -> bool {
        available()
    }

    /// Opens GPU `ordinal`. Fails cleanly (never panics) when the driver or NVRTC library is
    /// missing, the ordinal does not exist, or the GPU is older than sm_80 (the kernels use bf16
    /// MMA and cp.async).
    pub fn new(ordinal: usize, options: CudaOptions) -> Result<Self> {
        let found = probe()?;
        let info = found.devices.get(ordinal).cloned().ok_or_else(|| {
            RuntimeError::Device(format!("no CUDA device {ordinal}: the driver sees {} GPU(s)", found.devices.len()))
        })?;
        if info.compute_capability.0 < 8 {
            return Err(RuntimeError::Device(format!(
                "{} is {}: dalle-mesh's kernels need compute capability 8.0 or newer (bf16 MMA, cp.async)",
                info.name,
                info.arch()
            )));
        }
        dm_kernels::nvrtc_available()
            .map_err(|e| RuntimeError::Device(format!("CUDA kernels cannot be compiled: {e}")))?;
        let ctx =
            CudaContext::new(ordinal).map_err(|e| driver_err(&format!("creating a context on GPU {ordinal}"), e))?;
        // SAFETY: nothing has been allocated in this context handle yet. One compute stream orders
        // every op; the only other streams (NCCL's) synchronise with it through explicit events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err("creating the compute stream", e))?;
        let memory = MemoryTracker::new(format!("cuda:{ordinal}"), options.memory_budget);
        let kernels = KernelCache::for_device(ordinal, info.arch());
        let dev = DeviceState {
            info,
            ctx,
            stream,
            memory,
            kernels,
            scratch: Mutex::new(ScratchSet::new()),
            blas: Mutex::new(None),
            pad_2d_ok: AtomicBool::new(true),
            copy_2d_async_ok: AtomicBool::new(true),
        };
        Ok(Self { dev: Arc::new(dev), opts: options })
    }

    /// A handle on the same device, stream and memory with other precision / GEMM settings
    /// (the memory budget of the device is not changed).
    pub fn with_options(&self, precision: Precision, matmul: MatmulImpl) -> Self {
        Self { dev: self.dev.clone(), opts: CudaOptions { precision, matmul, ..self.opts } }
    }

    pub fn options(&self) -> CudaOptions {
        self.opts
    }
    pub fn precision(&self) -> Precision {
        self.opts.precision
    }
    pub fn matmul_impl(&self) -> MatmulImpl {
        self.opts.matmul
    }
    pub fn info(&self) -> &DeviceInfo {
        &self.dev.info
    }
    /// The NVRTC architecture the kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        self.dev.kernels.arch()
    }
    /// The compute stream every op enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    /// Waits for every op enqueued so far; reports asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.stream.synchronize().map_err(|e| driver_err("stream synchronize", e))?;
        self.dev.ctx.check_err().map_err(|e| driver_err("a deferred operation", e))
    }

    /// Compiles (or reads from the disk cache) and loads every kernel family now, instead of at
    /// first use; returns the time each family took.
    pub fn preload_kernels(&self) -> Result<Vec<(&'static str, Duration)>> {
        let mut out = Vec::new();
        for fam in crate::ops::kernel_registry::kernel_families() {
            let t0 = Instant::now();
            self.dev.kernels.module(&self.dev.ctx, fam.name)?;
            for e in fam.entry_points() {
                self.dev.kernels.function(&self.dev.ctx, fam.name, e)?;
            }
            out.push((fam.name, t0.elapsed()));
        }
        Ok(out)
    }

    /// Kernel families loaded so far.
    pub fn loaded_kernel_families(&self) -> Vec<&'static str> {
        self.dev.kernels.loaded_families()
    }

    /// Whether operands of mixed-precision GEMMs are staged with padded leading dimensions
    /// (false after the 2-D copy failed once on this device).
    pub fn bf16_padding_active(&self) -> bool {
        self.dev.pad_2d_ok.load(Ordering::Relaxed)
    }

    /// Whether the sharded-LayerNorm layout adapters still use asynchronous 2-D copies (false
    /// after the driver refused one; they then fall back to a synchronous copy).
    pub fn copy_2d_async_active(&self) -> bool {
        self.dev.copy_2d_async_ok.load(Ordering::Relaxed)
    }

    /// Runs `f` with the cuBLAS handle, creating it on first use.
    pub(crate) fn with_blas<R>(&self, f: impl FnOnce(&blas::Blas) -> Result<R>) -> Result<R> {
        let mut guard = self.dev.blas.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(blas::Blas::new(self.dev.stream.clone())?);
        }
        f(guard.as_ref().expect("created above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the driver (CI, this project's build machines) every entry point
    /// must be a clean error; with a driver, probing must still never panic.
    #[test]
    fn probe_without_a_driver_is_a_clean_error() {
        let present = driver_library_present();
        let probed = std::panic::catch_unwind(probe).expect("probe never panics");
        let opened = std::panic::catch_unwind(|| CudaBackend::new(0, CudaOptions::default()).map(|_| ()))
            .expect("CudaBackend::new never panics");
        if !present {
            let err = probed.expect_err("no driver library, no devices").to_string();
            assert!(err.contains("CUDA is unavailable") && err.contains("libcuda"), "{err}");
            assert!(!available() && !CudaBackend::available());
            let err = opened.expect_err("no driver library, no backend").to_string();
            assert!(err.contains("CUDA is unavailable"), "{err}");
        } else {
            eprintln!("libcuda present: probe -> {probed:?}, open -> {:?}", opened.as_ref().map(|_| "ok"));
        }
    }

    #[test]
    fn options_default_to_the_parity_mode() {
        let o = CudaOptions::default();
        assert_eq!((o.precision, o.matmul, o.memory_budget), (Precision::F32, MatmulImpl::Custom, None));
    }

    #[test]
    fn library_candidates_name_the_library() {
        let c = device::library_candidates("cuda");
        assert!(c.contains("libcuda.so"), "{c}");
        assert!(c.contains("libcuda.so.1"), "{c}");
    }
}
