//! CUDA C kernel sources of dalle-mesh and their compilation to PTX at run time.
//!
//! Every kernel family is one `.cu` file next to its op (`runtime/src/ops/<family>/`), embedded
//! in the binary with `include_str!`, described by a [`KernelFamily`] (entry points with typed
//! parameter lists, `-D` constants) and compiled by NVRTC (through cudarc, loaded dynamically) on first use; the PTX
//! is cached on disk, keyed by a hash of everything that determines it. NVRTC needs no GPU, so
//! every kernel can be compiled — and, when `ptxas` is available, assembled for its register and
//! spill report — on any CI machine: see [`check`] and `scripts/cuda-ci-deps.sh`.
//!
//! No math lives here: this crate holds the shared prelude (`cuda/common.cuh`) and compiles and
//! checks the families it is handed; the families and their kernel-call code live in dm-runtime.

mod cache;
mod check;
mod compile;
mod error;
mod family;

pub use check::{check, find_ptxas, CheckLine, PtxasReport};
pub use compile::{
    compile_ptx, compile_ptx_uncached, include_dir, nvrtc_available, nvrtc_version, Arch, CompiledKernel,
};
pub use error::{Error, Result};
pub use family::{declared_entry_points, mismatch, ptx_entry_params, Define, KernelDecl, KernelFamily, Param, PRELUDE};
