//! The CPU backend: the f32 reference every other backend is checked against, and what CI and
//! laptops train with. Ops are plain functions over slices in the submodules (one file per op
//! family, `crate::ops::<family>::cpu`); [`CpuBackend`] only dispatches (the checks ran in front
//! of it, in [`Backend`]'s named methods). Threads come from rayon's global pool;
//! GEMMs go through the `gemm` crate (AVX2/AVX-512 kernels picked at run time).

// The op families' CPU code lives in `crate::ops::<family>::cpu`; these paths keep the old names.
pub use crate::ops::adamw::cpu as adamw;
pub use crate::ops::attention::cpu as attention;
pub use crate::ops::cross_entropy::cpu as cross_entropy;
pub use crate::ops::elementwise::cpu as elementwise;
pub use crate::ops::embedding::cpu as embedding;
pub use crate::ops::gelu_glu::cpu as glu;
pub use crate::ops::layernorm::cpu as layernorm;
pub use crate::ops::math;
pub use crate::ops::matmul::cpu as matmul;

mod buf;
pub use buf::{CpuBuf, ValuesMut};

use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::Result;
use crate::memory::{MemoryTracker, Reservation};
use crate::ops::{HostIds, Op, Storage};

/// An i32 buffer in host memory (token ids, masks).
#[derive(Debug)]
pub struct CpuIds {
    data: Vec<i32>,
    _reservation: Reservation,
}

impl CpuIds {
    pub fn as_slice(&self) -> &[i32] {
        &self.data
    }
}

/// The CPU device. Cheap to clone; clones share the memory tracker.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    memory: MemoryTracker,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::with_budget("cpu", None)
    }
    /// A CPU device with a memory budget in bytes (`None` = unlimited), named e.g. `cpu:rank3`.
    pub fn with_budget(name: &str, budget_bytes: Option<u64>) -> Self {
        Self { memory: MemoryTracker::new(name, budget_bytes) }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Storage for CpuBuf {
    fn elems(&self) -> usize {
        self.len()
    }
    fn dtype(&self) -> DType {
        CpuBuf::dtype(self)
    }
}

impl Storage for CpuIds {
    fn elems(&self) -> usize {
        self.data.len()
    }
}

impl HostIds for CpuIds {
    fn host_ids(&self) -> &[i32] {
        &self.data
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn name(&self) -> String {
        self.memory.device().to_string()
    }
    fn memory(&self) -> &MemoryTracker {
        &self.memory
    }

    fn zeros(&self, name: &str, len: usize) -> Result<CpuBuf> {
        self.zeros_typed(name, len, DType::F32)
    }
    fn zeros_typed(&self, name: &str, len: usize, dtype: DType) -> Result<CpuBuf> {
        let reservation = self.memory.reserve(name, len as u64 * dtype.bytes())?;
        Ok(CpuBuf::zeros(len, dtype, reservation))
    }
    fn upload(&self, name: &str, data: &[f32]) -> Result<CpuBuf> {
        let reservation = self.memory.reserve(name, std::mem::size_of_val(data) as u64)?;
        Ok(CpuBuf::from_f32(data.to_vec(), reservation))
    }
    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.values().into_owned())
    }
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<CpuIds> {
        let reservation = self.memory.reserve(name, std::mem::size_of_val(ids) as u64)?;
        Ok(CpuIds { data: ids.to_vec(), _reservation: reservation })
    }

    fn compute(&self, op: Op<'_, CpuBuf, CpuIds>) -> Result<()> {
        compute(op);
        Ok(())
    }
}

/// An optional input as f32.
fn opt(b: Option<&CpuBuf>) -> Option<std::borrow::Cow<'_, [f32]>> {
    b.map(CpuBuf::values)
}

/// A LayerNorm backward step on the host values of `a`'s buffers: `run` gets the gradients
/// (written back into bf16 buffers when the guards drop, after it returns) and the inputs.
fn layernorm_backward_on_host(
    a: crate::ops::layernorm::Backward<'_, CpuBuf>,
    run: impl FnOnce(layernorm::Grads<'_>, layernorm::BackwardInputs<'_>),
) {
    let (dout, x, mean, rstd, scale) = (a.dout.values(), a.x.values(), a.mean.values(), a.rstd.values(), opt(a.scale));
    let (mut dx, mut dscale, mut dbias) = (a.dx.values_mut(), a.dscale.map(|s| s.values_mut()), a.dbias.values_mut());
    run(
        layernorm::Grads {
            dx: &mut dx,
            dscale: dscale.as_deref_mut(),
            dbias: &mut dbias,
            accumulate_dx: a.accumulate_dx,
        },
        layernorm::BackwardInputs { dout: &dout, x: &x, mean: &mean, rstd: &rstd, scale: scale.as_deref(), dim: a.dim },
    )
}

