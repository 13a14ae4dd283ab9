//! bf16 storage for backends whose kernels are f32: the staging adapter.
//!
//! The contract of bf16 buffers ([`crate::dtype`]) is the CPU backend's: an op reads a bf16 input
//! widened exactly to f32, computes in f32 and rounds (nearest even) once when it writes a bf16
//! output; an accumulated output is widened, added to in f32 and rounded once. [`compute_staged`]
//! gives any backend that semantics over its f32 kernels, for every [`Op`] at once:
//!
//! 1. every bf16 buffer of the op (input or output) is widened into a fresh f32 buffer of the
//!    backend (an allocation the memory tracker sees, named [`STAGING_NAME`]); outputs are widened
//!    too, so accumulated and partly written outputs keep their other values;
//! 2. the op runs on those f32 buffers (the f32 buffers of the call are passed as they are);
//! 3. every staged output is rounded back into its bf16 buffer, then the staging is freed.
//!
//! The conversions are the backend's own [`Backend::copy`] between an f32 and a bf16 buffer, so
//! a backend using the adapter must implement those copies (and the op's write/fill/copy when its
//! buffers are bf16) natively. [`map_bufs`] is the one place that knows which fields of each op
//! are buffers and whether the op writes them; [`Bf16Staged`] wraps a backend so that every op
//! goes through the adapter, which lets the CPU check it against its native bf16 ops.

use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Result, RuntimeError};
use crate::memory::MemoryTracker;
use crate::ops::{
    adamw, attention, cross_entropy as ce, elementwise as ew, embedding, gelu_glu, layernorm as ln, matmul,
};
use crate::ops::{Op, Storage};

/// The name the memory tracker shows for the f32 copies of bf16 buffers.
pub const STAGING_NAME: &str = "bf16 staging (f32 copy)";

