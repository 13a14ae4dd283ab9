//! DalleBart forward and backward, written out op by op against the runtime's [`Backend`].
//!
//! Math (../shared/DESIGN.md §1): NormFormer encoder layer `x += LN_1(SelfAttn(LN_0(x)))`,
//! `x += GLU(x)`; decoder layer adds causal self-attention and cross-attention the same way;
//! GLU `h = LN_0(x); h = gelu(h·W0) ∘ (h·W1); h = LN_1(h); out = h·W2`; both stacks end with a
//! bias-only `final_ln`; `logits = y · lm_head`; loss = mean softmax cross-entropy over
//! `image_vocab + 1` classes. The model owns its activations (allocated once per batch size)
//! and accumulates parameter gradients into `grads`.

use crate::batch::Batch;
use crate::config::DalleBartConfig;
use crate::error::{ModelError, Result};
use crate::params::{split_axis, AttnIdx, GluIdx, LnIdx, ParamTable};
use dm_parallel::layers::{self as tpl, VocabShard};
use dm_runtime::{AttentionShape, Backend, MatmulSpec, VocabRange};

pub mod generate;
pub use generate::{Prompt, SamplingOptions};

/// This rank's tensor-parallel group. DalleBart is built from the tensor-parallel blocks of
/// `dm_parallel::layers` (each documents its collectives). Per layer, over the group:
/// - forward: token embeddings (vocab-parallel rows) all-reduce; every attention `out_proj` and
///   GLU `Dense_2` (row-parallel) all-reduce their output; the GLU middle LayerNorm (its width is
///   the sharded ffn) all-reduces two `[rows]` statistics; the vocab-parallel cross-entropy
///   all-reduces the row max (max) and `[2, rows]` sums — the logits are never gathered;
/// - backward: the inputs of every column-parallel projection (q/k/v, GLU Dense_0/1, lm_head)
///   all-reduce their gradient; the GLU middle LayerNorm all-reduces `[2, rows]` sums; the
///   encoder output's gradient (from every cross-attention) is all-reduced once.
pub use dm_parallel::layers::TpGroup;

/// What one forward+backward reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// Mean cross-entropy over this batch's image tokens.
    pub loss: f32,
}

/// A LayerNorm's output and saved statistics.
struct LnActs<B: Backend> {
    out: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
}

struct AttnActs<B: Backend> {
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    /// Attention output before out_proj.
    o: B::Buf,
    lse: B::Buf,
    /// `o · out_proj` (input of the NormFormer post-attention LayerNorm).
    proj: B::Buf,
}

struct GluActs<B: Backend> {
    ln0: LnActs<B>,
    a0: B::Buf,
    a1: B::Buf,
    /// `gelu(a0) ∘ a1`
    act: B::Buf,
    ln1: LnActs<B>,
}

/// One attention sub-block `x + LN_post(Attn(LN_pre(x)))`.
struct AttnBlockActs<B: Backend> {
    ln_pre: LnActs<B>,
    attn: AttnActs<B>,
    ln_post: LnActs<B>,
    /// Residual stream after the block.
    out: B::Buf,
}

struct LayerActs<B: Backend> {
    self_attn: AttnBlockActs<B>,
    cross_attn: Option<AttnBlockActs<B>>,
    glu: GluActs<B>,
    /// Residual stream after the layer (input of the next one).
    out: B::Buf,
}

struct StackActs<B: Backend> {
    ids: B::Ids,
    /// Token + position embeddings.
    emb: B::Buf,
    ln_emb: LnActs<B>,
    layers: Vec<LayerActs<B>>,
    final_ln: LnActs<B>,
}

/// Gradient scratch of one stack, reused every step.
struct StackScratch<B: Backend> {
    /// Gradient of the residual stream, `[tokens, d]`.
    dres: B::Buf,
    /// Generic `[tokens, d]` temporaries.
    dtmp: B::Buf,
    dtmp2: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    /// `[tokens, ffn]` temporaries.
    dffn_a: B::Buf,
    dffn_b: B::Buf,
    dffn_c: B::Buf,
    /// Cross-attention key/value gradients, `[text tokens, d]` (decoder only).
    dk_cross: Option<(B::Buf, B::Buf)>,
    /// `[2, tokens]` row sums of the sharded LayerNorm backward (tp > 1).
    ln_sums: B::Buf,
}

