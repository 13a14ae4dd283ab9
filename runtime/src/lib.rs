//! dalle-mesh runtime: devices, memory accounting and the op-level backend interface.
//!
//! The model drives every computation through [`Backend`]: an llm.c-style set of ops, each with an
//! explicit forward and backward, over flat f32 device buffers whose shapes the caller passes.
//! [`cpu::CpuBackend`] is the reference implementation (multi-threaded, fused attention and
//! cross-entropy); a CUDA backend implements the same trait.

pub mod backend;
pub mod bf16_staging;
pub mod conformance;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod memory;
pub mod ops;
pub mod profiled;

pub use backend::{AdamWStep, AttentionShape, Backend, KeyMask, MatmulSpec, VocabRange};
pub use dtype::DType;
pub use error::{Result, RuntimeError};
pub use memory::{MemoryReport, MemoryTracker};
pub use profiled::{OpClass, OpProfile, Profiled};
