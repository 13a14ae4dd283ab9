//! DalleBart forward and backward, written out op by op against the runtime's [`Backend`].
//!
//! Math: NormFormer encoder layer `x += LN_1(SelfAttn(LN_0(x)))`, `x += GLU(x)`; decoder layer
//! adds causal self-attention and cross-attention the same way; GLU `h = LN_0(x); h = gelu(h·W0)
//! ∘ (h·W1); h = LN_1(h); out = h·W2`; both stacks end with a bias-only `final_ln`; `logits = y ·
//! lm_head`; loss = mean softmax cross-entropy over `image_vocab + 1` classes
//! ([`DalleBartConfig::loss_classes`]). The model owns its activations (allocated once per batch
//! size from the table of [`activations`]) and accumulates parameter gradients into `grads`.

use crate::batch::Batch;
use crate::config::DalleBartConfig;
use crate::error::{ModelError, Result};
use crate::params::{AttnBlockIdx, DecoderLayerIdx, EncoderLayerIdx, GluIdx, LnIdx, ParamTable};
use crate::precision::{Precision, WeightCopies, Weights};
use activations::{
    alloc_activations, Activations, AttnBlockActs, LayerActs, LnActs, ModelDims, OnDevice, StackDims, StackScratch,
};
use dm_parallel::layers::{self as tpl, ColumnParallelLinear, GradMode, RowParallelLinear, VocabShard};
use dm_runtime::{AttentionShape, Backend};

pub mod activations;
pub mod generate;
pub mod grad_groups;
pub use generate::{Prompt, SamplingOptions};
pub use grad_groups::{GradSink, NoSink};

/// This rank's tensor-parallel group. DalleBart is built from the tensor-parallel blocks of
/// `dm_parallel::layers` (each documents its collectives). Per layer, over the group:
/// - forward: token embeddings (vocab-parallel rows) all-reduce; every attention `out_proj` and
///   GLU `Dense_2` (row-parallel: the region exit) all-reduce their output; the GLU middle
///   LayerNorm (its width is the sharded ffn) all-reduces two `[rows]` statistics; the
///   vocab-parallel cross-entropy all-reduces the row max (max) and `[2, rows]` sums — the logits
///   are never gathered;
/// - backward: at every region entry (the input of q/k/v, GLU Dense_0/1, lm_head) the input
///   gradient is all-reduced; the GLU middle LayerNorm all-reduces `[2, rows]` sums; the encoder
///   output's gradient (from every cross-attention) is all-reduced once.
pub use dm_parallel::layers::TpGroup;

/// What one forward+backward reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// Mean cross-entropy over this batch's image tokens.
    pub loss: f32,
}

/// DalleBart on one device: parameters, their gradients, and activations.
pub struct DalleBart<B: Backend> {
    pub config: DalleBartConfig,
    pub table: ParamTable,
    backend: B,
    pub params: Vec<B::Buf>,
    pub grads: Vec<B::Buf>,
    acts: Option<Activations<B::Buf, B::Ids>>,
    tp: Option<TpGroup<B>>,
    precision: Precision,
    /// bf16-mixed's bf16 Dense-kernel copies of `params` (none in fp32).
    weight_copies: WeightCopies<B::Buf>,
}

impl<B: Backend> DalleBart<B> {
    /// Uploads parameter values (in [`ParamTable`] order) and allocates their gradients.
    pub fn new(backend: B, config: DalleBartConfig, values: Vec<Vec<f32>>) -> Result<Self> {
        Self::new_sharded(backend, config, None, values)
    }

