//! The op-level backend interface: what a device must compute for DalleBart to train.
//!
//! In the spirit of llm.c, every op has an explicit forward and backward and works on flat
//! row-major f32 buffers; the caller (the model) owns all activation memory and passes shapes.
//! Gradient outputs of *parameters* are always accumulated (`+=`), so gradient accumulation and
//! tied uses need no extra pass; gradient outputs of *activations* are overwritten unless an op
//! says otherwise.
//!
//! Every named op is a provided method: it wraps its arguments in an [`Op`], runs the op family's
//! one argument check ([`Op::check`], in `runtime/src/ops/<family>/mod.rs`) and hands the op to
//! [`Backend::compute`], the one method a backend implements for all ops. Backends never check.

use crate::dtype::DType;
use crate::error::{Result, RuntimeError};
use crate::memory::MemoryTracker;
use crate::ops::{adamw, attention, cross_entropy, elementwise as ew, embedding, gelu_glu, layernorm as ln, matmul};
use crate::ops::{HostIds, Op, Storage};

pub use crate::ops::adamw::AdamWStep;
pub use crate::ops::attention::AttentionShape;
pub use crate::ops::embedding::VocabRange;
pub use crate::ops::matmul::MatmulSpec;

/// Optional key-padding mask, `[batch, kv_len]`, non-zero = the key may be attended to.
pub type KeyMask<'a, B> = Option<&'a <B as Backend>::Ids>;

