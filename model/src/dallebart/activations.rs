//! The activation table of DalleBart: every buffer the model holds for a micro-batch (forward
//! activations of both stacks, the loss buffers, the backward scratch), its length and how mixed
//! precision would store it, written once. Like llm.c's `fill_in_activation_sizes`, the same
//! walk serves both readers: the model allocates its buffers through it ([`OnDevice`]), and the
//! memory plan (`crate::plan`) counts them without allocating anything ([`SizeCount`]).
//!
//! The structs are generic over the buffer type `T` (and the ids type `I`): the model holds
//! `Activations<B::Buf, B::Ids>`, the plan's count walks `Activations<(), ()>`.

use crate::config::DalleBartConfig;
use crate::error::Result;
use crate::params::split_axis;
use crate::precision::Precision;
use dm_runtime::{Backend, DType, VocabRange};

/// How a mixed-precision run stores a buffer (the fp32 model stores everything in 4 bytes); the
/// policy is documented in [`crate::precision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// What dalle-mini's `--dtype bfloat16` computes in bf16: Dense outputs (q/k/v, projections,
    /// GLU, logits), LayerNorm outputs, attention outputs, the residual stream, and the
    /// activation-gradient temporaries (bf16 under bf16-mixed).
    Act,
    /// Always fp32: the token + position embeddings, LayerNorm statistics, attention lse, losses,
    /// cross-entropy statistics, gradient accumulators.
    F32,
    /// i32 token ids and masks.
    Ids,
}

/// Where a buffer is counted in the plan's activation breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Encoder,
    Decoder,
    LogitsAndLoss,
    BackwardScratch,
}

/// Allocates (or counts) the buffers of the table.
pub trait ActAlloc {
    type Buf;
    type Ids;
    /// A zeroed f32 buffer of `len` elements.
    fn buf(&mut self, part: Part, name: &str, len: usize, storage: Storage) -> Result<Self::Buf>;
    /// An ids buffer of `len` elements, all `fill`.
    fn ids(&mut self, part: Part, name: &str, len: usize, fill: i32) -> Result<Self::Ids>;
}

/// Allocation on a backend's device: [`Storage::Act`] buffers in the precision's activation
/// type, the others in f32.
pub struct OnDevice<'a, B: Backend> {
    pub backend: &'a B,
    pub precision: Precision,
}

impl<B: Backend> ActAlloc for OnDevice<'_, B> {
    type Buf = B::Buf;
    type Ids = B::Ids;
    fn buf(&mut self, _: Part, name: &str, len: usize, storage: Storage) -> Result<B::Buf> {
        let dtype = match storage {
            Storage::Act => self.precision.act_dtype(),
            Storage::F32 | Storage::Ids => DType::F32,
        };
        Ok(self.backend.zeros_typed(name, len, dtype)?)
    }
    fn ids(&mut self, _: Part, name: &str, len: usize, fill: i32) -> Result<B::Ids> {
        Ok(self.backend.upload_ids(name, &vec![fill; len])?)
    }
}

/// Element counts of buffers by storage class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Elems {
    pub act: u64,
    pub f32: u64,
    pub ids: u64,
}

impl Elems {
    fn add(&mut self, storage: Storage, len: usize) {
        let len = len as u64;
        match storage {
            Storage::Act => self.act += len,
            Storage::F32 => self.f32 += len,
            Storage::Ids => self.ids += len,
        }
    }
}

/// Element counts of every [`Part`], filled by walking the table without allocating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeCount {
    pub encoder: Elems,
    pub decoder: Elems,
    pub logits_and_loss: Elems,
    pub backward_scratch: Elems,
}

impl SizeCount {
    fn part(&mut self, part: Part) -> &mut Elems {
        match part {
            Part::Encoder => &mut self.encoder,
            Part::Decoder => &mut self.decoder,
            Part::LogitsAndLoss => &mut self.logits_and_loss,
            Part::BackwardScratch => &mut self.backward_scratch,
        }
    }
}

impl ActAlloc for SizeCount {
    type Buf = ();
    type Ids = ();
    fn buf(&mut self, part: Part, _: &str, len: usize, storage: Storage) -> Result<()> {
        self.part(part).add(storage, len);
        Ok(())
    }
    fn ids(&mut self, part: Part, _: &str, len: usize, _: i32) -> Result<()> {
        self.part(part).add(Storage::Ids, len);
        Ok(())
    }
}

