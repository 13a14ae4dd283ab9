//! Autoregressive generation of image codes with a KV cache, dalle-mini style: top-k, top-p,
//! temperature and classifier-free guidance (`cond_scale`, the empty caption as the
//! unconditional prompt): `logits = uncond + cond_scale · (cond − uncond)`.
//!
//! The encoder runs once (the training forward); every decoder layer keeps its self-attention
//! keys/values for all image positions (`[rows, image_length, d]`) and its cross-attention
//! keys/values of the encoder output. Step `t` embeds one token per row, runs the training
//! decoder layer ([`super::decoder_layer_fwd`]) with the cache as its keys/values (attending to
//! cache positions `0..=t` through a key mask), and samples the next code on the host.

use super::activations::{alloc_layer, alloc_ln, OnDevice, Part, StackDims};
use super::{attn_shape, decoder_layer_fwd, embed, head_fwd, AttnInputs, DalleBart, Kv};
use crate::error::{ModelError, Result};
use dm_parallel::layers::ColumnParallelLinear;
use dm_runtime::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick each next code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely codes (None = all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of codes whose probability reaches p (None = all).
    pub top_p: Option<f32>,
    /// Classifier-free guidance scale; 1 disables guidance (no unconditional pass).
    pub cond_scale: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: None, top_p: None, cond_scale: 1.0, seed: 0 }
    }
}

/// A caption already tokenised to `max_text_length` (ids and attention mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub input_ids: Vec<i32>,
    pub attention_mask: Vec<i32>,
}