    /// One tensor-parallel shard: `values` are this rank's slices ([`ParamTable::sharded`]).
    pub fn new_sharded(
        backend: B,
        config: DalleBartConfig,
        tp: Option<TpGroup<B>>,
        values: Vec<Vec<f32>>,
    ) -> Result<Self> {
        config.validate()?;
        let (rank, size) = tp.as_ref().map_or((0, 1), |g| (g.rank, g.size));
        crate::params::check_tp(&config, size).map_err(ModelError::Config)?;
        let table = ParamTable::sharded(&config, rank, size);
        if values.len() != table.specs.len() {
            return Err(ModelError::Checkpoint {
                path: "<memory>".into(),
                detail: format!("{} tensors given, the model has {}", values.len(), table.specs.len()),
            });
        }
        let mut params = Vec::with_capacity(values.len());
        for (spec, v) in table.specs.iter().zip(&values) {
            if v.len() != spec.numel() {
                return Err(ModelError::Checkpoint {
                    path: "<memory>".into(),
                    detail: format!("`{}` has {} values, expected {:?}", spec.name, v.len(), spec.shape),
                });
            }
            params.push(backend.upload(&spec.name, v)?);
        }
        drop(values);
        let grads = table
            .specs
            .iter()
            .map(|s| backend.zeros(&format!("grad.{}", s.name), s.numel()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let weight_copies = WeightCopies::none(params.len());
        Ok(Self { config, table, backend, params, grads, acts: None, tp, precision: Precision::Fp32, weight_copies })
    }

    /// Sets the numeric policy of the forward/backward ([`Precision`], documented in
    /// [`crate::precision`]). The trainer calls this once after construction. `Bf16Mixed`
    /// allocates the bf16 Dense-kernel copies (refreshed from the fp32 masters at every forward)
    /// and makes the next forward allocate the activation table's `Act` buffers in bf16; a
    /// backend without bf16 storage refuses it with the reason.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        self.acts = None;
        self.weight_copies = match precision {
            Precision::Fp32 => WeightCopies::none(self.params.len()),
            Precision::Bf16Mixed => WeightCopies::allocate(&self.backend, &self.table.specs)?,
        };
        self.precision = precision;
        Ok(self)
    }

    /// The numeric policy ([`Self::with_precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// A freshly initialised model (dalle-mini's init distribution), deterministic in `seed`.
    pub fn init(backend: B, config: DalleBartConfig, seed: u64) -> Result<Self> {
        let values = ParamTable::new(&config).init_values(config.init_std, seed);
        Self::new(backend, config, values)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// (rank, size) of the tensor-parallel group.
    pub fn tp_coords(&self) -> (usize, usize) {
        self.tp.as_ref().map_or((0, 1), |g| (g.rank, g.size))
    }

    /// This rank's stack shapes.
    fn dims(&self) -> ModelDims {
        ModelDims::new(&self.config, self.tp_coords())
    }
    fn enc_dims(&self) -> StackDims {
        self.dims().enc
    }
    fn dec_dims(&self) -> StackDims {
        self.dims().dec
    }

    /// The columns of [`Self::logits`] rows on this rank: (padded width, first global column,
    /// real columns).
    pub fn logits_columns(&self) -> (usize, usize, usize) {
        let d = self.dec_dims();
        (d.vocab_local, d.vocab_start, d.vocab_valid)
    }

    /// Downloads every parameter (table order).
    pub fn param_values(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.params.iter().map(|p| self.backend.download(p)).collect::<std::result::Result<_, _>>()?)
    }
    /// Downloads every gradient (table order).
    pub fn grad_values(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.grads.iter().map(|g| self.backend.download(g)).collect::<std::result::Result<_, _>>()?)
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        for g in &mut self.grads {
            self.backend.fill(g, 0.0)?;
        }
        Ok(())
    }

    /// Frees the activation buffers (they are re-allocated by the next forward).
    pub fn release_activations(&mut self) {
        self.acts = None;
    }

