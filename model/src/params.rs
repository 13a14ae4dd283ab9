//! The parameter table: every tensor of DalleBart under dalle-mini's flattened Flax name, its
//! shape and its initialisation, in one fixed order. Layers are listed one tensor per layer
//! (`FlaxBartEncoderLayer_{i}`); the stacked `use_scan` layout is a view produced by
//! [`crate::checkpoint`].

use crate::config::DalleBartConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// normal(0, init_std): dense kernels and embeddings, as dalle-mini initialises them.
    Normal,
    Ones,
    Zeros,
}

/// How a tensor is split across the tensor-parallel ranks. Global indices `start .. start +
/// valid` along the split axis live at local indices `0 .. valid`; local indices past `valid`
/// are padding (vocabularies that don't divide by tp), kept at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shard {
    Replicated,
    /// Split along the last axis (column-parallel kernels, lm_head).
    Cols {
        full: usize,
        start: usize,
        valid: usize,
    },
    /// Split along the first axis (row-parallel kernels, embedding rows, the GLU middle bias).
    Rows {
        full: usize,
        start: usize,
        valid: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    /// Shape on this rank (equal to the full shape when replicated or tp = 1).
    pub shape: Vec<usize>,
    pub init: Init,
    pub shard: Shard,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The unsharded shape.
    pub fn full_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        match self.shard {
            Shard::Replicated => {}
            Shard::Cols { full, .. } => *s.last_mut().expect("cols split needs an axis") = full,
            Shard::Rows { full, .. } => s[0] = full,
        }
        s
    }
    pub fn full_numel(&self) -> usize {
        self.full_shape().iter().product()
    }

    /// This rank's slice of the full tensor (padding filled with zeros).
    pub fn shard_of(&self, full: &[f32]) -> Vec<f32> {
        match self.shard {
            Shard::Replicated => full.to_vec(),
            Shard::Rows { start, valid, .. } => {
                let row: usize = self.shape[1..].iter().product();
                let mut out = full[start * row..(start + valid) * row].to_vec();
                out.resize(self.numel(), 0.0);
                out
            }
            Shard::Cols { full: fc, start, valid } => {
                let lc = *self.shape.last().expect("cols split needs an axis");
                let rows = self.numel() / lc;
                let mut out = vec![0.0; self.numel()];
                for r in 0..rows {
                    out[r * lc..r * lc + valid].copy_from_slice(&full[r * fc + start..r * fc + start + valid]);
                }
                out
            }
        }
    }

    /// Writes this rank's slice `local` into the full tensor `full` (padding dropped).
    pub fn unshard_into(&self, local: &[f32], full: &mut [f32]) {
        match self.shard {
            Shard::Replicated => full.copy_from_slice(local),
            Shard::Rows { start, valid, .. } => {
                let row: usize = self.shape[1..].iter().product();
                full[start * row..(start + valid) * row].copy_from_slice(&local[..valid * row]);
            }
            Shard::Cols { full: fc, start, valid } => {
                let lc = *self.shape.last().expect("cols split needs an axis");
                for r in 0..self.numel() / lc {
                    full[r * fc + start..r * fc + start + valid].copy_from_slice(&local[r * lc..r * lc + valid]);
                }
            }
        }
    }
}

/// Where rank `rank` of `tp` sits on an axis of `full` entries split evenly (`even`: padded to
/// equal shards of ⌈full/tp⌉, else balanced shards of ⌊full/tp⌋ or one more): (start, valid, local).
pub fn split_axis(full: usize, tp: usize, rank: usize, padded: bool) -> (usize, usize, usize) {
    if padded {
        let local = full.div_ceil(tp);
        let start = (rank * local).min(full);
        (start, (full - start).min(local), local)
    } else {
        let (start, end) = (rank * full / tp, (rank + 1) * full / tp);
        (start, end - start, end - start)
    }
}

/// Indices into the table for one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttnIdx {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub out: usize,
}

/// Indices for one GLU feed-forward block.
#[derive(Debug, Clone, Copy)]
pub struct GluIdx {
    pub ln0_bias: usize,
    pub dense0: usize,
    pub dense1: usize,
    pub ln1_bias: usize,
    pub dense2: usize,
}

/// A LayerNorm with scale and bias.
#[derive(Debug, Clone, Copy)]
pub struct LnIdx {
    pub scale: usize,
    pub bias: usize,
}

