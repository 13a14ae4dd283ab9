//! Autoregressive generation of image codes with a KV cache, dalle-mini style: top-k, top-p,
//! temperature and classifier-free guidance (`cond_scale`, the empty caption as the
//! unconditional prompt): `logits = uncond + cond_scale · (cond − uncond)`.
//!
//! The encoder runs once; every decoder layer keeps its self-attention keys/values for all
//! image positions (`[rows, image_length, d]`) and its cross-attention keys/values of the
//! encoder output. Step `t` embeds one token per row, attends to cache positions `0..=t`
//! (a key mask), and samples the next code on the host.

use super::{attn_shape, ln_fwd, DalleBart, LnActs};
use crate::error::{ModelError, Result};
use dm_runtime::{Backend, MatmulSpec, VocabRange};
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
        let (t_len, l_len, d, v) = (cfg.max_text_length, cfg.image_length, cfg.d_model, cfg.image_rows());
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
        let (p, t) = (&self.params, &self.table);
        let a = self.acts.as_ref().expect("forward allocated activations");
        let enc_out = &a.enc.final_ln.out;
        let text_mask = &a.mask;
        let mut caches: Vec<LayerCache<B>> = Vec::with_capacity(t.decoder_layers.len());
        for (i, idx) in t.decoder_layers.iter().enumerate() {
            let mut cross_k = be.zeros(&format!("generate.layer{i}.cross_k"), rows * t_len * d)?;
            let mut cross_v = be.zeros(&format!("generate.layer{i}.cross_v"), rows * t_len * d)?;
            be.matmul(&mut cross_k, enc_out, &p[idx.cross_attn.k], MatmulSpec::nn(rows * t_len, d, d))?;
            be.matmul(&mut cross_v, enc_out, &p[idx.cross_attn.v], MatmulSpec::nn(rows * t_len, d, d))?;
            caches.push(LayerCache {
                self_k: be.zeros(&format!("generate.layer{i}.self_k"), rows * l_len * d)?,
                self_v: be.zeros(&format!("generate.layer{i}.self_v"), rows * l_len * d)?,
                cross_k,
                cross_v,
            });
        }

        let f = cfg.decoder_ffn_dim;
        let z = |name: &str, len: usize| be.zeros(&format!("generate.{name}"), len);
        let ln = |name: &str, dim: usize| -> Result<LnActs<B>> {
            Ok(LnActs { out: z(name, rows * dim)?, mean: z(name, rows)?, rstd: z(name, rows)? })
        };
        let (mut x, mut emb, mut pos) = (z("x", rows * d)?, z("emb", rows * d)?, z("pos", d)?);
        let (mut ln_a, mut ln_b, mut ln_ffn) = (ln("ln_a", d)?, ln("ln_b", d)?, ln("ln_ffn", f)?);
        let (mut q, mut k, mut vv, mut o, mut proj, mut tmp) = (
            z("q", rows * d)?,
            z("k", rows * d)?,
            z("v", rows * d)?,
            z("o", rows * d)?,
            z("proj", rows * d)?,
            z("tmp", rows * d)?,
        );
        let (mut a0, mut a1, mut act) = (z("a0", rows * f)?, z("a1", rows * f)?, z("act", rows * f)?);
        let mut lse = z("lse", rows * cfg.decoder_attention_heads)?;
        let mut logits = z("logits", rows * v)?;
        let dims = self.dec_dims();

        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let mut tokens = vec![cfg.bos_id() as i32; rows];
        let mut out = vec![Vec::with_capacity(l_len); n];
        for step in 0..l_len {
            let ids = be.upload_ids("generate.ids", &tokens)?;
            let visible: Vec<i32> = (0..rows * l_len).map(|i| ((i % l_len) <= step) as i32).collect();
            let self_mask = be.upload_ids("generate.self_mask", &visible)?;
            be.embedding_forward(&mut emb, &p[t.decoder.embed_tokens], &ids, VocabRange::full(v), d)?;
            be.copy(&mut pos, 0, &p[t.decoder.embed_positions], step * d, d)?;
            be.add_broadcast_rows(&mut emb, &pos, d)?;
            let lne = t.decoder.layernorm_embedding;
            be.layernorm_forward(
                &mut ln_a.out,
                &mut ln_a.mean,
                &mut ln_a.rstd,
                &emb,
                Some(&p[lne.scale]),
                &p[lne.bias],
                d,
            )?;
            be.copy(&mut x, 0, &ln_a.out, 0, rows * d)?;
            for (idx, cache) in t.decoder_layers.iter().zip(&mut caches) {
                // Causal self-attention over the cache.
                ln_fwd(&be, &mut ln_a, &x, None, &p[idx.ln0_bias], d)?;
                be.matmul(&mut q, &ln_a.out, &p[idx.self_attn.q], MatmulSpec::nn(rows, d, d))?;
                be.matmul(&mut k, &ln_a.out, &p[idx.self_attn.k], MatmulSpec::nn(rows, d, d))?;
                be.matmul(&mut vv, &ln_a.out, &p[idx.self_attn.v], MatmulSpec::nn(rows, d, d))?;
                for r in 0..rows {
                    be.copy(&mut cache.self_k, (r * l_len + step) * d, &k, r * d, d)?;
                    be.copy(&mut cache.self_v, (r * l_len + step) * d, &vv, r * d, d)?;
                }
                let shape = attn_shape(rows, 1, l_len, dims, false);
                be.attention_forward(&mut o, &mut lse, &q, &cache.self_k, &cache.self_v, Some(&self_mask), shape)?;
                be.matmul(&mut proj, &o, &p[idx.self_attn.out], MatmulSpec::nn(rows, d, d))?;
                ln_fwd(&be, &mut ln_b, &proj, Some(&p[idx.ln1.scale]), &p[idx.ln1.bias], d)?;
                be.add_assign(&mut x, &ln_b.out)?;
                // Cross-attention over the cached encoder keys/values.
                ln_fwd(&be, &mut ln_a, &x, None, &p[idx.ln2_bias], d)?;
                be.matmul(&mut q, &ln_a.out, &p[idx.cross_attn.q], MatmulSpec::nn(rows, d, d))?;
                let shape = attn_shape(rows, 1, t_len, dims, false);
                be.attention_forward(&mut o, &mut lse, &q, &cache.cross_k, &cache.cross_v, Some(text_mask), shape)?;
                be.matmul(&mut proj, &o, &p[idx.cross_attn.out], MatmulSpec::nn(rows, d, d))?;
                ln_fwd(&be, &mut ln_b, &proj, Some(&p[idx.ln3.scale]), &p[idx.ln3.bias], d)?;
                be.add_assign(&mut x, &ln_b.out)?;
                // GLU.
                let g = &idx.glu;
                ln_fwd(&be, &mut ln_a, &x, None, &p[g.ln0_bias], d)?;
                be.matmul(&mut a0, &ln_a.out, &p[g.dense0], MatmulSpec::nn(rows, f, d))?;
                be.matmul(&mut a1, &ln_a.out, &p[g.dense1], MatmulSpec::nn(rows, f, d))?;
                be.gelu_glu_forward(&mut act, &a0, &a1)?;
                ln_fwd(&be, &mut ln_ffn, &act, None, &p[g.ln1_bias], f)?;
                be.matmul(&mut tmp, &ln_ffn.out, &p[g.dense2], MatmulSpec::nn(rows, d, f))?;
                be.add_assign(&mut x, &tmp)?;
            }
            ln_fwd(&be, &mut ln_a, &x, None, &p[t.decoder.final_ln_bias], d)?;
            be.matmul(&mut logits, &ln_a.out, &p[t.lm_head], MatmulSpec::nn(rows, v, d))?;
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