/// Shapes of one stack on one tensor-parallel rank; `_local` sizes are this rank's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackDims {
    /// Sequence length.
    pub len: usize,
    pub d: usize,
    /// Attention heads on this rank, and their size.
    pub heads_local: usize,
    pub head_dim: usize,
    /// ffn columns on this rank, of `ffn`.
    pub ffn_local: usize,
    pub ffn: usize,
    /// Vocabulary rows on this rank (padded), the first of them globally, and how many are real.
    pub vocab_local: usize,
    pub vocab_start: usize,
    pub vocab_valid: usize,
}

impl StackDims {
    fn new(c: &DalleBartConfig, tp: (usize, usize), len: usize, heads: usize, ffn: usize, vocab: usize) -> Self {
        let (rank, size) = tp;
        let (_, ffn_local, _) = split_axis(ffn, size, rank, false);
        let (vocab_start, vocab_valid, vocab_local) = split_axis(vocab, size, rank, true);
        StackDims {
            len,
            d: c.d_model,
            heads_local: heads / size,
            head_dim: c.d_model / heads,
            ffn_local,
            ffn,
            vocab_local,
            vocab_start,
            vocab_valid,
        }
    }
    /// The encoder on rank `tp.0` of `tp.1`.
    pub fn encoder(c: &DalleBartConfig, tp: (usize, usize)) -> Self {
        Self::new(c, tp, c.max_text_length, c.encoder_attention_heads, c.encoder_ffn_dim, c.encoder_vocab_size)
    }
    /// The decoder on rank `tp.0` of `tp.1` (its vocabulary: the loss classes).
    pub fn decoder(c: &DalleBartConfig, tp: (usize, usize)) -> Self {
        Self::new(c, tp, c.image_length, c.decoder_attention_heads, c.decoder_ffn_dim, c.loss_classes())
    }
    /// Width of this rank's attention heads (`heads_local · head_dim`).
    pub fn width_local(&self) -> usize {
        self.heads_local * self.head_dim
    }
    pub fn vocab_range(&self) -> VocabRange {
        VocabRange { start: self.vocab_start, end: self.vocab_start + self.vocab_local }
    }
}

/// A LayerNorm's output and saved statistics.
pub struct LnActs<T> {
    pub out: T,
    pub mean: T,
    pub rstd: T,
}

pub struct AttnActs<T> {
    pub q: T,
    pub k: T,
    pub v: T,
    /// Attention output before out_proj.
    pub o: T,
    pub lse: T,
    /// `o · out_proj` (input of the NormFormer post-attention LayerNorm).
    pub proj: T,
}

pub struct GluActs<T> {
    pub ln0: LnActs<T>,
    pub a0: T,
    pub a1: T,
    /// `gelu(a0) ∘ a1`
    pub act: T,
    pub ln1: LnActs<T>,
}

/// One attention sub-block `x + LN_post(Attn(LN_pre(x)))`.
pub struct AttnBlockActs<T> {
    pub ln_pre: LnActs<T>,
    pub attn: AttnActs<T>,
    pub ln_post: LnActs<T>,
    /// Residual stream after the block.
    pub out: T,
}

pub struct LayerActs<T> {
    pub self_attn: AttnBlockActs<T>,
    pub cross_attn: Option<AttnBlockActs<T>>,
    pub glu: GluActs<T>,
    /// Residual stream after the layer (input of the next one).
    pub out: T,
}

pub struct StackActs<T, I> {
    pub ids: I,
    /// Token + position embeddings.
    pub emb: T,
    pub layernorm_embedding: LnActs<T>,
    pub layers: Vec<LayerActs<T>>,
    pub final_ln: LnActs<T>,
}

/// Gradient scratch of one stack, reused every step.
pub struct StackScratch<T> {
    /// Gradient of the residual stream, `[tokens, d]`.
    pub dres: T,
    /// Generic `[tokens, d]` temporaries.
    pub dtmp: T,
    pub dtmp2: T,
    pub dq: T,
    pub dk: T,
    pub dv: T,
    /// `[tokens, ffn_local]` temporaries.
    pub dffn_a: T,
    pub dffn_b: T,
    pub dffn_c: T,
    /// Cross-attention key/value gradients, `[text tokens, width_local]` (decoder only).
    pub dk_cross: Option<(T, T)>,
    /// `[2, tokens]` row sums of the sharded LayerNorm backward (tp > 1).
    pub ln_sums: T,
}

/// Everything the model holds for a micro-batch of `batch` rows.
pub struct Activations<T, I> {
    pub batch: usize,
    pub mask: I,
    pub labels: I,
    pub enc: StackActs<T, I>,
    pub dec: StackActs<T, I>,
    pub logits: T,
    pub losses: T,
    pub enc_scratch: StackScratch<T>,
    pub dec_scratch: StackScratch<T>,
    /// Gradient of the encoder output, accumulated over every cross-attention.
    pub d_enc_out: T,
    /// Whether `logits` currently hold logits (not yet overwritten by their gradient).
    pub logits_valid: bool,
    /// Vocab-parallel cross-entropy statistics: row max `[tokens]` and sums `[2, tokens]`.
    pub ce_max: T,
    pub ce_stats: T,
}