    fn ensure_activations(&mut self, batch: usize) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.batch == batch) {
            return Ok(());
        }
        self.acts = None;
        let mut on_device = OnDevice { backend: &self.backend, precision: self.precision };
        self.acts = Some(alloc_activations(&mut on_device, self.dims(), batch)?);
        Ok(())
    }

    /// Runs the forward pass up to the logits (kept in the activations).
    pub fn forward(&mut self, batch: &Batch) -> Result<()> {
        batch.validate(&self.config)?;
        self.ensure_activations(batch.batch)?;
        let (e, dd) = (self.enc_dims(), self.dec_dims());
        // The bf16 weight copies, once per forward (the backward reads the same copies).
        self.weight_copies.refresh(&self.backend, &self.params)?;
        let Self { backend: be, params, weight_copies, table: t, acts, tp, .. } = self;
        let p = &weight_copies.view(params);
        let tp = tp.as_ref();
        let a = acts.as_mut().expect("allocated above");
        a.mask = be.upload_ids("batch.attention_mask", &batch.attention_mask)?;
        a.labels = be.upload_ids("batch.labels", &batch.labels)?;
        a.enc.ids = be.upload_ids("batch.input_ids", &batch.input_ids)?;
        a.dec.ids = be.upload_ids("batch.decoder_input_ids", &batch.decoder_input_ids)?;
        let b = batch.batch;

        // Encoder.
        let ea = &mut a.enc;
        embed(
            be,
            p,
            tp,
            &t.encoder.into(),
            &ea.ids,
            &p[t.encoder.embed_positions],
            &mut ea.emb,
            &mut ea.layernorm_embedding,
            e,
        )?;
        let shape = attn_shape(b, e.len, e.len, e, false);
        for (li, idx) in t.encoder_layers.iter().enumerate() {
            let (done, rest) = ea.layers.split_at_mut(li);
            let x = if li == 0 { &ea.layernorm_embedding.out } else { &done[li - 1].out };
            let self_attn = AttnInputs { kv: Kv::SelfAttn, mask: Some(&a.mask), shape };
            encoder_layer_fwd(be, p, tp, idx, &mut rest[0], x, self_attn, e)?;
        }
        let last = ea.layers.last().map_or(&ea.layernorm_embedding.out, |l| &l.out);
        ln_fwd(be, &mut ea.final_ln, last, None, &p[t.encoder.final_ln_bias], e.d)?;

        // Decoder. The encoder output enters the decoder's tensor-parallel regions (every
        // cross-attention's keys/values).
        let enc_out = tpl::region_entry_forward::<B>(&a.enc.final_ln.out);
        let da = &mut a.dec;
        embed(
            be,
            p,
            tp,
            &t.decoder.into(),
            &da.ids,
            &p[t.decoder.embed_positions],
            &mut da.emb,
            &mut da.layernorm_embedding,
            dd,
        )?;
        let (self_shape, cross_shape) =
            (attn_shape(b, dd.len, dd.len, dd, true), attn_shape(b, dd.len, e.len, dd, false));
        for (li, idx) in t.decoder_layers.iter().enumerate() {
            let (done, rest) = da.layers.split_at_mut(li);
            let x = if li == 0 { &da.layernorm_embedding.out } else { &done[li - 1].out };
            let self_attn = AttnInputs { kv: Kv::SelfAttn, mask: None, shape: self_shape };
            let cross_attn = AttnInputs { kv: Kv::Cross(enc_out), mask: Some(&a.mask), shape: cross_shape };
            decoder_layer_fwd(be, p, tp, idx, &mut rest[0], x, self_attn, cross_attn, dd)?;
        }
        let last = da.layers.last().map_or(&da.layernorm_embedding.out, |l| &l.out);
        head_fwd(be, p, t, &mut da.final_ln, &mut a.logits, last, b * dd.len, dd)?;
        a.logits_valid = true;
        Ok(())
    }

    /// The logits of the last forward, `[batch, image_length, image_vocab + 1]`.
    pub fn logits(&self) -> Result<Vec<f32>> {
        let a = self.acts.as_ref().filter(|a| a.logits_valid).ok_or_else(|| {
            ModelError::Batch("no logits: run forward first (the loss overwrites them with their gradient)".into())
        })?;
        Ok(self.backend.download(&a.logits)?)
    }

    /// Cross-entropy of the last forward (mean over its image tokens), then the backward pass,
    /// accumulating `grad_scale_per_token ·` ∂(Σ token losses)/∂θ into `grads`. For the plain
    /// mean loss pass `1 / (batch · image_length)`; data-parallel ranks pass 1 / global tokens.
    pub fn loss_and_backward(&mut self, grad_scale_per_token: f32) -> Result<StepOutput> {
        self.loss_and_backward_with(grad_scale_per_token, &mut NoSink)
    }

    /// [`Self::loss_and_backward`] that tells `sink` each group of parameter gradients as soon as
    /// it is final ([`grad_groups`]: per layer, in backward order).
    pub fn loss_and_backward_with(
        &mut self,
        grad_scale_per_token: f32,
        sink: &mut dyn GradSink<B>,
    ) -> Result<StepOutput> {
        let loss = self.loss(grad_scale_per_token)?;
        self.backward(sink)?;
        Ok(StepOutput { loss })
    }

    /// Mean loss of the last forward without a backward (evaluation).
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f32> {
        self.forward(batch)?;
        self.loss(0.0)
    }

    /// Forward, loss and backward of one batch with the plain mean loss.
    pub fn forward_backward(&mut self, batch: &Batch) -> Result<StepOutput> {
        self.forward(batch)?;
        let tokens = (batch.batch * batch.image_len) as f32;
        self.loss_and_backward(1.0 / tokens)
    }

    fn loss(&mut self, grad_scale: f32) -> Result<f32> {
        let classes = self.config.loss_classes();
        let dd = self.dec_dims();
        let be = &self.backend;
        let tp = self.tp.as_ref().filter(|g| g.size > 1);
        let a = self
            .acts
            .as_mut()
            .filter(|a| a.logits_valid)
            .ok_or_else(|| ModelError::Batch("loss needs a forward pass first".into()))?;
        let shard = VocabShard { cols: dd.vocab_local, start: dd.vocab_start, valid: dd.vocab_valid };
        debug_assert!(tp.is_some() || shard.cols == classes);
        tpl::vocab_parallel_cross_entropy(
            be,
            tp,
            &mut a.logits,
            &mut a.losses,
            &mut a.ce_max,
            &mut a.ce_stats,
            &a.labels,
            shard,
            grad_scale,
        )?;
        a.logits_valid = false;
        let losses = be.download(&a.losses)?;
        let sum: f64 = losses.iter().map(|&l| l as f64).sum();
        Ok((sum / losses.len() as f64) as f32)
    }

    fn backward(&mut self, sink: &mut dyn GradSink<B>) -> Result<()> {
        let (e, dd) = (self.enc_dims(), self.dec_dims());
        let Self { backend: be, params, weight_copies, grads: g, table: t, acts, tp, .. } = self;
        let p = &weight_copies.view(params);
        let tp = tp.as_ref();
        let a = acts.as_mut().ok_or_else(|| ModelError::Batch("backward needs a forward pass first".into()))?;
        let b = a.batch;
        let nd = b * dd.len;

        // lm_head (column-parallel over the vocabulary) and decoder final_ln. `logits` now hold
        // ∂loss/∂logits.
        let ds = &mut a.dec_scratch;
        let last = a.dec.layers.last().map_or(&a.dec.layernorm_embedding.out, |l| &l.out);
        head_bwd(be, p, g, tp, t, &a.dec.final_ln, &a.logits, last, ds, nd, dd)?;
        sink.grads_ready(g, &grad_groups::head(t))?;

        // Decoder layers, last to first; cross-attention feeds ∂encoder_output.
        be.fill(&mut a.d_enc_out, 0.0)?;
        let enc_out = &a.enc.final_ln.out;
        let self_shape = attn_shape(b, dd.len, dd.len, dd, true);
        let cross_shape = attn_shape(b, dd.len, e.len, dd, false);
        for (li, idx) in t.decoder_layers.iter().enumerate().rev() {
            let x = if li == 0 { &a.dec.layernorm_embedding.out } else { &a.dec.layers[li - 1].out };
            let la = &a.dec.layers[li];
            let cross = (enc_out, &mut a.d_enc_out, &a.mask, cross_shape);
            decoder_layer_bwd(be, p, g, tp, idx, la, x, self_shape, cross, ds, dd)?;
            sink.grads_ready(g, &grad_groups::decoder_layer(idx))?;
        }
        embed_bwd(be, p, g, &t.decoder.into(), &a.dec, ds, dd)?;
        sink.grads_ready(g, &grad_groups::embeddings(&t.decoder))?;
        // The mirror of the decoder's region entry of the encoder output: the cross-attentions'
        // contributions are partial sums over this rank's heads.
        tpl::region_entry_backward(tp, &mut a.d_enc_out)?;

        // Encoder: final_ln from ∂encoder_output, then layers.
        let es = &mut a.enc_scratch;
        let last = a.enc.layers.last().map_or(&a.enc.layernorm_embedding.out, |l| &l.out);
        ln_bwd(
            be,
            p,
            g,
            &a.enc.final_ln,
            ln_bias_only(t.encoder.final_ln_bias),
            &mut es.dres,
            &a.d_enc_out,
            last,
            GradMode::Overwrite,
            e.d,
        )?;
        sink.grads_ready(g, &[t.encoder.final_ln_bias])?;
        let shape = attn_shape(b, e.len, e.len, e, false);
        for (li, idx) in t.encoder_layers.iter().enumerate().rev() {
            let x = if li == 0 { &a.enc.layernorm_embedding.out } else { &a.enc.layers[li - 1].out };
            encoder_layer_bwd(be, p, g, tp, idx, &a.enc.layers[li], x, Some(&a.mask), shape, es, e)?;
            sink.grads_ready(g, &grad_groups::encoder_layer(idx))?;
        }
        embed_bwd(be, p, g, &t.encoder.into(), &a.enc, es, e)?;
        sink.grads_ready(g, &grad_groups::embeddings(&t.encoder))?;
        Ok(())
    }
}