/// Indices of one NormFormer attention sub-block `x + LN_post(Attn(LN_pre(x)))`, named as its
/// activations are: `ln_pre` is the bias-only `LayerNorm_0` (self) or `LayerNorm_2` (cross),
/// `ln_post` the scaled `LayerNorm_1` (self) or `LayerNorm_3` (cross).
#[derive(Debug, Clone, Copy)]
pub struct AttnBlockIdx {
    pub ln_pre_bias: usize,
    pub attn: AttnIdx,
    pub ln_post: LnIdx,
}

#[derive(Debug, Clone, Copy)]
pub struct EncoderLayerIdx {
    pub self_attn: AttnBlockIdx,
    pub glu: GluIdx,
}

#[derive(Debug, Clone, Copy)]
pub struct DecoderLayerIdx {
    pub self_attn: AttnBlockIdx,
    pub cross_attn: AttnBlockIdx,
    pub glu: GluIdx,
}

/// Indices of one stack's embeddings and final norm.
#[derive(Debug, Clone, Copy)]
pub struct StackIdx {
    pub embed_tokens: usize,
    pub embed_positions: usize,
    pub layernorm_embedding: LnIdx,
    pub final_ln_bias: usize,
}

/// Every parameter of a config, plus typed indices into the list.
#[derive(Debug, Clone)]
pub struct ParamTable {
    pub specs: Vec<ParamSpec>,
    pub encoder: StackIdx,
    pub decoder: StackIdx,
    pub encoder_layers: Vec<EncoderLayerIdx>,
    pub decoder_layers: Vec<DecoderLayerIdx>,
    pub lm_head: usize,
}

pub const ENCODER_LAYER_PREFIX: &str = "model.encoder.layers.FlaxBartEncoderLayer_";
pub const DECODER_LAYER_PREFIX: &str = "model.decoder.layers.FlaxBartDecoderLayer_";

struct Builder {
    specs: Vec<ParamSpec>,
    tp: usize,
    rank: usize,
}

impl Builder {
    fn add(&mut self, name: String, shape: &[usize], init: Init) -> usize {
        self.add_sharded(name, shape, init, Shard::Replicated)
    }
    fn add_sharded(&mut self, name: String, shape: &[usize], init: Init, shard: Shard) -> usize {
        self.specs.push(ParamSpec { name, shape: shape.to_vec(), init, shard });
        self.specs.len() - 1
    }
    /// A tensor of full shape `full_shape` split along `axis` (0 or last) on this rank.
    fn add_split(&mut self, name: String, full_shape: &[usize], init: Init, axis_last: bool, padded: bool) -> usize {
        let axis = if axis_last { full_shape.len() - 1 } else { 0 };
        let full = full_shape[axis];
        let (start, valid, local) = split_axis(full, self.tp, self.rank, padded);
        let mut shape = full_shape.to_vec();
        shape[axis] = local;
        let shard = if self.tp == 1 {
            Shard::Replicated
        } else if axis_last {
            Shard::Cols { full, start, valid }
        } else {
            Shard::Rows { full, start, valid }
        };
        self.add_sharded(name, &shape, init, shard)
    }
    /// q/k/v column-parallel (heads split across tp), out_proj row-parallel.
    fn attn(&mut self, p: &str, d: usize) -> AttnIdx {
        let mut k =
            |n: &str, out: bool| self.add_split(format!("{p}.{n}_proj.kernel"), &[d, d], Init::Normal, !out, false);
        AttnIdx { q: k("q", false), k: k("k", false), v: k("v", false), out: k("out", true) }
    }
    /// Dense_0/1 column-parallel, the middle LayerNorm and Dense_2 split along ffn.
    fn glu(&mut self, p: &str, d: usize, ffn: usize) -> GluIdx {
        GluIdx {
            ln0_bias: self.add(format!("{p}.LayerNorm_0.bias"), &[d], Init::Zeros),
            dense0: self.add_split(format!("{p}.Dense_0.kernel"), &[d, ffn], Init::Normal, true, false),
            dense1: self.add_split(format!("{p}.Dense_1.kernel"), &[d, ffn], Init::Normal, true, false),
            ln1_bias: self.add_split(format!("{p}.LayerNorm_1.bias"), &[ffn], Init::Zeros, false, false),
            dense2: self.add_split(format!("{p}.Dense_2.kernel"), &[ffn, d], Init::Normal, false, false),
        }
    }
    fn ln(&mut self, p: &str, d: usize) -> LnIdx {
        LnIdx {
            scale: self.add(format!("{p}.scale"), &[d], Init::Ones),
            bias: self.add(format!("{p}.bias"), &[d], Init::Zeros),
        }
    }
    fn stack(&mut self, p: &str, vocab: usize, positions: usize, d: usize) -> (usize, usize, LnIdx) {
        let tok = self.add_split(format!("{p}.embed_tokens.embedding"), &[vocab, d], Init::Normal, false, true);
        let pos = self.add(format!("{p}.embed_positions.embedding"), &[positions, d], Init::Normal);
        let ln = self.ln(&format!("{p}.layernorm_embedding"), d);
        (tok, pos, ln)
    }
}

