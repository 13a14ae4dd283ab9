//! The gradient-ready hook of the backward: which parameter gradients are final when.
//!
//! The backward ([`super::DalleBart::loss_and_backward_with`]) calls a caller-supplied
//! [`GradSink`] each time a group of parameter gradients has received its last contribution, in
//! backward order ([`backward_groups`]):
//! 1. the head: `lm_head` and the decoder's `final_ln`;
//! 2. decoder layers, last to first (each with its self-attention, cross-attention and GLU);
//! 3. the decoder's embeddings (tokens, positions, `layernorm_embedding`);
//! 4. the encoder's `final_ln`;
//! 5. encoder layers, last to first;
//! 6. the encoder's embeddings.
//!
//! The trainer issues each group's data-parallel collective there, so it overlaps the rest of the
//! backward on transports that can ([`dm_parallel::comm::deferred`]). The sink must not change
//! the gradients' values in a way the rest of the backward could see: no later op reads or
//! writes a group's gradients once it was announced (the backward only accumulates into the
//! gradients of groups not yet announced).

use crate::error::Result;
use crate::params::{AttnBlockIdx, DecoderLayerIdx, EncoderLayerIdx, GluIdx, ParamTable, StackIdx};
use dm_runtime::Backend;

/// Told by the backward when parameter gradients are final.
pub trait GradSink<B: Backend> {
    /// The gradients `grads[i]` for `i` in `params` (indices of the [`ParamTable`]) are final
    /// for this backward. An error stops the backward and is returned by it.
    fn grads_ready(&mut self, grads: &mut [B::Buf], params: &[usize]) -> Result<()>;
}

/// The sink of a plain backward: nothing is told.
pub struct NoSink;

impl<B: Backend> GradSink<B> for NoSink {
    fn grads_ready(&mut self, _grads: &mut [B::Buf], _params: &[usize]) -> Result<()> {
        Ok(())
    }
}

/// Every group the backward announces, in the order it announces them (see the module docs);
/// together they hold every parameter exactly once.
pub fn backward_groups(t: &ParamTable) -> Vec<Vec<usize>> {
    let mut groups = vec![head(t)];
    groups.extend(t.decoder_layers.iter().rev().map(decoder_layer));
    groups.push(embeddings(&t.decoder));
    groups.push(vec![t.encoder.final_ln_bias]);
    groups.extend(t.encoder_layers.iter().rev().map(encoder_layer));
    groups.push(embeddings(&t.encoder));
    groups
}

/// `lm_head` and the decoder's `final_ln`.
pub(crate) fn head(t: &ParamTable) -> Vec<usize> {
    vec![t.lm_head, t.decoder.final_ln_bias]
}

/// A stack's token and position embeddings and `layernorm_embedding`.
pub(crate) fn embeddings(s: &StackIdx) -> Vec<usize> {
    vec![s.embed_tokens, s.embed_positions, s.layernorm_embedding.scale, s.layernorm_embedding.bias]
}

pub(crate) fn decoder_layer(l: &DecoderLayerIdx) -> Vec<usize> {
    let mut v = glu(&l.glu);
    v.extend(attn_block(&l.cross_attn));
    v.extend(attn_block(&l.self_attn));
    v
}

pub(crate) fn encoder_layer(l: &EncoderLayerIdx) -> Vec<usize> {
    let mut v = glu(&l.glu);
    v.extend(attn_block(&l.self_attn));
    v
}

fn glu(g: &GluIdx) -> Vec<usize> {
    vec![g.dense2, g.ln1_bias, g.dense0, g.dense1, g.ln0_bias]
}

fn attn_block(b: &AttnBlockIdx) -> Vec<usize> {
    vec![b.ln_post.scale, b.ln_post.bias, b.attn.out, b.attn.q, b.attn.k, b.attn.v, b.ln_pre_bias]
}
