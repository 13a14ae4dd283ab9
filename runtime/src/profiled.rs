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

use crate::backend::{AdamWStep, AttentionShape, Backend, KeyMask, MatmulSpec, VocabRange};
use crate::error::Result;
use crate::memory::MemoryTracker;
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
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        let n = self.inner.buf_len(buf) as f64;
        self.timed(OpClass::Memory, n, |b| b.download(buf))
    }
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<Self::Ids> {
        self.timed(OpClass::Memory, ids.len() as f64, |b| b.upload_ids(name, ids))
    }
    fn buf_len(&self, buf: &Self::Buf) -> usize {
        self.inner.buf_len(buf)
    }
    fn ids_len(&self, ids: &Self::Ids) -> usize {
        self.inner.ids_len(ids)
    }
    fn write(&self, dst: &mut Self::Buf, offset: usize, data: &[f32]) -> Result<()> {
        self.timed(OpClass::Memory, data.len() as f64, |b| b.write(dst, offset, data))
    }
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()> {
        let n = self.inner.buf_len(buf) as f64;
        self.timed(OpClass::Memory, n, |b| b.fill(buf, value))
    }
    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, len: usize) -> Result<()> {
        self.timed(OpClass::Memory, len as f64, |b| b.copy(dst, dst_off, src, src_off, len))
    }
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()> {
        let n = self.inner.buf_len(acc) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.add_assign(acc, x))
    }
    fn add(&self, out: &mut Self::Buf, a: &Self::Buf, bb: &Self::Buf) -> Result<()> {
        let n = self.inner.buf_len(out) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.add(out, a, bb))
    }
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.scale(x, s))
    }
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Optimizer, n, |b| b.sum_squares(x))
    }
    fn add_broadcast_rows(&self, out: &mut Self::Buf, row: &Self::Buf, row_len: usize) -> Result<()> {
        let n = self.inner.buf_len(out) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.add_broadcast_rows(out, row, row_len))
    }
    fn sum_broadcast_rows(&self, acc: &mut Self::Buf, x: &Self::Buf, row_len: usize) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.sum_broadcast_rows(acc, x, row_len))
    }
    fn matmul(&self, out: &mut Self::Buf, a: &Self::Buf, bb: &Self::Buf, spec: MatmulSpec) -> Result<()> {
        self.timed(OpClass::Gemm, spec.flops(), |b| b.matmul(out, a, bb, spec))
    }
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        scale: Option<&Self::Buf>,
        bias: &Self::Buf,
        dim: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Norm, n, |b| b.layernorm_forward(out, mean, rstd, x, scale, bias, dim))
    }
    fn layernorm_backward(
        &self,
        dx: &mut Self::Buf,
        dscale: Option<&mut Self::Buf>,
        dbias: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        scale: Option<&Self::Buf>,
        dim: usize,
        accumulate_dx: bool,
    ) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Norm, n, |b| {
            b.layernorm_backward(dx, dscale, dbias, dout, x, mean, rstd, scale, dim, accumulate_dx)
        })
    }
    fn layernorm_row_sums(
        &self,
        sums: &mut Self::Buf,
        x: &Self::Buf,
        center: Option<&Self::Buf>,
        dim: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Norm, n, |b| b.layernorm_row_sums(sums, x, center, dim))
    }
    fn layernorm_finish_stats(&self, sums: &mut Self::Buf, dim_global: usize, squared: bool) -> Result<()> {
        let n = self.inner.buf_len(sums) as f64;
        self.timed(OpClass::Norm, n, |b| b.layernorm_finish_stats(sums, dim_global, squared))
    }
    fn layernorm_apply(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        scale: Option<&Self::Buf>,
        bias: &Self::Buf,
        dim: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Norm, n, |b| b.layernorm_apply(out, x, mean, rstd, scale, bias, dim))
    }
    fn layernorm_backward_row_sums(
        &self,
        sums: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        scale: Option<&Self::Buf>,
        dim: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Norm, n, |b| b.layernorm_backward_row_sums(sums, dout, x, mean, rstd, scale, dim))
    }
    fn layernorm_backward_apply(
        &self,
        dx: &mut Self::Buf,
        dscale: Option<&mut Self::Buf>,
        dbias: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        scale: Option<&Self::Buf>,
        sums: &Self::Buf,
        dim: usize,
        dim_global: usize,
        accumulate_dx: bool,
    ) -> Result<()> {
        let n = self.inner.buf_len(x) as f64;
        self.timed(OpClass::Norm, n, |b| {
            b.layernorm_backward_apply(
                dx,
                dscale,
                dbias,
                dout,
                x,
                mean,
                rstd,
                scale,
                sums,
                dim,
                dim_global,
                accumulate_dx,
            )
        })
    }
    fn gelu_glu_forward(&self, out: &mut Self::Buf, a: &Self::Buf, bb: &Self::Buf) -> Result<()> {
        let n = self.inner.buf_len(out) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.gelu_glu_forward(out, a, bb))
    }
    fn gelu_glu_backward(
        &self,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        dout: &Self::Buf,
        a: &Self::Buf,
        bb: &Self::Buf,
    ) -> Result<()> {
        let n = self.inner.buf_len(dout) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.gelu_glu_backward(da, db, dout, a, bb))
    }
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &Self::Ids,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(out) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.embedding_forward(out, table, ids, range, dim))
    }
    fn embedding_backward(
        &self,
        dtable: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(dout) as f64;
        self.timed(OpClass::Elementwise, n, |b| b.embedding_backward(dtable, dout, ids, range, dim))
    }
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        mask: KeyMask<'_, Self>,
        shape: AttentionShape,
    ) -> Result<()> {
        self.timed(OpClass::Attention, shape.forward_flops(), |b| b.attention_forward(out, lse, q, k, v, mask, shape))
    }
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        mask: KeyMask<'_, Self>,
        shape: AttentionShape,
    ) -> Result<()> {
        self.timed(OpClass::Attention, 2.0 * shape.forward_flops(), |b| {
            b.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, mask, shape)
        })
    }
    fn cross_entropy_fused(
        &self,
        logits: &mut Self::Buf,
        losses: &mut Self::Buf,
        targets: &Self::Ids,
        classes: usize,
        grad_scale: f32,
    ) -> Result<()> {
        let n = self.inner.buf_len(logits) as f64;
        self.timed(OpClass::CrossEntropy, n, |b| b.cross_entropy_fused(logits, losses, targets, classes, grad_scale))
    }
    fn vocab_parallel_max(
        &self,
        row_max: &mut Self::Buf,
        logits: &Self::Buf,
        cols: usize,
        valid_cols: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(logits) as f64;
        self.timed(OpClass::CrossEntropy, n, |b| b.vocab_parallel_max(row_max, logits, cols, valid_cols))
    }
    fn vocab_parallel_sums(
        &self,
        stats: &mut Self::Buf,
        logits: &Self::Buf,
        row_max: &Self::Buf,
        targets: &Self::Ids,
        cols: usize,
        valid_cols: usize,
        vocab_start: usize,
    ) -> Result<()> {
        let n = self.inner.buf_len(logits) as f64;
        self.timed(OpClass::CrossEntropy, n, |b| {
            b.vocab_parallel_sums(stats, logits, row_max, targets, cols, valid_cols, vocab_start)
        })
    }
    fn vocab_parallel_grad(
        &self,
        logits: &mut Self::Buf,
        losses: &mut Self::Buf,
        row_max: &Self::Buf,
        stats: &Self::Buf,
        targets: &Self::Ids,
        cols: usize,
        valid_cols: usize,
        vocab_start: usize,
        grad_scale: f32,
    ) -> Result<()> {
        let n = self.inner.buf_len(logits) as f64;
        self.timed(OpClass::CrossEntropy, n, |b| {
            b.vocab_parallel_grad(logits, losses, row_max, stats, targets, cols, valid_cols, vocab_start, grad_scale)
        })
    }
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: &AdamWStep,
    ) -> Result<()> {
        let n = self.inner.buf_len(param) as f64;
        self.timed(OpClass::Optimizer, n, |b| b.adamw(param, grad, m, v, step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
