//! The case bodies, one file per op family (plus the tensor-parallel pieces, bf16 operands, the
//! model-sized cases, the shape errors and the sensitivity checks);
//! each public `fn name<B: Backend>(be, ck) -> CaseResult` is one case of
//! [`for_each_conformance_case`](crate::for_each_conformance_case).

use super::numerics::*;
use super::{CaseResult, Checks};
use crate::{AdamWStep, AttentionShape, Backend, MatmulSpec, RuntimeError, VocabRange};

mod adamw;
mod attention;
mod bf16;
mod cross_entropy;
mod elementwise;
mod embedding;
mod gelu_glu;
mod large;
mod layernorm;
mod matmul;
mod sensitivity;
mod shape_errors;
mod sharded;

pub use adamw::*;
pub use attention::*;
pub use bf16::*;
pub use cross_entropy::*;
pub use elementwise::*;
pub use embedding::*;
pub use gelu_glu::*;
pub use large::*;
pub use layernorm::*;
pub use matmul::*;
pub use sensitivity::*;
pub use shape_errors::*;
pub use sharded::*;