/// Replaces the buffers of an op, field by field: `input` for the buffers the op only reads,
/// `output` for those it writes (overwritten or accumulated).
pub trait BufMap<'a, 's, T> {
    fn input(&mut self, buf: &'a T) -> &'s T;
    fn output(&mut self, buf: &'a mut T) -> &'s mut T;
}

/// `Struct { field: role, … }` of one op: destructures the op's arguments (every field, so a new
/// field is a compile error here) and rebuilds them with each buffer mapped by its role:
/// `i` input, `o` output, `oi`/`oo` optional input/output, `k` kept as it is (not a buffer).
macro_rules! remap {
    ($m:ident, $a:ident, $($st:ident)::+ { $($field:ident: $role:ident),* $(,)? }) => {{
        let $($st)::+ { $($field),* } = $a;
        $($st)::+ { $($field: remap!(@ $m, $role, $field)),* }
    }};
    (@ $m:ident, i, $f:ident) => { $m.input($f) };
    (@ $m:ident, o, $f:ident) => { $m.output($f) };
    (@ $m:ident, oi, $f:ident) => { $f.map(|b| $m.input(b)) };
    (@ $m:ident, oo, $f:ident) => { $f.map(|b| $m.output(b)) };
    (@ $m:ident, k, $f:ident) => { $f };
}

/// `op` with each buffer replaced through `map`, visited in a fixed order (the fields' order), so
/// two passes over the same op see the same buffers in the same sequence.
pub fn map_bufs<'a: 's, 's, T, I>(op: Op<'a, T, I>, map: &mut impl BufMap<'a, 's, T>) -> Op<'s, T, I> {
    match op {
        Op::Fill(a) => Op::Fill(remap!(map, a, ew::Fill { buf: o, value: k })),
        Op::Write(a) => Op::Write(remap!(map, a, ew::Write { dst: o, offset: k, data: k })),
        Op::Copy(a) => Op::Copy(remap!(map, a, ew::Copy { dst: o, dst_off: k, src: i, src_off: k, len: k })),
        Op::AddAssign(a) => Op::AddAssign(remap!(map, a, ew::AddAssign { acc: o, x: i })),
        Op::Add(a) => Op::Add(remap!(map, a, ew::Add { out: o, a: i, b: i })),
        Op::Scale(a) => Op::Scale(remap!(map, a, ew::Scale { x: o, s: k })),
        Op::SumSquares(a) => Op::SumSquares(remap!(map, a, ew::SumSquares { x: i, out: k })),
        Op::AddBroadcastRows(a) => {
            Op::AddBroadcastRows(remap!(map, a, ew::AddBroadcastRows { out: o, row: i, row_len: k }))
        }
        Op::SumBroadcastRows(a) => {
            Op::SumBroadcastRows(remap!(map, a, ew::SumBroadcastRows { acc: o, x: i, row_len: k }))
        }
        Op::Matmul(a) => Op::Matmul(remap!(map, a, matmul::Matmul { out: o, a: i, b: i, spec: k })),
        Op::LayerNormForward(a) => Op::LayerNormForward(remap!(
            map,
            a,
            ln::Forward { out: o, mean: o, rstd: o, x: i, scale: oi, bias: i, dim: k }
        )),
        Op::LayerNormBackward(a) => Op::LayerNormBackward(remap!(
            map,
            a,
            ln::Backward {
                dx: o,
                dscale: oo,
                dbias: o,
                dout: i,
                x: i,
                mean: i,
                rstd: i,
                scale: oi,
                dim: k,
                accumulate_dx: k
            }
        )),
        Op::LayerNormRowSums(a) => {
            Op::LayerNormRowSums(remap!(map, a, ln::RowSums { sums: o, x: i, center: oi, dim: k }))
        }
        Op::LayerNormFinishStats(a) => {
            Op::LayerNormFinishStats(remap!(map, a, ln::FinishStats { sums: o, dim_global: k, squared: k }))
        }
        Op::LayerNormApply(a) => {
            Op::LayerNormApply(remap!(map, a, ln::Apply { out: o, x: i, mean: i, rstd: i, scale: oi, bias: i, dim: k }))
        }
        Op::LayerNormBackwardRowSums(a) => Op::LayerNormBackwardRowSums(remap!(
            map,
            a,
            ln::BackwardRowSums { sums: o, dout: i, x: i, mean: i, rstd: i, scale: oi, dim: k }
        )),
        Op::LayerNormBackwardApply(a) => Op::LayerNormBackwardApply(remap!(
            map,
            a,
            ln::BackwardApply {
                dx: o,
                dscale: oo,
                dbias: o,
                dout: i,
                x: i,
                mean: i,
                rstd: i,
                scale: oi,
                sums: i,
                dim: k,
                dim_global: k,
                accumulate_dx: k
            }
        )),
        Op::GeluGluForward(a) => Op::GeluGluForward(remap!(map, a, gelu_glu::Forward { out: o, a: i, b: i })),
        Op::GeluGluBackward(a) => {
            Op::GeluGluBackward(remap!(map, a, gelu_glu::Backward { da: o, db: o, dout: i, a: i, b: i }))
        }
        Op::EmbeddingForward(a) => {
            Op::EmbeddingForward(remap!(map, a, embedding::Forward { out: o, table: i, ids: k, range: k, dim: k }))
        }
        Op::EmbeddingBackward(a) => {
            Op::EmbeddingBackward(remap!(map, a, embedding::Backward { dtable: o, dout: i, ids: k, range: k, dim: k }))
        }
        Op::AttentionForward(a) => {
            let attention::Forward { out, lse, x, shape } = a;
            let (out, lse) = (map.output(out), map.output(lse));
            Op::AttentionForward(attention::Forward { out, lse, x: map_inputs(x, map), shape })
        }
        Op::AttentionBackward(a) => {
            let attention::Backward { dq, dk, dv, dout, x, out, lse, shape } = a;
            let (dq, dk, dv, dout) = (map.output(dq), map.output(dk), map.output(dv), map.input(dout));
            let x = map_inputs(x, map);
            let (out, lse) = (map.input(out), map.input(lse));
            Op::AttentionBackward(attention::Backward { dq, dk, dv, dout, x, out, lse, shape })
        }
        Op::CrossEntropyFused(a) => Op::CrossEntropyFused(remap!(
            map,
            a,
            ce::Fused { logits: o, losses: o, targets: k, classes: k, grad_scale: k }
        )),
        Op::VocabParallelMax(a) => {
            Op::VocabParallelMax(remap!(map, a, ce::VocabMax { row_max: o, logits: i, cols: k, valid_cols: k }))
        }
        Op::VocabParallelSums(a) => Op::VocabParallelSums(remap!(
            map,
            a,
            ce::VocabSums { stats: o, logits: i, row_max: i, targets: k, cols: k, valid_cols: k, vocab_start: k }
        )),
        Op::VocabParallelGrad(a) => Op::VocabParallelGrad(remap!(
            map,
            a,
            ce::VocabGrad {
                logits: o,
                losses: o,
                row_max: i,
                stats: i,
                targets: k,
                cols: k,
                valid_cols: k,
                vocab_start: k,
                grad_scale: k
            }
        )),
        Op::AdamW(a) => Op::AdamW(remap!(map, a, adamw::AdamW { param: o, grad: i, m: o, v: o, step: k })),
    }
}

