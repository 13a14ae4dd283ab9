//! The VQGAN forward pass on the CPU, one image at a time (NHWC, f32): the stages of
//! [`super::arch`] run through the runtime's image ops, plus the vector quantizer.

use super::arch::{self, attn_layers, resnet_layers, ConvLayer, Stage, CODEBOOK};
use super::config::{VqganConfig, GROUPS, GROUP_NORM_EPS};
use super::weights::VqganWeights;
use crate::error::{ModelError, Result};
use dm_runtime::backend::MatmulSpec;
use dm_runtime::ops::{self, Conv2dShape, GroupNormShape, Padding, SpatialAttentionShape, UpsampleShape};
use std::path::Path;

/// One image's activation, `[side, side, channels]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub side: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

/// A loaded VQGAN: config, weights and the two networks' stage lists.
#[derive(Debug, Clone)]
pub struct Vqgan {
    pub config: VqganConfig,
    weights: VqganWeights,
    encoder: Vec<Stage>,
    decoder: Vec<Stage>,
}

/// What [`Vqgan::encode`] returns for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The latents the quantizer sees (`quant_conv` output), `[g, g, embed_dim]`.
    pub pre_quant: Activation,
    /// Nearest codebook entry per position, row-major (`y·g + x`).
    pub codes: Vec<u32>,
}

impl Vqgan {
    pub fn new(config: VqganConfig, weights: VqganWeights) -> Result<Self> {
        config.validate().map_err(ModelError::Config)?;
        let (encoder, decoder) = (arch::encoder(&config), arch::decoder(&config));
        Ok(Vqgan { config, weights, encoder, decoder })
    }

    /// Loads a model folder (see [`VqganWeights::load_dir`]).
    pub fn load(dir: &Path) -> Result<Self> {
        let (cfg, weights) = VqganWeights::load_dir(dir)?;
        Self::new(cfg, weights)
    }

    pub fn weights(&self) -> &VqganWeights {
        &self.weights
    }

    /// Forward FLOPs of decoding one image (convolutions and attention products).
    pub fn decode_flops(&self) -> f64 {
        arch::flops(&self.decoder, self.config.latent_side())
    }
    /// Forward FLOPs of encoding one image (without the quantizer's distance GEMM).
    pub fn encode_flops(&self) -> f64 {
        arch::flops(&self.encoder, self.config.resolution)
    }

    /// Decodes one image's codes (row-major, `codes_per_image` of them) to `[R, R, out_ch]`
    /// pixels, not clipped (dalle-mini clips to [0, 1]).
    pub fn decode_codes(&self, codes: &[u32]) -> Result<Activation> {
        let (g, d, n) = (self.config.latent_side(), self.config.embed_dim, self.config.n_embed);
        if codes.len() != g * g {
            return Err(ModelError::Batch(format!(
                "{} codes given; this VQGAN decodes {g}×{g} = {} codes per image",
                codes.len(),
                g * g
            )));
        }
        if let Some(c) = codes.iter().find(|c| **c as usize >= n) {
            return Err(ModelError::Batch(format!("code {c} is outside this VQGAN's codebook of {n} entries")));
        }
        let book = self.weights.get(CODEBOOK);
        let data = codes.iter().flat_map(|&c| book[c as usize * d..(c as usize + 1) * d].iter().copied()).collect();
        self.run(&self.decoder, Activation { side: g, channels: d, data })
    }

    /// Encodes one `[R, R, in_channels]` image with values in [0, 1] (dalle-mini's range).
    pub fn encode(&self, image: &Activation) -> Result<Encoded> {
        let (r, c) = (self.config.resolution, self.config.in_channels);
        if image.side != r || image.channels != c || image.data.len() != r * r * c {
            return Err(ModelError::Batch(format!(
                "image is {}×{}×{}; this VQGAN encodes {r}×{r}×{c}",
                image.side, image.side, image.channels
            )));
        }
        let pre_quant = self.run(&self.encoder, image.clone())?;
        let codes = self.quantize(&pre_quant.data)?;
        Ok(Encoded { pre_quant, codes })
    }

    /// Index of the nearest codebook entry for each `embed_dim`-vector of `z`, by
    /// `argmin_j Σz² + Σe_j² − 2·z·e_j` as vqgan-jax's VectorQuantizer computes it (the first
    /// index wins ties, as `jnp.argmin`).
    pub fn quantize(&self, z: &[f32]) -> Result<Vec<u32>> {
        let (d, n) = (self.config.embed_dim, self.config.n_embed);
        if z.is_empty() || !z.len().is_multiple_of(d) {
            return Err(ModelError::Batch(format!("{} latent values are not a whole number of {d}-vectors", z.len())));
        }
        let book = self.weights.get(CODEBOOK);
        let rows = z.len() / d;
        let mut dots = vec![0.0f32; rows * n];
        let spec = MatmulSpec { m: rows, n, k: d, trans_a: false, trans_b: true, accumulate: false };
        dm_runtime::cpu::matmul::matmul(&mut dots, z, book, spec);
        let e2: Vec<f32> = book.chunks_exact(d).map(|e| e.iter().map(|v| v * v).sum()).collect();
        let codes = z
            .chunks_exact(d)
            .zip(dots.chunks_exact(n))
            .map(|(zr, dr)| {
                let z2: f32 = zr.iter().map(|v| v * v).sum();
                let mut best = (0u32, f32::INFINITY);
                for (j, (dot, e2)) in dr.iter().zip(&e2).enumerate() {
                    let dist = z2 + e2 - 2.0 * dot;
                    if dist < best.1 {
                        best = (j as u32, dist);
                    }
                }
                best.0
            })
            .collect();
        Ok(codes)
    }