/// Picks one code from a row of logits over the image vocabulary (BOS excluded).
pub fn sample_code(logits: &[f32], opts: &SamplingOptions, rng: &mut ChaCha8Rng) -> usize {
    if opts.temperature <= 0.0 {
        return logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = opts.top_k {
        idx.truncate(k.max(1));
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx.iter().map(|&i| (((logits[i] - max) / opts.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = opts.top_p {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&q| {
            acc += q;
            acc >= p as f64
        });
        if let Some(k) = keep {
            idx.truncate(k + 1);
            probs.truncate(k + 1);
        }
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, p) in idx.iter().zip(&probs) {
        u -= p;
        if u <= 0.0 {
            return *i;
        }
    }
    *idx.last().expect("at least one candidate")
}

/// Per-layer cached keys and values.
struct LayerCache<B: Backend> {
    self_k: B::Buf,
    self_v: B::Buf,
    cross_k: B::Buf,
    cross_v: B::Buf,
}

impl<B: Backend> DalleBart<B> {
    /// Generates `image_length` codes for each prompt. With `cond_scale != 1`, `uncond` (the
    /// empty caption) is run beside every prompt and guidance mixes the two.
    pub fn generate(
        &mut self,
        prompts: &[Prompt],
        uncond: Option<&Prompt>,
        opts: &SamplingOptions,
    ) -> Result<Vec<Vec<u32>>> {
        if self.tp_coords().1 > 1 {
            return Err(ModelError::Config("generation runs on one device; load the checkpoint with tp = 1".into()));
        }
        let cfg = self.config.clone();
        let guided = opts.cond_scale != 1.0;
        if guided && uncond.is_none() {
            return Err(ModelError::Batch("classifier-free guidance needs the unconditional prompt".into()));
        }
        let n = prompts.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let rows = if guided { 2 * n } else { n };
        let (t_len, l_len, d, v) = (cfg.max_text_length, cfg.image_length, cfg.d_model, cfg.loss_classes());
        // Encoder pass over prompts (+ unconditional rows), through the training forward.
        let mut input_ids = Vec::with_capacity(rows * t_len);
        let mut mask = Vec::with_capacity(rows * t_len);
        for p in prompts.iter().chain(std::iter::repeat_n(uncond.unwrap_or(&prompts[0]), rows - n)) {
            if p.input_ids.len() != t_len || p.attention_mask.len() != t_len {
                return Err(ModelError::Batch(format!("prompts must be tokenised to max_text_length {t_len}")));
            }
            input_ids.extend_from_slice(&p.input_ids);
            mask.extend_from_slice(&p.attention_mask);
        }
        let batch = crate::Batch::new(&cfg, rows, input_ids, mask, vec![0; rows * l_len])?;
        self.forward(&batch)?;

        let be = self.backend.clone();
        let (p, t) = (&self.weight_copies.view(&self.params), &self.table);
        let a = self.acts.as_ref().ok_or_else(|| ModelError::Batch("internal: forward left no activations".into()))?;
        let enc_out = &a.enc.final_ln.out;
        let text_mask = &a.mask;
        // One decoder position per row: the decoder's shapes with a sequence of one.
        let dims = StackDims { len: 1, ..self.dec_dims() };
        let kv_proj = ColumnParallelLinear { rows: rows * t_len, inputs: d, outputs_local: dims.width_local() };
        let mut caches: Vec<LayerCache<B>> = Vec::with_capacity(t.decoder_layers.len());
        for (i, idx) in t.decoder_layers.iter().enumerate() {
            let mut cross_k = be.zeros(&format!("generate.layer{i}.cross_k"), rows * t_len * d)?;
            let mut cross_v = be.zeros(&format!("generate.layer{i}.cross_v"), rows * t_len * d)?;
            kv_proj.forward(&be, &mut cross_k, enc_out, &p[idx.cross_attn.attn.k])?;
            kv_proj.forward(&be, &mut cross_v, enc_out, &p[idx.cross_attn.attn.v])?;
            caches.push(LayerCache {
                self_k: be.zeros(&format!("generate.layer{i}.self_k"), rows * l_len * d)?,
                self_v: be.zeros(&format!("generate.layer{i}.self_v"), rows * l_len * d)?,
                cross_k,
                cross_v,
            });
        }

        // The activations of one decoder layer for one position (reused by every layer), the
        // embedding and the head.
        let mut al = OnDevice { backend: &be, precision: self.precision };
        let mut layer = alloc_layer(&mut al, Part::Decoder, "generate.layer", dims, rows, Some(rows))?;
        let mut emb_ln = alloc_ln(&mut al, Part::Decoder, "generate.layernorm_embedding", rows, d)?;
        let mut final_ln = alloc_ln(&mut al, Part::Decoder, "generate.final_ln", rows, d)?;
        let z = |name: &str, len: usize| be.zeros(&format!("generate.{name}"), len);
        let (mut x, mut emb, mut pos, mut logits) =
            (z("x", rows * d)?, z("emb", rows * d)?, z("pos", d)?, z("logits", rows * v)?);
        let self_shape = attn_shape(rows, 1, l_len, dims, false);
        let cross_shape = attn_shape(rows, 1, t_len, dims, false);

        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let mut tokens = vec![cfg.bos_id() as i32; rows];
        let mut out = vec![Vec::with_capacity(l_len); n];
        for step in 0..l_len {
            let ids = be.upload_ids("generate.ids", &tokens)?;
            let visible: Vec<i32> = (0..rows * l_len).map(|i| ((i % l_len) <= step) as i32).collect();
            let self_mask = be.upload_ids("generate.self_mask", &visible)?;
            be.copy(&mut pos, 0, &p[t.decoder.embed_positions], step * d, d)?;
            embed(&be, p, None, &t.decoder.into(), &ids, &pos, &mut emb, &mut emb_ln, dims)?;
            be.copy(&mut x, 0, &emb_ln.out, 0, rows * d)?;
            for (idx, cache) in t.decoder_layers.iter().zip(&mut caches) {
                let kv = Kv::SelfCached { k: &mut cache.self_k, v: &mut cache.self_v, pos: step, len: l_len };
                let self_attn = AttnInputs { kv, mask: Some(&self_mask), shape: self_shape };
                let kv = Kv::CrossCached { k: &cache.cross_k, v: &cache.cross_v };
                let cross_attn = AttnInputs { kv, mask: Some(text_mask), shape: cross_shape };
                decoder_layer_fwd(&be, p, None, idx, &mut layer, &x, self_attn, cross_attn, dims)?;
                be.copy(&mut x, 0, &layer.out, 0, rows * d)?;
            }
            head_fwd(&be, p, t, &mut final_ln, &mut logits, &x, rows, dims)?;
            let host = be.download(&logits)?;
            for r in 0..n {
                let cond = &host[r * v..r * v + cfg.image_vocab_size];
                let row: Vec<f32> = if guided {
                    let un = &host[(n + r) * v..(n + r) * v + cfg.image_vocab_size];
                    cond.iter().zip(un).map(|(c, u)| u + opts.cond_scale * (c - u)).collect()
                } else {
                    cond.to_vec()
                };
                let code = sample_code(&row, opts, &mut rng);
                out[r].push(code as u32);
                tokens[r] = code as i32;
                if guided {
                    tokens[n + r] = code as i32;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p_pick_from_the_head() {
        let logits = [0.0, 5.0, 1.0, 4.9, -3.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let greedy = SamplingOptions { temperature: 0.0, ..Default::default() };
        assert_eq!(sample_code(&logits, &greedy, &mut rng), 1);
        let top2 = SamplingOptions { top_k: Some(2), ..Default::default() };
        for _ in 0..200 {
            assert!([1, 3].contains(&sample_code(&logits, &top2, &mut rng)));
        }
        let nucleus = SamplingOptions { top_p: Some(0.3), ..Default::default() };
        for _ in 0..200 {
            assert_eq!(sample_code(&logits, &nucleus, &mut rng), 1);
        }
    }
}