struct Activations<B: Backend> {
    batch: usize,
    mask: B::Ids,
    labels: B::Ids,
    enc: StackActs<B>,
    dec: StackActs<B>,
    logits: B::Buf,
    losses: B::Buf,
    enc_scratch: StackScratch<B>,
    dec_scratch: StackScratch<B>,
    /// Gradient of the encoder output, accumulated over every cross-attention.
    d_enc_out: B::Buf,
    /// Whether `logits` currently hold logits (not yet overwritten by their gradient).
    logits_valid: bool,
    /// Vocab-parallel cross-entropy statistics: row max `[tokens]` and sums `[2, tokens]`.
    ce_max: B::Buf,
    ce_stats: B::Buf,
}

/// DalleBart on one device: parameters, their gradients, and activations.
pub struct DalleBart<B: Backend> {
    pub config: DalleBartConfig,
    pub table: ParamTable,
    backend: B,
    pub params: Vec<B::Buf>,
    pub grads: Vec<B::Buf>,
    acts: Option<Activations<B>>,
    tp: Option<TpGroup<B>>,
}

/// Shapes of one stack on this rank, derived from the config and the tp split.
#[derive(Clone, Copy)]
struct StackDims {
    len: usize,
    d: usize,
    /// Heads on this rank, and their size.
    heads: usize,
    head_dim: usize,
    /// ffn columns on this rank, of `ffn_global`.
    ffn: usize,
    ffn_global: usize,
    /// Vocabulary rows on this rank (padded), the first of them globally, and how many are real.
    vocab: usize,
    vocab_start: usize,
    vocab_valid: usize,
}

impl StackDims {
    /// Width of this rank's attention heads (`heads · head_dim`).
    fn dl(&self) -> usize {
        self.heads * self.head_dim
    }
    fn vocab_range(&self) -> VocabRange {
        VocabRange { start: self.vocab_start, end: self.vocab_start + self.vocab }
    }
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
        Ok(Self { config, table, backend, params, grads, acts: None, tp })
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

    fn stack_dims(&self, len: usize, heads: usize, ffn: usize, vocab: usize) -> StackDims {
        let (rank, size) = self.tp_coords();
        let (_, f_local, _) = split_axis(ffn, size, rank, false);
        let (v_start, v_valid, v_local) = split_axis(vocab, size, rank, true);
        StackDims {
            len,
            d: self.config.d_model,
            heads: heads / size,
            head_dim: self.config.d_model / heads,
            ffn: f_local,
            ffn_global: ffn,
            vocab: v_local,
            vocab_start: v_start,
            vocab_valid: v_valid,
        }
    }
    fn enc_dims(&self) -> StackDims {
        let c = &self.config;
        self.stack_dims(c.max_text_length, c.encoder_attention_heads, c.encoder_ffn_dim, c.encoder_vocab_size)
    }
    fn dec_dims(&self) -> StackDims {
        let c = &self.config;
        self.stack_dims(c.image_length, c.decoder_attention_heads, c.decoder_ffn_dim, c.image_rows())
    }

    /// The columns of [`Self::logits`] rows on this rank: (padded width, first global column,
    /// real columns).
    pub fn logits_columns(&self) -> (usize, usize, usize) {
        let d = self.dec_dims();
        (d.vocab, d.vocab_start, d.vocab_valid)
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
        let (e, dd) = (self.enc_dims(), self.dec_dims());
        let be = &self.backend;
        let text_tokens = batch * e.len;
        let image_tokens = batch * dd.len;
        let enc = alloc_stack(be, "encoder", e, batch, self.config.encoder_layers, None)?;
        let dec = alloc_stack(be, "decoder", dd, batch, self.config.decoder_layers, Some(text_tokens))?;
        self.acts = Some(Activations {
            batch,
            mask: be.upload_ids("batch.attention_mask", &vec![1; text_tokens])?,
            labels: be.upload_ids("batch.labels", &vec![0; image_tokens])?,
            logits: be.zeros("logits", image_tokens * dd.vocab)?,
            losses: be.zeros("losses", image_tokens)?,
            enc_scratch: alloc_scratch(be, "encoder", e, batch, None)?,
            dec_scratch: alloc_scratch(be, "decoder", dd, batch, Some(text_tokens))?,
            d_enc_out: be.zeros("grad.encoder_output", text_tokens * e.d)?,
            enc,
            dec,
            logits_valid: false,
            ce_max: be.zeros("loss.row_max", image_tokens)?,
            ce_stats: be.zeros("loss.row_sums", 2 * image_tokens)?,
        });
        Ok(())
    }