/// Attention's q, k, v (inputs; the mask is ids).
fn map_inputs<'a: 's, 's, T, I>(
    x: attention::Inputs<'a, T, I>,
    map: &mut impl BufMap<'a, 's, T>,
) -> attention::Inputs<'s, T, I> {
    remap!(map, x, attention::Inputs { q: i, k: i, v: i, mask: k })
}

/// Pass 1: keeps every buffer and widens each bf16 one into a new f32 buffer (`slots[i]` for the
/// i-th buffer visited, `None` for f32 buffers); `writes[i]` says whether the op writes it.
struct Widen<'b, B: Backend> {
    be: &'b B,
    slots: Vec<Option<B::Buf>>,
    writes: Vec<bool>,
    err: Option<RuntimeError>,
}

impl<B: Backend> Widen<'_, B> {
    fn visit(&mut self, buf: &B::Buf, writes: bool) {
        self.writes.push(writes);
        if buf.dtype() != DType::Bf16 || self.err.is_some() {
            self.slots.push(None);
            return;
        }
        let len = buf.elems();
        let staged = self.be.zeros(STAGING_NAME, len).and_then(|mut wide| {
            self.be.copy(&mut wide, 0, buf, 0, len)?;
            Ok(wide)
        });
        match staged {
            Ok(wide) => self.slots.push(Some(wide)),
            Err(e) => {
                self.err = Some(e);
                self.slots.push(None);
            }
        }
    }
}

