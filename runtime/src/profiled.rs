//! [`Profiled<B>`]: a [`Backend`] that forwards every op to `B` and counts, per [`OpClass`],
//! the calls, the work (FLOPs for GEMMs and attention, elements for the rest) and the wall time
//! spent in them. Scaling studies use it to split a step's time by op class and the performance
//! model's tests use it to check that its analytic FLOP counts equal what the model executes.
//!
//! Work units, per call:
//! - GEMMs ([`OpClass::Gemm`]): `MatmulSpec::flops`;
//! - attention ([`OpClass::Attention`]): `AttentionShape::forward_flops` for the forward, twice that for
//!   the backward (the causal half is counted, as `dm_model::flops` counts it);
//! - cross-entropy ([`OpClass::CrossEntropy`]): logit elements (`rows × columns`) of each pass;
//! - the rest ([`OpClass::Norm`], [`OpClass::Elementwise`], [`OpClass::Optimizer`],
//!   [`OpClass::Memory`]): elements of the largest buffer the op reads or writes.
//!
//! Buffers are `B`'s own, so a communicator of `B` serves `Profiled<B>` unchanged.

use crate::backend::Backend;
use crate::error::Result;
use crate::memory::MemoryTracker;
use crate::ops::{Op, Storage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What an op is, for the time split of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// Matrix products.
    Gemm,
    /// Fused attention forward and backward.
    Attention,
    /// Softmax cross-entropy (fused and vocab-parallel steps).
    CrossEntropy,
    /// LayerNorm forward, backward and their sharded steps.
    Norm,
    /// GELU-GLU, adds, scales, embeddings, reductions.
    Elementwise,
    /// AdamW updates.
    Optimizer,
    /// Allocation, host transfers, fills and copies.
    Memory,
}

impl OpClass {
    /// Every class, in counter order.
    pub const ALL: [OpClass; 7] = [
        OpClass::Gemm,
        OpClass::Attention,
        OpClass::CrossEntropy,
        OpClass::Norm,
        OpClass::Elementwise,
        OpClass::Optimizer,
        OpClass::Memory,
    ];

    /// snake_case name.
    pub fn name(&self) -> &'static str {
        match self {
            OpClass::Gemm => "gemm",
            OpClass::Attention => "attention",
            OpClass::CrossEntropy => "cross_entropy",
            OpClass::Norm => "norm",
            OpClass::Elementwise => "elementwise",
            OpClass::Optimizer => "optimizer",
            OpClass::Memory => "memory",
        }
    }
}

/// Calls, work units and seconds of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClassStats {
    pub calls: u64,
    pub units: f64,
    pub seconds: f64,
}

/// A snapshot of every class's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpProfile {
    pub classes: [ClassStats; 7],
}

impl OpProfile {
    pub fn get(&self, class: OpClass) -> ClassStats {
        self.classes[class as usize]
    }
    /// Seconds in every class together.
    pub fn total_seconds(&self) -> f64 {
        self.classes.iter().map(|c| c.seconds).sum()
    }
    /// `self − earlier`, class by class (counters only grow).
    pub fn since(&self, earlier: &OpProfile) -> OpProfile {
        let mut out = *self;
        for (o, e) in out.classes.iter_mut().zip(&earlier.classes) {
            o.calls -= e.calls;
            o.units -= e.units;
            o.seconds -= e.seconds;
        }
        out
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: [AtomicU64; 7],
    /// Work units, stored as f64 bits (updated under compare-and-swap).
    units: [AtomicU64; 7],
    nanos: [AtomicU64; 7],
}

impl Counters {
    fn record(&self, class: OpClass, units: f64, nanos: u64) {
        let i = class as usize;
        self.calls[i].fetch_add(1, Ordering::Relaxed);
        self.nanos[i].fetch_add(nanos, Ordering::Relaxed);
        let _ = self.units[i]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + units).to_bits()));
    }
}