impl ParamTable {
    pub fn new(c: &DalleBartConfig) -> Self {
        Self::sharded(c, 0, 1)
    }

    /// The parameters tensor-parallel rank `rank` of `tp` holds (call [`check_tp`] first).
    pub fn sharded(c: &DalleBartConfig, rank: usize, tp: usize) -> Self {
        let d = c.d_model;
        let mut b = Builder { specs: Vec::new(), tp, rank };
        let (etok, epos, eln) = b.stack("model.encoder", c.encoder_vocab_size, c.max_text_length, d);
        let encoder_layers = (0..c.encoder_layers)
            .map(|i| {
                let p = format!("{ENCODER_LAYER_PREFIX}{i}");
                // Table order: attention, LayerNorm_0, LayerNorm_1, GLU.
                let attn = b.attn(&format!("{p}.FlaxBartAttention_0"), d);
                let ln_pre_bias = b.add(format!("{p}.LayerNorm_0.bias"), &[d], Init::Zeros);
                let ln_post = b.ln(&format!("{p}.LayerNorm_1"), d);
                EncoderLayerIdx {
                    self_attn: AttnBlockIdx { ln_pre_bias, attn, ln_post },
                    glu: b.glu(&format!("{p}.GLU_0"), d, c.encoder_ffn_dim),
                }
            })
            .collect();
        let efinal = b.add("model.encoder.final_ln.bias".into(), &[d], Init::Zeros);
        let (dtok, dpos, dln) = b.stack("model.decoder", c.loss_classes(), c.image_length, d);
        let decoder_layers = (0..c.decoder_layers)
            .map(|i| {
                let p = format!("{DECODER_LAYER_PREFIX}{i}");
                // Table order: both attentions, LayerNorm_0 … LayerNorm_3, GLU.
                let self_attn = b.attn(&format!("{p}.FlaxBartAttention_0"), d);
                let cross_attn = b.attn(&format!("{p}.FlaxBartAttention_1"), d);
                let self_ln_pre = b.add(format!("{p}.LayerNorm_0.bias"), &[d], Init::Zeros);
                let self_ln_post = b.ln(&format!("{p}.LayerNorm_1"), d);
                let cross_ln_pre = b.add(format!("{p}.LayerNorm_2.bias"), &[d], Init::Zeros);
                let cross_ln_post = b.ln(&format!("{p}.LayerNorm_3"), d);
                DecoderLayerIdx {
                    self_attn: AttnBlockIdx { ln_pre_bias: self_ln_pre, attn: self_attn, ln_post: self_ln_post },
                    cross_attn: AttnBlockIdx { ln_pre_bias: cross_ln_pre, attn: cross_attn, ln_post: cross_ln_post },
                    glu: b.glu(&format!("{p}.GLU_0"), d, c.decoder_ffn_dim),
                }
            })
            .collect();
        let dfinal = b.add("model.decoder.final_ln.bias".into(), &[d], Init::Zeros);
        let lm_head = b.add_split("lm_head.kernel".into(), &[d, c.loss_classes()], Init::Normal, true, true);
        Self {
            specs: b.specs,
            encoder: StackIdx {
                embed_tokens: etok,
                embed_positions: epos,
                layernorm_embedding: eln,
                final_ln_bias: efinal,
            },
            decoder: StackIdx {
                embed_tokens: dtok,
                embed_positions: dpos,
                layernorm_embedding: dln,
                final_ln_bias: dfinal,
            },
            encoder_layers,
            decoder_layers,
            lm_head,
        }
    }

    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// This rank's values from full (unsharded) values in table order.
    pub fn shard_values(&self, full: &[Vec<f32>]) -> Vec<Vec<f32>> {
        self.specs.iter().zip(full).map(|(s, f)| s.shard_of(f)).collect()
    }