/// A device that can run DalleBart's ops. `Buf` holds f32 elements (or bf16 where the backend
/// stores them: [`Backend::zeros_typed`]), `Ids` holds i32 elements.
/// A backend value is a cheap handle (clones share the device and its memory tracker).
pub trait Backend: Clone + Send + Sync + 'static {
    type Buf: Send + Sync + Storage;
    type Ids: Send + Sync + Storage + HostIds;

    /// Human-readable device name, e.g. `cpu` or `cuda:0 (NVIDIA H100)`.
    fn name(&self) -> String;
    /// The accounting allocator of this device.
    fn memory(&self) -> &MemoryTracker;

    // ---- memory ------------------------------------------------------------------------
    /// A zero-filled buffer of `len` f32, registered under `name`.
    fn zeros(&self, name: &str, len: usize) -> Result<Self::Buf>;
    fn upload(&self, name: &str, data: &[f32]) -> Result<Self::Buf>;
    /// A zero-filled buffer of `len` elements of `dtype` (the tracker counts [`DType::bytes`] per
    /// element). Ops read a bf16 buffer as f32 and round what they write into it. A backend
    /// without bf16 storage refuses bf16 with the reason.
    fn zeros_typed(&self, name: &str, len: usize, dtype: DType) -> Result<Self::Buf> {
        match dtype {
            DType::F32 => self.zeros(name, len),
            DType::Bf16 => Err(RuntimeError::Device(format!(
                "not implemented yet on {}: bf16 buffers (`{name}`); use precision fp32 on this device",
                self.name()
            ))),
        }
    }
    /// `data` in a new buffer of `dtype` (rounded to nearest even for bf16).
    fn upload_typed(&self, name: &str, data: &[f32], dtype: DType) -> Result<Self::Buf> {
        if dtype == DType::F32 {
            return self.upload(name, data);
        }
        let mut buf = self.zeros_typed(name, data.len(), dtype)?;
        self.write(&mut buf, 0, data)?;
        Ok(buf)
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<Self::Ids>;
    fn buf_len(&self, buf: &Self::Buf) -> usize {
        buf.elems()
    }
    fn ids_len(&self, ids: &Self::Ids) -> usize {
        ids.elems()
    }
    /// Overwrites `dst[offset..offset + data.len()]` from host memory.
    fn write(&self, dst: &mut Self::Buf, offset: usize, data: &[f32]) -> Result<()> {
        self.run(Op::Write(ew::Write { dst, offset, data }))
    }
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()> {
        self.run(Op::Fill(ew::Fill { buf, value }))
    }
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, len: usize) -> Result<()> {
        self.run(Op::Copy(ew::Copy { dst, dst_off, src, src_off, len }))
    }

    // ---- elementwise and reductions -----------------------------------------------------
    /// `acc += x`.
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()> {
        self.run(Op::AddAssign(ew::AddAssign { acc, x }))
    }
    /// `out = a + b`.
    fn add(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()> {
        self.run(Op::Add(ew::Add { out, a, b }))
    }
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()> {
        self.run(Op::Scale(ew::Scale { x, s }))
    }
    /// Σ x², accumulated in f64.
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64> {
        let mut out = 0.0;
        self.run(Op::SumSquares(ew::SumSquares { x, out: &mut out }))?;
        Ok(out)
    }
    /// Broadcast add over blocks: `out[i·row_len + j] += row[j]` for every block i (position
    /// embeddings); only the first `row_len` elements of `row` are used.
    fn add_broadcast_rows(&self, out: &mut Self::Buf, row: &Self::Buf, row_len: usize) -> Result<()> {
        self.run(Op::AddBroadcastRows(ew::AddBroadcastRows { out, row, row_len }))
    }
    /// The backward of [`Backend::add_broadcast_rows`]: `acc[j] += Σ_i x[i·row_len + j]` for
    /// `j < row_len`.
    fn sum_broadcast_rows(&self, acc: &mut Self::Buf, x: &Self::Buf, row_len: usize) -> Result<()> {
        self.run(Op::SumBroadcastRows(ew::SumBroadcastRows { acc, x, row_len }))
    }

    // ---- dense -------------------------------------------------------------------------
    fn matmul(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, spec: MatmulSpec) -> Result<()> {
        self.run(Op::Matmul(matmul::Matmul { out, a, b, spec }))
    }

    // ---- layernorm (eps 1e-5, biased variance) ---------------------------------------------
    /// `out = (x - mean)·rstd·scale + bias` per row of `dim`; saves `mean`, `rstd` (`[rows]`).
    /// `scale = None` is dalle-mini's bias-only LayerNorm.
    #[allow(clippy::too_many_arguments)]
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
        self.run(Op::LayerNormForward(ln::Forward { out, mean, rstd, x, scale, bias, dim }))
    }
    /// Gradients of [`Backend::layernorm_forward`]: `dscale`/`dbias` accumulated; `dx` overwritten,
    /// or accumulated when `accumulate_dx` (the residual stream's gradient).
    #[allow(clippy::too_many_arguments)]
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
        let a = ln::Backward { dx, dscale, dbias, dout, x, mean, rstd, scale, dim, accumulate_dx };
        self.run(Op::LayerNormBackward(a))
    }

    // ---- layernorm over a dimension sharded across tensor-parallel ranks -----------------
    // Forward: `layernorm_row_sums(x) → all-reduce → mean = Σ/dim_global`,
    // `layernorm_row_sums(x, center = mean, squared) → all-reduce → rstd`, then
    // `layernorm_apply`. Backward: `layernorm_backward_row_sums → all-reduce →
    // layernorm_backward_apply`. With one shard these equal the fused ops above.
    /// `sums[r] = Σ_j x[r, j]`, or `Σ_j (x[r, j] − center[r])²` when `center` is given.
    fn layernorm_row_sums(
        &self,
        sums: &mut Self::Buf,
        x: &Self::Buf,
        center: Option<&Self::Buf>,
        dim: usize,
    ) -> Result<()> {
        self.run(Op::LayerNormRowSums(ln::RowSums { sums, x, center, dim }))
    }
    /// Turns all-reduced row sums into statistics in place: `Σx → mean = Σx / dim_global`
    /// (`squared = false`) or `Σ(x−mean)² → rstd = 1/√(Σ/dim_global + eps)` (`squared = true`).
    fn layernorm_finish_stats(&self, sums: &mut Self::Buf, dim_global: usize, squared: bool) -> Result<()> {
        self.run(Op::LayerNormFinishStats(ln::FinishStats { sums, dim_global, squared }))
    }
    /// `out = (x − mean)·rstd·scale + bias` with given statistics.
    #[allow(clippy::too_many_arguments)]
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
        self.run(Op::LayerNormApply(ln::Apply { out, x, mean, rstd, scale, bias, dim }))
    }
    /// Per-row partial sums for the backward, `sums = [Σ_j ĝ, Σ_j ĝ·x̂]` as `[2, rows]`, where
    /// `ĝ = dout·scale` and `x̂ = (x − mean)·rstd`.
    #[allow(clippy::too_many_arguments)]
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
        self.run(Op::LayerNormBackwardRowSums(ln::BackwardRowSums { sums, dout, x, mean, rstd, scale, dim }))
    }
    /// `dx (= | +=) rstd·(ĝ − Σĝ/dim_global − x̂·Σĝx̂/dim_global)` from all-reduced `sums`;
    /// `dscale`, `dbias` accumulated.
    #[allow(clippy::too_many_arguments)]
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
        let a =
            ln::BackwardApply { dx, dscale, dbias, dout, x, mean, rstd, scale, sums, dim, dim_global, accumulate_dx };
        self.run(Op::LayerNormBackwardApply(a))
    }

    // ---- GELU-GLU ----------------------------------------------------------------------
    /// `out = gelu(a) · b`, exact (erf) GELU.
    fn gelu_glu_forward(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()> {
        self.run(Op::GeluGluForward(gelu_glu::Forward { out, a, b }))
    }
    /// `da, db` (overwritten) from `dout`.
    fn gelu_glu_backward(
        &self,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        dout: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
    ) -> Result<()> {
        self.run(Op::GeluGluBackward(gelu_glu::Backward { da, db, dout, a, b }))
    }

    // ---- embeddings --------------------------------------------------------------------
    /// `out[i, :] = table[ids[i] - range.start, :]` for ids in `range`, zeros otherwise;
    /// `table` holds `range.len()` rows of `dim`.
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &Self::Ids,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        self.run(Op::EmbeddingForward(embedding::Forward { out, table, ids, range, dim }))
    }
    /// Scatter-add: `dtable[ids[i] - range.start, :] += dout[i, :]` for ids in `range`.
    fn embedding_backward(
        &self,
        dtable: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        self.run(Op::EmbeddingBackward(embedding::Backward { dtable, dout, ids, range, dim }))
    }

    // ---- attention ---------------------------------------------------------------------
    /// Softmax attention with scores scaled by 1/√head_dim, optional key-padding mask and
    /// causal mask. Writes `out` (same layout as `q`) and the per-row log-sum-exp `lse`
    /// (`[batch, heads, q_len]`), which the backward uses to recompute probabilities.
    /// A query row whose keys are all masked attends uniformly (as JAX's finite mask bias does);
    /// its `lse` entry is NaN, which tells the backward to use the uniform distribution.
    #[allow(clippy::too_many_arguments)]
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
        let x = attention::Inputs { q, k, v, mask };
        self.run(Op::AttentionForward(attention::Forward { out, lse, x, shape }))
    }
    /// `dq, dk, dv` (overwritten) from `dout`, recomputing the probabilities from `lse`.
    #[allow(clippy::too_many_arguments)]
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
        let x = attention::Inputs { q, k, v, mask };
        self.run(Op::AttentionBackward(attention::Backward { dq, dk, dv, dout, x, out, lse, shape }))
    }

    // ---- loss --------------------------------------------------------------------------
    /// Fused softmax cross-entropy over `classes` columns, forward and backward in one pass:
    /// `losses[r] = logsumexp(logits[r]) - logits[r, targets[r]]`, and `logits` is overwritten by
    /// `grad_scale · (softmax(logits[r]) - onehot(targets[r]))`.
    fn cross_entropy_fused(
        &self,
        logits: &mut Self::Buf,
        losses: &mut Self::Buf,
        targets: &Self::Ids,
        classes: usize,
        grad_scale: f32,
    ) -> Result<()> {
        self.run(Op::CrossEntropyFused(cross_entropy::Fused { logits, losses, targets, classes, grad_scale }))
    }

    /// Vocab-parallel cross-entropy, step 1: `row_max[r] = max` over this rank's first
    /// `valid_cols` columns of `logits` (`[rows, cols]`; columns past `valid_cols` are padding).
    fn vocab_parallel_max(
        &self,
        row_max: &mut Self::Buf,
        logits: &Self::Buf,
        cols: usize,
        valid_cols: usize,
    ) -> Result<()> {
        self.run(Op::VocabParallelMax(cross_entropy::VocabMax { row_max, logits, cols, valid_cols }))
    }
    /// Step 2, after all-reducing the max: `stats = [Σ_valid e^(x − max), target logit or 0]` as
    /// `[2, rows]`; this rank holds global columns `vocab_start ..`.
    #[allow(clippy::too_many_arguments)]
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
        let a = cross_entropy::VocabSums { stats, logits, row_max, targets, cols, valid_cols, vocab_start };
        self.run(Op::VocabParallelSums(a))
    }
    /// Step 3, after all-reducing `stats`: `losses[r] = max + ln Σ − target logit`, and `logits`
    /// overwritten by `grad_scale·(softmax − onehot)` on valid columns, 0 on padding.
    #[allow(clippy::too_many_arguments)]
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
        let a = cross_entropy::VocabGrad {
            logits,
            losses,
            row_max,
            stats,
            targets,
            cols,
            valid_cols,
            vocab_start,
            grad_scale,
        };
        self.run(Op::VocabParallelGrad(a))
    }

    // ---- optimizer ---------------------------------------------------------------------
    /// One AdamW step over a parameter tensor and its moments (see [`AdamWStep`]).
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: &AdamWStep,
    ) -> Result<()> {
        self.run(Op::AdamW(adamw::AdamW { param, grad, m, v, step: *step }))
    }

    // ---- what a backend implements ------------------------------------------------------
    /// Computes one op whose arguments [`Op::check`] has accepted. Callers use the named methods
    /// above (which check first); a backend implements this alone and checks nothing.
    fn compute(&self, op: Op<'_, Self::Buf, Self::Ids>) -> Result<()>;

    /// Checks `op`, then computes it.
    fn run(&self, op: Op<'_, Self::Buf, Self::Ids>) -> Result<()> {
        op.check()?;
        self.compute(op)
    }
}
