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

use crate::backend::Backend;
use crate::error::Result;
use crate::memory::{MemoryTracker, Reservation};
use crate::ops::{HostIds, Op, Storage};

/// An f32 buffer in host memory, registered with the device's memory tracker.
#[derive(Debug)]
pub struct CpuBuf {
    data: Vec<f32>,
    _reservation: Reservation,
}

impl CpuBuf {
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

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
        self.data.len()
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
        let reservation = self.memory.reserve(name, (len * 4) as u64)?;
        Ok(CpuBuf { data: vec![0.0; len], _reservation: reservation })
    }
    fn upload(&self, name: &str, data: &[f32]) -> Result<CpuBuf> {
        let reservation = self.memory.reserve(name, std::mem::size_of_val(data) as u64)?;
        Ok(CpuBuf { data: data.to_vec(), _reservation: reservation })
    }
    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.data.clone())
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

fn opt(b: Option<&CpuBuf>) -> Option<&[f32]> {
    b.map(CpuBuf::as_slice)
}

/// Runs one checked op on host slices.
fn compute(op: Op<'_, CpuBuf, CpuIds>) {
    match op {
        Op::Fill(a) => elementwise::fill(&mut a.buf.data, a.value),
        Op::Write(a) => a.dst.data[a.offset..a.offset + a.data.len()].copy_from_slice(a.data),
        Op::Copy(a) => {
            a.dst.data[a.dst_off..a.dst_off + a.len].copy_from_slice(&a.src.data[a.src_off..a.src_off + a.len])
        }
        Op::AddAssign(a) => elementwise::add_assign(&mut a.acc.data, &a.x.data),
        Op::Add(a) => elementwise::add(&mut a.out.data, &a.a.data, &a.b.data),
        Op::Scale(a) => elementwise::scale(&mut a.x.data, a.s),
        Op::SumSquares(a) => *a.out = elementwise::sum_squares(&a.x.data),
        Op::AddBroadcastRows(a) => elementwise::add_broadcast_rows(&mut a.out.data, &a.row.data[..a.row_len]),
        Op::SumBroadcastRows(a) => elementwise::sum_broadcast_rows(&mut a.acc.data[..a.row_len], &a.x.data),
        Op::Matmul(a) => matmul::matmul(&mut a.out.data, &a.a.data, &a.b.data, a.spec),
        Op::LayerNormForward(a) => {
            let (x, bias) = (&a.x.data, &a.bias.data);
            layernorm::forward(&mut a.out.data, &mut a.mean.data, &mut a.rstd.data, x, opt(a.scale), bias, a.dim)
        }
        Op::LayerNormBackward(a) => layernorm::backward(
            &mut a.dx.data,
            a.dscale.map(|s| s.as_mut_slice()),
            &mut a.dbias.data,
            &a.dout.data,
            &a.x.data,
            &a.mean.data,
            &a.rstd.data,
            opt(a.scale),
            a.dim,
            a.accumulate_dx,
        ),
        Op::LayerNormRowSums(a) => layernorm::row_sums(&mut a.sums.data, &a.x.data, opt(a.center), a.dim),
        Op::LayerNormFinishStats(a) => layernorm::finish_stats(&mut a.sums.data, a.dim_global, a.squared),
        Op::LayerNormApply(a) => {
            let (mean, rstd) = (&a.mean.data, &a.rstd.data);
            layernorm::apply(&mut a.out.data, &a.x.data, mean, rstd, opt(a.scale), &a.bias.data, a.dim)
        }
        Op::LayerNormBackwardRowSums(a) => {
            let (dout, x, mean, rstd) = (&a.dout.data, &a.x.data, &a.mean.data, &a.rstd.data);
            layernorm::backward_row_sums(&mut a.sums.data, dout, x, mean, rstd, opt(a.scale), a.dim)
        }
        Op::LayerNormBackwardApply(a) => layernorm::backward_apply(
            &mut a.dx.data,
            a.dscale.map(|s| s.as_mut_slice()),
            &mut a.dbias.data,
            &a.dout.data,
            &a.x.data,
            &a.mean.data,
            &a.rstd.data,
            opt(a.scale),
            &a.sums.data,
            a.dim,
            a.dim_global,
            a.accumulate_dx,
        ),
        Op::GeluGluForward(a) => glu::forward(&mut a.out.data, &a.a.data, &a.b.data),
        Op::GeluGluBackward(a) => glu::backward(&mut a.da.data, &mut a.db.data, &a.dout.data, &a.a.data, &a.b.data),
        Op::EmbeddingForward(a) => embedding::forward(&mut a.out.data, &a.table.data, &a.ids.data, a.range, a.dim),
        Op::EmbeddingBackward(a) => embedding::backward(&mut a.dtable.data, &a.dout.data, &a.ids.data, a.range, a.dim),
        Op::AttentionForward(a) => {
            let x = &a.x;
            let mask = x.mask.map(CpuIds::as_slice);
            attention::forward(&mut a.out.data, &mut a.lse.data, &x.q.data, &x.k.data, &x.v.data, mask, a.shape)
        }
        Op::AttentionBackward(a) => attention::backward(
            attention::Grads { dq: &mut a.dq.data, dk: &mut a.dk.data, dv: &mut a.dv.data },
            &a.dout.data,
            attention::Inputs { q: &a.x.q.data, k: &a.x.k.data, v: &a.x.v.data, mask: a.x.mask.map(CpuIds::as_slice) },
            &a.out.data,
            &a.lse.data,
            a.shape,
        ),
        Op::CrossEntropyFused(a) => {
            cross_entropy::fused(&mut a.logits.data, &mut a.losses.data, &a.targets.data, a.classes, a.grad_scale)
        }
        Op::VocabParallelMax(a) => cross_entropy::vp_max(&mut a.row_max.data, &a.logits.data, a.cols, a.valid_cols),
        Op::VocabParallelSums(a) => {
            let (logits, row_max, targets) = (&a.logits.data, &a.row_max.data, &a.targets.data);
            cross_entropy::vp_sums(&mut a.stats.data, logits, row_max, targets, a.cols, a.valid_cols, a.vocab_start)
        }
        Op::VocabParallelGrad(a) => cross_entropy::vp_grad(
            &mut a.logits.data,
            &mut a.losses.data,
            &a.row_max.data,
            &a.stats.data,
            &a.targets.data,
            a.cols,
            a.valid_cols,
            a.vocab_start,
            a.grad_scale,
        ),
        Op::AdamW(a) => adamw::step(&mut a.param.data, &a.grad.data, &mut a.m.data, &mut a.v.data, &a.step),
    }
}