/// Runs one checked op on host slices: inputs through [`CpuBuf::values`], outputs through
/// [`CpuBuf::values_mut`] (f32 buffers in place; bf16 ones widened, computed in f32, rounded once).
fn compute(op: Op<'_, CpuBuf, CpuIds>) {
    match op {
        Op::Fill(a) => elementwise::fill(&mut a.buf.values_mut(), a.value),
        Op::Write(a) => a.dst.values_mut()[a.offset..a.offset + a.data.len()].copy_from_slice(a.data),
        Op::Copy(a) => a.dst.values_mut()[a.dst_off..a.dst_off + a.len]
            .copy_from_slice(&a.src.values()[a.src_off..a.src_off + a.len]),
        Op::AddAssign(a) => elementwise::add_assign(&mut a.acc.values_mut(), &a.x.values()),
        Op::Add(a) => elementwise::add(&mut a.out.values_mut(), &a.a.values(), &a.b.values()),
        Op::Scale(a) => elementwise::scale(&mut a.x.values_mut(), a.s),
        Op::SumSquares(a) => *a.out = elementwise::sum_squares(&a.x.values()),
        Op::AddBroadcastRows(a) => {
            elementwise::add_broadcast_rows(&mut a.out.values_mut(), &a.row.values()[..a.row_len])
        }
        Op::SumBroadcastRows(a) => elementwise::sum_broadcast_rows(&mut a.acc.values_mut()[..a.row_len], &a.x.values()),
        Op::Matmul(a) => matmul::matmul(&mut a.out.values_mut(), &a.a.values(), &a.b.values(), a.spec),
        Op::LayerNormForward(a) => {
            let (x, bias) = (&a.x.values(), &a.bias.values());
            layernorm::forward(
                &mut a.out.values_mut(),
                &mut a.mean.values_mut(),
                &mut a.rstd.values_mut(),
                x,
                opt(a.scale).as_deref(),
                bias,
                a.dim,
            )
        }
        Op::LayerNormBackward(a) => layernorm_backward_on_host(a, layernorm::backward),
        Op::LayerNormRowSums(a) => {
            layernorm::row_sums(&mut a.sums.values_mut(), &a.x.values(), opt(a.center).as_deref(), a.dim)
        }
        Op::LayerNormFinishStats(a) => layernorm::finish_stats(&mut a.sums.values_mut(), a.dim_global, a.squared),
        Op::LayerNormApply(a) => {
            let (mean, rstd) = (&a.mean.values(), &a.rstd.values());
            layernorm::apply(
                &mut a.out.values_mut(),
                &a.x.values(),
                mean,
                rstd,
                opt(a.scale).as_deref(),
                &a.bias.values(),
                a.dim,
            )
        }
        Op::LayerNormBackwardRowSums(a) => {
            let (dout, x, mean, rstd, scale) =
                (a.dout.values(), a.x.values(), a.mean.values(), a.rstd.values(), opt(a.scale));
            let inputs = layernorm::BackwardInputs {
                dout: &dout,
                x: &x,
                mean: &mean,
                rstd: &rstd,
                scale: scale.as_deref(),
                dim: a.dim,
            };
            layernorm::backward_row_sums(&mut a.sums.values_mut(), inputs)
        }
        Op::LayerNormBackwardApply(a) => {
            let (fused, sums, dim_global) = a.split();
            let sums = sums.values();
            layernorm_backward_on_host(fused, |grads, inputs| {
                layernorm::backward_apply(grads, inputs, &sums, dim_global)
            })
        }
        Op::GeluGluForward(a) => glu::forward(&mut a.out.values_mut(), &a.a.values(), &a.b.values()),
        Op::GeluGluBackward(a) => glu::backward(
            &mut a.da.values_mut(),
            &mut a.db.values_mut(),
            &a.dout.values(),
            &a.a.values(),
            &a.b.values(),
        ),
        Op::EmbeddingForward(a) => {
            embedding::forward(&mut a.out.values_mut(), &a.table.values(), &a.ids.data, a.range, a.dim)
        }
        Op::EmbeddingBackward(a) => {
            embedding::backward(&mut a.dtable.values_mut(), &a.dout.values(), &a.ids.data, a.range, a.dim)
        }
        Op::AttentionForward(a) => {
            let x = &a.x;
            let mask = x.mask.map(CpuIds::as_slice);
            attention::forward(
                &mut a.out.values_mut(),
                &mut a.lse.values_mut(),
                &x.q.values(),
                &x.k.values(),
                &x.v.values(),
                mask,
                a.shape,
            )
        }
        Op::AttentionBackward(a) => attention::backward(
            attention::Grads { dq: &mut a.dq.values_mut(), dk: &mut a.dk.values_mut(), dv: &mut a.dv.values_mut() },
            &a.dout.values(),
            attention::Inputs {
                q: &a.x.q.values(),
                k: &a.x.k.values(),
                v: &a.x.v.values(),
                mask: a.x.mask.map(CpuIds::as_slice),
            },
            &a.out.values(),
            &a.lse.values(),
            a.shape,
        ),
        Op::CrossEntropyFused(a) => cross_entropy::fused(
            &mut a.logits.values_mut(),
            &mut a.losses.values_mut(),
            &a.targets.data,
            a.classes,
            a.grad_scale,
        ),
        Op::VocabParallelMax(a) => {
            cross_entropy::vp_max(&mut a.row_max.values_mut(), &a.logits.values(), a.cols, a.valid_cols)
        }
        Op::VocabParallelSums(a) => {
            let (logits, row_max, targets) = (&a.logits.values(), &a.row_max.values(), &a.targets.data);
            cross_entropy::vp_sums(
                &mut a.stats.values_mut(),
                logits,
                row_max,
                targets,
                a.cols,
                a.valid_cols,
                a.vocab_start,
            )
        }
        Op::VocabParallelGrad(a) => cross_entropy::vp_grad(
            &mut a.logits.values_mut(),
            &mut a.losses.values_mut(),
            &a.row_max.values(),
            &a.stats.values(),
            &a.targets.data,
            a.cols,
            a.valid_cols,
            a.vocab_start,
            a.grad_scale,
        ),
        Op::AdamW(a) => adamw::step(
            &mut a.param.values_mut(),
            &a.grad.values(),
            &mut a.m.values_mut(),
            &mut a.v.values_mut(),
            &a.step,
        ),
    }
}