/// The parameter indices an embedding stage needs.
struct EmbedIdx {
    tokens: usize,
    positions: usize,
    ln: LnIdx,
}

impl From<crate::params::StackIdx> for EmbedIdx {
    fn from(s: crate::params::StackIdx) -> Self {
        Self { tokens: s.embed_tokens, positions: s.embed_positions, ln: s.layernorm_embedding }
    }
}

/// A LayerNorm's parameters: an optional scale and a bias.
#[derive(Clone, Copy)]
struct LnParams {
    scale: Option<usize>,
    bias: usize,
}

impl From<LnIdx> for LnParams {
    fn from(l: LnIdx) -> Self {
        Self { scale: Some(l.scale), bias: l.bias }
    }
}

fn ln_bias_only(bias: usize) -> LnParams {
    LnParams { scale: None, bias }
}

fn attn_shape(batch: usize, q_len: usize, kv_len: usize, dims: StackDims, causal: bool) -> AttentionShape {
    AttentionShape { batch, q_len, kv_len, heads: dims.heads_local, head_dim: dims.head_dim, causal }
}

/// LayerNorm forward over rows of `dim`: output and statistics into `ln`.
fn ln_fwd<B: Backend>(
    be: &B,
    ln: &mut LnActs<B::Buf>,
    x: &B::Buf,
    scale: Option<&B::Buf>,
    bias: &B::Buf,
    dim: usize,
) -> Result<()> {
    Ok(be.layernorm_forward(&mut ln.out, &mut ln.mean, &mut ln.rstd, x, scale, bias, dim)?)
}