/// `B` with per-class op counters; clones share the counters (and `B`'s device).
#[derive(Debug, Clone)]
pub struct Profiled<B: Backend> {
    inner: B,
    counters: Arc<Counters>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Self { inner, counters: Arc::new(Counters::default()) }
    }
    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
    /// The counters so far.
    pub fn profile(&self) -> OpProfile {
        let mut p = OpProfile::default();
        for (i, c) in p.classes.iter_mut().enumerate() {
            c.calls = self.counters.calls[i].load(Ordering::Relaxed);
            c.units = f64::from_bits(self.counters.units[i].load(Ordering::Relaxed));
            c.seconds = self.counters.nanos[i].load(Ordering::Relaxed) as f64 * 1e-9;
        }
        p
    }
    fn timed<T>(&self, class: OpClass, units: f64, f: impl FnOnce(&B) -> T) -> T {
        let t0 = Instant::now();
        let out = f(&self.inner);
        self.counters.record(class, units, t0.elapsed().as_nanos() as u64);
        out
    }
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Ids = B::Ids;

    fn name(&self) -> String {
        self.inner.name()
    }
    fn memory(&self) -> &MemoryTracker {
        self.inner.memory()
    }
    fn zeros(&self, name: &str, len: usize) -> Result<Self::Buf> {
        self.timed(OpClass::Memory, len as f64, |b| b.zeros(name, len))
    }
    fn upload(&self, name: &str, data: &[f32]) -> Result<Self::Buf> {
        self.timed(OpClass::Memory, data.len() as f64, |b| b.upload(name, data))
    }
    fn zeros_typed(&self, name: &str, len: usize, dtype: crate::DType) -> Result<Self::Buf> {
        self.timed(OpClass::Memory, len as f64, |b| b.zeros_typed(name, len, dtype))
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        self.timed(OpClass::Memory, buf.elems() as f64, |b| b.download(buf))
    }
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<Self::Ids> {
        self.timed(OpClass::Memory, ids.len() as f64, |b| b.upload_ids(name, ids))
    }
    /// `op` was checked by this wrapper's named method; `B` computes it without checking again.
    fn compute(&self, op: Op<'_, Self::Buf, Self::Ids>) -> Result<()> {
        let (class, units) = work(&op);
        self.timed(class, units, |b| b.compute(op))
    }
}

/// The class of `op` and its work units (see the module docs).
fn work<T: Storage, I>(op: &Op<'_, T, I>) -> (OpClass, f64) {
    use OpClass::*;
    let (class, units) = match op {
        Op::Fill(a) => (Memory, a.buf.elems()),
        Op::Write(a) => (Memory, a.data.len()),
        Op::Copy(a) => (Memory, a.len),
        Op::AddAssign(a) => (Elementwise, a.acc.elems()),
        Op::Add(a) => (Elementwise, a.out.elems()),
        Op::Scale(a) => (Elementwise, a.x.elems()),
        Op::SumSquares(a) => (Optimizer, a.x.elems()),
        Op::AddBroadcastRows(a) => (Elementwise, a.out.elems()),
        Op::SumBroadcastRows(a) => (Elementwise, a.x.elems()),
        Op::Matmul(a) => return (Gemm, a.spec.flops()),
        Op::LayerNormForward(a) => (Norm, a.x.elems()),
        Op::LayerNormBackward(a) => (Norm, a.x.elems()),
        Op::LayerNormRowSums(a) => (Norm, a.x.elems()),
        Op::LayerNormFinishStats(a) => (Norm, a.sums.elems()),
        Op::LayerNormApply(a) => (Norm, a.x.elems()),
        Op::LayerNormBackwardRowSums(a) => (Norm, a.x.elems()),
        Op::LayerNormBackwardApply(a) => (Norm, a.x.elems()),
        Op::GeluGluForward(a) => (Elementwise, a.out.elems()),
        Op::GeluGluBackward(a) => (Elementwise, a.dout.elems()),
        Op::EmbeddingForward(a) => (Elementwise, a.out.elems()),
        Op::EmbeddingBackward(a) => (Elementwise, a.dout.elems()),
        Op::AttentionForward(a) => return (Attention, a.shape.forward_flops()),
        Op::AttentionBackward(a) => return (Attention, 2.0 * a.shape.forward_flops()),
        Op::CrossEntropyFused(a) => (CrossEntropy, a.logits.elems()),
        Op::VocabParallelMax(a) => (CrossEntropy, a.logits.elems()),
        Op::VocabParallelSums(a) => (CrossEntropy, a.logits.elems()),
        Op::VocabParallelGrad(a) => (CrossEntropy, a.logits.elems()),
        Op::AdamW(a) => (Optimizer, a.param.elems()),
    };
    (class, units as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MatmulSpec;
    use crate::cpu::CpuBackend;

    #[test]
    fn counts_calls_units_and_forwards_results() {
        let be = Profiled::new(CpuBackend::new());
        let a = be.upload("a", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = be.upload("b", &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap();
        let mut c = be.zeros("c", 4).unwrap();
        be.matmul(&mut c, &a, &b, MatmulSpec::nn(2, 2, 3)).unwrap();
        assert_eq!(be.download(&c).unwrap(), vec![4.0, 5.0, 10.0, 11.0]);
        let p = be.profile();
        assert_eq!(p.get(OpClass::Gemm).calls, 1);
        assert_eq!(p.get(OpClass::Gemm).units, 24.0);
        // two uploads, one zeros, one download
        assert_eq!(p.get(OpClass::Memory).calls, 4);
        assert_eq!(p.get(OpClass::Memory).units, 6.0 + 6.0 + 4.0 + 4.0);
        assert!(p.total_seconds() > 0.0);
        let later = be.profile();
        assert_eq!(later.since(&p).get(OpClass::Gemm).calls, 0);
    }
}
