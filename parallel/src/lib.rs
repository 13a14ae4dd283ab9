//! dalle-mesh parallelism: the `tp × dp` device [`mesh`], the [`comm`]unicators that connect its
//! ranks, the tensor-parallel building blocks the model is made of ([`layers`]), ZeRO-1
//! ([`zero`]) and the rendezvous of process ranks ([`rendezvous`]).
//!
//! Layering: `kernels → runtime → parallel → model → launch`, each crate knowing only those to
//! its left. This crate knows `dm-runtime` (devices and the [`dm_runtime::Backend`] op interface)
//! and nothing to its right; `dm-model` builds DalleBart from it.

#![warn(missing_docs)]

pub mod comm;
pub mod layers;
pub mod mesh;
pub mod rendezvous;
pub mod zero;

pub use comm::{
    run_ranks, run_ranks_on, CollectiveKind, CommError, CommStats, Communicator, OpStats, RankComms, RankFailure,
    ReduceOp, SoloComm, StatsRecorder, ThreadComm,
};
pub use comm::{CommTimes, TimedComm};
pub use mesh::{Mesh, MeshError};