/// LayerNorm backward: `dx` (overwritten or accumulated) from `dout`, and the parameter
/// gradients of `w` (accumulated).
#[allow(clippy::too_many_arguments)]
fn ln_bwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    g: &mut [B::Buf],
    ln: &LnActs<B::Buf>,
    w: LnParams,
    dx: &mut B::Buf,
    dout: &B::Buf,
    x: &B::Buf,
    mode: GradMode,
    dim: usize,
) -> Result<()> {
    let accumulate = mode == GradMode::Accumulate;
    match w.scale {
        Some(scale) => {
            let (dscale, dbias) = pair_mut(g, scale, w.bias);
            let s = Some(&p[scale]);
            be.layernorm_backward(dx, Some(dscale), dbias, dout, x, &ln.mean, &ln.rstd, s, dim, accumulate)?
        }
        None => be.layernorm_backward(dx, None, &mut g[w.bias], dout, x, &ln.mean, &ln.rstd, None, dim, accumulate)?,
    }
    Ok(())
}

/// Two distinct mutable elements of a slice.
fn pair_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

/// Token embedding (vocab-parallel rows: all-reduced) + `positions` (one row per position of
/// the `dims.len` positions), then `layernorm_embedding`.
#[allow(clippy::too_many_arguments)]
fn embed<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    tp: Option<&TpGroup<B>>,
    idx: &EmbedIdx,
    ids: &B::Ids,
    positions: &B::Buf,
    emb: &mut B::Buf,
    ln: &mut LnActs<B::Buf>,
    dims: StackDims,
) -> Result<()> {
    tpl::vocab_parallel_embedding(be, tp, emb, &p[idx.tokens], ids, dims.vocab_range(), dims.d)?;
    be.add_broadcast_rows(emb, positions, dims.len * dims.d)?;
    ln_fwd(be, ln, emb, Some(&p[idx.ln.scale]), &p[idx.ln.bias], dims.d)
}

/// Backward of [`embed`] from `sc.dres` (= ∂ layernorm_embedding output, replicated across tp).
fn embed_bwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    g: &mut [B::Buf],
    idx: &EmbedIdx,
    s: &activations::StackActs<B::Buf, B::Ids>,
    sc: &mut StackScratch<B::Buf>,
    dims: StackDims,
) -> Result<()> {
    let ln = &s.layernorm_embedding;
    ln_bwd(be, p, g, ln, idx.ln.into(), &mut sc.dtmp, &sc.dres, &s.emb, GradMode::Overwrite, dims.d)?;
    be.embedding_backward(&mut g[idx.tokens], &sc.dtmp, &s.ids, dims.vocab_range(), dims.d)?;
    be.sum_broadcast_rows(&mut g[idx.positions], &sc.dtmp, dims.len * dims.d)?;
    Ok(())
}

/// The decoder's head: `final_ln`, then `logits_local = y · lm_head_local` (column-parallel over
/// the vocabulary, entered with the identity; no collective) for `rows` tokens.
#[allow(clippy::too_many_arguments)]
fn head_fwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    t: &ParamTable,
    final_ln: &mut LnActs<B::Buf>,
    logits: &mut B::Buf,
    x: &B::Buf,
    rows: usize,
    dims: StackDims,
) -> Result<()> {
    ln_fwd(be, final_ln, x, None, &p[t.decoder.final_ln_bias], dims.d)?;
    let y = tpl::region_entry_forward::<B>(&final_ln.out);
    let lm_head = ColumnParallelLinear { rows, inputs: dims.d, outputs_local: dims.vocab_local };
    Ok(lm_head.forward(be, logits, y, &p[t.lm_head])?)
}

/// Backward of [`head_fwd`] from `dlogits`: lm_head's gradients, the region entry's all-reduce
/// of ∂y, then `final_ln` into `sc.dres`.
#[allow(clippy::too_many_arguments)]
fn head_bwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    g: &mut [B::Buf],
    tp: Option<&TpGroup<B>>,
    t: &ParamTable,
    final_ln: &LnActs<B::Buf>,
    dlogits: &B::Buf,
    x: &B::Buf,
    sc: &mut StackScratch<B::Buf>,
    rows: usize,
    dims: StackDims,
) -> Result<()> {
    let lm_head = ColumnParallelLinear { rows, inputs: dims.d, outputs_local: dims.vocab_local };
    let (w, dw) = (&p[t.lm_head], &mut g[t.lm_head]);
    lm_head.backward(be, dw, &mut sc.dtmp, &final_ln.out, dlogits, w, GradMode::Overwrite)?;
    tpl::region_entry_backward(tp, &mut sc.dtmp)?;
    let bias = ln_bias_only(t.decoder.final_ln_bias);
    ln_bwd(be, p, g, final_ln, bias, &mut sc.dres, &sc.dtmp, x, GradMode::Overwrite, dims.d)
}

/// Where an attention block's keys and values come from.
enum Kv<'a, T> {
    /// Self-attention: projected from the block's normalised input (into the activations).
    SelfAttn,
    /// Cross-attention: projected from another sequence (the encoder output).
    Cross(&'a T),
    /// Generation's self-attention over a cache: the new keys/values (projected as
    /// [`Kv::SelfAttn`], one token per row) are written at position `pos` of every row of the
    /// `[rows, len, width]` cache `(k, v)`, then attention reads the cache.
    SelfCached { k: &'a mut T, v: &'a mut T, pos: usize, len: usize },
    /// Generation's cross-attention: keys/values of the encoder output, projected once.
    CrossCached { k: &'a T, v: &'a T },
}