    fn run(&self, stages: &[Stage], mut x: Activation) -> Result<Activation> {
        for stage in stages {
            x = self.stage(stage, x)?;
        }
        Ok(x)
    }

    fn stage(&self, stage: &Stage, x: Activation) -> Result<Activation> {
        match stage {
            Stage::Conv(l) => {
                let pad = Padding::uniform(l.kernel / 2);
                self.conv(l, &x, 1, pad)
            }
            Stage::Downsample(l) => self.conv(l, &x, 2, Padding::bottom_right(1)),
            Stage::Upsample(l) => {
                let s = UpsampleShape { batch: 1, height: x.side, width: x.side, channels: x.channels };
                let mut up = vec![0.0; s.output_len()];
                ops::upsample_nearest2x(&mut up, &x.data, &s)?;
                let up = Activation { side: 2 * x.side, channels: x.channels, data: up };
                self.conv(l, &up, 1, Padding::uniform(1))
            }
            Stage::NormSwish { name, .. } => {
                let mut h = self.norm(name, &x)?;
                ops::swish_in_place(&mut h.data);
                Ok(h)
            }
            Stage::ResnetBlock { prefix, cin, cout } => self.resnet(prefix, *cin, *cout, x),
            Stage::AttnBlock { prefix, channels } => self.attention(prefix, *channels, x),
        }
    }

    fn conv(&self, l: &ConvLayer, x: &Activation, stride: usize, padding: Padding) -> Result<Activation> {
        let s = Conv2dShape {
            batch: 1,
            height: x.side,
            width: x.side,
            in_channels: l.cin,
            out_channels: l.cout,
            kernel_h: l.kernel,
            kernel_w: l.kernel,
            stride,
            padding,
        };
        let mut out = vec![0.0; s.output_len()];
        let (kernel, bias) =
            (self.weights.get(&format!("{}.kernel", l.name)), self.weights.get(&format!("{}.bias", l.name)));
        ops::conv2d(&mut out, &x.data, kernel, Some(bias), &s).map_err(|e| layer_err(&l.name, e))?;
        Ok(Activation { side: s.out_height(), channels: l.cout, data: out })
    }

    fn norm(&self, name: &str, x: &Activation) -> Result<Activation> {
        let s = GroupNormShape {
            batch: 1,
            positions: x.side * x.side,
            channels: x.channels,
            groups: GROUPS,
            eps: GROUP_NORM_EPS,
        };
        let mut out = vec![0.0; x.data.len()];
        let (scale, bias) = (self.weights.get(&format!("{name}.scale")), self.weights.get(&format!("{name}.bias")));
        ops::group_norm(&mut out, &x.data, scale, bias, &s).map_err(|e| layer_err(name, e))?;
        Ok(Activation { data: out, ..*x })
    }

    fn resnet(&self, prefix: &str, cin: usize, cout: usize, x: Activation) -> Result<Activation> {
        let (norm1, conv1, norm2, conv2, shortcut) = resnet_layers(prefix, cin, cout);
        let same = Padding::uniform(1);
        let mut h = self.norm(&norm1, &x)?;
        ops::swish_in_place(&mut h.data);
        let h = self.conv(&conv1, &h, 1, same)?;
        let mut h = self.norm(&norm2, &h)?;
        ops::swish_in_place(&mut h.data);
        let mut h = self.conv(&conv2, &h, 1, same)?;
        let residual = match &shortcut {
            Some(l) => self.conv(l, &x, 1, Padding::default())?,
            None => x,
        };
        add_in_place(&mut h.data, &residual.data);
        Ok(h)
    }

    fn attention(&self, prefix: &str, c: usize, x: Activation) -> Result<Activation> {
        let (norm, [q, k, v, proj]) = attn_layers(prefix, c);
        let none = Padding::default();
        let h = self.norm(&norm, &x)?;
        let (q, k, v) = (self.conv(&q, &h, 1, none)?, self.conv(&k, &h, 1, none)?, self.conv(&v, &h, 1, none)?);
        let s = SpatialAttentionShape { batch: 1, positions: x.side * x.side, channels: c };
        let mut a = vec![0.0; s.len()];
        ops::spatial_attention(&mut a, &q.data, &k.data, &v.data, &s).map_err(|e| layer_err(prefix, e))?;
        let mut out = self.conv(&proj, &Activation { data: a, ..x.clone() }, 1, none)?;
        add_in_place(&mut out.data, &x.data);
        Ok(out)
    }
}

fn add_in_place(acc: &mut [f32], x: &[f32]) {
    dm_runtime::cpu::elementwise::add_assign(acc, x);
}

fn layer_err(layer: &str, e: dm_runtime::RuntimeError) -> ModelError {
    ModelError::Config(format!("VQGAN layer `{layer}`: {e}"))
}
