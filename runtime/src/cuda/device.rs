//! Finding CUDA without touching it, describing the GPUs, and the per-device state every
//! [`super::CudaBackend`] handle shares: context, the one compute stream, the kernel modules and
//! the scratch buffers.
//!
//! cudarc (with `dynamic-loading`) panics on the first call into a library it cannot load, so
//! every path into CUDA starts with [`driver_library_present`] (cudarc's `is_culib_present`,
//! memoised): on a machine without a driver the backend is a clean error, never a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{result as dr, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr};

use crate::error::{Result, RuntimeError};
use crate::memory::{MemoryTracker, Reservation};

/// Whether libcuda (the driver) can be loaded. Loading it runs no CUDA call.
pub fn driver_library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries `libloading::Library::new` on cudarc's candidate file
    // names and drops what it opened; loading libcuda has no preconditions.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// Whether libcublas can be loaded (only [`super::MatmulImpl::Cublas`] needs it).
pub fn cublas_library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `driver_library_present`.
    *PRESENT.get_or_init(|| unsafe { cudarc::cublas::sys::is_culib_present() })
}

/// The file names cudarc looks for when loading `lib` (for error messages).
pub fn library_candidates(lib: &str) -> String {
    let mut names = cudarc::get_lib_name_candidates(lib);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names.join(", ")
}

/// The error every entry point returns when the driver library is missing.
pub fn unavailable_error() -> RuntimeError {
    RuntimeError::Device(format!(
        "CUDA is unavailable: the NVIDIA driver library was not found (looked for {}); \
         install the driver or add its folder to LD_LIBRARY_PATH",
        library_candidates("cuda")
    ))
}

pub(crate) fn driver_err(what: &str, e: dr::DriverError) -> RuntimeError {
    RuntimeError::Device(format!("CUDA {what} failed: {e}"))
}

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: u64,
    pub multiprocessors: usize,
    /// Largest dynamic shared memory a block may opt in to, in bytes.
    pub max_shared_memory_per_block_optin: usize,
}

impl DeviceInfo {
    /// The NVRTC architecture of this GPU, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// What [`probe`] found: the driver's CUDA version and every visible GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaProbe {
    /// e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    pub devices: Vec<DeviceInfo>,
}

/// Describes GPU `ordinal` (the driver must be initialised).
fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    let dev = dr::device::get(ordinal as i32).map_err(|e| driver_err(&format!("cuDeviceGet({ordinal})"), e))?;
    let name = dr::device::get_name(dev).map_err(|e| driver_err("cuDeviceGetName", e))?;
    let attr = |a: CUdevice_attribute| -> Result<i32> {
        // SAFETY: `dev` came from cuDeviceGet above.
        unsafe { dr::device::get_attribute(dev, a) }.map_err(|e| driver_err("cuDeviceGetAttribute", e))
    };
    let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let smem = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    // SAFETY: as above.
    let mem = unsafe { dr::device::total_mem(dev) }.map_err(|e| driver_err("cuDeviceTotalMem", e))?;
    Ok(DeviceInfo {
        ordinal,
        name,
        compute_capability: (major, minor),
        total_memory_bytes: mem as u64,
        multiprocessors: sms.max(1) as usize,
        max_shared_memory_per_block_optin: smem.max(0) as usize,
    })
}

/// Initialises the driver and lists the GPUs. A clean error (never a panic) when the driver
/// library is missing, the driver fails to initialise, or there is no GPU.
pub fn probe() -> Result<CudaProbe> {
    if !driver_library_present() {
        return Err(unavailable_error());
    }
    dr::init().map_err(|e| driver_err("cuInit", e))?;
    let mut version = 0;
    // SAFETY: the driver is initialised; `version` is valid for a write.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| driver_err("cuDriverGetVersion", e))?;
    let count = dr::device::get_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
    if count <= 0 {
        return Err(RuntimeError::Device("CUDA is unavailable: the driver sees no GPU".into()));
    }
    let devices = (0..count as usize).map(device_info).collect::<Result<Vec<_>>>()?;
    Ok(CudaProbe { driver_version: version, devices })
}

/// Compiled kernel modules of one device, loaded on first use and cached (functions too), and
/// the dynamic-shared-memory limit each function has been raised to.
///
/// One cache per GPU per process ([`KernelCache::for_device`]): every backend handle of a GPU uses
/// its primary context, so modules loaded once serve them all, and the driver's PTX JIT (seconds
/// per family without a warm `~/.nv/ComputeCache`) runs once per process, not once per backend.
pub(crate) struct KernelCache {
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    smem_raised: Mutex<HashMap<String, usize>>,
}

impl KernelCache {
    /// The process-wide cache of GPU `ordinal`.
    pub(crate) fn for_device(ordinal: usize, arch: String) -> Arc<Self> {
        static CACHES: OnceLock<Mutex<HashMap<usize, Arc<KernelCache>>>> = OnceLock::new();
        let mut caches = CACHES.get_or_init(Mutex::default).lock().unwrap_or_else(PoisonError::into_inner);
        caches.entry(ordinal).or_insert_with(|| Arc::new(Self::new(arch))).clone()
    }