/// The stacks' shapes and layer counts of one rank.
#[derive(Debug, Clone, Copy)]
pub struct ModelDims {
    pub enc: StackDims,
    pub dec: StackDims,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
}

impl ModelDims {
    /// Rank `tp.0` of `tp.1`.
    pub fn new(c: &DalleBartConfig, tp: (usize, usize)) -> Self {
        Self {
            enc: StackDims::encoder(c, tp),
            dec: StackDims::decoder(c, tp),
            encoder_layers: c.encoder_layers,
            decoder_layers: c.decoder_layers,
        }
    }
}

/// The table itself: every buffer for a micro-batch of `batch` rows, in allocation order.
pub fn alloc_activations<A: ActAlloc>(al: &mut A, m: ModelDims, batch: usize) -> Result<Activations<A::Buf, A::Ids>> {
    let (e, dd) = (m.enc, m.dec);
    let text_tokens = batch * e.len;
    let image_tokens = batch * dd.len;
    let enc = alloc_stack(al, Part::Encoder, "encoder", e, batch, m.encoder_layers, None)?;
    let dec = alloc_stack(al, Part::Decoder, "decoder", dd, batch, m.decoder_layers, Some(text_tokens))?;
    let loss = Part::LogitsAndLoss;
    let mask = al.ids(loss, "batch.attention_mask", text_tokens, 1)?;
    let labels = al.ids(loss, "batch.labels", image_tokens, 0)?;
    // lm_head's output: bf16 as dalle-mini's Dense computes it; the loss reads it in f32 and
    // overwrites it with its gradient (bf16, as dalle-mini's cotangent of the bf16 logits).
    let logits = al.buf(loss, "logits", image_tokens * dd.vocab_local, Storage::Act)?;
    let losses = al.buf(loss, "losses", image_tokens, Storage::F32)?;
    let enc_scratch = alloc_scratch(al, "encoder", e, batch, None)?;
    let dec_scratch = alloc_scratch(al, "decoder", dd, batch, Some(text_tokens))?;
    let d_enc_out = al.buf(Part::BackwardScratch, "grad.encoder_output", text_tokens * e.d, Storage::F32)?;
    let ce_max = al.buf(loss, "loss.row_max", image_tokens, Storage::F32)?;
    let ce_stats = al.buf(loss, "loss.row_sums", 2 * image_tokens, Storage::F32)?;
    Ok(Activations {
        batch,
        mask,
        labels,
        enc,
        dec,
        logits,
        losses,
        enc_scratch,
        dec_scratch,
        d_enc_out,
        logits_valid: false,
        ce_max,
        ce_stats,
    })
}

/// A LayerNorm's output `[rows, dim]` and its statistics `[rows]`.
pub fn alloc_ln<A: ActAlloc>(al: &mut A, part: Part, name: &str, rows: usize, dim: usize) -> Result<LnActs<A::Buf>> {
    Ok(LnActs {
        out: al.buf(part, name, rows * dim, Storage::Act)?,
        mean: al.buf(part, &format!("{name}.mean"), rows, Storage::F32)?,
        rstd: al.buf(part, &format!("{name}.rstd"), rows, Storage::F32)?,
    })
}

fn alloc_attn_block<A: ActAlloc>(
    al: &mut A,
    part: Part,
    name: &str,
    dims: StackDims,
    batch: usize,
    kv_tokens: usize,
) -> Result<AttnBlockActs<A::Buf>> {
    let n = batch * dims.len;
    let (d, wl) = (dims.d, dims.width_local());
    let act = |al: &mut A, what: &str, len: usize| al.buf(part, &format!("{name}.{what}"), len, Storage::Act);
    let ln_pre = alloc_ln(al, part, &format!("{name}.ln_pre"), n, d)?;
    let attn = AttnActs {
        q: act(al, "q", n * wl)?,
        k: act(al, "k", kv_tokens * wl)?,
        v: act(al, "v", kv_tokens * wl)?,
        o: act(al, "attn", n * wl)?,
        lse: al.buf(part, &format!("{name}.lse"), batch * dims.heads_local * dims.len, Storage::F32)?,
        proj: act(al, "out_proj", n * d)?,
    };
    let ln_post = alloc_ln(al, part, &format!("{name}.ln_post"), n, d)?;
    let out = act(al, "residual", n * d)?;
    Ok(AttnBlockActs { ln_pre, attn, ln_post, out })
}

