//! CUDA C kernel sources of dalle-mesh and their compilation to PTX at run time.
//!
//! Every kernel family is one `.cu` file under `kernels/cuda/`, embedded in the binary with
//! `include_str!` and compiled by NVRTC (through cudarc, loaded dynamically) on first use; the PTX
//! is cached on disk, keyed by a hash of everything that determines it. NVRTC needs no GPU, so
//! every kernel can be compiled — and, when `ptxas` is available, assembled for its register and
//! spill report — on any CI machine: see [`check`] and `scripts/cuda-ci-deps.sh`.
//!
//! No math lives here: this crate only names, compiles and checks the kernels. The kernel-call code (grid,
//! block, shared memory, argument order) are documented at the top of each `.cu` file and above
//! every kernel; [`grid`] collects the constants they need.

mod cache;
mod check;
mod compile;
mod error;
mod families;
pub mod grid;

pub use check::{check, find_ptxas, CheckLine, PtxasReport};
pub use compile::{
    compile_ptx, compile_ptx_uncached, include_dir, nvrtc_available, nvrtc_version, Arch, CompiledKernel,
};
pub use error::{Error, Result};
pub use families::{families, family, KernelFamily, PRELUDE};
