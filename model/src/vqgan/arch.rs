//! The VQGAN's architecture, written once as a list of stages per network: the parameter list
//! (names and shapes), the FLOP count and the forward pass are all derived from it.
//!
//! As vqgan-jax (after taming-transformers) defines it, with NHWC activations:
//! - encoder: `conv_in`; per level `i` (resolution `R/2^i`): `down_i.block_j` (j < num_res_blocks)
//!   each followed by `down_i.attn_j` when the level has attention, then `down_i.downsample`
//!   except at the last level; `mid.block_1`, `mid.attn_1`, `mid.block_2`; `norm_out`, swish,
//!   `conv_out`; then `quant_conv` (1×1, z_channels → embed_dim).
//! - decoder: `post_quant_conv` (1×1, embed_dim → z_channels); `conv_in`; the same mid; levels
//!   from the lowest resolution up: `up_i.block_j` (j ≤ num_res_blocks) with optional `up_i.attn_j`,
//!   then `up_i.upsample` except at level 0 (`up_0` is the highest resolution); `norm_out`,
//!   swish, `conv_out`.
//! - ResNet block: norm1, swish, conv1 (3×3), norm2, swish, conv2 (3×3), plus the input, through
//!   `nin_shortcut` (1×1) when the channel count changes.
//! - attention block: norm, `q`/`k`/`v` 1×1, single-head attention over positions, `proj_out`
//!   1×1, plus the input.

use super::config::VqganConfig;

/// A convolution with its Flax name (`<name>.kernel` HWIO, `<name>.bias`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvLayer {
    pub name: String,
    pub kernel: usize,
    pub cin: usize,
    pub cout: usize,
}

/// One stage of a network, applied to the running activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// A same-size convolution (3×3 with padding 1, or 1×1).
    Conv(ConvLayer),
    ResnetBlock {
        prefix: String,
        cin: usize,
        cout: usize,
    },
    AttnBlock {
        prefix: String,
        channels: usize,
    },
    /// Pad bottom/right by 1, then the 3×3 stride-2 convolution `<prefix>.conv`.
    Downsample(ConvLayer),
    /// Nearest ×2 upsampling, then the 3×3 convolution `<prefix>.conv`.
    Upsample(ConvLayer),
    /// GroupNorm `<name>` followed by swish.
    NormSwish {
        name: String,
        channels: usize,
    },
}

fn conv(name: String, kernel: usize, cin: usize, cout: usize) -> ConvLayer {
    ConvLayer { name, kernel, cin, cout }
}

fn mid(prefix: &str, c: usize) -> [Stage; 3] {
    [
        Stage::ResnetBlock { prefix: format!("{prefix}.mid.block_1"), cin: c, cout: c },
        Stage::AttnBlock { prefix: format!("{prefix}.mid.attn_1"), channels: c },
        Stage::ResnetBlock { prefix: format!("{prefix}.mid.block_2"), cin: c, cout: c },
    ]
}

/// Image `[R, R, in_channels]` → the latents the quantizer sees `[R/2^(L−1), …, embed_dim]`.
pub fn encoder(cfg: &VqganConfig) -> Vec<Stage> {
    let mut s = vec![Stage::Conv(conv("encoder.conv_in".into(), 3, cfg.in_channels, cfg.ch))];
    let mut c = cfg.ch;
    for (i, mult) in cfg.ch_mult.iter().enumerate() {
        let cout = cfg.ch * mult;
        for j in 0..cfg.num_res_blocks {
            s.push(Stage::ResnetBlock { prefix: format!("encoder.down_{i}.block_{j}"), cin: c, cout });
            c = cout;
            if cfg.has_attention(i) {
                s.push(Stage::AttnBlock { prefix: format!("encoder.down_{i}.attn_{j}"), channels: c });
            }
        }
        if i + 1 != cfg.levels() {
            s.push(Stage::Downsample(conv(format!("encoder.down_{i}.downsample.conv"), 3, c, c)));
        }
    }
    s.extend(mid("encoder", c));
    s.push(Stage::NormSwish { name: "encoder.norm_out".into(), channels: c });
    s.push(Stage::Conv(conv("encoder.conv_out".into(), 3, c, cfg.z_channels)));
    s.push(Stage::Conv(conv("quant_conv".into(), 1, cfg.z_channels, cfg.embed_dim)));
    s
}

/// Quantized latents `[R/2^(L−1), …, embed_dim]` → image `[R, R, out_ch]`.
pub fn decoder(cfg: &VqganConfig) -> Vec<Stage> {
    let mut c = cfg.ch * cfg.ch_mult[cfg.levels() - 1];
    let mut s = vec![
        Stage::Conv(conv("post_quant_conv".into(), 1, cfg.embed_dim, cfg.z_channels)),
        Stage::Conv(conv("decoder.conv_in".into(), 3, cfg.z_channels, c)),
    ];
    s.extend(mid("decoder", c));
    for i in (0..cfg.levels()).rev() {
        let cout = cfg.ch * cfg.ch_mult[i];
        for j in 0..=cfg.num_res_blocks {
            s.push(Stage::ResnetBlock { prefix: format!("decoder.up_{i}.block_{j}"), cin: c, cout });
            c = cout;
            if cfg.has_attention(i) {
                s.push(Stage::AttnBlock { prefix: format!("decoder.up_{i}.attn_{j}"), channels: c });
            }
        }
        if i != 0 {
            s.push(Stage::Upsample(conv(format!("decoder.up_{i}.upsample.conv"), 3, c, c)));
        }
    }
    s.push(Stage::NormSwish { name: "decoder.norm_out".into(), channels: c });
    s.push(Stage::Conv(conv("decoder.conv_out".into(), 3, c, cfg.out_ch)));
    s
}