impl<'a, B: Backend> BufMap<'a, 'a, B::Buf> for Widen<'_, B> {
    fn input(&mut self, buf: &'a B::Buf) -> &'a B::Buf {
        self.visit(buf, false);
        buf
    }
    fn output(&mut self, buf: &'a mut B::Buf) -> &'a mut B::Buf {
        self.visit(buf, true);
        buf
    }
}

/// Pass 2: swaps each bf16 buffer for its staged f32 copy, keeping the written originals (in
/// visit order) for the write-back.
struct Swap<'a, 's, T> {
    slots: std::slice::IterMut<'s, Option<T>>,
    originals: Vec<&'a mut T>,
}

impl<'a: 's, 's, T> BufMap<'a, 's, T> for Swap<'a, 's, T> {
    fn input(&mut self, buf: &'a T) -> &'s T {
        match self.slots.next() {
            Some(Some(wide)) => wide,
            _ => buf,
        }
    }
    fn output(&mut self, buf: &'a mut T) -> &'s mut T {
        match self.slots.next() {
            Some(Some(wide)) => {
                self.originals.push(buf);
                wide
            }
            _ => buf,
        }
    }
}

/// Runs `op` through `f32_compute` with every bf16 buffer staged as f32 (see the module docs).
/// An op without bf16 buffers goes to `f32_compute` as it is, with no allocation.
pub fn compute_staged<'a, B: Backend>(
    be: &B,
    op: Op<'a, B::Buf, B::Ids>,
    f32_compute: impl FnOnce(Op<'_, B::Buf, B::Ids>) -> Result<()>,
) -> Result<()> {
    let mut widen = Widen { be, slots: Vec::new(), writes: Vec::new(), err: None };
    let op = map_bufs(op, &mut widen);
    let Widen { mut slots, writes, err, .. } = widen;
    if let Some(e) = err {
        return Err(e);
    }
    if slots.iter().all(Option::is_none) {
        return f32_compute(op);
    }
    let mut swap = Swap { slots: slots.iter_mut(), originals: Vec::new() };
    let staged_op = map_bufs(op, &mut swap);
    f32_compute(staged_op)?;
    let Swap { originals, .. } = swap;
    let written = slots.iter().zip(&writes).filter_map(|(slot, &w)| slot.as_ref().filter(|_| w));
    for (dst, wide) in originals.into_iter().zip(written) {
        be.copy(dst, 0, wide, 0, wide.elems())?;
    }
    Ok(())
}

/// Refuses an op that still holds a bf16 buffer (what [`compute_staged`] hands on must be f32).
struct RequireF32 {
    bf16_seen: usize,
}

impl<'a, T: Storage> BufMap<'a, 'a, T> for RequireF32 {
    fn input(&mut self, buf: &'a T) -> &'a T {
        self.bf16_seen += usize::from(buf.dtype() == DType::Bf16);
        buf
    }
    fn output(&mut self, buf: &'a mut T) -> &'a mut T {
        self.bf16_seen += usize::from(buf.dtype() == DType::Bf16);
        buf
    }
}

/// `op` as it is when all its buffers are f32, else an error naming how many are not.
pub fn require_f32<'a, T: Storage, I>(op: Op<'a, T, I>) -> Result<Op<'a, T, I>> {
    let mut check = RequireF32 { bf16_seen: 0 };
    let op = map_bufs(op, &mut check);
    match check.bf16_seen {
        0 => Ok(op),
        n => Err(RuntimeError::Device(format!("bf16 staging left {n} bf16 buffer(s) in an f32-only op"))),
    }
}

/// A backend whose every op runs through [`compute_staged`] on `B`'s f32 computation: what a
/// backend with f32 kernels only would do. `B` allocates, transfers and converts (its
/// [`Backend::copy`] between dtypes); the ops `B` computes never see a bf16 buffer (checked:
/// [`require_f32`]), so on the CPU this is a test of the adapter against the native bf16 ops.
#[derive(Debug, Clone)]
pub struct Bf16Staged<B>(pub B);

impl<B: Backend> Backend for Bf16Staged<B> {
    type Buf = B::Buf;
    type Ids = B::Ids;

    fn name(&self) -> String {
        format!("{} (bf16 staged)", self.0.name())
    }
    fn memory(&self) -> &MemoryTracker {
        self.0.memory()
    }
    fn zeros(&self, name: &str, len: usize) -> Result<Self::Buf> {
        self.0.zeros(name, len)
    }
    fn zeros_typed(&self, name: &str, len: usize, dtype: DType) -> Result<Self::Buf> {
        self.0.zeros_typed(name, len, dtype)
    }
    fn upload(&self, name: &str, data: &[f32]) -> Result<Self::Buf> {
        self.0.upload(name, data)
    }
    fn upload_typed(&self, name: &str, data: &[f32], dtype: DType) -> Result<Self::Buf> {
        self.0.upload_typed(name, data, dtype)
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        self.0.download(buf)
    }
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<Self::Ids> {
        self.0.upload_ids(name, ids)
    }
    fn compute(&self, op: Op<'_, Self::Buf, Self::Ids>) -> Result<()> {
        compute_staged(&self.0, op, |op| self.0.compute(require_f32(op)?))
    }
}