/// The inputs of one attention block besides the residual stream.
struct AttnInputs<'a, B: Backend> {
    kv: Kv<'a, B::Buf>,
    /// Key mask (`[batch, kv_len]`), if any.
    mask: Option<&'a B::Ids>,
    shape: AttentionShape,
}

/// Forward of `out = x + LN_post(Attn(LN_pre(x), kv))` where `kv` is `x`'s normalised self (self
/// attention), the encoder output (cross-attention) or a KV cache (generation). The heads are a
/// tensor-parallel region: q/k/v column-parallel (this rank's heads, entered with the identity),
/// out_proj row-parallel (its output all-reduced across tp).
fn attn_block_fwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    tp: Option<&TpGroup<B>>,
    w: &AttnBlockIdx,
    s: &mut AttnBlockActs<B::Buf>,
    x: &B::Buf,
    inputs: AttnInputs<'_, B>,
) -> Result<()> {
    let AttnInputs { kv, mask, shape } = inputs;
    let (wl, nq) = (shape.width(), shape.batch * shape.q_len);
    let d = be.buf_len(x) / nq;
    ln_fwd(be, &mut s.ln_pre, x, None, &p[w.ln_pre_bias], d)?;
    let h = tpl::region_entry_forward::<B>(&s.ln_pre.out);
    let a = &mut s.attn;
    let proj = |rows: usize| ColumnParallelLinear { rows, inputs: d, outputs_local: wl };
    proj(nq).forward(be, &mut a.q, h, &p[w.attn.q])?;
    let (k, v): (&B::Buf, &B::Buf) = match kv {
        Kv::SelfAttn => {
            proj(nq).forward(be, &mut a.k, h, &p[w.attn.k])?;
            proj(nq).forward(be, &mut a.v, h, &p[w.attn.v])?;
            (&a.k, &a.v)
        }
        Kv::Cross(src) => {
            let nk = shape.batch * shape.kv_len;
            proj(nk).forward(be, &mut a.k, src, &p[w.attn.k])?;
            proj(nk).forward(be, &mut a.v, src, &p[w.attn.v])?;
            (&a.k, &a.v)
        }
        Kv::SelfCached { k: cache_k, v: cache_v, pos, len } => {
            proj(nq).forward(be, &mut a.k, h, &p[w.attn.k])?;
            proj(nq).forward(be, &mut a.v, h, &p[w.attn.v])?;
            for r in 0..shape.batch {
                be.copy(cache_k, (r * len + pos) * wl, &a.k, r * wl, wl)?;
                be.copy(cache_v, (r * len + pos) * wl, &a.v, r * wl, wl)?;
            }
            (&*cache_k, &*cache_v)
        }
        Kv::CrossCached { k, v } => (k, v),
    };
    be.attention_forward(&mut a.o, &mut a.lse, &a.q, k, v, mask, shape)?;
    let out_proj = RowParallelLinear { rows: nq, inputs_local: wl, outputs: d };
    out_proj.forward(be, tp, &mut a.proj, &a.o, &p[w.attn.out])?;
    ln_fwd(be, &mut s.ln_post, &a.proj, Some(&p[w.ln_post.scale]), &p[w.ln_post.bias], d)?;
    be.add(&mut s.out, x, &s.ln_post.out)?;
    Ok(())
}