/// The codebook's Flax name (`[n_embed, embed_dim]`).
pub const CODEBOOK: &str = "quantize.embedding.embedding";

/// What kind of tensor a parameter is (for random initialisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Kernel { fan_in: usize },
    Bias,
    NormScale,
    Codebook,
}

/// One parameter: Flax name ('.'-joined), shape, kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

fn conv_params(l: &ConvLayer, out: &mut Vec<ParamSpec>) {
    out.push(ParamSpec {
        name: format!("{}.kernel", l.name),
        shape: vec![l.kernel, l.kernel, l.cin, l.cout],
        kind: ParamKind::Kernel { fan_in: l.kernel * l.kernel * l.cin },
    });
    out.push(ParamSpec { name: format!("{}.bias", l.name), shape: vec![l.cout], kind: ParamKind::Bias });
}

fn norm_params(name: &str, c: usize, out: &mut Vec<ParamSpec>) {
    out.push(ParamSpec { name: format!("{name}.scale"), shape: vec![c], kind: ParamKind::NormScale });
    out.push(ParamSpec { name: format!("{name}.bias"), shape: vec![c], kind: ParamKind::Bias });
}

/// The ResNet block's sub-layers: (norm1, conv1, norm2, conv2, optional nin_shortcut).
pub fn resnet_layers(
    prefix: &str,
    cin: usize,
    cout: usize,
) -> (String, ConvLayer, String, ConvLayer, Option<ConvLayer>) {
    (
        format!("{prefix}.norm1"),
        conv(format!("{prefix}.conv1"), 3, cin, cout),
        format!("{prefix}.norm2"),
        conv(format!("{prefix}.conv2"), 3, cout, cout),
        (cin != cout).then(|| conv(format!("{prefix}.nin_shortcut"), 1, cin, cout)),
    )
}

/// The attention block's 1×1 projections `q`, `k`, `v`, `proj_out`, and its norm's name.
pub fn attn_layers(prefix: &str, c: usize) -> (String, [ConvLayer; 4]) {
    let p = |n: &str| conv(format!("{prefix}.{n}"), 1, c, c);
    (format!("{prefix}.norm"), [p("q"), p("k"), p("v"), p("proj_out")])
}

fn stage_params(stage: &Stage, out: &mut Vec<ParamSpec>) {
    match stage {
        Stage::Conv(l) | Stage::Downsample(l) | Stage::Upsample(l) => conv_params(l, out),
        Stage::NormSwish { name, channels } => norm_params(name, *channels, out),
        Stage::ResnetBlock { prefix, cin, cout } => {
            let (n1, c1, n2, c2, short) = resnet_layers(prefix, *cin, *cout);
            norm_params(&n1, *cin, out);
            conv_params(&c1, out);
            norm_params(&n2, *cout, out);
            conv_params(&c2, out);
            if let Some(s) = short {
                conv_params(&s, out);
            }
        }
        Stage::AttnBlock { prefix, channels } => {
            let (norm, projections) = attn_layers(prefix, *channels);
            norm_params(&norm, *channels, out);
            projections.iter().for_each(|l| conv_params(l, out));
        }
    }
}

/// Every parameter of the model, sorted by name (the order Flax flattens them in).
pub fn param_specs(cfg: &VqganConfig) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    for stage in encoder(cfg).iter().chain(&decoder(cfg)) {
        stage_params(stage, &mut out);
    }
    out.push(ParamSpec { name: CODEBOOK.into(), shape: vec![cfg.n_embed, cfg.embed_dim], kind: ParamKind::Codebook });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Forward FLOPs of `stages` on a `side × side` input (convolutions and attention products).
pub fn flops(stages: &[Stage], mut side: usize) -> f64 {
    let conv = |l: &ConvLayer, side: usize| 2.0 * (side * side * l.kernel * l.kernel * l.cin * l.cout) as f64;
    let mut total = 0.0;
    for stage in stages {
        total += match stage {
            Stage::Conv(l) => conv(l, side),
            Stage::Downsample(l) => {
                side /= 2;
                conv(l, side)
            }
            Stage::Upsample(l) => {
                side *= 2;
                conv(l, side)
            }
            Stage::NormSwish { .. } => 0.0,
            Stage::ResnetBlock { prefix, cin, cout } => {
                let (_, c1, _, c2, short) = resnet_layers(prefix, *cin, *cout);
                conv(&c1, side) + conv(&c2, side) + short.map_or(0.0, |s| conv(&s, side))
            }
            Stage::AttnBlock { prefix, channels } => {
                let (_, projections) = attn_layers(prefix, *channels);
                let n = (side * side) as f64;
                projections.iter().map(|l| conv(l, side)).sum::<f64>() + 4.0 * n * n * *channels as f64
            }
        };
    }
    total
}
