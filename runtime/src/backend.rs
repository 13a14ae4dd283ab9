//! The op-level backend interface: what a device must compute for DalleBart to train.
//!
//! In the spirit of llm.c, every op has an explicit forward and backward and works on flat
//! row-major f32 buffers; the caller (the model) owns all activation memory and passes shapes.
//! Gradient outputs of *parameters* are always accumulated (`+=`), so gradient accumulation and
//! tied uses need no extra pass; gradient outputs of *activations* are overwritten unless an op
//! says otherwise.

use crate::error::Result;
use crate::memory::MemoryTracker;

/// `out[m, n] (= | +=) op(a)[m, k] · op(b)[k, n]`, all row-major.
/// `a` is stored `[m, k]`, or `[k, m]` when `trans_a`; `b` is stored `[k, n]`, or `[n, k]` when `trans_b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Add into `out` instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulSpec {
    /// `out = a · b` with `a: [m, k]`, `b: [k, n]`.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, trans_a: false, trans_b: false, accumulate: false }
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Multi-head attention over `q: [batch, q_len, heads·head_dim]` and
/// `k, v: [batch, kv_len, heads·head_dim]`; head `h` is the contiguous column slice
/// `h·head_dim .. (h+1)·head_dim` (as dalle-mini splits heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query `i` sees keys `j <= i` only (decoder self-attention; requires q_len == kv_len).
    pub causal: bool,
}

impl AttentionShape {
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Length of the saved log-sum-exp buffer: `[batch, heads, q_len]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.q_len
    }
    /// Forward FLOPs of the two batched products (QKᵀ and PV), causal not discounted.
    pub fn forward_flops(&self) -> f64 {
        4.0 * (self.batch * self.heads * self.q_len * self.kv_len * self.head_dim) as f64
    }
}

/// Optional key-padding mask, `[batch, kv_len]`, non-zero = the key may be attended to.
pub type KeyMask<'a, B> = Option<&'a <B as Backend>::Ids>;

/// The half-open row range `[start, end)` of a vocabulary that one tensor-parallel rank holds.
/// Ids outside it contribute nothing on that rank. At tp = 1 it is the whole vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabRange {
    pub start: usize,
    pub end: usize,
}

impl VocabRange {
    pub fn full(rows: usize) -> Self {
        Self { start: 0, end: rows }
    }
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// One AdamW update exactly as `optax.adamw` (eps_root 0, decay on every entry):
/// `m = (1-b1)·g + b1·m; v = (1-b2)·g² + b2·v; u = m̂/(√v̂ + eps) + wd·p; p = p - lr·u`,
/// with `g = grad_scale · grad` (grad_scale carries gradient clipping and averaging).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count used for bias correction.
    pub step: u64,
    pub grad_scale: f32,
}

/// A device that can run DalleBart's ops. `Buf` holds f32 elements, `Ids` holds i32 elements.
/// A backend value is a cheap handle (clones share the device and its memory tracker).
pub trait Backend: Clone + Send + Sync + 'static {
    type Buf: Send + Sync;
    type Ids: Send + Sync;

    /// Human-readable device name, e.g. `cpu` or `cuda:0 (NVIDIA H100)`.
    fn name(&self) -> String;
    /// The accounting allocator of this device.
    fn memory(&self) -> &MemoryTracker;

    // ---- memory ------------------------------------------------------------------------
    /// A zero-filled buffer of `len` f32, registered under `name`.
    fn zeros(&self, name: &str, len: usize) -> Result<Self::Buf>;
    fn upload(&self, name: &str, data: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<Self::Ids>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn ids_len(&self, ids: &Self::Ids) -> usize;
    /// Overwrites `dst[offset..offset + data.len()]` from host memory.
    fn write(&self, dst: &mut Self::Buf, offset: usize, data: &[f32]) -> Result<()>;
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, len: usize) -> Result<()>;

    // ---- elementwise and reductions -----------------------------------------------------
    /// `acc += x`.
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// `out = a + b`.
    fn add(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()>;
    /// Σ x², accumulated in f64.
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64>;
    /// Broadcast add over blocks: `out[i·row_len + j] += row[j]` for every block i (position
    /// embeddings); only the first `row_len` elements of `row` are used.
    fn add_broadcast_rows(&self, out: &mut Self::Buf, row: &Self::Buf, row_len: usize) -> Result<()>;
    /// The backward of [`Backend::add_broadcast_rows`]: `acc[j] += Σ_i x[i·row_len + j]` for
    /// `j < row_len`.
    fn sum_broadcast_rows(&self, acc: &mut Self::Buf, x: &Self::Buf, row_len: usize) -> Result<()>;

    // ---- dense -------------------------------------------------------------------------
    fn matmul(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, spec: MatmulSpec) -> Result<()>;

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
    ) -> Result<()>;
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
    ) -> Result<()>;

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
    ) -> Result<()>;
    /// Turns all-reduced row sums into statistics in place: `Σx → mean = Σx / dim_global`
    /// (`squared = false`) or `Σ(x−mean)² → rstd = 1/√(Σ/dim_global + eps)` (`squared = true`).
    fn layernorm_finish_stats(&self, sums: &mut Self::Buf, dim_global: usize, squared: bool) -> Result<()>;
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
    ) -> Result<()>;
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
    ) -> Result<()>;
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
    ) -> Result<()>;

    // ---- GELU-GLU ----------------------------------------------------------------------
    /// `out = gelu(a) · b`, exact (erf) GELU.
    fn gelu_glu_forward(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// `da, db` (overwritten) from `dout`.
    fn gelu_glu_backward(
        &self,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        dout: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
    ) -> Result<()>;

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
    ) -> Result<()>;
    /// Scatter-add: `dtable[ids[i] - range.start, :] += dout[i, :]` for ids in `range`.
    fn embedding_backward(
        &self,
        dtable: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        range: VocabRange,
        dim: usize,
    ) -> Result<()>;

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
    ) -> Result<()>;
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
    ) -> Result<()>;

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
    ) -> Result<()>;

    /// Vocab-parallel cross-entropy, step 1: `row_max[r] = max` over this rank's first
    /// `valid_cols` columns of `logits` (`[rows, cols]`; columns past `valid_cols` are padding).
    fn vocab_parallel_max(
        &self,
        row_max: &mut Self::Buf,
        logits: &Self::Buf,
        cols: usize,
        valid_cols: usize,
    ) -> Result<()>;
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
    ) -> Result<()>;
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
    ) -> Result<()>;

    // ---- optimizer ---------------------------------------------------------------------
    /// One AdamW step over a parameter tensor and its moments (see [`AdamWStep`]).
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: &AdamWStep,
    ) -> Result<()>;
}
