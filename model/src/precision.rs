//! The numeric policy of a training run ([`Precision`]), and the bf16 weight copies that
//! bf16-mixed keeps next to the fp32 master weights ([`WeightCopies`], read through [`Weights`]).
//!
//! bf16-mixed follows dalle-mini trained with `--dtype bfloat16` (Flax modules with
//! `dtype = bfloat16`, `param_dtype = float32`):
//! - **weights**: the fp32 master copy is what AdamW updates and checkpoints save; every Dense
//!   kernel (names ending in `.kernel`: q/k/v/out projections, the GLU's Dense_0/1/2, lm_head)
//!   also has a bf16 copy, made from the master once per forward (so once per optimizer step
//!   without gradient accumulation), never per GEMM, and read by the forward and the backward
//!   GEMMs. Embedding tables and LayerNorm scales/biases have no copy: dalle-mini's `nn.Embed`
//!   (no dtype) and LayerNorm compute with the fp32 parameter.
//! - **gradients and AdamW moments**: fp32.
//! - **activations**: the buffers of the activation table marked `Act` are bf16 (every Dense
//!   output, LayerNorm outputs, attention outputs, the residual stream, the GLU intermediates,
//!   the logits, and the activation-gradient temporaries), the rest fp32: the token + position
//!   embeddings (fp32 in dalle-mini), LayerNorm mean/rstd, attention lse, per-token losses and
//!   cross-entropy statistics, and the gradient accumulators (`dres`, `dtmp`, `∂encoder_output`,
//!   the sharded-LayerNorm sums).
//! - **compute**: every op computes in f32 from its (widened) inputs and rounds its bf16 outputs
//!   once; so LayerNorm statistics, the attention softmax, the loss and all reductions are f32.

use crate::params::ParamSpec;
use dm_runtime::{Backend, DType};
use serde::{Deserialize, Serialize};

/// Numeric format of a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// f32 everywhere.
    #[serde(rename = "fp32")]
    Fp32,
    /// Mixed precision: fp32 master weights, gradients and moments, bf16 Dense-kernel copies and
    /// bf16 activations (see the module documentation for which buffers stay fp32).
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
}

impl Precision {
    /// The command-line spelling.
    pub fn name(&self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16Mixed => "bf16-mixed",
        }
    }
    /// The element type of the activation buffers that mixed precision stores in bf16.
    pub fn act_dtype(&self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16Mixed => DType::Bf16,
        }
    }
    /// Bytes of one such activation element.
    pub fn act_bytes(&self) -> u64 {
        self.act_dtype().bytes()
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "bf16-mixed" | "bf16_mixed" | "bf16" => Ok(Precision::Bf16Mixed),
            other => Err(format!("unknown precision `{other}`: use fp32 or bf16-mixed")),
        }
    }
}

/// Whether bf16-mixed keeps a bf16 copy of this parameter: the Dense kernels (GEMM operands).
pub fn has_bf16_copy(spec: &ParamSpec) -> bool {
    spec.name.ends_with(".kernel")
}

/// The bf16 copies of the parameters that have one ([`has_bf16_copy`]), in table order (`None`
/// for the others, and for every parameter in fp32).
pub struct WeightCopies<T> {
    copies: Vec<Option<T>>,
}

impl<T> WeightCopies<T> {
    /// No copies (fp32).
    pub fn none(n: usize) -> Self {
        Self { copies: (0..n).map(|_| None).collect() }
    }
    /// One bf16 buffer per parameter with a copy, registered as `bf16.<name>`.
    pub fn allocate<B: Backend<Buf = T>>(be: &B, specs: &[ParamSpec]) -> dm_runtime::Result<Self> {
        let copies = specs
            .iter()
            .map(|s| has_bf16_copy(s).then(|| be.zeros_typed(&format!("bf16.{}", s.name), s.numel(), DType::Bf16)))
            .map(Option::transpose)
            .collect::<dm_runtime::Result<_>>()?;
        Ok(Self { copies })
    }
    /// Rounds every master parameter that has a copy into it (one cast per tensor).
    pub fn refresh<B: Backend<Buf = T>>(&mut self, be: &B, master: &[T]) -> dm_runtime::Result<()> {
        for (copy, p) in self.copies.iter_mut().zip(master) {
            if let Some(c) = copy {
                be.copy(c, 0, p, 0, be.buf_len(p))?;
            }
        }
        Ok(())
    }
    /// The weights the ops read: the copy where there is one, else the master.
    pub fn view<'a>(&'a self, master: &'a [T]) -> Weights<'a, T> {
        Weights { master, copies: &self.copies }
    }
}

/// The weights one forward/backward reads, indexed by parameter (table order): a parameter's
/// bf16 copy where it has one, its fp32 master otherwise.
#[derive(Clone, Copy)]
pub struct Weights<'a, T> {
    master: &'a [T],
    copies: &'a [Option<T>],
}

impl<T> std::ops::Index<usize> for Weights<'_, T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        self.copies.get(i).and_then(Option::as_ref).unwrap_or(&self.master[i])
    }
}