    pub(crate) fn new(arch: String) -> Self {
        Self {
            arch,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            smem_raised: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn arch(&self) -> &str {
        &self.arch
    }

    /// The module of `family`, compiling (NVRTC, disk-cached) and loading it on first use.
    pub(crate) fn module(&self, ctx: &Arc<CudaContext>, family: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = modules.get(family) {
            return Ok(m.clone());
        }
        let fam = crate::ops::kernel_registry::kernel_family(family)
            .ok_or_else(|| RuntimeError::Device(format!("no kernel family named {family}")))?;
        let compiled = dm_kernels::compile_ptx(fam, &self.arch)
            .map_err(|e| RuntimeError::Device(format!("compiling kernel family {family}: {e}")))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(compiled.ptx))
            .map_err(|e| driver_err(&format!("loading the PTX of kernel family {family} for {}", self.arch), e))?;
        modules.insert(family, module.clone());
        Ok(module)
    }

    /// Entry point `entry` of `family`.
    pub(crate) fn function(&self, ctx: &Arc<CudaContext>, family: &'static str, entry: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap_or_else(PoisonError::into_inner).get(entry) {
            return Ok(f.clone());
        }
        let module = self.module(ctx, family)?;
        let f = module
            .load_function(entry)
            .map_err(|e| driver_err(&format!("cuModuleGetFunction({entry}) in family {family}"), e))?;
        self.functions.lock().unwrap_or_else(PoisonError::into_inner).insert(entry.to_string(), f.clone());
        Ok(f)
    }

    /// Raises `f`'s dynamic shared memory limit to at least `bytes` (once per size).
    pub(crate) fn ensure_smem(
        &self,
        ctx: &Arc<CudaContext>,
        entry: &str,
        f: &CudaFunction,
        bytes: usize,
    ) -> Result<()> {
        if bytes <= super::grid::DEFAULT_SMEM_LIMIT {
            return Ok(());
        }
        let mut raised = self.smem_raised.lock().unwrap_or_else(PoisonError::into_inner);
        if raised.get(entry).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(|e| driver_err(&format!("raising {entry}'s dynamic shared memory to {bytes} bytes"), e))?;
        raised.insert(entry.to_string(), bytes);
        Ok(())
    }

    /// Families loaded so far.
    pub(crate) fn loaded_families(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.modules.lock().unwrap_or_else(PoisonError::into_inner).keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// A grow-only device scratch buffer, registered with the memory tracker like any tensor.
pub(crate) struct Scratch<T> {
    name: &'static str,
    slice: Option<CudaSlice<T>>,
    _reservation: Option<Reservation>,
}

impl<T: DeviceRepr> Scratch<T> {
    pub(crate) const fn new(name: &'static str) -> Self {
        Self { name, slice: None, _reservation: None }
    }

    /// At least `len` elements (contents undefined). Growing frees the old buffer in stream order,
    /// so work already enqueued that reads it is unaffected.
    pub(crate) fn get(
        &mut self,
        stream: &Arc<CudaStream>,
        memory: &MemoryTracker,
        len: usize,
    ) -> Result<&mut CudaSlice<T>> {
        let len = len.max(1);
        if self.slice.as_ref().is_none_or(|s| s.len() < len) {
            self.slice = None;
            self._reservation = None;
            let reservation = memory.reserve(self.name, (len * std::mem::size_of::<T>()) as u64)?;
            // SAFETY: scratch contents are always written before they are read (every user
            // fills the range it reads in the same stream first).
            let slice =
                unsafe { stream.alloc::<T>(len) }.map_err(|e| driver_err(&format!("allocating {}", self.name), e))?;
            self.slice = Some(slice);
            self._reservation = Some(reservation);
        }
        Ok(self.slice.as_mut().expect("allocated above"))
    }
}

/// Every scratch buffer of a device, behind one lock: an op holds it while it enqueues, so two
/// threads sharing a backend never interleave uses of one scratch buffer (the stream orders the
/// GPU side).
pub(crate) struct ScratchSet {
    /// bf16 copies of GEMM operands (mixed precision): A, B, and the unpadded cast of either.
    pub bf16_a: Scratch<u16>,
    pub bf16_b: Scratch<u16>,
    pub bf16_tmp: Scratch<u16>,
    /// f32 scratch: attention's D = rowsum(dO∘O), layernorm partials, sharded-LN pairs.
    pub f32_a: Scratch<f32>,
    pub f32_b: Scratch<f32>,
    /// Σx² partials and result.
    pub f64_partials: Scratch<f64>,
    pub f64_out: Scratch<f64>,
}

impl ScratchSet {
    pub(crate) const fn new() -> Self {
        Self {
            bf16_a: Scratch::new("cuda.scratch.bf16_a"),
            bf16_b: Scratch::new("cuda.scratch.bf16_b"),
            bf16_tmp: Scratch::new("cuda.scratch.bf16_tmp"),
            f32_a: Scratch::new("cuda.scratch.f32_a"),
            f32_b: Scratch::new("cuda.scratch.f32_b"),
            f64_partials: Scratch::new("cuda.scratch.f64_partials"),
            f64_out: Scratch::new("cuda.scratch.f64_out"),
        }
    }
}