/// Backward of [`attn_block_fwd`] (training: [`Kv::SelfAttn`] when `cross` is `None`): on entry
/// `sc.dres` = ∂out, on exit ∂x. For cross-attention, `cross` carries the encoder output and its
/// gradient accumulator (a partial sum over this rank's heads, all-reduced by the caller once for
/// all layers, the mirror of its region entry). The region entry of `LN_pre(x)` all-reduces its
/// gradient across tp.
#[allow(clippy::too_many_arguments)]
fn attn_block_bwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    g: &mut [B::Buf],
    tp: Option<&TpGroup<B>>,
    w: &AttnBlockIdx,
    s: &AttnBlockActs<B::Buf>,
    x: &B::Buf,
    cross: Option<(&B::Buf, &mut B::Buf)>,
    mask: Option<&B::Ids>,
    shape: AttentionShape,
    sc: &mut StackScratch<B::Buf>,
) -> Result<()> {
    let (wl, nq, nk) = (shape.width(), shape.batch * shape.q_len, shape.batch * shape.kv_len);
    let d = be.buf_len(x) / nq;
    let a = &s.attn;
    // Post-attention LayerNorm: ∂proj into dtmp.
    ln_bwd(be, p, g, &s.ln_post, w.ln_post.into(), &mut sc.dtmp, &sc.dres, &a.proj, GradMode::Overwrite, d)?;
    // out_proj (row-parallel): weight gradient and ∂o are local.
    let out_proj = RowParallelLinear { rows: nq, inputs_local: wl, outputs: d };
    out_proj.backward(be, &mut g[w.attn.out], &mut sc.dtmp2, &a.o, &sc.dtmp, &p[w.attn.out])?;
    // Attention core.
    let (dk, dv) = match sc.dk_cross.as_mut() {
        Some((dk, dv)) if cross.is_some() => (dk, dv),
        _ => (&mut sc.dk, &mut sc.dv),
    };
    be.attention_backward(&mut sc.dq, dk, dv, &sc.dtmp2, &a.q, &a.k, &a.v, &a.o, &a.lse, mask, shape)?;
    // q/k/v projections (column-parallel). ∂(LN_pre output) into dtmp.
    let proj = |rows: usize| ColumnParallelLinear { rows, inputs: d, outputs_local: wl };
    let h = &s.ln_pre.out;
    proj(nq).backward(be, &mut g[w.attn.q], &mut sc.dtmp, h, &sc.dq, &p[w.attn.q], GradMode::Overwrite)?;
    let acc = GradMode::Accumulate;
    match cross {
        None => {
            proj(nk).backward(be, &mut g[w.attn.k], &mut sc.dtmp, h, dk, &p[w.attn.k], acc)?;
            proj(nk).backward(be, &mut g[w.attn.v], &mut sc.dtmp, h, dv, &p[w.attn.v], acc)?;
        }
        Some((enc_out, d_enc_out)) => {
            proj(nk).backward(be, &mut g[w.attn.k], d_enc_out, enc_out, dk, &p[w.attn.k], acc)?;
            proj(nk).backward(be, &mut g[w.attn.v], d_enc_out, enc_out, dv, &p[w.attn.v], acc)?;
        }
    }
    tpl::region_entry_backward(tp, &mut sc.dtmp)?;
    // Pre-attention LayerNorm (bias only); adds into the residual gradient.
    ln_bwd(be, p, g, &s.ln_pre, ln_bias_only(w.ln_pre_bias), &mut sc.dres, &sc.dtmp, x, acc, d)
}

/// Forward of `out = x + GLU(x)`. The ffn columns are a tensor-parallel region: Dense_0/1
/// column-parallel (entered with the identity), the middle LayerNorm takes its statistics from
/// all-reduced row sums over the sharded ffn, and Dense_2 is row-parallel: its output is
/// all-reduced.
#[allow(clippy::too_many_arguments)]
fn glu_fwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    tp: Option<&TpGroup<B>>,
    w: &GluIdx,
    s: &mut activations::GluActs<B::Buf>,
    x: &B::Buf,
    out: &mut B::Buf,
    dims: StackDims,
) -> Result<()> {
    let (d, f) = (dims.d, dims.ffn_local);
    let n = be.buf_len(x) / d;
    ln_fwd(be, &mut s.ln0, x, None, &p[w.ln0_bias], d)?;
    let h = tpl::region_entry_forward::<B>(&s.ln0.out);
    let dense = ColumnParallelLinear { rows: n, inputs: d, outputs_local: f };
    dense.forward(be, &mut s.a0, h, &p[w.dense0])?;
    dense.forward(be, &mut s.a1, h, &p[w.dense1])?;
    be.gelu_glu_forward(&mut s.act, &s.a0, &s.a1)?;
    let l = &mut s.ln1;
    let bias = &p[w.ln1_bias];
    tpl::sharded_layernorm_forward(be, tp, &mut l.out, &mut l.mean, &mut l.rstd, &s.act, bias, f, dims.ffn)?;
    let dense2 = RowParallelLinear { rows: n, inputs_local: f, outputs: d };
    dense2.forward(be, tp, out, &s.ln1.out, &p[w.dense2])?;
    be.add_assign(out, x)?;
    Ok(())
}

/// Backward of [`glu_fwd`]: on entry `sc.dres` = ∂out, on exit ∂x. The middle LayerNorm
/// all-reduces `[2, rows]` sums; the region entry all-reduces the gradient of Dense_0/1's input.
#[allow(clippy::too_many_arguments)]
fn glu_bwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    g: &mut [B::Buf],
    tp: Option<&TpGroup<B>>,
    w: &GluIdx,
    s: &activations::GluActs<B::Buf>,
    x: &B::Buf,
    sc: &mut StackScratch<B::Buf>,
    dims: StackDims,
) -> Result<()> {
    let (d, f) = (dims.d, dims.ffn_local);
    let n = be.buf_len(x) / d;
    let dense2 = RowParallelLinear { rows: n, inputs_local: f, outputs: d };
    dense2.backward(be, &mut g[w.dense2], &mut sc.dffn_a, &s.ln1.out, &sc.dres, &p[w.dense2])?;
    let l = &s.ln1;
    tpl::sharded_layernorm_backward(
        be,
        tp,
        &mut sc.ln_sums,
        &mut sc.dffn_b,
        &mut g[w.ln1_bias],
        &sc.dffn_a,
        &s.act,
        &l.mean,
        &l.rstd,
        f,
        dims.ffn,
    )?;
    // dffn_a ← ∂a0, dffn_c ← ∂a1
    be.gelu_glu_backward(&mut sc.dffn_a, &mut sc.dffn_c, &sc.dffn_b, &s.a0, &s.a1)?;
    let dense = ColumnParallelLinear { rows: n, inputs: d, outputs_local: f };
    let h = &s.ln0.out;
    dense.backward(be, &mut g[w.dense0], &mut sc.dtmp, h, &sc.dffn_a, &p[w.dense0], GradMode::Overwrite)?;
    dense.backward(be, &mut g[w.dense1], &mut sc.dtmp, h, &sc.dffn_c, &p[w.dense1], GradMode::Accumulate)?;
    tpl::region_entry_backward(tp, &mut sc.dtmp)?;
    ln_bwd(be, p, g, &s.ln0, ln_bias_only(w.ln0_bias), &mut sc.dres, &sc.dtmp, x, GradMode::Accumulate, d)
}