fn alloc_stack<A: ActAlloc>(
    al: &mut A,
    part: Part,
    name: &str,
    dims: StackDims,
    batch: usize,
    n_layers: usize,
    cross_kv_tokens: Option<usize>,
) -> Result<StackActs<A::Buf, A::Ids>> {
    let (n, d) = (batch * dims.len, dims.d);
    let layers = (0..n_layers)
        .map(|i| alloc_layer(al, part, &format!("{name}.layer{i}"), dims, batch, cross_kv_tokens))
        .collect::<Result<Vec<_>>>()?;
    Ok(StackActs {
        ids: al.ids(part, &format!("{name}.ids"), n, 0)?,
        // fp32: dalle-mini's token and position `nn.Embed`s have no dtype.
        emb: al.buf(part, &format!("{name}.embeddings"), n * d, Storage::F32)?,
        layernorm_embedding: alloc_ln(al, part, &format!("{name}.layernorm_embedding"), n, d)?,
        layers,
        final_ln: alloc_ln(al, part, &format!("{name}.final_ln"), n, d)?,
    })
}

/// One layer's activations (`cross_kv_tokens`: the decoder's cross-attention keys/values).
pub fn alloc_layer<A: ActAlloc>(
    al: &mut A,
    part: Part,
    name: &str,
    dims: StackDims,
    batch: usize,
    cross_kv_tokens: Option<usize>,
) -> Result<LayerActs<A::Buf>> {
    let n = batch * dims.len;
    let (d, f) = (dims.d, dims.ffn_local);
    let self_attn = alloc_attn_block(al, part, &format!("{name}.self_attn"), dims, batch, n)?;
    let cross_attn = match cross_kv_tokens {
        Some(kv) => Some(alloc_attn_block(al, part, &format!("{name}.cross_attn"), dims, batch, kv)?),
        None => None,
    };
    let glu = GluActs {
        ln0: alloc_ln(al, part, &format!("{name}.glu.ln0"), n, d)?,
        a0: al.buf(part, &format!("{name}.glu.dense0"), n * f, Storage::Act)?,
        a1: al.buf(part, &format!("{name}.glu.dense1"), n * f, Storage::Act)?,
        act: al.buf(part, &format!("{name}.glu.act"), n * f, Storage::Act)?,
        ln1: alloc_ln(al, part, &format!("{name}.glu.ln1"), n, f)?,
    };
    let out = al.buf(part, &format!("{name}.out"), n * d, Storage::Act)?;
    Ok(LayerActs { self_attn, cross_attn, glu, out })
}

fn alloc_scratch<A: ActAlloc>(
    al: &mut A,
    name: &str,
    dims: StackDims,
    batch: usize,
    cross_kv_tokens: Option<usize>,
) -> Result<StackScratch<A::Buf>> {
    let n = batch * dims.len;
    let (d, wl, f) = (dims.d, dims.width_local(), dims.ffn_local);
    let mut z = |what: &str, len: usize, storage: Storage| {
        al.buf(Part::BackwardScratch, &format!("{name}.scratch.{what}"), len, storage)
    };
    let (dres, dtmp) = (z("dres", n * d, Storage::F32)?, z("dtmp", n * d, Storage::F32)?);
    let dtmp2 = z("dtmp2", n * wl, Storage::Act)?;
    let (dq, dk, dv) = (z("dq", n * wl, Storage::Act)?, z("dk", n * wl, Storage::Act)?, z("dv", n * wl, Storage::Act)?);
    let dffn_a = z("dffn_a", n * f, Storage::Act)?;
    let dffn_b = z("dffn_b", n * f, Storage::Act)?;
    let dffn_c = z("dffn_c", n * f, Storage::Act)?;
    let dk_cross = match cross_kv_tokens {
        Some(kv) => Some((z("dk_cross", kv * wl, Storage::Act)?, z("dv_cross", kv * wl, Storage::Act)?)),
        None => None,
    };
    let ln_sums = z("ln_sums", 2 * n, Storage::F32)?;
    Ok(StackScratch { dres, dtmp, dtmp2, dq, dk, dv, dffn_a, dffn_b, dffn_c, dk_cross, ln_sums })
}

/// The element counts of the table for rank `tp.0` of `tp.1` and a micro-batch of `batch` rows.
pub fn activation_sizes(c: &DalleBartConfig, tp: (usize, usize), batch: usize) -> SizeCount {
    let mut count = SizeCount::default();
    alloc_activations(&mut count, ModelDims::new(c, tp), batch).expect("counting never fails");
    count
}
