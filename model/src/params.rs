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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
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

#[derive(Debug, Clone, Copy)]
pub struct EncoderLayerIdx {
    pub ln0_bias: usize,
    pub attn: AttnIdx,
    pub ln1: LnIdx,
    pub glu: GluIdx,
}

#[derive(Debug, Clone, Copy)]
pub struct DecoderLayerIdx {
    pub ln0_bias: usize,
    pub self_attn: AttnIdx,
    pub ln1: LnIdx,
    pub ln2_bias: usize,
    pub cross_attn: AttnIdx,
    pub ln3: LnIdx,
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
}

impl Builder {
    fn add(&mut self, name: String, shape: &[usize], init: Init) -> usize {
        self.specs.push(ParamSpec { name, shape: shape.to_vec(), init });
        self.specs.len() - 1
    }
    fn attn(&mut self, p: &str, d: usize) -> AttnIdx {
        let mut k = |n: &str| self.add(format!("{p}.{n}_proj.kernel"), &[d, d], Init::Normal);
        AttnIdx { q: k("q"), k: k("k"), v: k("v"), out: k("out") }
    }
    fn glu(&mut self, p: &str, d: usize, ffn: usize) -> GluIdx {
        GluIdx {
            ln0_bias: self.add(format!("{p}.LayerNorm_0.bias"), &[d], Init::Zeros),
            dense0: self.add(format!("{p}.Dense_0.kernel"), &[d, ffn], Init::Normal),
            dense1: self.add(format!("{p}.Dense_1.kernel"), &[d, ffn], Init::Normal),
            ln1_bias: self.add(format!("{p}.LayerNorm_1.bias"), &[ffn], Init::Zeros),
            dense2: self.add(format!("{p}.Dense_2.kernel"), &[ffn, d], Init::Normal),
        }
    }
    fn ln(&mut self, p: &str, d: usize) -> LnIdx {
        LnIdx {
            scale: self.add(format!("{p}.scale"), &[d], Init::Ones),
            bias: self.add(format!("{p}.bias"), &[d], Init::Zeros),
        }
    }
    fn stack(&mut self, p: &str, vocab: usize, positions: usize, d: usize) -> (usize, usize, LnIdx) {
        let tok = self.add(format!("{p}.embed_tokens.embedding"), &[vocab, d], Init::Normal);
        let pos = self.add(format!("{p}.embed_positions.embedding"), &[positions, d], Init::Normal);
        let ln = self.ln(&format!("{p}.layernorm_embedding"), d);
        (tok, pos, ln)
    }
}

impl ParamTable {
    pub fn new(c: &DalleBartConfig) -> Self {
        let d = c.d_model;
        let mut b = Builder { specs: Vec::new() };
        let (etok, epos, eln) = b.stack("model.encoder", c.encoder_vocab_size, c.max_text_length, d);
        let encoder_layers = (0..c.encoder_layers)
            .map(|i| {
                let p = format!("{ENCODER_LAYER_PREFIX}{i}");
                EncoderLayerIdx {
                    attn: b.attn(&format!("{p}.FlaxBartAttention_0"), d),
                    ln0_bias: b.add(format!("{p}.LayerNorm_0.bias"), &[d], Init::Zeros),
                    ln1: b.ln(&format!("{p}.LayerNorm_1"), d),
                    glu: b.glu(&format!("{p}.GLU_0"), d, c.encoder_ffn_dim),
                }
            })
            .collect();
        let efinal = b.add("model.encoder.final_ln.bias".into(), &[d], Init::Zeros);
        let (dtok, dpos, dln) = b.stack("model.decoder", c.image_rows(), c.image_length, d);
        let decoder_layers = (0..c.decoder_layers)
            .map(|i| {
                let p = format!("{DECODER_LAYER_PREFIX}{i}");
                DecoderLayerIdx {
                    self_attn: b.attn(&format!("{p}.FlaxBartAttention_0"), d),
                    cross_attn: b.attn(&format!("{p}.FlaxBartAttention_1"), d),
                    ln0_bias: b.add(format!("{p}.LayerNorm_0.bias"), &[d], Init::Zeros),
                    ln1: b.ln(&format!("{p}.LayerNorm_1"), d),
                    ln2_bias: b.add(format!("{p}.LayerNorm_2.bias"), &[d], Init::Zeros),
                    ln3: b.ln(&format!("{p}.LayerNorm_3"), d),
                    glu: b.glu(&format!("{p}.GLU_0"), d, c.decoder_ffn_dim),
                }
            })
            .collect();
        let dfinal = b.add("model.decoder.final_ln.bias".into(), &[d], Init::Zeros);
        let lm_head = b.add("lm_head.kernel".into(), &[d, c.image_rows()], Init::Normal);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts read off dalle-mini itself (../shared/DESIGN.md §1).
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