    /// Runs the forward pass up to the logits (kept in the activations).
    pub fn forward(&mut self, batch: &Batch) -> Result<()> {
        batch.validate(&self.config)?;
        self.ensure_activations(batch.batch)?;
        let (e, dd) = (self.enc_dims(), self.dec_dims());
        let Self { backend: be, params: p, table: t, acts, tp, .. } = self;
        let tp = tp.as_ref();
        let a = acts.as_mut().expect("allocated above");
        a.mask = be.upload_ids("batch.attention_mask", &batch.attention_mask)?;
        a.labels = be.upload_ids("batch.labels", &batch.labels)?;
        a.enc.ids = be.upload_ids("batch.input_ids", &batch.input_ids)?;
        a.dec.ids = be.upload_ids("batch.decoder_input_ids", &batch.decoder_input_ids)?;
        let b = batch.batch;

        // Encoder.
        embed(be, p, tp, &t.encoder.into(), &mut a.enc, e)?;
        for (li, idx) in t.encoder_layers.iter().enumerate() {
            let (done, rest) = a.enc.layers.split_at_mut(li);
            let x = if li == 0 { &a.enc.ln_emb.out } else { &done[li - 1].out };
            let la = &mut rest[0];
            let shape = attn_shape(b, e.len, e.len, e, false);
            attn_block_fwd(
                be,
                p,
                tp,
                idx.ln0_bias,
                &idx.attn,
                idx.ln1,
                &mut la.self_attn,
                x,
                None,
                Some(&a.mask),
                shape,
            )?;
            glu_fwd(be, p, tp, &idx.glu, &mut la.glu, &la.self_attn.out, &mut la.out, e)?;
        }
        let last = a.enc.layers.last().map_or(&a.enc.ln_emb.out, |l| &l.out);
        ln_fwd(be, &mut a.enc.final_ln, last, None, &p[t.encoder.final_ln_bias], e.d)?;

        // Decoder.
        embed(be, p, tp, &t.decoder.into(), &mut a.dec, dd)?;
        let enc_out = &a.enc.final_ln.out;
        for (li, idx) in t.decoder_layers.iter().enumerate() {
            let (done, rest) = a.dec.layers.split_at_mut(li);
            let x = if li == 0 { &a.dec.ln_emb.out } else { &done[li - 1].out };
            let la = &mut rest[0];
            let shape = attn_shape(b, dd.len, dd.len, dd, true);
            attn_block_fwd(be, p, tp, idx.ln0_bias, &idx.self_attn, idx.ln1, &mut la.self_attn, x, None, None, shape)?;
            let cross = la.cross_attn.as_mut().expect("decoder layers have cross-attention");
            let shape = attn_shape(b, dd.len, e.len, dd, false);
            attn_block_fwd(
                be,
                p,
                tp,
                idx.ln2_bias,
                &idx.cross_attn,
                idx.ln3,
                cross,
                &la.self_attn.out,
                Some(enc_out),
                Some(&a.mask),
                shape,
            )?;
            glu_fwd(be, p, tp, &idx.glu, &mut la.glu, &cross.out, &mut la.out, dd)?;
        }
        let last = a.dec.layers.last().map_or(&a.dec.ln_emb.out, |l| &l.out);
        ln_fwd(be, &mut a.dec.final_ln, last, None, &p[t.decoder.final_ln_bias], dd.d)?;
        be.matmul(&mut a.logits, &a.dec.final_ln.out, &p[t.lm_head], MatmulSpec::nn(b * dd.len, dd.vocab, dd.d))?;
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
        let loss = self.loss(grad_scale_per_token)?;
        self.backward()?;
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
        let classes = self.config.image_rows();
        let dd = self.dec_dims();
        let be = &self.backend;
        let tp = self.tp.as_ref().filter(|g| g.size > 1);
        let a = self
            .acts
            .as_mut()
            .filter(|a| a.logits_valid)
            .ok_or_else(|| ModelError::Batch("loss needs a forward pass first".into()))?;
        let shard = VocabShard { cols: dd.vocab, start: dd.vocab_start, valid: dd.vocab_valid };
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

    fn backward(&mut self) -> Result<()> {
        let (e, dd) = (self.enc_dims(), self.dec_dims());
        let Self { backend: be, params: p, grads: g, table: t, acts, tp, .. } = self;
        let tp = tp.as_ref();
        let a = acts.as_mut().ok_or_else(|| ModelError::Batch("backward needs a forward pass first".into()))?;
        let b = a.batch;
        let nd = b * dd.len;

        // lm_head and decoder final_ln. `logits` now hold ∂loss/∂logits.
        let ds = &mut a.dec_scratch;
        let y = &a.dec.final_ln;
        be.matmul(
            &mut g[t.lm_head],
            &y.out,
            &a.logits,
            MatmulSpec { m: dd.d, n: dd.vocab, k: nd, trans_a: true, trans_b: false, accumulate: true },
        )?;
        be.matmul(
            &mut ds.dtmp,
            &a.logits,
            &p[t.lm_head],
            MatmulSpec { m: nd, n: dd.d, k: dd.vocab, trans_a: false, trans_b: true, accumulate: false },
        )?;
        tpl::reduce_input_grad(tp, &mut ds.dtmp)?;
        let last = a.dec.layers.last().map_or(&a.dec.ln_emb.out, |l| &l.out);
        be.layernorm_backward(
            &mut ds.dres,
            None,
            &mut g[t.decoder.final_ln_bias],
            &ds.dtmp,
            last,
            &y.mean,
            &y.rstd,
            None,
            dd.d,
            false,
        )?;

        // Decoder layers, last to first; cross-attention feeds ∂encoder_output.
        be.fill(&mut a.d_enc_out, 0.0)?;
        let enc_out = &a.enc.final_ln.out;
        for (li, idx) in t.decoder_layers.iter().enumerate().rev() {
            let x = if li == 0 { &a.dec.ln_emb.out } else { &a.dec.layers[li - 1].out };
            let la = &a.dec.layers[li];
            glu_bwd(be, p, g, tp, &idx.glu, &la.glu, la.cross_attn.as_ref().map(|c| &c.out).expect("decoder"), ds, dd)?;
            let cross = la.cross_attn.as_ref().expect("decoder layers have cross-attention");
            let shape = attn_shape(b, dd.len, e.len, dd, false);
            attn_block_bwd(
                be,
                p,
                g,
                tp,
                idx.ln2_bias,
                &idx.cross_attn,
                idx.ln3,
                cross,
                &la.self_attn.out,
                Some((enc_out, &mut a.d_enc_out)),
                Some(&a.mask),
                shape,
                ds,
            )?;
            let shape = attn_shape(b, dd.len, dd.len, dd, true);
            attn_block_bwd(
                be,
                p,
                g,
                tp,
                idx.ln0_bias,
                &idx.self_attn,
                idx.ln1,
                &la.self_attn,
                x,
                None,
                None,
                shape,
                ds,
            )?;
        }
        embed_bwd(be, p, g, &t.decoder.into(), &a.dec, ds, dd)?;
        // The cross-attentions' contributions are partial sums over this rank's heads.
        tpl::reduce_input_grad(tp, &mut a.d_enc_out)?;

        // Encoder: final_ln from ∂encoder_output, then layers.
        let es = &mut a.enc_scratch;
        let last = a.enc.layers.last().map_or(&a.enc.ln_emb.out, |l| &l.out);
        be.layernorm_backward(
            &mut es.dres,
            None,
            &mut g[t.encoder.final_ln_bias],
            &a.d_enc_out,
            last,
            &a.enc.final_ln.mean,
            &a.enc.final_ln.rstd,
            None,
            e.d,
            false,
        )?;
        for (li, idx) in t.encoder_layers.iter().enumerate().rev() {
            let x = if li == 0 { &a.enc.ln_emb.out } else { &a.enc.layers[li - 1].out };
            let la = &a.enc.layers[li];
            glu_bwd(be, p, g, tp, &idx.glu, &la.glu, &la.self_attn.out, es, e)?;
            let shape = attn_shape(b, e.len, e.len, e, false);
            attn_block_bwd(
                be,
                p,
                g,
                tp,
                idx.ln0_bias,
                &idx.attn,
                idx.ln1,
                &la.self_attn,
                x,
                None,
                Some(&a.mask),
                shape,
                es,
            )?;
        }
        embed_bwd(be, p, g, &t.encoder.into(), &a.enc, es, e)?;
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

fn attn_shape(batch: usize, q_len: usize, kv_len: usize, dims: StackDims, causal: bool) -> AttentionShape {
    AttentionShape { batch, q_len, kv_len, heads: dims.heads, head_dim: dims.head_dim, causal }
}

fn alloc_ln<B: Backend>(be: &B, name: &str, rows: usize, dim: usize) -> Result<LnActs<B>> {
    Ok(LnActs {
        out: be.zeros(name, rows * dim)?,
        mean: be.zeros(&format!("{name}.mean"), rows)?,
        rstd: be.zeros(&format!("{name}.rstd"), rows)?,
    })
}

fn alloc_attn_block<B: Backend>(
    be: &B,
    name: &str,
    dims: StackDims,
    batch: usize,
    kv_tokens: usize,
) -> Result<AttnBlockActs<B>> {
    let n = batch * dims.len;
    let (d, dl) = (dims.d, dims.dl());
    Ok(AttnBlockActs {
        ln_pre: alloc_ln(be, &format!("{name}.ln_pre"), n, d)?,
        attn: AttnActs {
            q: be.zeros(&format!("{name}.q"), n * dl)?,
            k: be.zeros(&format!("{name}.k"), kv_tokens * dl)?,
            v: be.zeros(&format!("{name}.v"), kv_tokens * dl)?,
            o: be.zeros(&format!("{name}.attn"), n * dl)?,
            lse: be.zeros(&format!("{name}.lse"), batch * dims.heads * dims.len)?,
            proj: be.zeros(&format!("{name}.out_proj"), n * d)?,
        },
        ln_post: alloc_ln(be, &format!("{name}.ln_post"), n, d)?,
        out: be.zeros(&format!("{name}.residual"), n * d)?,
    })
}

fn alloc_stack<B: Backend>(
    be: &B,
    name: &str,
    dims: StackDims,
    batch: usize,
    n_layers: usize,
    cross_kv_tokens: Option<usize>,
) -> Result<StackActs<B>> {
    let n = batch * dims.len;
    let (d, f) = (dims.d, dims.ffn);
    let layers = (0..n_layers)
        .map(|i| {
            let l = format!("{name}.layer{i}");
            Ok(LayerActs {
                self_attn: alloc_attn_block(be, &format!("{l}.self_attn"), dims, batch, n)?,
                cross_attn: match cross_kv_tokens {
                    Some(kv) => Some(alloc_attn_block(be, &format!("{l}.cross_attn"), dims, batch, kv)?),
                    None => None,
                },
                glu: GluActs {
                    ln0: alloc_ln(be, &format!("{l}.glu.ln0"), n, d)?,
                    a0: be.zeros(&format!("{l}.glu.dense0"), n * f)?,
                    a1: be.zeros(&format!("{l}.glu.dense1"), n * f)?,
                    act: be.zeros(&format!("{l}.glu.act"), n * f)?,
                    ln1: alloc_ln(be, &format!("{l}.glu.ln1"), n, f)?,
                },
                out: be.zeros(&format!("{l}.out"), n * d)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StackActs {
        ids: be.upload_ids(&format!("{name}.ids"), &vec![0; n])?,
        emb: be.zeros(&format!("{name}.embeddings"), n * d)?,
        ln_emb: alloc_ln(be, &format!("{name}.layernorm_embedding"), n, d)?,
        layers,
        final_ln: alloc_ln(be, &format!("{name}.final_ln"), n, d)?,
    })
}

fn alloc_scratch<B: Backend>(
    be: &B,
    name: &str,
    dims: StackDims,
    batch: usize,
    cross_kv_tokens: Option<usize>,
) -> Result<StackScratch<B>> {
    let n = batch * dims.len;
    let (d, dl, f) = (dims.d, dims.dl(), dims.ffn);
    let z = |what: &str, len: usize| be.zeros(&format!("{name}.scratch.{what}"), len);
    Ok(StackScratch {
        dres: z("dres", n * d)?,
        dtmp: z("dtmp", n * d)?,
        dtmp2: z("dtmp2", n * dl)?,
        dq: z("dq", n * dl)?,
        dk: z("dk", n * dl)?,
        dv: z("dv", n * dl)?,
        dffn_a: z("dffn_a", n * f)?,
        dffn_b: z("dffn_b", n * f)?,
        dffn_c: z("dffn_c", n * f)?,
        dk_cross: match cross_kv_tokens {
            Some(kv) => Some((z("dk_cross", kv * dl)?, z("dv_cross", kv * dl)?)),
            None => None,
        },
        ln_sums: z("ln_sums", 2 * n)?,
    })
}

fn ln_fwd<B: Backend>(
    be: &B,
    ln: &mut LnActs<B>,
    x: &B::Buf,
    scale: Option<&B::Buf>,
    bias: &B::Buf,
    dim: usize,
) -> Result<()> {
    Ok(be.layernorm_forward(&mut ln.out, &mut ln.mean, &mut ln.rstd, x, scale, bias, dim)?)
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

/// Token embedding (vocab-parallel rows: all-reduced) + positions, then `layernorm_embedding`.
fn embed<B: Backend>(
    be: &B,
    p: &[B::Buf],
    tp: Option<&TpGroup<B>>,
    idx: &EmbedIdx,
    s: &mut StackActs<B>,
    dims: StackDims,
) -> Result<()> {
    tpl::vocab_parallel_embedding(be, tp, &mut s.emb, &p[idx.tokens], &s.ids, dims.vocab_range(), dims.d)?;
    be.add_broadcast_rows(&mut s.emb, &p[idx.positions], dims.len * dims.d)?;
    ln_fwd(be, &mut s.ln_emb, &s.emb, Some(&p[idx.ln.scale]), &p[idx.ln.bias], dims.d)
}

/// Backward of [`embed`] from `sc.dres` (= ∂ layernorm_embedding output, replicated across tp).
fn embed_bwd<B: Backend>(
    be: &B,
    p: &[B::Buf],
    g: &mut [B::Buf],
    idx: &EmbedIdx,
    s: &StackActs<B>,
    sc: &mut StackScratch<B>,
    dims: StackDims,
) -> Result<()> {
    let (dscale, dbias) = pair_mut(g, idx.ln.scale, idx.ln.bias);
    be.layernorm_backward(
        &mut sc.dtmp,
        Some(dscale),
        dbias,
        &sc.dres,
        &s.emb,
        &s.ln_emb.mean,
        &s.ln_emb.rstd,
        Some(&p[idx.ln.scale]),
        dims.d,
        false,
    )?;
    be.embedding_backward(&mut g[idx.tokens], &sc.dtmp, &s.ids, dims.vocab_range(), dims.d)?;
    be.sum_broadcast_rows(&mut g[idx.positions], &sc.dtmp, dims.len * dims.d)?;
    Ok(())
}

/// Forward of `out = x + LN_post(Attn(LN_pre(x), kv))` where `kv` is `x`'s normalised self (self
/// attention) or the encoder output (cross-attention). q/k/v are column-parallel (this rank's
/// heads), out_proj row-parallel: its output is all-reduced across tp.
#[allow(clippy::too_many_arguments)]
fn attn_block_fwd<B: Backend>(
    be: &B,
    p: &[B::Buf],
    tp: Option<&TpGroup<B>>,
    ln_pre_bias: usize,
    w: &AttnIdx,
    ln_post: LnIdx,
    s: &mut AttnBlockActs<B>,
    x: &B::Buf,
    kv_source: Option<&B::Buf>,
    mask: Option<&B::Ids>,
    shape: AttentionShape,
) -> Result<()> {
    let dl = shape.width();
    let nq = shape.batch * shape.q_len;
    let nk = shape.batch * shape.kv_len;
    let d = be.buf_len(x) / nq;
    ln_fwd(be, &mut s.ln_pre, x, None, &p[ln_pre_bias], d)?;
    let kv = kv_source.unwrap_or(&s.ln_pre.out);
    let a = &mut s.attn;
    be.matmul(&mut a.q, &s.ln_pre.out, &p[w.q], MatmulSpec::nn(nq, dl, d))?;
    be.matmul(&mut a.k, kv, &p[w.k], MatmulSpec::nn(nk, dl, d))?;
    be.matmul(&mut a.v, kv, &p[w.v], MatmulSpec::nn(nk, dl, d))?;
    be.attention_forward(&mut a.o, &mut a.lse, &a.q, &a.k, &a.v, mask, shape)?;
    tpl::row_parallel_forward(be, tp, &mut a.proj, &a.o, &p[w.out], MatmulSpec::nn(nq, d, dl))?;
    ln_fwd(be, &mut s.ln_post, &a.proj, Some(&p[ln_post.scale]), &p[ln_post.bias], d)?;
    be.add(&mut s.out, x, &s.ln_post.out)?;
    Ok(())
}

/// Backward of [`attn_block_fwd`]: on entry `sc.dres` = ∂out, on exit ∂x. For cross-attention,
/// `kv` carries the encoder output and its gradient accumulator (a partial sum over this rank's
/// heads, all-reduced by the caller once for all layers). The input gradient of q/k/v
/// (column-parallel) is all-reduced across tp.
#[allow(clippy::too_many_arguments)]
fn attn_block_bwd<B: Backend>(
    be: &B,
    p: &[B::Buf],
    g: &mut [B::Buf],
    tp: Option<&TpGroup<B>>,
    ln_pre_bias: usize,
    w: &AttnIdx,
    ln_post: LnIdx,
    s: &AttnBlockActs<B>,
    x: &B::Buf,
    kv: Option<(&B::Buf, &mut B::Buf)>,
    mask: Option<&B::Ids>,
    shape: AttentionShape,
    sc: &mut StackScratch<B>,
) -> Result<()> {
    let dl = shape.width();
    let nq = shape.batch * shape.q_len;
    let nk = shape.batch * shape.kv_len;
    let d = be.buf_len(x) / nq;
    let a = &s.attn;
    // Post-attention LayerNorm: ∂proj into dtmp.
    let (dscale, dbias) = pair_mut(g, ln_post.scale, ln_post.bias);
    be.layernorm_backward(
        &mut sc.dtmp,
        Some(dscale),
        dbias,
        &sc.dres,
        &a.proj,
        &s.ln_post.mean,
        &s.ln_post.rstd,
        Some(&p[ln_post.scale]),
        d,
        false,
    )?;
    // out_proj (row-parallel): weight gradient and ∂o are local.
    let t = |m, n, k, ta, tb, acc| MatmulSpec { m, n, k, trans_a: ta, trans_b: tb, accumulate: acc };
    be.matmul(&mut g[w.out], &a.o, &sc.dtmp, t(dl, d, nq, true, false, true))?;
    be.matmul(&mut sc.dtmp2, &sc.dtmp, &p[w.out], t(nq, dl, d, false, true, false))?;
    // Attention core.
    let (dk, dv) = match sc.dk_cross.as_mut() {
        Some((dk, dv)) if kv.is_some() => (dk, dv),
        _ => (&mut sc.dk, &mut sc.dv),
    };
    be.attention_backward(&mut sc.dq, dk, dv, &sc.dtmp2, &a.q, &a.k, &a.v, &a.o, &a.lse, mask, shape)?;
    // q/k/v projections. ∂(LN_pre output) into dtmp.
    let wgrad = |m: usize| t(d, dl, m, true, false, true);
    let dgrad = |m: usize, acc: bool| t(m, d, dl, false, true, acc);
    be.matmul(&mut g[w.q], &s.ln_pre.out, &sc.dq, wgrad(nq))?;
    be.matmul(&mut sc.dtmp, &sc.dq, &p[w.q], dgrad(nq, false))?;
    match kv {
        None => {
            be.matmul(&mut g[w.k], &s.ln_pre.out, dk, wgrad(nk))?;
            be.matmul(&mut g[w.v], &s.ln_pre.out, dv, wgrad(nk))?;
            be.matmul(&mut sc.dtmp, dk, &p[w.k], dgrad(nk, true))?;
            be.matmul(&mut sc.dtmp, dv, &p[w.v], dgrad(nk, true))?;
        }
        Some((enc_out, d_enc_out)) => {
            be.matmul(&mut g[w.k], enc_out, dk, wgrad(nk))?;
            be.matmul(&mut g[w.v], enc_out, dv, wgrad(nk))?;
            be.matmul(d_enc_out, dk, &p[w.k], dgrad(nk, true))?;
            be.matmul(d_enc_out, dv, &p[w.v], dgrad(nk, true))?;
        }
    }
    tpl::reduce_input_grad(tp, &mut sc.dtmp)?;
    // Pre-attention LayerNorm (bias only); adds into the residual gradient.
    be.layernorm_backward(
        &mut sc.dres,
        None,
        &mut g[ln_pre_bias],
        &sc.dtmp,
        x,
        &s.ln_pre.mean,
        &s.ln_pre.rstd,
        None,
        d,
        true,
    )?;
    Ok(())
}

/// Forward of `out = x + GLU(x)`. Dense_0/1 are column-parallel (this rank's ffn columns), the
/// middle LayerNorm takes its statistics from all-reduced row sums over the sharded ffn, and
/// Dense_2 is row-parallel: its output is all-reduced.
#[allow(clippy::too_many_arguments)]
fn glu_fwd<B: Backend>(
    be: &B,
    p: &[B::Buf],
    tp: Option<&TpGroup<B>>,
    w: &GluIdx,
    s: &mut GluActs<B>,
    x: &B::Buf,
    out: &mut B::Buf,
    dims: StackDims,
) -> Result<()> {
    let (d, f) = (dims.d, dims.ffn);
    let n = be.buf_len(x) / d;
    ln_fwd(be, &mut s.ln0, x, None, &p[w.ln0_bias], d)?;
    be.matmul(&mut s.a0, &s.ln0.out, &p[w.dense0], MatmulSpec::nn(n, f, d))?;
    be.matmul(&mut s.a1, &s.ln0.out, &p[w.dense1], MatmulSpec::nn(n, f, d))?;
    be.gelu_glu_forward(&mut s.act, &s.a0, &s.a1)?;
    let l = &mut s.ln1;
    tpl::sharded_layernorm_forward(
        be,
        tp,
        &mut l.out,
        &mut l.mean,
        &mut l.rstd,
        &s.act,
        &p[w.ln1_bias],
        f,
        dims.ffn_global,
    )?;
    tpl::row_parallel_forward(be, tp, out, &s.ln1.out, &p[w.dense2], MatmulSpec::nn(n, d, f))?;
    be.add_assign(out, x)?;
    Ok(())
}

/// Backward of [`glu_fwd`]: on entry `sc.dres` = ∂out, on exit ∂x. The middle LayerNorm
/// all-reduces `[2, rows]` sums; the input gradient of Dense_0/1 is all-reduced.
#[allow(clippy::too_many_arguments)]
fn glu_bwd<B: Backend>(
    be: &B,
    p: &[B::Buf],
    g: &mut [B::Buf],
    tp: Option<&TpGroup<B>>,
    w: &GluIdx,
    s: &GluActs<B>,
    x: &B::Buf,
    sc: &mut StackScratch<B>,
    dims: StackDims,
) -> Result<()> {
    let (d, f) = (dims.d, dims.ffn);
    let n = be.buf_len(x) / d;
    let t = |m, nn, k, ta, tb, acc| MatmulSpec { m, n: nn, k, trans_a: ta, trans_b: tb, accumulate: acc };
    be.matmul(&mut g[w.dense2], &s.ln1.out, &sc.dres, t(f, d, n, true, false, true))?;
    be.matmul(&mut sc.dffn_a, &sc.dres, &p[w.dense2], t(n, f, d, false, true, false))?;
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
        dims.ffn_global,
    )?;
    // dffn_a ← ∂a0, dffn_c ← ∂a1
    be.gelu_glu_backward(&mut sc.dffn_a, &mut sc.dffn_c, &sc.dffn_b, &s.a0, &s.a1)?;
    let wgrad = t(d, f, n, true, false, true);
    be.matmul(&mut g[w.dense0], &s.ln0.out, &sc.dffn_a, wgrad)?;
    be.matmul(&mut g[w.dense1], &s.ln0.out, &sc.dffn_c, wgrad)?;
    be.matmul(&mut sc.dtmp, &sc.dffn_a, &p[w.dense0], t(n, d, f, false, true, false))?;
    be.matmul(&mut sc.dtmp, &sc.dffn_c, &p[w.dense1], t(n, d, f, false, true, true))?;
    tpl::reduce_input_grad(tp, &mut sc.dtmp)?;
    be.layernorm_backward(
        &mut sc.dres,
        None,
        &mut g[w.ln0_bias],
        &sc.dtmp,
        x,
        &s.ln0.mean,
        &s.ln0.rstd,
        None,
        d,
        true,
    )?;
    Ok(())
}