/// One encoder layer: self-attention block, then GLU, into `la.out`.
#[allow(clippy::too_many_arguments)]
fn encoder_layer_fwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    tp: Option<&TpGroup<B>>,
    idx: &EncoderLayerIdx,
    la: &mut LayerActs<B::Buf>,
    x: &B::Buf,
    self_attn: AttnInputs<'_, B>,
    dims: StackDims,
) -> Result<()> {
    attn_block_fwd(be, p, tp, &idx.self_attn, &mut la.self_attn, x, self_attn)?;
    glu_fwd(be, p, tp, &idx.glu, &mut la.glu, &la.self_attn.out, &mut la.out, dims)
}

/// Backward of [`encoder_layer_fwd`]: `sc.dres` from ∂out to ∂x.
#[allow(clippy::too_many_arguments)]
fn encoder_layer_bwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    g: &mut [B::Buf],
    tp: Option<&TpGroup<B>>,
    idx: &EncoderLayerIdx,
    la: &LayerActs<B::Buf>,
    x: &B::Buf,
    mask: Option<&B::Ids>,
    shape: AttentionShape,
    sc: &mut StackScratch<B::Buf>,
    dims: StackDims,
) -> Result<()> {
    glu_bwd(be, p, g, tp, &idx.glu, &la.glu, &la.self_attn.out, sc, dims)?;
    attn_block_bwd(be, p, g, tp, &idx.self_attn, &la.self_attn, x, None, mask, shape, sc)
}

/// One decoder layer: causal self-attention, cross-attention, GLU, into `la.out`. Training and
/// generation (a KV cache in `self_attn.kv` / `cross_attn.kv`) share it.
#[allow(clippy::too_many_arguments)]
fn decoder_layer_fwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    tp: Option<&TpGroup<B>>,
    idx: &DecoderLayerIdx,
    la: &mut LayerActs<B::Buf>,
    x: &B::Buf,
    self_attn: AttnInputs<'_, B>,
    cross_attn: AttnInputs<'_, B>,
    dims: StackDims,
) -> Result<()> {
    attn_block_fwd(be, p, tp, &idx.self_attn, &mut la.self_attn, x, self_attn)?;
    let cross = la.cross_attn.as_mut().ok_or_else(missing_cross_attention)?;
    attn_block_fwd(be, p, tp, &idx.cross_attn, cross, &la.self_attn.out, cross_attn)?;
    glu_fwd(be, p, tp, &idx.glu, &mut la.glu, &cross.out, &mut la.out, dims)
}

/// Backward of [`decoder_layer_fwd`] in training: `sc.dres` from ∂out to ∂x; `cross` is the
/// encoder output, its gradient accumulator, the text mask and the cross-attention shape.
#[allow(clippy::too_many_arguments)]
fn decoder_layer_bwd<B: Backend>(
    be: &B,
    p: &Weights<'_, B::Buf>,
    g: &mut [B::Buf],
    tp: Option<&TpGroup<B>>,
    idx: &DecoderLayerIdx,
    la: &LayerActs<B::Buf>,
    x: &B::Buf,
    self_shape: AttentionShape,
    cross: (&B::Buf, &mut B::Buf, &B::Ids, AttentionShape),
    sc: &mut StackScratch<B::Buf>,
    dims: StackDims,
) -> Result<()> {
    let (enc_out, d_enc_out, text_mask, cross_shape) = cross;
    let ca = la.cross_attn.as_ref().ok_or_else(missing_cross_attention)?;
    glu_bwd(be, p, g, tp, &idx.glu, &la.glu, &ca.out, sc, dims)?;
    let kv = Some((enc_out, d_enc_out));
    attn_block_bwd(be, p, g, tp, &idx.cross_attn, ca, &la.self_attn.out, kv, Some(text_mask), cross_shape, sc)?;
    attn_block_bwd(be, p, g, tp, &idx.self_attn, &la.self_attn, x, None, None, self_shape, sc)
}

fn missing_cross_attention() -> ModelError {
    ModelError::Batch("internal: decoder layer activations without cross-attention".into())
}