    /// Full values from every tp rank's local values (`tables[r]`, `locals[r]`).
    pub fn unshard_values(tables: &[ParamTable], locals: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
        let t0 = &tables[0];
        (0..t0.specs.len())
            .map(|i| {
                let mut full = vec![0.0; t0.specs[i].full_numel()];
                for (t, l) in tables.iter().zip(locals) {
                    t.specs[i].unshard_into(&l[i], &mut full);
                }
                full
            })
            .collect()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// Initial values as dalle-mini draws them in distribution (normal(init_std) kernels and
    /// embeddings, LayerNorm scale 1 and bias 0), from a seeded ChaCha8 stream per tensor.
    pub fn init_values(&self, init_std: f32, seed: u64) -> Vec<Vec<f32>> {
        let normal = Normal::new(0.0f32, init_std).expect("init_std validated positive");
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| match s.init {
                Init::Ones => vec![1.0; s.numel()],
                Init::Zeros => vec![0.0; s.numel()],
                Init::Normal => {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    (0..s.numel()).map(|_| normal.sample(&mut rng)).collect()
                }
            })
            .collect()
    }
}

/// Checks that a config can be split over `tp` ranks, naming what doesn't divide.
pub fn check_tp(c: &DalleBartConfig, tp: usize) -> Result<(), String> {
    if tp == 0 {
        return Err("tp must be at least 1".into());
    }
    for (heads, name) in
        [(c.encoder_attention_heads, "encoder_attention_heads"), (c.decoder_attention_heads, "decoder_attention_heads")]
    {
        if !heads.is_multiple_of(tp) {
            return Err(format!(
                "{name} = {heads} is not divisible by tp = {tp}: choose a tp that divides the head count"
            ));
        }
    }
    for (n, name) in [
        (c.encoder_ffn_dim, "encoder_ffn_dim"),
        (c.decoder_ffn_dim, "decoder_ffn_dim"),
        (c.encoder_vocab_size, "encoder_vocab_size"),
        (c.loss_classes(), "image_vocab_size + 1"),
    ] {
        if n < 2 * tp {
            return Err(format!("{name} = {n} is too small to split over tp = {tp}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_round_trips_with_padding_and_uneven_splits() {
        let mut c = DalleBartConfig::micro();
        c.d_model = 8;
        c.encoder_attention_heads = 4;
        c.decoder_attention_heads = 4;
        c.encoder_ffn_dim = 10; // 10 over tp 4: balanced 2,3,2,3
        c.decoder_ffn_dim = 12;
        c.encoder_vocab_size = 13; // padded to 4 × 4
        c.image_vocab_size = 20; // 21 rows → 4 × 6 (3 padding)
        c.image_length = 4;
        c.max_text_length = 3;
        let full = ParamTable::new(&c);
        let values = full.init_values(0.5, 3);
        check_tp(&c, 4).unwrap();
        let tables: Vec<ParamTable> = (0..4).map(|r| ParamTable::sharded(&c, r, 4)).collect();
        let locals: Vec<Vec<Vec<f32>>> = tables.iter().map(|t| t.shard_values(&values)).collect();
        assert_eq!(ParamTable::unshard_values(&tables, &locals), values);
        let lm = &tables[3].specs[tables[3].lm_head];
        assert_eq!(lm.shape, vec![8, 6]);
        assert_eq!(lm.shard, Shard::Cols { full: 21, start: 18, valid: 3 });
        assert!(check_tp(&c, 3).unwrap_err().contains("attention_heads"));
    }

    /// Parameter counts read off dalle-mini itself (the published checkpoints' `config.json` and weights).
    #[test]
    fn parameter_counts_match_dalle_mini() {
        assert_eq!(ParamTable::new(&DalleBartConfig::micro()).numel(), 23_706_112);
        let mini = ParamTable::new(&DalleBartConfig::mini()).numel() as f64;
        assert!((mini / 1e6 - 437.8).abs() < 0.05, "{mini}");
        let mega = ParamTable::new(&DalleBartConfig::mega()).numel() as f64;
        assert!((mega / 1e6 - 2587.5).abs() < 0.05, "{mega}");
    }

    #[test]
    fn names_are_unique() {
        let t = ParamTable::new(&DalleBartConfig::micro());
        let mut names: Vec<_> = t.specs.iter().map(|s| &s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), t.specs.len());
    }
}
